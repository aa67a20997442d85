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
# The Trainer's end-of-run summary: the mean loss of the whole run, logged once at the last step.
# It is no point of the curve (drawn, it was a lone one-point series beside the real one).
SUMMARY_METRICS = frozenset({"train_loss"})


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

    A job resumed when its first logged step is past its ``logging_steps``; the job before it
    into the same output folder contributes its points below that step, and so on back.
    """
    points = _points(ctx, job_id, contains)
    job = ctx.store.job(job_id)
    if job["kind"] != "train" or not points:
        return points
    root = ctx.root
    target = jobs.job_target("train", _config(job), root)
    earlier = [j for j in ctx.store.jobs(limit=200, kind="train")
               if j["id"] < job_id and jobs.job_target("train", _config(j), root) == target]
    first, logging = min(p["step"] for p in points), _config(job).get("logging_steps") or 1
    for prev in earlier:  # newest first
        if target is None or first <= logging:
            break  # this part started from scratch
        before = _points(ctx, prev["id"], contains, before=first)
        if not before:
            break
        points = before + points
        first, logging = min(p["step"] for p in before), _config(prev).get("logging_steps") or 1
    return points


def loss_frame(ctx: AppContext, job_id: int | None, overlay: Sequence[int] = (),
               contains: str = "loss") -> Any:
    """Long-format (step, value, name) of the watched job's curve and the overlaid jobs'.

    Without overlays the names are the metric names (``loss``, ``eval_loss``); with them each
    is prefixed ``#id`` so the legend tells runs apart.
    """
    import pandas as pd  # gradio depends on pandas; imported here to keep start-up lean

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
    return pd.DataFrame(rows, columns=COLUMNS)


def overlay_choices(ctx: AppContext) -> list[tuple[str, int]]:
    """Training jobs that logged a loss, newest first, as (label, job id)."""
    logged = ctx.store.jobs_with_metric("loss")
    return [(f"#{j['id']} {j['name']} ({j['status']})", j["id"])
            for j in ctx.store.jobs(limit=100, kind="train") if j["id"] in logged]
