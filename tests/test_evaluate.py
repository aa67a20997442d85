from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import ScriptedTwoStep
from PIL import Image

from visrl.boxes import Box
from visrl.cli import _register, cli
from visrl.config import load_config
from visrl.contract import TwoStepContract
from visrl.errors import ConfigError, DataError
from visrl.evaluate import EvalConfig, Prediction, compare_table, metrics_table, run_eval, summarize
from visrl.progress import Progress
from visrl.prompts import DIRECT_SUFFIX
from visrl.reasoning import Sampling
from visrl.store import Store

_register()
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class ScriptedReasoner(ScriptedTwoStep):
    """A scripted two-step policy keyed by question: (box or None, answer, direct answer). The box
    is written as the contract's text and parsed back by the production code."""

    def __init__(self, script: dict[str, tuple[list[float] | None, str, str]],
                 progress: Progress | None = None, stop_after_calls: int | None = None) -> None:
        super().__init__()
        self.script, self.progress, self.stop_after_calls = script, progress, stop_after_calls
        self.calls = 0  # box steps, i.e. two_step batches
        self.sampling: list[Any] = []

    def reply(self, conversation: list, sampling: Any) -> list[str]:
        text = self.question_text(conversation)
        box, answer, direct = self.script[text.split(" ")[0]]
        if len(conversation) == 3:  # the answer step, after a box that parsed or not
            return [answer]
        if text.endswith(DIRECT_SUFFIX):
            return [direct]
        return [self.contract.format(Box.from_list(box), self.full_image(conversation).size) if box else "garbage"]

    def generate(self, conversations: list, sampling: Any, progress: bool = False) -> list[list[str]]:
        """The replies, then a count of the box-step batches (stopping after ``stop_after_calls``)."""
        out = super().generate(conversations, sampling)
        if self.is_box_step(conversations[0]) and not self.question_text(conversations[0]).endswith(DIRECT_SUFFIX):
            self.calls += 1
            self.sampling.append(sampling)
            if self.stop_after_calls is not None and self.calls >= self.stop_after_calls:
                self.progress.stop_requested = True
        return out


# (gt box, predicted box, reference, two-step answer, direct answer)
CASES = [
    ([10, 10, 50, 50], [10, 10, 50, 50], "7", "7", "3"),          # IoU 1: hit; right; direct wrong
    ([0, 0, 40, 40], [20, 20, 60, 60], "4", "5", "4"),            # IoU 1/7: miss; wrong; direct right
    ([0, 0, 100, 50], [0, 0, 100, 100], "7", "The seven.", "7"),  # IoU exactly 0.5: a miss (> 0.5)
    ([0, 0, 20, 20], None, "2", "2", "9"),                        # no box parsed: IoU 0, answer 0
    (None, [0, 0, 10, 10], "1", "one", "0"),                      # no gt box: answer metrics only
]


def add_cases(store: Store, name: str = "bench", split: str = "test") -> dict[str, tuple]:
    ws = store.workspace
    Image.new("RGB", (100, 100), "white").save(ws.images_dir / "white.png")
    dataset_id = store.add_dataset(name, "test")
    script, items = {}, []
    for i, (gt, pred, ref, answer, direct) in enumerate(CASES):
        question = f"q{i}?"
        items.append({"split": split, "source_id": str(i), "image": "images/white.png", "width": 100,
                      "height": 100, "question": question, "answer": ref,
                      "gt_box": Box.from_list(gt) if gt else None})
        script[question] = (pred, answer, direct)
    store.add_items(dataset_id, items)
    return script


def config(**kw: Any) -> EvalConfig:
    return EvalConfig(**{"model_name_or_path": "models/m", "dataset": "bench", "batch_size": 2, **kw})


def test_metrics_are_exact(store: Store) -> None:
    script = add_cases(store)
    reasoner = ScriptedReasoner(script)
    report = run_eval(store.workspace, config(), reasoner=reasoner)
    m = report.metrics
    assert (m["n"], m["n_box"]) == (5, 4)
    assert m["acc50"] == 0.25
    assert m["mean_iou"] == pytest.approx((1 + 1 / 7 + 0.5 + 0) / 4, abs=1e-4)
    assert m["parse_rate"] == 0.8
    assert m["answer_acc"] == 0.6
    assert m["direct_answer_acc"] == 0.4
    assert (m["unscored"], m["direct_unscored"]) == (0, 0)  # rule judges score every answer
    assert "Unscored" not in report.table
    # batches of 2, greedy: one box per item, answered once
    assert reasoner.calls == 3 and reasoner.sampling == [Sampling(max_new_tokens=64)] * 3


def test_unscored_judge_replies_are_counted_apart_not_wrong(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model judge that gives no parseable score says nothing about the answer: the metrics
    count it as ``unscored`` and leave it out of the accuracy's denominator."""
    import re

    from visrl import judges

    def chat(base_url: str, model: str, messages: list[dict[str, Any]], **kw: Any) -> str:
        text = messages[0]["content"][-1]["text"]
        reference, answer = re.search(r"Reference answer: (.*)\nCandidate answer: (.*)\n", text).groups()
        if answer in ("The seven.", "one", "9"):
            return "I cannot tell from the image."  # no score anywhere
        return json.dumps({"score": int(answer == reference)})

    monkeypatch.setattr(judges, "_chat_completion", lambda: chat)
    add_cases(store)
    cfg = config(answer_judge="model", judge_base_url="http://judge/v1", judge_model="j")
    report = run_eval(store.workspace, cfg, reasoner=ScriptedReasoner(_script()))
    m = report.metrics
    # two-step: 7 right, 5 wrong, no box parsed = 0 (a failed rollout is scored), two unscored
    assert (m["answer_acc"], m["unscored"]) == (pytest.approx(1 / 3, abs=1e-4), 2)
    assert (m["direct_answer_acc"], m["direct_unscored"]) == (0.5, 1)  # 3 wrong, 4 and 7 right, 0 wrong
    rows = [json.loads(line) for line in (Path(report.output_dir) / "predictions.jsonl").read_text().splitlines()]
    assert [r["answer_score"] for r in rows] == [1.0, 0.0, None, 0.0, None]
    assert [r["direct_unscored"] for r in rows] == [False, False, False, True, False]
    assert "| Unscored answers (not in accuracy) | 2 | – | – | 1 | – | – |" in report.table
    # each accuracy's n leaves its unscored answers out: 5 - 2 and 5 - 1
    assert report.metrics["intervals"]["answer_acc"]["n"] == 3
    assert report.metrics["intervals"]["direct_answer_acc"]["n"] == 4


def test_outputs_and_stored_evaluation(store: Store) -> None:
    add_cases(store)
    ckpt = store.add_checkpoint("runs/7/adapter", base="models/m", stage="dpo1")
    cfg = config(adapter_name_or_path=str(store.workspace.root / "runs/7/adapter"))
    report = run_eval(store.workspace, cfg, reasoner=ScriptedReasoner(_script()))
    out = Path(report.output_dir)
    assert out.parent == store.workspace.exports_dir and out.name.startswith("eval-")
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["iou"] for r in rows] == [1.0, pytest.approx(0.1429), 0.5, 0.0, None]
    assert [r["answer_score"] for r in rows] == [1.0, 0.0, 1.0, 0.0, 1.0]
    written = json.loads((out / "metrics.json").read_text())
    assert written["metrics"] == report.metrics
    assert written["contract"] == TwoStepContract().to_dict()  # what was evaluated: format, crop, budget
    # Acc@0.5 is a share of the 4 boxed items: 1/4 with its Wilson interval [4.6%, 69.9%]
    assert "| Detection Acc@0.5 (%) | 25.0 | 4.6 – 69.9 | 4 | – | – | – |" in (out / "report.md").read_text()
    assert written["metrics"]["intervals"]["acc50"] == {"n": 4, "low": 0.0456, "high": 0.6994, "method": "wilson"}
    [ev] = store.evaluations()
    assert (ev["id"], ev["checkpoint_id"], ev["n"]) == (report.evaluation_id, ckpt, 5)
    assert report.checkpoint_id == ckpt and ev["metrics"]["acc50"] == 0.25
    table = compare_table(store)
    assert f"| #{ckpt} dpo1 | bench/test | 5 | 25.0 | 0.411 | 60.0 | 40.0 | 80.0 |" in table


def _script() -> dict[str, tuple]:
    return {f"q{i}?": (pred, answer, direct) for i, (_, pred, _, answer, direct) in enumerate(CASES)}


def test_stop_request_ends_early_and_stores_nothing(store: Store) -> None:
    add_cases(store)
    progress = Progress(bar=False)
    reasoner = ScriptedReasoner(_script(), progress=progress, stop_after_calls=1)
    out = store.workspace.root / "my-eval"
    report = run_eval(store.workspace, config(output_dir="my-eval"), progress, reasoner=reasoner)
    assert report.stopped and report.n == 2 and report.evaluation_id is None
    assert store.evaluations() == []
    assert json.loads((out / "metrics.json").read_text())["stopped"] is True


def test_no_direct_baseline_and_job_output_dir(store: Store) -> None:
    add_cases(store)
    job = store.create_job("eval", {})
    report = run_eval(store.workspace, config(direct_baseline=False), job_id=job,
                      reasoner=ScriptedReasoner(_script()))
    assert report.metrics["direct_answer_acc"] is None
    assert Path(report.output_dir) == store.workspace.run_dir(job)
    assert store.evaluations()[0]["job_id"] == job


def test_finished_job_message_is_the_result_not_evaluating(store: Store) -> None:
    """The job's status line said "evaluating 5 items" after success; now it is the result."""
    add_cases(store)
    job = store.create_job("eval", {})
    progress = Progress(store, job, bar=False)
    report = run_eval(store.workspace, config(), progress, job_id=job, reasoner=ScriptedReasoner(_script()))
    assert store.job(job)["message"] == (
        "evaluated 5 items: Acc@0.5 0.250 [0.046, 0.699], n=4 · answer acc 0.600 [0.231, 0.882], n=5 "
        f"(evaluation #{report.evaluation_id})")


def test_report_calls_two_step_versus_direct_by_the_intervals() -> None:
    """+20 points on 5 items is noise; the same on 400 items is not."""
    small = {"n": 5, "answer_acc": 0.6, "direct_answer_acc": 0.4, "unscored": 0, "direct_unscored": 0}
    assert "+20.0 points, **within noise** (95% intervals overlap)" in metrics_table(small)
    large = {**small, "n": 400}
    assert "+20.0 points, **better** (95% intervals do not overlap)" in metrics_table(large)
    assert "Two-step vs direct" not in metrics_table({"n": 5, "answer_acc": 0.6})  # no baseline ran


def test_empty_split_is_a_data_error(store: Store) -> None:
    add_cases(store)
    with pytest.raises(DataError, match="no items in split 'val'"):
        run_eval(store.workspace, config(split="val"), reasoner=ScriptedReasoner({}))


@pytest.mark.parametrize("kw, message", [
    ({"dataset": ""}, "dataset is required"),
    ({"box_format": "xyxy"}, "box_format .* unknown; use one of"),
    ({"answer_judge": "vibes"}, "answer_judge must be one of"),
    ({"batch_size": 0}, "batch_size must be at least 1"),
    ({"backend": "remote"}, "needs base_url and remote_model"),
])
def test_config_errors(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(**kw)


@pytest.mark.parametrize("path", ["eval.yaml", "demo/eval.yaml"])
def test_shipped_configs_load(path: str) -> None:
    cfg = load_config(EvalConfig, CONFIGS / path)
    assert cfg.split == "test" and cfg.box_format is None  # the checkpoint's contract (visrl_model.json)


def test_summarize_and_table_without_boxes() -> None:
    preds = [Prediction(1, "q", "a", None, None, None, None, "a", 1.0)]
    m = summarize(preds, seconds=2.0)
    assert (m["acc50"], m["mean_iou"], m["answer_acc"], m["items_per_s"]) == (None, None, 1.0, 0.5)
    assert (m["unscored"], m["direct_unscored"]) == (0, None)  # no direct baseline ran
    assert "| Mean IoU | – | – | – | – | – | – |" in metrics_table(m)
    assert m["intervals"] == {"parse_rate": {"n": 1, "low": 0.0, "high": 0.7935, "method": "wilson"},
                              "answer_acc": {"n": 1, "low": 0.2065, "high": 1.0, "method": "wilson"}}


def test_evals_command_prints_the_comparison(store: Store) -> None:
    add_cases(store)
    run_eval(store.workspace, config(), reasoner=ScriptedReasoner(_script()))
    result = CliRunner().invoke(cli, ["evals", "-w", str(store.workspace.root)])
    assert result.exit_code == 0, result.output
    assert "| 1 | models/m | – | bench/test | 5 | 25.0 |" in result.output


@pytest.mark.slow
def test_eval_cli_with_the_tiny_model(store: Store) -> None:
    from visrl.tiny import build_tiny_model

    add_cases(store)
    build_tiny_model(store.workspace.models_dir / "tiny", preset="test")
    cfg = store.workspace.root / "eval.yaml"
    cfg.write_text("model_name_or_path: models/tiny\ndataset: bench\nbatch_size: 4\nmax_new_tokens: 8\n")
    result = CliRunner().invoke(cli, ["eval", str(cfg), "-w", str(store.workspace.root), "--limit", "3"])
    assert result.exit_code == 0, result.output
    [ev] = store.evaluations()
    assert ev["n"] == 3 and ev["metrics"]["n_box"] == 3
    assert 0.0 <= ev["metrics"]["parse_rate"] <= 1.0
    assert "| Answer accuracy (%) |" in result.output
