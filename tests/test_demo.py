"""The built-in demo workspace: contents, idempotence, crash recovery, and a real (slow) build."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import visrl.demo as demo
from visrl.errors import WorkspaceError
from visrl.store import Store
from visrl.workspace import Workspace

SMALL = {"n_train": 4, "n_val": 1, "n_test": 2}


@pytest.fixture
def fake_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A 'shipped' model folder with (fake) weights, so the demo copies instead of building."""
    folder = tmp_path / "shipped"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "config.json").write_text("{}")
    monkeypatch.setattr(demo, "SHIPPED_MODEL", folder)
    return folder


@pytest.fixture
def generate_calls(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """run_generate replaced by a recorder that reports 5 pairs."""
    import visrl.generate

    calls: list[Any] = []

    def fake(workspace: Any, cfg: Any, progress: Any = None, **kwargs: Any) -> Any:
        calls.append((workspace, cfg))
        return SimpleNamespace(rollouts=cfg.limit * 6, pairs_total=5, seconds=0.1)

    monkeypatch.setattr(visrl.generate, "run_generate", fake)
    return calls


def build(root: Path, **kwargs: Any) -> Path:
    lines: list[str] = []
    out = demo.create_demo_workspace(root, progress=lines.append, data=SMALL, **kwargs)
    assert lines[-1].startswith(f"demo workspace ready in {root}")
    return out


def test_demo_workspace_contents(tmp_path: Path, fake_model: Path, generate_calls: list[Any]) -> None:
    root = build(tmp_path / "demo", n_pairs_items=3)
    store = Store(Workspace.open(root))
    assert store.stats()["datasets"]["demo"]["items"] == {"test": 2, "train": 4, "val": 1}
    assert store.dataset("demo")["source"] == "visrl.synthetic (demo)"
    item = store.items("demo", "train")[0]
    assert "pattern" in item["question"] and store.item_box(item) is not None
    assert (root / item["image"]).is_file()
    assert (root / "models" / "tiny-demo" / "model.safetensors").read_bytes() == b"weights"
    [checkpoint] = store.checkpoints()
    assert (checkpoint["path"], checkpoint["stage"], checkpoint["base"]) == ("models/tiny-demo", "sft", "data/demo-model")
    [(workspace, cfg)] = generate_calls
    assert Path(workspace.root) == root
    assert (cfg.model_name_or_path, cfg.dataset, cfg.split, cfg.limit) == ("models/tiny-demo", "demo", "train", 3)
    # configs/demo/generate.yaml: the answer judge alone; the box format is the checkpoint's
    assert (cfg.answer_judge, cfg.crop_judge, cfg.box_format) == ("exact", "none", None)
    assert cfg.adapter_name_or_path is None  # no SFT adapter exists yet: the demo model itself
    marker = json.loads((root / demo.COMPLETE).read_text())
    assert (marker["items"], marker["model"], marker["pairs"]) == (7, "models/tiny-demo", 5)
    assert not (root / demo.BUILDING).exists()


def test_complete_workspace_is_left_alone(tmp_path: Path, fake_model: Path, generate_calls: list[Any]) -> None:
    root = build(tmp_path / "demo", n_pairs_items=1)
    (root / "runs" / "note.txt").write_text("mine")
    assert demo.create_demo_workspace(root, data=SMALL) == root
    assert len(generate_calls) == 1 and (root / "runs" / "note.txt").read_text() == "mine"
    build(root, force=True, n_pairs_items=1)  # force rebuilds from scratch
    assert len(generate_calls) == 2 and not (root / "runs" / "note.txt").exists()
    assert Store(Workspace.open(root)).stats()["datasets"]["demo"]["items"]["train"] == 4


def test_half_built_workspace_is_rebuilt(tmp_path: Path, fake_model: Path, generate_calls: list[Any]) -> None:
    root = tmp_path / "demo"
    root.mkdir()
    (root / demo.BUILDING).write_text("crashed")
    (root / "visrl.db").write_text("half a database")
    build(root, n_pairs_items=0)
    assert generate_calls == []  # 0 items: no generation
    assert (root / demo.COMPLETE).is_file() and not (root / demo.BUILDING).exists()
    assert Store(Workspace.open(root)).stats()["datasets"]["demo"]["items"]["val"] == 1


def test_refuses_a_folder_that_is_not_a_demo_workspace(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    Store(Workspace.open(root))
    with pytest.raises(WorkspaceError, match="holds a workspace that is not a demo workspace"):
        demo.create_demo_workspace(root, data=SMALL)
    assert (root / "visrl.db").is_file()


def test_demo_task_is_the_shipped_models(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from visrl.synthetic import SyntheticConfig

    data = demo.demo_data()
    assert data["dataset_name"] == "visrl_demo" and SyntheticConfig(**data)
    report = json.loads(demo.MODEL_REPORT.read_text(encoding="utf-8"))
    trained = {k: v for k, v in report["config"]["data"].items() if k not in demo.ANSWER_JUDGE_TASK}
    assert {k: data[k] for k in trained} == trained
    assert data["detail"] == "pattern" and data["distinct_details"] and data["min_objects"] == data["max_objects"] == 3
    monkeypatch.setattr(demo, "MODEL_REPORT", tmp_path / "missing.json")
    assert demo.demo_data() == demo.DEMO_DATA


@pytest.mark.slow
def test_real_demo_workspace_with_pairs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real generation on a small benchmark, with a small built model as the 'shipped' one."""
    import torch

    from visrl.tiny import build_tiny_model

    torch.set_num_threads(1)
    monkeypatch.setattr(demo, "SHIPPED_MODEL", build_tiny_model(tmp_path / "shipped", preset="test"))
    root = build(tmp_path / "demo", n_pairs_items=2)
    store = Store(Workspace.open(root))
    assert (root / "models" / "tiny-demo" / "model.safetensors").is_file()
    assert [c["path"] for c in store.checkpoints()] == ["models/tiny-demo"]
    # 2 items x 3 attempts x (policy + negative or random) rollouts
    assert len(store.rollouts()) == 12
    assert {r["item_id"] for r in store.rollouts()} == {i["id"] for i in store.items("demo", "train")[:2]}
    marker = json.loads((root / demo.COMPLETE).read_text())
    assert marker["pairs"] == store.db["pairs"].count


def test_untrained_model_skips_generation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          generate_calls: list[Any]) -> None:
    import visrl.tiny

    built: list[Path] = []
    monkeypatch.setattr(demo, "SHIPPED_MODEL", tmp_path / "empty")
    monkeypatch.setattr(visrl.tiny, "build_tiny_model", lambda out, preset: built.append(Path(out)) or out)
    root = build(tmp_path / "demo", n_pairs_items=5)
    assert built == [root / "models" / "tiny-demo"] and generate_calls == []
    assert Store(Workspace.open(root)).checkpoints()[0]["base"] == "tiny:demo"


def test_card_and_benchmark_arms_are_stored_evaluations(tmp_path: Path, fake_model: Path,
                                                        generate_calls: list[Any]) -> None:
    (fake_model / "training_report.json").write_text(json.dumps({"evaluation": {
        "split": "test", "n": 200, "acc@0.5": 0.255, "mean_iou": 0.252, "parse_rate": 1.0,
        "two_step_acc": 0.51, "true_crop_acc": 1.0, "direct_acc": 0.315}}))
    arm = {"acc50": {"mean": 0.3, "std": 0.02}, "answer_acc": {"mean": 0.55, "std": 0.01}}
    (fake_model / "learning_benchmark.json").write_text(json.dumps({
        "bench_version": 2, "config": {"test_items": 200},
        "seeds": [{"generate": {"pairs": n}} for n in (10, 20, 30)],
        "summary": {"base": arm, "control_b": arm, "visrl_stage1": arm,
                    "visrl": {**arm, "acc50": {"mean": 0.4, "std": 0.03}}, "grpo": arm, "other": arm}}))
    root = build(tmp_path / "demo", n_pairs_items=0)
    store = Store(Workspace.open(root))
    card, control, stage1, visrl, grpo = store.evaluations()
    [checkpoint] = store.checkpoints()
    assert (card["model"], card["checkpoint_id"], card["split"], card["n"]) == (
        "models/tiny-demo", checkpoint["id"], "test (model card)", 200)
    assert control["split"] == visrl["split"] == "test (learning benchmark)"  # not this workspace's test split
    assert card["metrics"] == {"acc50": 0.255, "mean_iou": 0.252, "parse_rate": 1.0, "answer_acc": 0.51,
                               "direct_answer_acc": 0.315, "true_crop_answer_acc": 1.0,
                               "source": "data/demo-model/MODEL_CARD.md"}
    assert control["model"] == "learning benchmark (3 seeds): control B: warm-up + SFT on the answers (no boxes)"
    assert visrl["model"] == "learning benchmark (3 seeds): warm-up + VisRL (answer judge only)"
    assert stage1["model"] == "learning benchmark (3 seeds): warm-up + VisRL stage 1 only (box-step DPO)"
    assert stage1["metrics"]["pairs"] == 20  # the same pairs as stage 2's
    assert grpo["model"] == "learning benchmark (3 seeds): warm-up + GRPO (answer reward only)"
    assert (visrl["metrics"]["acc50"], visrl["metrics"]["acc50_std"], visrl["n"]) == (0.4, 0.03, 200)
    assert visrl["metrics"]["pairs"] == 20 and "pairs" not in control["metrics"] and "pairs" not in grpo["metrics"]
    assert visrl["metrics"]["seeds"] == 3  # the spread is over 3 seeds: it widens the intervals
    assert visrl["checkpoint_id"] is None  # no checkpoint: Chat keeps the shipped model
    assert json.loads((root / demo.COMPLETE).read_text())["evaluations"] == 5


def test_an_arm_that_trained_on_no_pairs_says_so(tmp_path: Path, fake_model: Path,
                                                 generate_calls: list[Any]) -> None:
    arm = {"acc50": {"mean": 0.26, "std": 0.0}}
    (fake_model / "learning_benchmark.json").write_text(json.dumps({
        "bench_version": 2, "config": {"test_items": 200}, "seeds": [{"generate": {"pairs": 0}}],
        "summary": {"warmup": arm, "visrl": arm}}))
    root = build(tmp_path / "demo", n_pairs_items=0)
    warmup, visrl = Store(Workspace.open(root)).evaluations()
    assert visrl["model"] == ("learning benchmark (1 seed): warm-up + VisRL (answer judge only)"
                              " - 0 pairs, not trained (= warm-up)")
    assert warmup["model"] == "learning benchmark (1 seed): SFT warm-up (few boxes)"


def test_an_older_benchmark_file_keeps_its_own_labels(tmp_path: Path, fake_model: Path,
                                                     generate_calls: list[Any]) -> None:
    """Version 1 files (no bench_version: a crop judge beside the answer judge) stay readable."""
    arm = {"acc50": {"mean": 0.26, "std": 0.0}}
    (fake_model / "learning_benchmark.json").write_text(json.dumps({
        "config": {"test_items": 200}, "seeds": [{"generate": {"pairs": 0}, "generate_iou": {"pairs": 135}}],
        "summary": {"visrl": arm, "visrl_iou": arm, "grpo": arm}}))
    root = build(tmp_path / "demo", n_pairs_items=0)
    visrl, ablation = Store(Workspace.open(root)).evaluations()
    assert visrl["model"] == ("learning benchmark (1 seed): warm-up + VisRL (model crop judge)"
                              " - 0 pairs, not trained (= warm-up)")
    assert ablation["model"] == "learning benchmark (1 seed): VisRL with IoU crop judge (ablation)"
    assert ablation["metrics"]["pairs"] == 135


def test_a_benchmark_file_of_an_unknown_version_is_skipped_with_a_log_line(
        tmp_path: Path, fake_model: Path, generate_calls: list[Any], caplog: pytest.LogCaptureFixture) -> None:
    (fake_model / "learning_benchmark.json").write_text(json.dumps({
        "bench_version": 9, "summary": {"visrl": {"acc50": {"mean": 0.9, "std": 0.0}}}}))
    with caplog.at_level("WARNING", logger="visrl.demo"):
        root = build(tmp_path / "demo", n_pairs_items=0)
    assert Store(Workspace.open(root)).evaluations() == []
    assert "learning benchmark version 9 is not one this visrl reads (1, 2)" in caplog.text


def test_unreadable_reports_seed_nothing_and_lose_nothing(tmp_path: Path, fake_model: Path,
                                                          generate_calls: list[Any]) -> None:
    (fake_model / "training_report.json").write_text("{not json")
    (fake_model / "learning_benchmark.json").write_text(json.dumps({"summary": {"visrl": "oops"}}))
    root = build(tmp_path / "demo", n_pairs_items=0)
    store = Store(Workspace.open(root))
    assert store.evaluations() == [] and store.stats()["datasets"]["demo"]["items"]["train"] == 4
