"""Loss curves for the Train tab: one curve across a resumed job, and runs overlaid.

A training job resumed from a checkpoint of an earlier job (``resume_from_checkpoint: auto``
and the same ``output_dir``) logs from the step it resumed at; the curve the user wants is
the earlier job's points before that step followed by the new job's. Overlaid runs are other
jobs' curves, labelled ``#id metric``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from visrl import jobs
from visrl.errors import VisRLError
from visrl_app.context import AppContext

COLUMNS = ["step", "value", "name"]
# The chart's vega spec is built once, from the types of the FIRST frame it gets, and later frames
# only swap the data (gradio 6.31's NativePlot). An empty frame has object columns, which gradio
# calls "nominal": a page opened before any point was logged drew no line and listed the losses
# as text labels on the y axis. Every frame, empty or not, carries these types.
DTYPES = {"step": "int64", "value": "float64", "name": "str"}
# The Trainer's end-of-run summary: the mean loss of the whole run, logged once at the last step.
# It is no point of the curve (drawn, it was a lone one-point series beside the real one).
SUMMARY_METRICS = frozenset({"train_loss"})
# Series colours, in order of first appearance (gradio's own accent first).
PALETTE = ("#f97316", "#3b82f6", "#22c55e", "#a855f7", "#ef4444", "#14b8a6", "#eab308", "#64748b")


def _points(ctx: AppContext, job_id: int, contains: str, before: float = float("inf")) -> list[dict[str, Any]]:
    return [{"step": r["step"], "value": r["value"], "name": r["name"]}
            for r in ctx.store.metrics(job_id)
            if contains in r["name"] and r["name"] not in SUMMARY_METRICS and r["step"] < before]


def _config(job: dict[str, Any]) -> dict[str, Any]:
    try:
        config = json.loads(job.get("config") or "{}")
    except ValueError:
        return {}
    return config if isinstance(config, dict) else {}


def resumed_points(ctx: AppContext, job_id: int, contains: str = "loss") -> list[dict[str, Any]]:
    """``job_id``'s points, preceded by those of the earlier jobs it resumed (oldest first).

    A job that resumed from checkpoint-N (its ``start_step``, written when training begins)
    continues the newest earlier job into the same output folder that reached step N: that
    job's curve up to N (itself joined the same way), then this job's points, which may be none.
    """
    job = ctx.store.job(job_id)
    points = _points(ctx, job_id, contains)
    if job["kind"] != "train":
        return points
    start = _start_step(job, points)
    earlier = _continued_job(ctx, job, start) if start else None
    if earlier is None:
        return points
    return [p for p in resumed_points(ctx, earlier["id"], contains) if p["step"] <= start] + points


def _start_step(job: dict[str, Any], points: list[dict[str, Any]]) -> int:
    """The step ``job`` started at; for a row older than ``start_step``, a guess: it resumed at
    the step before its first logged one when that is past its first logging step."""
    if job.get("start_step") is not None:
        return int(job["start_step"])
    logging = _config(job).get("logging_steps") or 1
    first = min((p["step"] for p in points), default=0)
    return first - 1 if first > logging else 0


def _continued_job(ctx: AppContext, job: dict[str, Any], start: int) -> dict[str, Any] | None:
    """The newest train job before ``job`` into the same output folder that got to ``start``."""
    root = ctx.root
    target = jobs.job_target("train", _config(job), root)
    if target is None:
        return None
    return next((j for j in ctx.store.jobs(limit=200, kind="train")  # newest first
                 if j["id"] < job["id"] and (j["step"] or 0) >= start
                 and jobs.job_target("train", _config(j), root) == target), None)


def loss_frame(ctx: AppContext, job_id: int | None, overlay: Sequence[int] = (),
               contains: str = "loss") -> Any:
    """Long-format (step, value, name) of the watched job's curve and the overlaid jobs'.

    Without overlays the names are the metric names (``loss``, ``eval_loss``); with them each
    is prefixed ``#id`` so the legend tells runs apart.
    """
    shown = [job_id] if job_id is not None else []
    shown += [int(j) for j in overlay or () if j is not None and int(j) not in shown]
    rows: list[dict[str, Any]] = []
    for j in shown:
        try:
            points = resumed_points(ctx, j, contains)
        except VisRLError:  # a job deleted since it was picked
            continue
        if len(shown) > 1:
            points = [{**p, "name": f"#{j} {p['name']}"} for p in points]
        rows += points
    return frame(rows)


def frame(rows: Sequence[dict[str, Any]]) -> Any:
    """``rows`` of (step, value, name) as the chart's frame, with :data:`DTYPES` even when empty."""
    import pandas as pd  # gradio depends on pandas; imported here to keep start-up lean

    return pd.DataFrame({column: pd.Series([row[column] for row in rows], dtype=dtype)
                         for column, dtype in DTYPES.items()})


def color_map(names: Sequence[str]) -> dict[str, str]:
    """A colour per series name, in order of first appearance."""
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(dict.fromkeys(names))}


def recolor(shown: Any) -> Any:
    """The plot's colour map for the series it shows now (``shown``: its value as the browser
    sends it back, columns and rows).

    The browser builds the chart's spec, colour scale included, from the props it has when the
    spec is (re)built, and a new frame only swaps the data: a series first named after that (the
    first logged point of a running job, an overlaid run) had no colour and drew no line. A
    changed map makes it rebuild the spec. This runs on the plot's change event, after the new
    frame is in place: a map sent with the frame rebuilt the spec from the previous frame.
    """
    import gradio as gr

    shown = shown.model_dump() if hasattr(shown, "model_dump") else shown or {}
    columns, rows = shown.get("columns") or [], shown.get("data") or []
    at = columns.index("name") if "name" in columns else None
    return gr.LinePlot(color_map=color_map([row[at] for row in rows] if at is not None else []))


def overlay_choices(ctx: AppContext) -> list[tuple[str, int]]:
    """Training jobs that logged a loss, newest first, as (label, job id)."""
    logged = ctx.store.jobs_with_metric("loss")
    return [(f"#{j['id']} {j['name']} ({j['status']})", j["id"])
            for j in ctx.store.jobs(limit=100, kind="train") if j["id"] in logged]
