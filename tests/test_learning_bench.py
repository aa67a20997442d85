"""bench/learning.py: the VisRL arm's pairs come from the answer judge alone, so deleting the
annotated boxes changes none of them; and the arms' bookkeeping (summary, table) on made-up seeds."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import ScriptedTwoStep, load_script
from PIL import Image

import visrl.demo as demo
from visrl.boxes import iou
from visrl.store import Store, box_from_json
from visrl.synthetic import SyntheticConfig, render_item

ROOT = Path(__file__).resolve().parents[1]
# The benchmark's task: 3 objects, each with its own answer (a wrong crop always answers wrong).
TASK = {**demo.DEMO_DATA, "min_objects": 3, "max_objects": 3, "distinct_details": True}
N_ITEMS = 6


@pytest.fixture(scope="module")
def bench() -> Any:
    return load_script("bench/learning.py", "learning_bench")


def _key(image: Image.Image) -> str:
    return hashlib.sha1(image.convert("RGB").tobytes()).hexdigest()


class SceneReader(ScriptedTwoStep):
    """A scripted two-step policy that knows the scenes: attempt k of an item (its k-th
    conversation in one call) boxes objects k and k+1 (of 3); an answer is the detail of the
    object its box text covers (IoU > 0.5), as a perfect crop reader would give. It never sees the
    store, so it cannot read an annotated box."""

    def __init__(self, scenes: list[Any]) -> None:
        super().__init__()
        self.scenes = {_key(s.image): s for s in scenes}
        self.attempts: dict[str, int] = {}

    def generate(self, conversations: list, sampling: Any, progress: bool = False) -> list[list[str]]:
        self.attempts = {}  # attempts are counted within one call
        return super().generate(conversations, sampling)

    def reply(self, conversation: list, sampling: Any) -> list[str]:
        full = self.full_image(conversation)
        scene = self.scenes[_key(full)]
        if self.is_box_step(conversation):  # one box per sample, attempt k -> objects k, k+1
            k = self.attempts[_key(full)] = self.attempts.get(_key(full), -1) + 1
            return [self.contract.format(scene.objects[(k + j) % 3].box, full.size) for j in range(sampling.n)]
        box = self.parse(self.box_text(conversation), full)
        hit = [o for o in scene.objects if iou(box, o.box) > 0.5]
        return [hit[0].detail_answer if hit else "none"] * sampling.n


def _args(**kw: Any) -> argparse.Namespace:
    return argparse.Namespace(**{"items": N_ITEMS, "attempts": 2, "gen_batch": 4, "gen_tokens": 32,
                                 "gen_temperature": 0.5, **kw})


def _pairs(ws: Path) -> list[tuple]:
    store = Store.open(ws)
    rows = [(store.item(p["item_id"])["source_id"], p["chosen_box"], p["chosen_answer"], p["rejected_box"],
             p["rejected_answer"], p["chosen_score"], p["rejected_score"])
            for p in store.db["pairs"].rows_where(order_by="item_id")]
    store.close()
    return rows


def test_deleting_the_boxes_changes_no_pair(bench: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "model.safetensors").write_bytes(b"weights")  # copied, never loaded: the policy is scripted
    monkeypatch.setattr(demo, "SHIPPED_MODEL", shipped)
    scenes = [render_item(SyntheticConfig(**TASK), "train", i) for i in range(N_ITEMS)]
    runs = {}
    for name, delete in (("boxed", False), ("unboxed", True)):
        ws = bench.make_workspace(tmp_path, name, N_ITEMS, 0, TASK, base=None)
        withheld = bench.strip_boxes(ws, "train") if delete else None
        report = bench.generate_pairs(ws, "models/tiny-demo", _args(), seed=0, withheld=withheld,
                                      reasoner=SceneReader(scenes))
        runs[name] = (ws, report, withheld)

    (boxed_ws, boxed, _), (unboxed_ws, unboxed, withheld) = runs["boxed"], runs["unboxed"]
    store = Store.open(unboxed_ws)
    assert all(item["gt_box"] is None for item in store.items("demo", "train"))
    store.close()
    assert len(withheld) == N_ITEMS
    assert (boxed["crop_judge"], boxed["answer_judge"]) == ("none", "exact")
    assert _pairs(boxed_ws) == _pairs(unboxed_ws)
    # Attempts 0 and 1 box objects {0, 1} and {1, 2}: the named object is always among them, so
    # every item gives a pair, its chosen box is the named object's and its rejected box another's.
    pairs = _pairs(unboxed_ws)
    assert boxed["pairs"] == unboxed["pairs"] == len(pairs) == N_ITEMS
    for i, ((source_id, chosen, answer, rejected, wrong, good, bad), scene) in enumerate(zip(pairs, scenes, strict=True)):
        assert source_id == f"train_{i}"
        assert iou(box_from_json(chosen), scene.target_object.box) > 0.99
        assert iou(box_from_json(rejected), scene.target_object.box) == 0.0
        assert (answer, good, bad) == (scene.answer, 1.0, 0.0) and wrong != scene.answer
    # The withheld boxes agree with every verdict of the answer judge: of the 4 boxes per item
    # (objects 0, 1, 1, 2), those on the named object pass and hit it, the others fail and miss.
    right = sum(2 if s.target == 1 else 1 for s in scenes)
    assert unboxed["judge_vs_boxes"] == {"passed_n": right, "failed_n": 4 * N_ITEMS - right, "passed_iou_hit": 1.0,
                                         "failed_iou_hit": 0.0, "pairs_right": 1.0, "pairs_ordered": 1.0,
                                         "answer_when_hit": 1.0, "answer_when_near": None, "answer_when_off": 0.0,
                                         "rollouts_hit": right, "rollouts_near": 0, "rollouts_off": 4 * N_ITEMS - right}


# ---------------------------------------------------------------------- summary and table

def _metrics(acc: float, direct: float | None = None) -> dict[str, Any]:
    return {"acc50": acc, "mean_iou": acc, "answer_acc": acc, "parse_rate": 1.0, "direct_answer_acc": direct}


def test_summary_and_table_cover_every_arm(bench: Any) -> None:
    seeds = [{arm: _metrics(0.1 * k + 0.02 * s, 0.3 if arm in bench.DIRECT_ARMS else None)
              for k, arm in enumerate(bench.SEED_ARMS)} for s in range(3)]
    summary = bench.summarize(_metrics(0.05, 0.33), seeds)
    assert list(summary) == ["base", *bench.SEED_ARMS] == [arm for arm, _, _ in bench.ARMS]
    assert summary["visrl"]["acc50"] == {"mean": 0.52, "std": 0.02}
    assert "direct_answer_acc" in summary["control_b"] and "direct_answer_acc" not in summary["visrl"]
    lines = bench.table(summary, 3).splitlines()
    assert lines[0] == "| arm | Acc@0.5 | mean IoU | answer (two-step) | box parse | answer (direct) |"
    assert [line.split(" | ")[0] for line in lines[2:10]] == [f"| {label}" for _, label, _ in bench.ARMS]
    assert lines[2].endswith("| 0.330 ± 0.000 |")  # the start model's direct answers


def test_bench_arms_match_the_apps_labels(bench: Any) -> None:
    assert bench.SEED_ARMS == ("warmup", "control_a", "control_b", "upper", "visrl_stage1", "visrl", "grpo")
    assert {arm: label for arm, label, _ in bench.ARMS[1:]} == demo.BENCH_ARMS


def test_deadline_asks_the_trainer_to_stop_once_its_time_is_spent(bench: Any) -> None:
    spent, fresh = bench.Deadline(0.0, "grpo"), bench.Deadline(3600.0, "grpo")
    for progress in (spent, fresh):
        progress.set_total(100)  # the clock starts when training does
        progress.update(step=1)
    assert (spent.stop_requested, fresh.stop_requested) == (True, False)


def test_a_dpo_stage_loads_as_an_adapter_or_as_a_whole_model(bench: Any, tmp_path: Path) -> None:
    """--dpo-finetuning lora leaves an adapter on the stage's base; full leaves a model folder,
    which the next stage and the evaluation load alone."""
    from visrl.train.run import TrainResult

    lora, full = tmp_path / "lora", tmp_path / "full"
    lora.mkdir(), full.mkdir()
    (lora / "adapter_config.json").write_text("{}")
    result = TrainResult(path=lora, base="models/bench-warmup", stage="dpo", global_step=3, stopped=False)
    assert bench.trained(result) == ("models/bench-warmup", str(lora))
    result.path = full
    assert bench.trained(result) == (str(full), None)
    assert bench.parse_args([]).dpo_finetuning == "full"


def test_the_reader_phase_trains_reading_not_binding_once(bench: Any, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared start model: two-step rows with jittered crops on its own stream, no pointer
    loss, no binding weight; a second call (a resumed --keep run) reuses it."""
    calls: list[dict[str, Any]] = []

    def fake_workspace(parent: Path, name: str, *_: Any) -> Path:
        (parent / name).mkdir(parents=True, exist_ok=True)
        return parent / name

    def fake_sft(ws: Path, start: str, out: str, args: Any, seed: int, **kw: Any) -> dict:
        calls.append({"start": start, "out": out, "seed": seed, **kw})
        (ws / out).mkdir(parents=True)
        return {"steps": kw["steps"], "seconds": 1.0, "rows_seen": 16 * kw["steps"]}

    monkeypatch.setattr(bench, "make_workspace", fake_workspace)
    monkeypatch.setattr(bench, "sft", fake_sft)
    args = argparse.Namespace(reader_steps=7, base=tmp_path / "base", data={}, direct_share=0.1)
    first = bench.reader_phase(tmp_path, args)
    again = bench.reader_phase(tmp_path, args)
    assert first == again == (tmp_path / "reader" / bench.FOLDERS["reader"], {"steps": 7, "seconds": 1.0, "rows_seen": 112})
    assert calls == [{"start": bench.START, "out": bench.FOLDERS["reader"], "seed": 0, "split": "reader", "scenes": 0,
                      "direct": 0.1, "minutes": 1e6, "steps": 7, "boxes": True, "pointer_weight": 0.0,
                      "binding_weight": 1.0}]
    assert bench.reader_phase(tmp_path, argparse.Namespace(reader_steps=0, base=args.base)) == (args.base, {"steps": 0})


def test_a_base_without_weights_is_refused(bench: Any, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--base", str(tmp_path)])
    assert f"--base {tmp_path} holds no model.safetensors" in capsys.readouterr().err
    (tmp_path / "model.safetensors").write_bytes(b"w")
    args = bench.parse_args(["--base", str(tmp_path), "--data", "distinct_details=true", "--data", "max_objects=3"])
    assert (args.items, args.seeds, args.data) == (1000, 3, {"distinct_details": True, "max_objects": 3})


def test_the_readme_and_card_quote_the_shipped_benchmark() -> None:
    """The Acc@0.5 of each arm the README and the model card quote is the shipped run's (the file
    the Evaluate tab reads), and bench/results holds the same run."""
    shipped = ROOT / "data" / "demo-model" / "learning_benchmark.json"
    report = json.loads(shipped.read_text())
    assert report == json.loads((ROOT / "bench" / "results" / "learning.json").read_text())
    readme = (ROOT / "README.md").read_text()
    card = (ROOT / "data" / "demo-model" / "MODEL_CARD.md").read_text()
    assert len(report["seeds"]) == 3
    for arm in ("warmup", "control_a", "upper", "visrl", "grpo"):
        acc = report["summary"][arm]["acc50"]
        quoted = f"{acc['mean']:.3f} ± {acc['std']:.3f}"
        assert quoted in readme, (arm, quoted)
        assert quoted in card, (arm, quoted)
