"""GRPO on the box step: reward values on hand-written completions, rows from the store, config
checks, and a 2-step run on the tiny model that moves LoRA and leaves a loadable adapter."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import pytest
from conftest import ScriptedTwoStep
from PIL import Image

from visrl.boxes import Box
from visrl.contract import TwoStepContract
from visrl.errors import ConfigError
from visrl.prompts import box_prompt
from visrl.train.config import TrainConfig, load_train_config
from visrl.train.grpo import (
    AnswerReward,
    FormatReward,
    IoUReward,
    default_parse,
    grpo_rows,
    message_text,
)

BASE = {"stage": "grpo", "model_name_or_path": "m", "output_dir": "o",
        "per_device_train_batch_size": 2, "num_generations": 2}
IMAGE = Image.new("RGB", (100, 100), "white")  # square: Visual-CoT values are plain fractions
GT = [0.0, 0.0, 50.0, 50.0]
VISCOT = TwoStepContract(box_format="viscot")


# ---------------------------------------------------------------------- rewards

@pytest.mark.parametrize("completion, expected_iou, expected_format", [
    ([{"role": "assistant", "content": "[0.00, 0.00, 0.50, 0.50]"}], 1.0, 1.0),
    ([{"role": "assistant", "content": [{"type": "text", "text": "[0.25, 0.00, 0.75, 0.50]"}]}], 1 / 3, 1.0),
    ("[0.00, 0.00, 0.25, 0.50]", 0.5, 1.0),
    ([{"role": "assistant", "content": "[0.50, 0.50, 1.00, 1.00]"}], 0.0, 1.0),  # touches at a corner
    ([{"role": "assistant", "content": "the red square, I think"}], 0.0, 0.0),
    ([{"role": "assistant", "content": "[0.1, nan, 0.3, 0.4]"}], 0.0, 0.0),
    ([{"role": "assistant", "content": ""}], 0.0, 0.0),
])
def test_iou_and_format_rewards(completion: Any, expected_iou: float, expected_format: float) -> None:
    parse = default_parse(VISCOT)
    kwargs = {"prompts": [box_prompt("q?")], "completions": [completion], "gt_box": [GT], "images": [[IMAGE]]}
    assert IoUReward(parse)(**kwargs) == [pytest.approx(expected_iou, abs=1e-9)]
    assert FormatReward(parse)(**kwargs) == [expected_format]


def test_iou_reward_uses_each_rows_image_size() -> None:
    """Visual-CoT pads to a square: on a 200x100 image [0, .25, .5, .75] is x 0-100, y 0-100."""
    wide = Image.new("RGB", (200, 100))
    out = IoUReward(default_parse(VISCOT))(
        completions=["[0.00, 0.25, 0.50, 0.75]"] * 2, gt_box=[[0, 0, 100, 100], [0, 0, 50, 100]],
        images=[[wide], [wide]])
    assert out == [pytest.approx(1.0), pytest.approx(0.5)]


def test_reward_names_are_the_logged_metric_names() -> None:
    from trl.trainer.utils import get_callable_name

    parse = default_parse(VISCOT)
    names = [get_callable_name(r) for r in (IoUReward(parse), FormatReward(parse), AnswerReward(None, parse, 8))]
    assert names == ["iou", "format", "answer"]


class CannedReasoner(ScriptedTwoStep):
    """A scripted two-step policy: it answers by the width of the crop the production code cut and
    put in the answer prompt ("red" for the 50 px wide right crop)."""

    def __init__(self) -> None:
        import torch

        super().__init__()
        self.model = torch.nn.Linear(1, 1)
        self.calls: list[list[str]] = []

    def generate(self, conversations: list, sampling: Any, progress: bool = False) -> list[list[str]]:
        assert sampling.greedy and sampling.max_new_tokens == 8
        assert not self.model.training  # answers are generated in eval mode
        self.calls.append([self.box_text(c) for c in conversations])
        return super().generate(conversations, sampling)

    def reply(self, conversation: list, sampling: Any) -> list[str]:
        return ["red" if self.crop_image(conversation).width == 50 else "blue"]


def test_answer_reward_judges_the_answer_on_each_sampled_crop() -> None:
    reasoner = CannedReasoner()
    completions = ["[0.00, 0.00, 0.50, 0.50]", "[0.00, 0.00, 0.25, 0.50]", "no box", "[0, 0, 0.5, 0.5]"]
    out = AnswerReward(reasoner, default_parse(VISCOT), max_new_tokens=8)(
        completions=completions, images=[[IMAGE]] * 4, question=["colour?"] * 4,
        references=[["Red"], ["red"], ["red"], [""]])
    # right crop -> "red" (1.0); narrow crop -> "blue" (0.0); no box -> 0.0; no reference -> None
    assert out == [1.0, 0.0, 0.0, None]
    assert reasoner.calls == [completions[:2]]  # one batched answer step, boxed completions only
    assert reasoner.model.training  # training mode restored


def test_message_text_reads_every_completion_shape() -> None:
    assert message_text("[1, 2, 3, 4]") == "[1, 2, 3, 4]"
    assert message_text([{"role": "assistant", "content": "a"}]) == "a"
    assert message_text({"role": "user", "content": [{"type": "image", "text": None},
                                                      {"type": "text", "text": "q?"}]}) == "q?"


# ---------------------------------------------------------------------- config

def test_unknown_grpo_key_is_rejected_by_name(tmp_path: Path) -> None:
    path = tmp_path / "grpo.yaml"
    path.write_text("stage: grpo\nmodel_name_or_path: m\noutput_dir: o\nper_device_train_batch_size: 2\n"
                    "num_generation: 2\nmax_completion_len: 16\n")
    with pytest.raises(ConfigError) as info:
        load_train_config(path)
    message = str(info.value)
    assert ("unknown key(s) max_completion_len (did you mean max_completion_length?), "
            "num_generation (did you mean num_generations?)") in message
    assert "num_generations" in message and "max_completion_length" in message  # the valid spellings


@pytest.mark.parametrize("override, fragment", [
    ({"num_generations": 1}, "num_generations must be >= 2"),
    ({"per_device_train_batch_size": 3}, "(3) must be a multiple of num_generations (2)"),
    ({"max_completion_length": 0}, "max_completion_length must be >= 1, got 0"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"grpo_beta": -0.1}, "grpo_beta must be >= 0, got -0.1"),
])
def test_bad_grpo_values_name_the_value(override: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        TrainConfig(**{**BASE, **override})
    assert fragment in str(info.value)


def test_group_divisibility_only_binds_grpo() -> None:
    cfg = TrainConfig(stage="sft", model_name_or_path="m", output_dir="o")  # batch 1, 8 generations
    assert cfg.num_generations == 8
    assert TrainConfig(**{**BASE, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 2})


def test_shipped_grpo_configs_load() -> None:
    root = Path(__file__).resolve().parent.parent / "configs"
    for path in (root / "train_grpo.yaml", root / "demo" / "train_grpo.yaml"):
        cfg = load_train_config(path)
        assert cfg.stage == "grpo"
        assert (cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps) % cfg.num_generations == 0


# ---------------------------------------------------------------------- rows and a real run

def add_boxed_items(store: Any, n: int = 4) -> None:
    ds = store.add_dataset("boxes", "test")
    for i in range(n):
        Image.new("RGB", (64, 48), (60 * i, 100, 30)).save(store.workspace.images_dir / f"{i}.png")
        store.add_items(ds, [{"image": f"images/{i}.png", "width": 64, "height": 48,
                              "question": f"What colour is square {i}?", "answer": "red",
                              "gt_box": "[4, 4, 30, 30]", "split": "train", "source_id": str(i)}])
    store.add_items(ds, [{"image": "images/0.png", "width": 64, "height": 48, "question": "no box?",
                          "answer": "x", "split": "train", "source_id": "nobox"}])


def test_grpo_rows_are_box_prompts_with_gt_boxes(store: Any) -> None:
    add_boxed_items(store, n=2)
    cfg = TrainConfig(**BASE)
    rows = grpo_rows(cfg, store, store.workspace)
    assert len(rows) == 2  # the item without a box is left out
    row = rows[0]
    assert row["prompt"] == box_prompt("What colour is square 0?")
    assert row["gt_box"] == [4.0, 4.0, 30.0, 30.0] and row["references"] == ["red"]
    assert [im.size for im in row["images"]] == [(64, 48)]


def test_grpo_rows_from_an_sft_export(store: Any, tmp_path: Path) -> None:
    from visrl.formats.trl import save_dataset, sft_rows

    add_boxed_items(store, n=2)
    folder = save_dataset(sft_rows(store, store.workspace), tmp_path / "export")
    rows = grpo_rows(TrainConfig(**{**BASE, "dataset": str(folder)}), store, store.workspace)
    assert [r["question"] for r in rows] == ["What colour is square 0?", "What colour is square 1?"]
    assert rows[0]["prompt"] == box_prompt("What colour is square 0?")
    # Visual-CoT keeps 2 decimals of the padded square (64 px): pixel corners within 0.5 px.
    assert rows[0]["gt_box"] == pytest.approx([4, 4, 30, 30], abs=0.5)


def test_no_boxed_items_is_a_data_error(store: Any) -> None:
    from visrl.errors import DataError

    with pytest.raises(DataError, match="no items with a ground-truth box"):
        grpo_rows(TrainConfig(**BASE), store, store.workspace)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    torch.set_num_threads(1)
    from visrl.tiny import build_tiny_model

    return Path(build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny", preset="test", seed=0))


def text_box(text: str, image: Image.Image) -> Box:
    """A box read from *any* text: a random tiny model writes no real boxes, so with the real
    parser every reward is 0, advantages are 0 and nothing would move. This keeps the rewards real
    functions of the completions (different texts, different IoUs)."""
    code = zlib.crc32(text.encode())
    return Box(0, 0, 1 + code % image.width, 1 + (code >> 8) % image.height)


@pytest.mark.slow
def test_two_grpo_steps_move_lora_and_save_a_loadable_adapter(
        tiny_dir: Path, store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import visrl.train.grpo as grpo
    import visrl.train.run as run
    from visrl.models import load_model
    from visrl.reasoning import Reasoner

    torch.manual_seed(0)
    monkeypatch.setattr(grpo, "default_parse", lambda fmt: text_box)
    add_boxed_items(store)
    built: dict[str, Any] = {}
    build = run.build_trainer

    def keep(*args: Any) -> Any:
        trainer = build(*args)
        built["trainer"] = trainer
        built["before"] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        return trainer

    monkeypatch.setattr(run, "build_trainer", keep)
    answered: list[tuple[Any, list[list[str]]]] = []
    real_answer = Reasoner.answer

    def spy(self: Reasoner, *args: Any, **kwargs: Any) -> list[list[str]]:
        out = real_answer(self, *args, **kwargs)
        answered.append((self.model, out))
        return out

    monkeypatch.setattr(Reasoner, "answer", spy)
    cfg = TrainConfig(stage="grpo", model_name_or_path=str(tiny_dir), output_dir="models/grpo",
                      max_steps=2, per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=16, learning_rate=1e-2, lora_rank=4, bf16=False,
                      gradient_checkpointing=False, grpo_answer_reward=True, save_steps=100)
    result = run.train(store.workspace, cfg)

    assert result.global_step == 2 and not result.stopped and result.stage == "grpo"
    trainer = built["trainer"]
    after = dict(trainer.model.named_parameters())
    changed = {n for n, p in built["before"].items() if not torch.equal(p, after[n].detach())}
    assert any("language_model" in n and "lora_" in n for n in changed)
    assert not any("lora_" not in n for n in changed)  # the base stays frozen
    # The answer step ran on the policy being trained: a step is 4 completions (2 items x 2 boxes).
    assert [len(out) for _, out in answered] == [4, 4]
    assert all(model is trainer.model for model, _ in answered)
    assert all(isinstance(group[0], str) for _, out in answered for group in out)
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert {"rewards/iou/mean", "rewards/format/mean", "rewards/answer/mean"} <= logged
    out = store.workspace.models_dir / "grpo"
    assert (out / "adapter_model.safetensors").is_file()
    loaded = load_model(str(tiny_dir), adapter=str(out), device="cpu")
    assert loaded.adapter and loaded.box_format == "viscot"
    [record] = store.checkpoints()
    assert (record["path"], record["stage"]) == ("models/grpo", "grpo")


# ---------------------------------------------------------------------- the answer reward alone

ANSWER_ONLY = {**BASE, "grpo_iou_reward": False, "grpo_answer_reward": True}


def test_answer_only_rows_read_no_box(store: Any) -> None:
    add_boxed_items(store, n=2)
    ds = store.dataset("boxes")["id"]
    store.add_items(ds, [{"image": "images/1.png", "width": 64, "height": 48, "question": "unanswered?",
                          "answer": "", "split": "train", "source_id": "noanswer"}])
    rows = grpo_rows(TrainConfig(**ANSWER_ONLY), store, store.workspace)
    # The unboxed item is a row now; the one without a reference answer is not (nothing to judge).
    assert [r["question"] for r in rows] == ["What colour is square 0?", "What colour is square 1?", "no box?"]
    assert all("gt_box" not in r for r in rows)
    assert rows[2]["references"] == ["x"] and rows[2]["prompt"] == box_prompt("no box?")


def test_answer_only_rows_from_an_export_keep_rows_without_a_box(store: Any, tmp_path: Path) -> None:
    from visrl.formats.trl import save_dataset, sft_rows

    add_boxed_items(store, n=2)
    folder = save_dataset(sft_rows(store, store.workspace), tmp_path / "export")
    rows = grpo_rows(TrainConfig(**{**ANSWER_ONLY, "dataset": str(folder)}), store, store.workspace)
    assert [(r["question"], r["references"]) for r in rows] == [
        ("What colour is square 0?", ["red"]), ("What colour is square 1?", ["red"])]
    assert all("gt_box" not in r for r in rows)


def test_answer_only_with_no_answers_is_a_data_error(store: Any) -> None:
    from visrl.errors import DataError

    with pytest.raises(DataError, match="no items with a reference answer"):
        grpo_rows(TrainConfig(**ANSWER_ONLY), store, store.workspace)


def test_grpo_without_any_task_reward_is_refused() -> None:
    with pytest.raises(ConfigError, match="grpo_iou_reward and grpo_answer_reward are both false"):
        TrainConfig(**{**BASE, "grpo_iou_reward": False})
    # Other stages never read the grpo rewards.
    assert TrainConfig(stage="sft", model_name_or_path="m", output_dir="o", grpo_iou_reward=False)


def test_demo_answer_only_recipe_loads() -> None:
    cfg = load_train_config(Path(__file__).resolve().parent.parent / "configs" / "demo" / "train_grpo_answer.yaml")
    assert (cfg.stage, cfg.grpo_iou_reward, cfg.grpo_answer_reward) == ("grpo", False, True)
    assert cfg.adapter_name_or_path is None  # it starts from a model that boxes: no SFT adapter needed


@pytest.mark.slow
def test_answer_only_grpo_runs_on_unboxed_items(tiny_dir: Path, store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from trl.trainer.utils import get_callable_name

    import visrl.train.grpo as grpo
    import visrl.train.run as run

    torch.manual_seed(0)
    monkeypatch.setattr(grpo, "default_parse", lambda fmt: text_box)
    add_boxed_items(store)
    # Delete every annotated box: the run must not need them.
    with store.atomic():
        for item in store.items():
            store.db["items"].update(item["id"], {"gt_box": None})
    built: dict[str, Any] = {}
    build = run.build_trainer

    def keep(*args: Any) -> Any:
        built["trainer"] = build(*args)
        return built["trainer"]

    monkeypatch.setattr(run, "build_trainer", keep)
    cfg = TrainConfig(stage="grpo", model_name_or_path=str(tiny_dir), output_dir="models/grpo-answer",
                      max_steps=2, per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=16, learning_rate=1e-2, lora_rank=4, bf16=False,
                      gradient_checkpointing=False, grpo_iou_reward=False, grpo_answer_reward=True,
                      save_steps=100)
    result = run.train(store.workspace, cfg)

    assert result.global_step == 2 and not result.stopped
    trainer = built["trainer"]
    assert [get_callable_name(f) for f in trainer.reward_funcs] == ["format", "answer"]
    assert len(trainer.train_dataset) == 5 and "gt_box" not in trainer.train_dataset.column_names
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert {"rewards/format/mean", "rewards/answer/mean"} <= logged
    assert not any(k.startswith("rewards/iou") for k in logged)
    assert (store.workspace.models_dir / "grpo-answer" / "adapter_model.safetensors").is_file()
