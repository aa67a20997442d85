"""Training stages: config checks, the stage-2 loss against a hand computation, LoRA targets,
stop/resume with a loadable checkpoint. Model tests use the tiny model (a few steps, batch 2)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from visrl.errors import ConfigError
from visrl.prompts import answer_prompt, assistant, box_prompt
from visrl.train.config import LANGUAGE_MODEL_TARGET, TrainConfig, load_train_config

BASE = {"stage": "dpo", "model_name_or_path": "models/tiny", "output_dir": "models/out"}


# ---------------------------------------------------------------------- config

def test_unknown_keys_are_rejected_by_name(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("stage: sft\nmodel_name_or_path: m\noutput_dir: o\nlearning_rat: 1e-5\nlora_rnak: 4\n")
    with pytest.raises(ConfigError) as info:
        load_train_config(path)
    assert "learning_rat" in str(info.value) and "lora_rnak" in str(info.value)


def test_yaml_spellings_are_coerced(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("stage: visrl\nmodel_name_or_path: m\noutput_dir: o\nlearning_rate: 5e-6\n"
                    "resume_from_checkpoint: false\npair_status: accepted\n")
    cfg = load_train_config(path, {"max_steps": 3})
    assert cfg.learning_rate == 5e-6 and cfg.max_steps == 3
    assert cfg.resume_from_checkpoint is False and cfg.pair_status == ["accepted"]


@pytest.mark.parametrize("override, fragment", [
    ({"stage": "ppo"}, "'ppo'"),
    ({"stage": "grpo", "num_generations": 3, "per_device_train_batch_size": 2}, "multiple of num_generations (3)"),
    ({"finetuning_type": "qlora"}, "'qlora'"),
    ({"lora_dropout": 1.5}, "1.5"),
    ({"warmup_ratio": 1.0}, "1.0"),
    ({"max_steps": 0}, "got 0"),
    ({"pair_status": ["good"]}, "'good'"),
    ({"lora_rank": 0}, "lora_rank must be >= 1, got 0"),
    ({"box_weight": 0.0, "answer_weight": 0.0}, "not both 0"),
    ({"box_format": "xyxy"}, "'xyxy'"),
    ({"pref_loss": "orpo"}, "pref_loss 'orpo' is not a loss trl's DPOTrainer has"),
    ({"pref_loss": "simpo"}, "use one of sigmoid, hinge"),
    ({"learning_rate": 0.0}, "learning_rate must be > 0, got 0.0"),
    ({"pref_ftx": -1.0}, "pref_ftx must be >= 0 (the SFT term's weight), got -1.0"),
    ({"pref_ftx": 1.0, "pref_loss": "sft"}, "pref_loss is already sft"),
    ({"pref_beta": -0.1}, "pref_beta must be > 0, got -0.1"),
    ({"box_weight": -0.5}, "got -0.5 and 0.5"),
    ({"lora_alpha": 0}, "lora_alpha must be >= 1 or null, got 0"),
    ({"save_total_limit": 0}, "save_total_limit must be >= 1 or null, got 0"),
    ({"max_length": 0}, "max_length must be >= 1 or null, got 0"),
    ({"weight_decay": -0.01}, "weight_decay must be >= 0, got -0.01"),
    ({"crop_margin": -0.1}, "crop_margin must be >= 0, got -0.1"),
    ({"image_max_pixels": 100}, "image_max_pixels must be >= 784"),
    ({"image_min_pixels": 100}, "image_min_pixels must be >= 784 (one 28x28 unit) or null, got 100"),
    ({"full_max_pixels": 0}, "full_max_pixels must be >= 784 (one 28x28 unit) or null, got 0"),
    ({"crop_min_pixels": 1.5e5}, "crop_min_pixels must be >= 784 (one 28x28 unit) or null, got 150000.0"),
    ({"image_min_pixels": 4096, "image_max_pixels": 2048}, "image_min_pixels (4096) must not exceed image_max_pixels"),
    ({"crop_margin": 11.0}, "crop_margin must be in [0.0, 10.0], got 11.0"),
    ({"lr_scheduler_type": "cosin"}, "'cosin'"),
])
def test_bad_values_name_the_value(override: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        TrainConfig(**{**BASE, **override})
    assert fragment in str(info.value)


def test_every_contract_key_of_a_run_reaches_its_contract(tmp_path: Path) -> None:
    """The run's contract keys are TrainConfig fields (a seed config's image_min_pixels is one,
    not an ignored key) and training_contract takes each of them over the checkpoint's record."""
    from visrl.contract import TwoStepContract, write_contract
    from visrl.models import ModelSource
    from visrl.train.lora import training_contract

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "qwen2_vl"}')
    write_contract(base, TwoStepContract(crop_margin=0.2, full_max_pixels=9999, crop_min_pixels=8888))
    path = tmp_path / "train.yaml"
    path.write_text(f"stage: sft\nmodel_name_or_path: {base}\noutput_dir: o\nimage_min_pixels: 3136\n"
                    "image_max_pixels: 1003520\nfull_max_pixels: 401408\n")
    cfg = load_train_config(path)
    contract = training_contract(cfg, ModelSource(base))
    assert (contract.image_min_pixels, contract.image_max_pixels, contract.full_max_pixels) == (3136, 1003520, 401408)
    assert (contract.crop_min_pixels, contract.crop_margin) == (8888, 0.0)  # unset key: the checkpoint's; set: ours


@pytest.mark.parametrize("target, expected", [
    ("language_model", LANGUAGE_MODEL_TARGET),
    ("all", "all-linear"),
    ("q_proj, v_proj", ["q_proj", "v_proj"]),
    (r".*\.mlp\..*", r".*\.mlp\..*"),
])
def test_lora_targets(target: str, expected: Any) -> None:
    assert TrainConfig(**BASE, lora_target=target).lora_targets() == expected


@pytest.mark.parametrize("ftx, losses, weights", [
    (0.0, ["sigmoid"], [1.0]),
    (0.5, ["sigmoid", "sft"], [1.0, 0.5]),
])
def test_pref_ftx_adds_trls_sft_term(tmp_path: Path, ftx: float, losses: list[str], weights: list[float]) -> None:
    """pref_ftx is trl's own loss list: the preference loss plus "sft" (NLL of the chosen), weighted."""
    from visrl.train.dpo import dpo_args

    args = dpo_args(TrainConfig(**{**BASE, "stage": "dpo", "pref_ftx": ftx}), tmp_path, has_eval=False)
    assert (args.loss_type, args.loss_weights) == (losses, weights)


def test_pref_losses_are_exactly_trls() -> None:
    """DPO_LOSSES mirrors trl's list: an upgrade that adds or drops one shows up here. Read from
    the installed trl's source (importing trl takes ~10 s here): the dispatch in DPOTrainer."""
    import importlib.util
    import re
    from pathlib import Path

    from visrl.train.config import DPO_LOSSES

    spec = importlib.util.find_spec("trl")
    assert spec is not None and spec.origin is not None
    source = (Path(spec.origin).parent / "trainer" / "dpo_trainer.py").read_text()
    assert set(DPO_LOSSES) == set(re.findall(r'if loss_type == "(\w+)"', source))  # if / elif arms


SEED_RL = """\
### model
model_name_or_path: Qwen/Qwen2-VL-7B-Instruct
trust_remote_code: true
### method
stage: dpo
do_train: true
finetuning_type: lora
lora_target: all
pref_beta: 0.1
pref_loss: sigmoid
### dataset
dataset: demo_rl_data_stage1
template: qwen2_vl
cutoff_len: 2048
max_samples: 10000
overwrite_cache: true
preprocessing_num_workers: 16
### output
output_dir: saves/qwen2_vl-7b/lora/visrl-stage2
logging_steps: 10
save_steps: 200
plot_loss: true
overwrite_output_dir: true
### train
per_device_train_batch_size: 3
gradient_accumulation_steps: 8
learning_rate: 5.0e-6
num_train_epochs: 5.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
seed: 88
### eval
val_size: 0.1
per_device_eval_batch_size: 3
eval_strategy: steps
eval_steps: 200
"""


def test_the_visrl_seed_config_loads_with_its_ignored_keys_named(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "train_rl.yaml"
    path.write_text(SEED_RL + "train_on_prompt: true\n")
    with caplog.at_level("WARNING", logger="visrl.train.config"):
        cfg = load_train_config(path)
    assert (cfg.stage, cfg.max_length, cfg.assistant_only_loss, cfg.seed) == ("dpo", 2048, False, 88)
    assert (cfg.lora_target, cfg.learning_rate, cfg.val_size, cfg.bf16) == ("all", 5e-6, 0.1, True)
    [warning] = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    for key in ("do_train", "template", "trust_remote_code", "overwrite_cache", "preprocessing_num_workers",
                "plot_loss", "ddp_timeout", "max_samples", "overwrite_output_dir", "eval_steps"):
        assert key in warning
    assert "cutoff_len" not in warning and "train_on_prompt" not in warning  # mapped, not ignored


def test_the_visrl_seed_merge_config_loads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from visrl.jobs import validate_config
    from visrl.train.merge import load_merge_config

    path = tmp_path / "merge_lora.yaml"
    path.write_text("model_name_or_path: Qwen/Qwen2-VL-7B-Instruct\nadapter_name_or_path: saves/lora/stage2\n"
                    "template: qwen2_vl\nfinetuning_type: lora\ntrust_remote_code: true\n"
                    "export_dir: models/qwen2_vl-7b_visrl\nexport_size: 2\nexport_device: cpu\n"
                    "export_legacy_format: false\n")
    with caplog.at_level("WARNING", logger="visrl.train.config"):
        cfg = load_merge_config(path)
        assert validate_config("merge", path)["export_dir"] == "models/qwen2_vl-7b_visrl"  # a job too
    assert (cfg.export_dir, cfg.export_size) == ("models/qwen2_vl-7b_visrl", 2)
    assert all(key in caplog.text for key in ("template", "export_device", "export_legacy_format"))
    path.write_text(path.read_text() + "quantization_bit: 4\n")
    with pytest.raises(ConfigError, match="unknown key.*quantization_bit"):
        load_merge_config(path)


def test_foreign_keys_that_mean_nothing_known_stay_errors(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text(SEED_RL + "quantization_bit: 4\n")
    with pytest.raises(ConfigError, match="unknown key.*quantization_bit"):
        load_train_config(path)
    path.write_text(SEED_RL + "max_length: 4096\n")
    with pytest.raises(ConfigError, match="cutoff_len .2048 as max_length. contradicts max_length: 4096"):
        load_train_config(path)


@pytest.mark.slow
@pytest.mark.parametrize("overrides, adapted, not_adapted", [
    # LLaMA-Factory's `all`: every linear layer of the language model, none of the vision side.
    ({"lora_target": "all"}, {"language_model"}, {"visual", "lm_head"}),
    ({"lora_target": "language_model"}, {"language_model"}, {"visual", "lm_head"}),
    # Named targets do not reach the vision tower either (Qwen2.5-VL's vision MLP has gate_proj too).
    ({"lora_target": "q_proj,fc1"}, {"language_model"}, {"visual", "lm_head"}),
    # Unfrozen, the vision blocks and the merger are adapted, the patch embedding (a conv) never.
    ({"lora_target": "all", "freeze_vision_tower": False, "freeze_multi_modal_projector": False},
     {"language_model", "visual.blocks", "visual.merger"}, {"patch_embed", "lm_head"}),
    ({"lora_target": "all", "freeze_vision_tower": False}, {"language_model", "visual.blocks"}, {"visual.merger"}),
])
def test_lora_target_reaches_only_the_unfrozen_parts(
        tiny_dir: Path, overrides: dict[str, Any], adapted: set[str], not_adapted: set[str]) -> None:
    from peft import get_peft_model

    from visrl.models import load_model
    from visrl.train.lora import lora_config

    cfg = TrainConfig(**{**BASE, "lora_rank": 2, **overrides})
    model = get_peft_model(load_model(str(tiny_dir), dtype="float32", device="cpu").model, lora_config(cfg))
    wrapped = {name for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert all(any(part in name for name in wrapped) for part in adapted), sorted(wrapped)
    assert not any(part in name for name in wrapped for part in not_adapted), sorted(wrapped)


@pytest.mark.slow
def test_full_fine_tuning_freezes_the_vision_side(tiny_dir: Path) -> None:
    from visrl.train.lora import load_train_model

    cfg = TrainConfig(**{**BASE, "finetuning_type": "full", "bf16": False})
    model = load_train_model(cfg, str(tiny_dir), None).model
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any("visual" in name for name in trainable)
    assert any("language_model" in name for name in trainable)


def test_every_option_has_help() -> None:
    import dataclasses

    from visrl.train.merge import MergeConfig

    for cls in (TrainConfig, MergeConfig):
        assert all(f.metadata.get("help") for f in dataclasses.fields(cls)), cls


def test_shipped_configs_load() -> None:
    from visrl.config import load_config
    from visrl.train.merge import MergeConfig

    root = Path(__file__).resolve().parent.parent / "configs"
    for sub in ("", "demo/"):
        stages = [load_train_config(root / f"{sub}train_{name}.yaml").stage
                  for name in ("sft", "rl_stage1", "rl_stage2")]
        assert stages == ["sft", "dpo", "visrl"]
        assert load_config(MergeConfig, root / f"{sub}merge_lora.yaml").export_dir


# ---------------------------------------------------------------------- helpers (model tests)

def _image(color: Any, size: tuple[int, int]) -> Any:
    from PIL import Image

    return Image.new("RGB", size, color)


def stage2_rows(n: int = 2) -> list[dict[str, Any]]:
    """Rows in the layout of visrl.formats.trl.dpo_rows(stage=2), built by hand."""
    rows = []
    for i in range(n):
        full = _image((40 * i, 90, 160), (84, 56))
        question = f"What colour is square {i}?"
        good, bad = "[0.10, 0.20, 0.50, 0.60]", "[0.70, 0.70, 0.90, 0.95]"
        rows.append({
            "images": [full], "prompt": box_prompt(question),
            "chosen": assistant(good), "rejected": assistant(bad), "pair_id": 10 + i,
            "chosen_answer_images": [full, _image("red", (28, 28))],
            "chosen_answer_prompt": answer_prompt(question, good), "chosen_answer": assistant("red"),
            "rejected_answer_images": [full, _image("blue", (56, 28))],
            "rejected_answer_prompt": answer_prompt(question, bad),
            "rejected_answer": assistant("blue square"),
        })
    return rows


def to_dataset(rows: list[dict[str, Any]]) -> Any:
    from datasets import Dataset

    return Dataset.from_list(rows)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    torch.set_num_threads(1)
    from visrl.tiny import build_tiny_model
    return Path(build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny", preset="test", seed=0))


def make_trainer(tiny_dir: Path, out: Path, **overrides: Any) -> Any:
    from visrl.train.joint import build_visrl_trainer
    from visrl.train.lora import load_train_model

    cfg = TrainConfig(**{"stage": "visrl", "model_name_or_path": str(tiny_dir), "output_dir": str(out),
                         "max_steps": 1, "per_device_train_batch_size": 2, "learning_rate": 1e-2,
                         "resume_from_checkpoint": False, "lora_rank": 4, **overrides})
    tm = load_train_model(cfg, str(tiny_dir), None)
    return build_visrl_trainer(cfg, tm, to_dataset(stage2_rows()), None, out, [])


def hand_dpo_loss(model: Any, batch: dict[str, Any], beta: float) -> Any:
    """Sigmoid DPO from the model's plain logits; the reference is the adapter-disabled model."""
    import torch
    import torch.nn.functional as F

    mask = batch["completion_mask"][:, 1:].float()
    kwargs = {k: v for k, v in batch.items() if k != "completion_mask"}
    targets = batch["input_ids"][:, 1:, None]

    def sequence_logps(logits: Any) -> Any:
        token_logps = logits[:, :-1].float().log_softmax(-1).gather(-1, targets).squeeze(-1)
        return (token_logps * mask).sum(1)

    with torch.no_grad():
        policy = sequence_logps(model(**kwargs, use_cache=False).logits)
        with model.disable_adapter():
            ref = sequence_logps(model(**kwargs, use_cache=False).logits)
    chosen, rejected = policy.chunk(2)
    ref_chosen, ref_rejected = ref.chunk(2)
    return (-F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))).mean()


# ---------------------------------------------------------------------- model tests

@pytest.mark.slow
def test_stage2_loss_is_half_box_plus_half_answer_dpo(tiny_dir: Path, tmp_path: Path) -> None:
    import torch

    trainer = make_trainer(tiny_dir, tmp_path / "out", pref_beta=0.5)
    model = trainer.model
    torch.manual_seed(0)
    with torch.no_grad():  # a fresh LoRA equals its reference (B = 0): move it away
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.eval()
    batch = trainer.data_collator(stage2_rows())
    # Each side of the answer step sees its own crop: 2 chosen rows + 2 rejected rows, 2 images each.
    assert batch["answer"]["image_grid_thw"].shape[0] == 8
    assert batch["box"]["image_grid_thw"].shape[0] == 4
    box = hand_dpo_loss(model, batch["box"], beta=0.5)
    answer = hand_dpo_loss(model, batch["answer"], beta=0.5)
    assert abs(box.item() - answer.item()) > 1e-3  # the two steps really differ
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
    assert loss.item() == pytest.approx(0.5 * box.item() + 0.5 * answer.item(), rel=1e-4)
    assert trainer._metrics["eval"]["box/loss"][-1] == pytest.approx(box.item(), rel=1e-4)
    assert trainer._metrics["eval"]["answer/loss"][-1] == pytest.approx(answer.item(), rel=1e-4)


@pytest.mark.slow
def test_one_step_moves_lora_but_not_the_vision_tower(tiny_dir: Path, tmp_path: Path) -> None:
    import torch

    trainer = make_trainer(tiny_dir, tmp_path / "out")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    assert not any("visual" in n and "lora_" in n for n in before)  # default target: LM only
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = {n for n, p in before.items() if not torch.equal(p, after[n].detach())}
    assert any("language_model" in n and "lora_B" in n for n in changed)
    assert not any("visual" in n for n in changed)
    assert not any("lora_" not in n for n in changed)  # the base stays frozen
    logged = trainer.state.log_history[0]
    for key in ("box/rewards/accuracies", "answer/rewards/margins", "box/loss", "answer/loss"):
        assert key in logged


class StopAfter:
    """A Progress stand-in (same attributes the callback uses) that asks to stop at a step."""

    def __init__(self, stop_at: int) -> None:
        self.stop_at, self.stop_requested, self.total, self.steps = stop_at, False, 0, []
        self.begin: int | None = None
        self.metrics: dict[str, float] = {}

    def set_total(self, total: int) -> None:
        self.total = total

    def begin_at(self, step: int, message: str | None = None) -> None:
        self.begin = step

    def update(self, step: int | None = None, metrics: dict[str, float] | None = None,
               message: str | None = None, **_: Any) -> None:
        self.steps.append(step)
        self.metrics.update(metrics or {})
        self.stop_requested = step is not None and step >= self.stop_at


def test_a_run_records_the_step_it_started_at(store: Any) -> None:
    """A resumed job says where it resumed (the app joins its curve to the run it continues)."""
    from transformers import TrainerControl, TrainerState

    from visrl.progress import Progress
    from visrl.train.callbacks import ProgressCallback

    for begin, message in ((6, "resumed at step 6"), (0, None)):
        job = store.create_job("train", {}, name="sft")
        ProgressCallback(Progress(store, job, bar=False)).on_train_begin(
            None, TrainerState(global_step=begin, max_steps=8), TrainerControl())
        row = store.job(job)
        assert (row["start_step"], row["step"], row["total"], row["message"]) == (begin, begin, 8, message)


@pytest.mark.slow
def test_stop_leaves_a_loadable_checkpoint_and_resume_finishes(
        tiny_dir: Path, store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import visrl.train.run as run
    from visrl.models import load_model

    monkeypatch.setattr(run, "stage_rows", lambda cfg, store, ws, **_: stage2_rows(4))
    monkeypatch.setattr(run, "to_dataset", to_dataset)
    cfg = TrainConfig(stage="visrl", model_name_or_path=str(tiny_dir), output_dir="models/stage2",
                      max_steps=3, per_device_train_batch_size=2, save_steps=100, learning_rate=1e-3)
    progress = StopAfter(stop_at=1)
    first = run.train(store.workspace, cfg, progress=progress)
    assert first.stopped and first.global_step == 1 and progress.total == 3
    ckpt = store.workspace.models_dir / "stage2" / "checkpoint-1"
    assert first.path == ckpt and (ckpt / "adapter_model.safetensors").is_file()
    assert "box/loss" in progress.metrics
    loaded = load_model(str(tiny_dir), adapter=str(ckpt), device="cpu")
    assert loaded.model is not None
    [record] = store.checkpoints()
    assert record["path"] == "models/stage2/checkpoint-1" and record["stage"] == "visrl"

    progress = StopAfter(stop_at=99)
    second = run.train(store.workspace, cfg, progress=progress)
    assert not second.stopped and second.global_step == 3 and progress.begin == 1
    out = store.workspace.models_dir / "stage2"
    assert (out / "adapter_config.json").is_file()
    final = [c for c in store.checkpoints() if c["path"] == "models/stage2"]
    assert final and final[0]["pairs"] == "[10, 11, 12, 13]"


@pytest.mark.slow
def test_train_cli_runs_sft_in_a_job(tiny_dir: Path, store: Any, tmp_path: Path) -> None:
    """The CLI path end to end (rows from the store via visrl.formats.trl)."""
    from click.testing import CliRunner

    from visrl.cli import _register, cli
    from visrl.formats import trl as trl_format

    assert trl_format.sft_rows  # the real exporter turns store items into rows here
    ds = store.add_dataset("boxes", "test")
    for i in range(2):
        _image((60 * i, 100, 30), (64, 48)).save(store.workspace.images_dir / f"{i}.png")
        store.add_items(ds, [{"image": f"images/{i}.png", "width": 64, "height": 48,
                              "question": f"q{i}?", "answer": "red", "gt_box": "[4, 4, 30, 30]",
                              "split": "train", "source_id": str(i)}])
    config = tmp_path / "sft.yaml"
    config.write_text(f"stage: sft\nmodel_name_or_path: {tiny_dir}\noutput_dir: models/sft\n"
                      "max_steps: 1\nper_device_train_batch_size: 2\n")
    _register()
    result = CliRunner().invoke(cli, ["train", str(config), "--workspace", str(store.workspace.root)])
    assert result.exit_code == 0, result.output
    assert (store.workspace.models_dir / "sft" / "adapter_config.json").is_file()
    assert store.checkpoints()[-1]["stage"] == "sft"


@pytest.mark.slow
def test_training_writes_its_contract_and_loading_reads_it(tiny_dir: Path, store: Any, tmp_path: Path) -> None:
    """The box format, crop margin and pixel budget a run trains with travel in the checkpoint."""
    from visrl.contract import read_record
    from visrl.models import load_model
    from visrl.train.run import train

    ds = store.add_dataset("boxes", "test")
    for i in range(2):
        _image((60 * i, 100, 30), (64, 48)).save(store.workspace.images_dir / f"{i}.png")
        store.add_items(ds, [{"image": f"images/{i}.png", "width": 64, "height": 48, "question": f"q{i}?",
                              "answer": "red", "gt_box": "[4, 4, 30, 30]", "split": "train", "source_id": str(i)}])
    cfg = TrainConfig(stage="sft", model_name_or_path=str(tiny_dir), output_dir="models/sft25", max_steps=1,
                      per_device_train_batch_size=2, box_format="qwen2_5", crop_margin=0.1,
                      image_max_pixels=8000, bf16=False, gradient_checkpointing=False)
    result = train(store.workspace, cfg)
    record = read_record(result.path)
    assert (record["box_format"], record["crop_margin"], record["image_max_pixels"]) == ("qwen2_5", 0.1, 8000)
    assert record["base"]["path"] == str(tiny_dir.resolve())
    loaded = load_model(tiny_dir, adapter=result.path)
    assert (loaded.box_format, loaded.contract.crop_margin, loaded.contract.image_max_pixels) == ("qwen2_5", 0.1, 8000)
    grid = loaded.processor.image_processor(images=[_image((1, 2, 3), (640, 480))])["image_grid_thw"][0].tolist()
    assert grid[1] * grid[2] * 14 * 14 <= 8000  # the capped budget, not the processor's 112 x 112


def _adapter_keys(folder: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return set(f.keys())


def _files(folder: Path) -> set[str]:
    """Files of a run's folder; the per-rank RNG states of a checkpoint count as one kind."""
    import re

    return {re.sub(r"rng_state(_\d+)?\.pth$", "rng_state.pth", str(p.relative_to(folder)))
            for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_two_cpu_ranks_train_one_checkpoint_like_one_process(tiny_dir: Path, store: Any, tmp_path: Path) -> None:
    """SFT, then stage 2 on its adapter (merged base), under `accelerate launch` with 2 CPU ranks:
    two ranks really run, and the result is the single-process result's kind, written once."""
    from visrl.formats.trl import save_dataset
    from visrl.jobs import Launcher, start_job
    from visrl.train.run import train as run_train

    ws = store.workspace
    ds = store.add_dataset("boxes", "test")
    for i in range(4):
        _image((60 * i, 100, 30), (64, 48)).save(ws.images_dir / f"{i}.png")
        store.add_items(ds, [{"image": f"images/{i}.png", "width": 64, "height": 48, "question": f"q{i}?",
                              "answer": "red", "gt_box": "[4, 4, 30, 30]", "split": "train",
                              "source_id": str(i)}])
    save_dataset(stage2_rows(4), ws.root / "exports" / "stage2")
    common = f"model_name_or_path: {tiny_dir}\nmax_steps: 2\nper_device_train_batch_size: 1\nlora_rank: 4\n"
    configs = {}
    for tag in ("one", "two"):
        configs[tag, "sft"] = tmp_path / f"sft-{tag}.yaml"
        configs[tag, "sft"].write_text(f"stage: sft\n{common}output_dir: models/sft-{tag}\n")
        configs[tag, "visrl"] = tmp_path / f"visrl-{tag}.yaml"
        configs[tag, "visrl"].write_text(f"stage: visrl\n{common}output_dir: models/visrl-{tag}\n"
                                         f"adapter_name_or_path: models/sft-{tag}\ndataset: exports/stage2\n")
    for stage in ("sft", "visrl"):
        from visrl.train import load_train_config

        run_train(ws, load_train_config(configs["one", stage]))
        job_id = start_job(ws, "train", configs["two", stage], launcher=Launcher(num_processes=2, cpu=True))
        deadline = time.monotonic() + 120
        while store.job(job_id)["status"] in ("queued", "running", "stopping"):
            assert time.monotonic() < deadline, "the 2-rank job did not finish in 120 s"
            time.sleep(0.5)
        log = (ws.root / store.job(job_id)["log_path"]).read_text()
        assert store.job(job_id)["status"] == "succeeded", log[-3000:]
        assert log.count("visrl train: ") == 2  # two ranks chose their threads: two processes ran
        one, two = ws.models_dir / f"{stage}-one", ws.models_dir / f"{stage}-two"
        assert _files(one) == _files(two)
        assert (two / "checkpoint-2" / "rng_state_1.pth").is_file()  # the second rank's state
        assert _adapter_keys(one) == _adapter_keys(two)
    registered = [c["path"] for c in store.checkpoints()]
    assert sorted(registered) == sorted(["models/sft-one", "models/sft-two", "models/visrl-one",
                                         "models/visrl-two"])  # the main rank registers, once
    assert (ws.models_dir / "visrl-two" / "base" / "config.json").is_file()  # merged base, main rank


@pytest.mark.slow
def test_stage2_encodes_each_image_once_per_step_with_the_same_loss_and_gradients(
        tiny_dir: Path, tmp_path: Path) -> None:
    import torch

    def one_step(reuse: bool) -> tuple[float, dict[str, Any], Any]:
        trainer = make_trainer(tiny_dir, tmp_path / f"out-{reuse}")
        if not reuse:
            trainer.vision_cache.remove()
            trainer.vision_cache = None
        torch.manual_seed(0)
        with torch.no_grad():  # move the fresh LoRA away from its reference so the loss is not log 2
            for name, param in trainer.model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop otherwise
        batch = trainer._prepare_inputs(trainer.data_collator(stage2_rows()))
        loss = trainer.training_step(trainer.model, batch)
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        return loss.item(), grads, trainer.vision_cache

    plain_loss, plain_grads, _ = one_step(False)
    loss, grads, cache = one_step(True)
    # 2 pairs: 2 full images, the red crop (same in both pairs) and the blue one. Without the cache
    # the tower sees 24 images per step: box 4 rows x 2 passes, answer 4 rows x 2 images x 2 passes.
    assert (cache.encoded, cache.reused) == (4, 20)
    assert cache.entries == []  # freed after the step
    assert loss == pytest.approx(plain_loss, rel=1e-5)
    assert grads.keys() == plain_grads.keys() and grads
    for name, grad in grads.items():
        assert torch.allclose(grad, plain_grads[name], rtol=1e-4, atol=1e-6), name


def test_only_the_main_rank_writes_the_merged_base(tmp_path: Path) -> None:
    from visrl.train.lora import TrainModel, save_merged_base

    class Unsaveable:  # any write from a non-main rank would fail loudly here
        def save_pretrained(self, *args: Any) -> None:
            raise AssertionError("a non-main rank wrote the merged base")

    tm = TrainModel(model=Unsaveable(), processor=Unsaveable(), base_path="/base", merged_adapter="/sft")
    save_merged_base(tm, tmp_path / "base", write=False)
    assert tm.base_path == str(tmp_path / "base") and not (tmp_path / "base").exists()

# ---------------------------------------------------------------------- max_length never cuts image tokens

def _length_counter(tiny_dir: Path, **contract: Any) -> Any:
    from visrl.contract import TwoStepContract
    from visrl.models import load_processor
    from visrl.train.lengths import LengthCounter

    processor = load_processor(tiny_dir)
    budget = TwoStepContract(**contract)
    budget.apply_budget(processor)
    return LengthCounter(processor, budget.bound_to(processor))


@pytest.mark.parametrize("size", [(64, 48), (640, 480), (30, 900)])
def test_visual_tokens_are_the_processors_from_the_size_alone(tiny_dir: Path, size: tuple[int, int]) -> None:
    from visrl.train.lengths import visual_tokens

    counter = _length_counter(tiny_dir, image_max_pixels=200_000)
    image_processor = counter.processor.image_processor
    grid = image_processor(images=[_image((1, 2, 3), size)])["image_grid_thw"][0].tolist()
    assert visual_tokens(size, counter.contract) == grid[0] * grid[1] * grid[2] // image_processor.merge_size ** 2


def test_a_sequence_length_is_counted_as_the_processor_makes_it(tiny_dir: Path) -> None:
    from visrl.prompts import two_step_conversation

    counter = _length_counter(tiny_dir, image_max_pixels=200_000)
    messages = two_step_conversation("What colour is the square on the left?", "[0.1, 0.2, 0.3, 0.4]", "red")
    images = [_image((1, 2, 3), (640, 480)), _image((4, 5, 6), (120, 90))]
    text = counter.processor.apply_chat_template(messages, tokenize=False)
    made = counter.processor(text=[text], images=images)["input_ids"][0]
    sizes = [im.size for im in images]
    assert counter.exact(messages, sizes) == len(made)
    assert counter.exact(messages, sizes) <= counter.upper_bound(messages, sizes) <= len(made) + 300


def test_a_row_whose_image_tokens_would_be_cut_is_named(tiny_dir: Path) -> None:
    from visrl.errors import DataError
    from visrl.train.lengths import check_rows_fit

    counter = _length_counter(tiny_dir, image_max_pixels=200_000)
    small, large = _image((1, 2, 3), (64, 48)), _image((1, 2, 3), (640, 480))
    rows = [{**stage2_rows()[0], "pair_id": 7},
            {"images": [large], "prompt": box_prompt("Which colour?"), "chosen": assistant("[1, 2, 3, 4]"),
             "rejected": assistant("[5, 6, 7, 8]"), "pair_id": 9}]
    rows[0] = {**rows[0], "images": [small], "chosen_answer_images": [small, small],
               "rejected_answer_images": [small, small]}
    needed = counter.exact([*rows[1]["prompt"], *rows[1]["chosen"]], [large.size])
    assert needed > 200  # the 640x480 image alone is most of it
    with pytest.raises(DataError) as info:
        check_rows_fit(rows, needed - 1, counter)
    message = str(info.value)
    assert message.startswith(f"training row 1 (pair 9): its chosen sequence needs {needed} tokens")
    assert f"max_length is {needed - 1}" in message and "cut image tokens" in message
    check_rows_fit(rows, needed, counter)  # the whole sequence fits: nothing is cut
    check_rows_fit(rows, None, counter)  # no truncation at all


def test_training_refuses_rows_max_length_would_cut_before_the_model_loads(
        tiny_dir: Path, store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A seed config's cutoff_len (max_length) too short for its images stops the run by name."""
    from visrl.errors import DataError
    from visrl.train import run

    ds = store.add_dataset("boxes", "test")
    _image((60, 100, 30), (640, 480)).save(store.workspace.images_dir / "0.png")
    store.add_items(ds, [{"image": "images/0.png", "width": 640, "height": 480, "question": "Which colour?",
                          "answer": "red", "gt_box": "[4, 4, 300, 300]", "split": "train", "source_id": "0"}])
    monkeypatch.setattr(run, "load_train_model", lambda *a, **k: pytest.fail("the model must not load"))
    cfg = TrainConfig(stage="sft", model_name_or_path=str(tiny_dir), output_dir="models/sft", max_length=128,
                      image_max_pixels=200_000, bf16=False, gradient_checkpointing=False)
    with pytest.raises(DataError, match=r"training row 0 \(question 'Which colour\? .*needs \d+ tokens .*"
                                        r"max_length is 128"):
        run.train(store.workspace, cfg)


def test_deferred_rows_are_measured_as_they_will_be_opened(tiny_dir: Path, store: Any) -> None:
    """Training rows that are still records are checked without opening an image: the sizes read
    from file headers are those RowImages gives the model (full shrunk, crop cut and enlarged)."""
    from visrl.contract import TwoStepContract
    from visrl.formats.row_images import IMAGE_COLUMNS, RowImages
    from visrl.formats.trl import deferred_rows, sft_records
    from visrl.train.lengths import InputSizes, RowsWithReferences

    ds = store.add_dataset("boxes", "test")
    _image((60, 100, 30), (640, 480)).save(store.workspace.images_dir / "0.png")
    store.add_items(ds, [{"image": "images/0.png", "width": 640, "height": 480, "question": "Which colour?",
                          "answer": "red", "gt_box": "[4, 4, 30, 21]", "split": "train", "source_id": "0"}])
    contract = TwoStepContract(crop_margin=0.5, full_max_pixels=50_000, crop_min_pixels=10_000)
    rows = deferred_rows(sft_records(store, "boxes"), "sft", contract, store.workspace)
    sizes, opened = InputSizes(contract), RowImages(contract)
    [row] = RowsWithReferences(rows, contract, sizes)
    measured = [sizes(ref) for key in IMAGE_COLUMNS for ref in row.get(key, ())]
    assert measured == [opened(ref).size for key in IMAGE_COLUMNS for ref in row.get(key, ())]
    assert opened.opened == 1 and measured[0] == (258, 194) and measured[1][0] * measured[1][1] >= 10_000
