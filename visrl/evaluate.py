"""Evaluation: greedy two-step inference on a split, against a direct-answer baseline.

Metrics (``metrics.json``; keys are stable, the app and :func:`compare_table` read them):

``n``                  items evaluated; ``n_box`` of them with an annotated box.
``acc50``              detection accuracy, Visual-CoT's definition: share of boxed items whose
                       predicted box has IoU > 0.5 with the annotated one (no box parsed = miss).
``mean_iou``           mean IoU over boxed items (no box parsed = 0).
``parse_rate``         share of all items whose box text parsed.
``answer_acc``         mean answer-judge score of the two-step answers, over the items the judge
                       scored (``n - unscored``).
``unscored``           two-step answers a judge model replied to without a parseable score: neither
                       right nor wrong, so counted here and left out of ``answer_acc``'s
                       denominator (as generation drops them from pairing; :mod:`visrl.judges`).
``direct_answer_acc``  the same for the direct baseline (question on the full image, no box step).
``direct_unscored``    unscored direct answers (left out of ``direct_answer_acc``); None without
                       the baseline.
``seconds``, ``items_per_s``.
``intervals``          each share's 95% interval and its own n: ``{"acc50": {"n", "low", "high",
                       "method"}, ...}`` (Wilson; :mod:`visrl.uncertainty` says why and how).

Items without an annotated box count for the answer metrics only. A box text that does not
parse is a failed two-step answer (score 0), as in generation. Each run writes
``metrics.json``, ``report.md`` and ``predictions.jsonl`` (one row per item) to its output folder
and one row of the ``evaluations`` table, linked to the ``checkpoints`` row whose path is the
evaluated adapter (or model), so the app can compare checkpoints.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from visrl.boxes import iou
from visrl.contract import TwoStepContract
from visrl.errors import ConfigError, DataError
from visrl.judges import (
    Judge,
    JudgeInput,
    JudgeOptions,
    make_judges,
    model_judge_key,
    references,
)
from visrl.policy import PolicyConfig, check_range, load_reasoner
from visrl.progress import Progress
from visrl.store import Store, box_from_json, loads
from visrl.uncertainty import NOISE, interval, intervals, verdict
from visrl.vocabulary import ANSWER_JUDGES
from visrl.workspace import Workspace

ACC_IOU = 0.5  # Visual-CoT's detection accuracy: IoU strictly above 0.5


@dataclass
class EvalConfig(PolicyConfig):
    """``visrl eval CONFIG``: one YAML key per field. Paths may be workspace-relative."""

    split: str = field(default="test", metadata={"help": "Split to evaluate on."})
    answer_judge: str = field(default="auto", metadata={
        "help": f"{' | '.join(ANSWER_JUDGES)} (see visrl.judges)."})
    judge_base_url: str | None = field(default=None, metadata={
        "help": "OpenAI-compatible endpoint of the judge model (answer_judge: model)."})
    judge_model: str | None = field(default=None, metadata={"help": "Judge model name on that endpoint."})
    judge_api_key_env: str | None = field(default=None, metadata={
        "help": "NAME of the environment variable holding the judge server's API key (e.g. JUDGE_API_KEY); "
                "never the key itself. null = no key."})
    anls_threshold: float = field(default=0.5, metadata={"help": "ANLS cut-off (DocVQA uses 0.5)."})
    number_rel_tol: float = field(default=0.05, metadata={"help": "Relative tolerance of numeric answers."})
    direct_baseline: bool = field(default=True, metadata={
        "help": "Also answer each question directly on the full image (the no-box baseline)."})
    output_dir: str | None = field(default=None, metadata={
        "help": "Where metrics.json, report.md, predictions.jsonl go; null = runs/<job>/ in a job, "
                "else exports/eval-<time>/ (workspace-relative paths allowed)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.answer_judge not in ANSWER_JUDGES:
            raise ConfigError(f"answer_judge must be one of {', '.join(ANSWER_JUDGES)}, got {self.answer_judge!r}")
        check_range("anls_threshold", self.anls_threshold, 0.0, 1.0)
        check_range("number_rel_tol", self.number_rel_tol, 0.0, 1e6)

    def judge_options(self) -> JudgeOptions:
        return JudgeOptions(anls_threshold=self.anls_threshold, number_rel_tol=self.number_rel_tol,
                            base_url=self.judge_base_url, model=self.judge_model,
                            api_key=model_judge_key(self.judge_api_key_env, self.answer_judge))

    def model_label(self) -> str:
        return (self.remote_model or "remote") if self.backend == "remote" else self.model_name_or_path


@dataclass
class EvalReport:
    metrics: dict[str, Any]
    n: int
    output_dir: str  # absolute path
    evaluation_id: int | None  # None when stopped early (partial results are not stored)
    checkpoint_id: int | None
    stopped: bool
    table: str  # markdown


# ---------------------------------------------------------------------- scoring (pure)

@dataclass
class Prediction:
    """One item's outcome; boxes are pixel lists of the original image."""

    item_id: int
    question: str
    reference: str
    box_text: str | None
    box: list[float] | None
    gt_box: list[float] | None
    iou: float | None  # None when the item has no annotated box
    answer: str | None
    answer_score: float | None  # None: the judge model gave no parseable score (unscored)
    direct_answer: str | None = None
    direct_score: float | None = None  # None: no baseline run, or unscored (see direct_unscored)
    direct_unscored: bool = False


def summarize(predictions: list[Prediction], seconds: float = 0.0) -> dict[str, Any]:
    """The metrics of the module doc from per-item predictions."""
    n = len(predictions)
    boxed = [p for p in predictions if p.iou is not None]
    direct = [p.direct_score for p in predictions if p.direct_score is not None]
    scored = [p.answer_score for p in predictions if p.answer_score is not None]
    ran_direct = any(p.direct_score is not None or p.direct_unscored for p in predictions)
    metrics: dict[str, Any] = {
        "n": n, "n_box": len(boxed),
        "acc50": _mean([float(p.iou > ACC_IOU) for p in boxed]),
        "mean_iou": _mean([p.iou for p in boxed]),
        "parse_rate": _mean([float(p.box is not None) for p in predictions]),
        "answer_acc": _mean(scored),
        "unscored": n - len(scored),
        "direct_answer_acc": _mean(direct) if direct else None,
        "direct_unscored": sum(p.direct_unscored for p in predictions) if ran_direct else None,
        "seconds": round(seconds, 3), "items_per_s": round(n / seconds, 3) if seconds > 0 else None,
    }
    rounded = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}
    return {**rounded, "intervals": intervals(rounded, n)}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fmt(value: Any, percent: bool = True) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}" if percent else f"{value:.3f}"


def _cells(metrics: dict[str, Any], name: str, percent: bool = True) -> tuple[str, str, str]:
    """(value, 95% interval, n) of one metric as table cells."""
    found = interval(metrics, name, int(metrics.get("n") or 0))
    if found is None:
        return _fmt(metrics.get(name), percent), "–", "–"
    return (_fmt(found.value, percent), f"{_fmt(found.low, percent)} – {_fmt(found.high, percent)}",
            str(found.n))


def metrics_table(metrics: dict[str, Any]) -> str:
    """One evaluation as a markdown table: each metric with its 95% interval and n, two-step and
    direct, then whether two-step answers beat direct ones by :func:`visrl.uncertainty.verdict`."""
    none = ("–", "–", "–")
    rows = [
        ("Detection Acc@0.5 (%)", *_cells(metrics, "acc50"), *none),
        ("Mean IoU", *_cells(metrics, "mean_iou", percent=False), *none),
        ("Box parse rate (%)", *_cells(metrics, "parse_rate"), *none),
        ("Answer accuracy (%)", *_cells(metrics, "answer_acc"), *_cells(metrics, "direct_answer_acc")),
    ]
    if metrics.get("unscored") or metrics.get("direct_unscored"):  # only model judges leave answers unscored
        rows.append(("Unscored answers (not in accuracy)", str(metrics.get("unscored") or 0), "–", "–",
                     str(metrics.get("direct_unscored") or 0), "–", "–"))
    lines = ["| metric | two-step | 95% interval | n | direct | 95% interval | n |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines.append(f"\nn = {metrics.get('n', 0)} items ({metrics.get('n_box', 0)} with a box), "
                 f"{metrics.get('seconds', 0)} s")
    versus = two_step_versus_direct(metrics)
    if versus:
        lines.append(versus)
    lines.append("95% intervals: Wilson on each metric's own n; a difference is called better or worse "
                 "only when the two intervals do not overlap, else within noise (visrl.uncertainty).")
    return "\n".join(lines) + "\n"


def two_step_versus_direct(metrics: dict[str, Any]) -> str | None:
    """One line: the two-step answers against the direct baseline, by the intervals' rule."""
    n = int(metrics.get("n") or 0)
    two_step, direct = interval(metrics, "answer_acc", n), interval(metrics, "direct_answer_acc", n)
    if two_step is None or direct is None:
        return None
    called = verdict(two_step, direct)
    why = "95% intervals overlap" if called == NOISE else "95% intervals do not overlap"
    return (f"Two-step vs direct answer accuracy: {100 * (two_step.value - direct.value):+.1f} points, "
            f"**{called}** ({why}).")


def headline(metrics: dict[str, Any]) -> str:
    """The finished job's one-line message: the main shares with their intervals."""
    n = int(metrics.get("n") or 0)
    parts = [f"{text} {found.text()}" for name, text in (("acc50", "Acc@0.5"), ("answer_acc", "answer acc"))
             if (found := interval(metrics, name, n)) is not None]
    return f"evaluated {n} items" + (": " + " · ".join(parts) if parts else "")


def compare_table(store: Store) -> str:
    """Every stored evaluation as one markdown table, oldest first."""
    stages = {c["id"]: c["stage"] for c in store.checkpoints()}
    lines = ["| id | model | checkpoint | data | n | Acc@0.5 | mIoU | answer | direct | parse | when |",
             "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for ev in store.evaluations():
        m = ev["metrics"]
        model = ev["model"] + (f" + {ev['adapter']}" if ev["adapter"] else "")
        ckpt = f"#{ev['checkpoint_id']} {stages.get(ev['checkpoint_id'], '')}".strip() if ev["checkpoint_id"] else "–"
        lines.append(
            f"| {ev['id']} | {model} | {ckpt} | {ev['dataset']}/{ev['split']} | {ev['n']} "
            f"| {_fmt(m.get('acc50'))} | {_fmt(m.get('mean_iou'), False)} | {_fmt(m.get('answer_acc'))} "
            f"| {_fmt(m.get('direct_answer_acc'))} | {_fmt(m.get('parse_rate'))} | {ev['created_at']} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- the run

def greedy(max_new_tokens: int) -> Any:
    from visrl.reasoning import Sampling

    return Sampling(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens, n=1)


def run_eval(workspace: str | Path | Workspace | None, cfg: EvalConfig,
             progress: Progress | None = None, job_id: int | None = None,
             reasoner: Any = None, sampling: Any = None) -> EvalReport:
    """Evaluate ``cfg`` (see module doc). ``reasoner``/``sampling`` replace the configured model
    (tests, benchmarks); a stop request ends it after the current batch, unstored."""
    store = Store.open(workspace)
    ws = store.workspace
    answer_judge, _ = make_judges(cfg.answer_judge, "none", cfg.judge_options())
    items = store.items(cfg.dataset, cfg.split, limit=cfg.limit)
    if not items:
        raise DataError(f"dataset {cfg.dataset!r} has no items in split {cfg.split!r}; "
                        "`visrl stats` lists the splits")
    if progress is not None:
        progress.set_total(len(items))
        progress.update(step=0, force=True, message=f"evaluating {len(items)} items")
    reasoner = reasoner if reasoner is not None else load_reasoner(ws, cfg)
    sampling = sampling if sampling is not None else greedy(cfg.max_new_tokens)
    start = time.monotonic()
    predictions: list[Prediction] = []
    for i in range(0, len(items), cfg.batch_size):
        if progress is not None and progress.stop_requested:
            break
        batch = items[i:i + cfg.batch_size]
        predictions += _eval_batch(ws, reasoner, sampling, answer_judge, cfg, batch)
        if progress is not None:
            running = summarize(predictions, time.monotonic() - start)
            progress.update(advance=len(batch), metrics={
                k: running[k] for k in ("acc50", "mean_iou", "answer_acc", "direct_answer_acc",
                                        "parse_rate") if running[k] is not None})
    metrics = summarize(predictions, time.monotonic() - start)
    stopped = len(predictions) < len(items)
    out = _output_dir(ws, cfg, job_id)
    table = metrics_table(metrics)
    contract = getattr(reasoner, "contract", None)
    _write_outputs(out, cfg, metrics, table, predictions, stopped, contract)
    checkpoint_id = find_checkpoint(store, cfg)
    evaluation_id = None
    if not stopped:
        evaluation_id = store.add_evaluation(
            metrics, model=cfg.model_label(), adapter=cfg.adapter_name_or_path, dataset=cfg.dataset,
            split=cfg.split, n=len(predictions), checkpoint_id=checkpoint_id, job_id=job_id)
        if progress is not None and progress.in_job:  # the result replaces "evaluating N items"
            progress.message(f"{headline(metrics)} (evaluation #{evaluation_id})")
    return EvalReport(metrics=metrics, n=len(predictions), output_dir=str(out),
                      evaluation_id=evaluation_id, checkpoint_id=checkpoint_id, stopped=stopped,
                      table=table)


def _eval_batch(ws: Workspace, reasoner: Any, sampling: Any, judge: Judge, cfg: EvalConfig,
                batch: list[dict[str, Any]]) -> list[Prediction]:
    from visrl.generate import load_image

    images = [load_image(ws, item) for item in batch]
    questions = [item["question"] for item in batch]
    results = reasoner.two_step(images, questions, sampling)
    directs = reasoner.direct(images, questions, sampling) if cfg.direct_baseline else [None] * len(batch)
    out = []
    for item, image, result, direct in zip(batch, images, results, directs, strict=True):
        first = result[0] if isinstance(result, list) else result  # n = 1: one result per item
        gt = box_from_json(item.get("gt_box"))
        refs = references(item)
        score = _score(judge, item, refs, first.answer if first.box is not None else None)
        direct_text = direct[0] if isinstance(direct, list) else direct
        direct_score = _score(judge, item, refs, direct_text) if cfg.direct_baseline else None
        out.append(Prediction(
            item_id=item["id"], question=item["question"], reference=item.get("answer") or "",
            box_text=first.box_text, box=first.box.as_list() if first.box is not None else None,
            gt_box=gt.as_list() if gt is not None else None,
            iou=None if gt is None else round(iou(first.box, gt), 4),
            answer=first.answer, answer_score=score, direct_answer=direct_text, direct_score=direct_score,
            direct_unscored=cfg.direct_baseline and direct_score is None))
        image.close()
    return out


def _score(judge: Judge, item: dict[str, Any], refs: list[str], answer: str | None) -> float | None:
    """The answer's score, or None when the judge gave none (an unscored model-judge reply: it
    says nothing about the answer, so accuracy leaves it out instead of counting it wrong). A
    failed rollout (``answer`` None) is scored 0.0 by every answer judge."""
    judgement = judge(JudgeInput(question=item["question"], references=refs, answer=answer))
    return None if judgement is None else judgement.score


def _output_dir(ws: Workspace, cfg: EvalConfig, job_id: int | None) -> Path:
    if cfg.output_dir:
        out = ws.resolve(cfg.output_dir)
    elif job_id is not None:
        out = ws.run_dir(job_id)
    else:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = ws.exports_dir / f"eval-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _write_outputs(out: Path, cfg: EvalConfig, metrics: dict[str, Any], table: str,
                   predictions: list[Prediction], stopped: bool, contract: TwoStepContract | None = None) -> None:
    """``contract`` (the policy's) is recorded: which box format, crop and pixel budget were evaluated."""
    recorded = contract.to_dict() if contract is not None else None
    payload = {"metrics": metrics, "config": asdict(cfg), "contract": recorded, "stopped": stopped}
    (out / "metrics.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    head = f"# Evaluation: {cfg.model_label()}" + (f" + {cfg.adapter_name_or_path}" if cfg.adapter_name_or_path else "")
    note = "\n\nStopped early: partial results, not stored.\n" if stopped else "\n"
    (out / "report.md").write_text(
        f"{head}\n\n{cfg.dataset}/{cfg.split}, box format "
        f"{contract.box_format if contract is not None else cfg.box_format}, "
        f"judge {cfg.answer_judge}{note}\n{table}", encoding="utf-8")
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for p in predictions:
            f.write(json.dumps(asdict(p)) + "\n")


def find_checkpoint(store: Store, cfg: EvalConfig) -> int | None:
    """The ``checkpoints`` row whose path is the evaluated adapter, else the model, else None."""
    ws = store.workspace
    by_path = {ws.resolve(ckpt["path"]).resolve(): ckpt["id"] for ckpt in store.checkpoints()}
    for candidate in (cfg.adapter_name_or_path, cfg.model_name_or_path):
        if not candidate or cfg.backend == "remote":
            continue
        resolved = ws.resolve(candidate).resolve()
        if resolved in by_path:
            return by_path[resolved]
    return None


def load_metrics(path: str | Path) -> dict[str, Any]:
    """``metrics`` of a written ``metrics.json`` (for notebooks and the app)."""
    return loads(Path(path).read_text(encoding="utf-8"), {}).get("metrics", {})

