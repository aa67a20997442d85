"""Watching background jobs (generate, train, merge, eval) from a tab.

Jobs are ``visrl.jobs`` subprocesses; the ``jobs`` table is the truth, so a reloaded page or a
restarted app finds a running job again (:func:`latest_job`). A ``gr.Timer`` polls
:func:`job_view`; the job being watched is per-browser ``gr.State``.
"""

from __future__ import annotations

import datetime as dt
import functools
import html
from pathlib import Path
from typing import Any

import gradio as gr
import yaml

from visrl import jobs
from visrl.errors import VisRLError
from visrl_app.context import AppContext, warn

POLL_S = 2.0  # a job step takes seconds; polling faster only loads the store
HISTORY_COLUMNS = ["id", "kind", "name", "status", "progress", "created", "ended", "message"]


def write_config(ctx: AppContext, kind: str, text: str) -> Path:
    """Save a YAML recipe the app composed or the user edited under ``runs/app-configs/``."""
    folder = ctx.workspace.runs_dir / "app-configs"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    path = folder / f"{kind}-{stamp}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def start(ctx: AppContext, kind: str, config: str | dict[str, Any], name: str = "") -> int:
    """Write ``config`` (YAML text or a mapping) and start the job; ConfigError if it is invalid."""
    text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
    path = write_config(ctx, kind, text)
    return jobs.start_job(ctx.workspace, kind, path, name=name or kind)


def start_from_form(ctx: AppContext, kind: str, compose: Any, job_id: int | None, what: str) -> int | None:
    """Start ``compose()``'s config as a ``kind`` job; on a user error warn and keep ``job_id``."""
    try:
        new_id = start(ctx, kind, compose(), name=kind)
    except VisRLError as exc:
        warn(str(exc))
        return job_id
    gr.Info(f"started {what} job {new_id}")
    return new_id


def latest_job(ctx: AppContext, kinds: tuple[str, ...]) -> int | None:
    """The newest active job of ``kinds``, else the newest of any status (for a reloaded page)."""
    jobs.refresh_jobs(ctx.store)
    rows = [j for j in ctx.store.jobs(limit=100) if j["kind"] in kinds]
    active = [j for j in rows if j["status"] in jobs.ACTIVE]
    chosen = active or rows
    return chosen[0]["id"] if chosen else None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def progress_html(job: dict[str, Any] | None) -> str:
    """A progress bar with step, percentage and ETA (the job's ``eta_s`` as its Progress wrote it)."""
    if job is None:
        return "<div class='visrl-progress'>No job yet.</div>"
    fraction = float(job.get("progress") or 0.0)
    if job["status"] == "succeeded":
        fraction = 1.0
    step, total = job.get("step") or 0, job.get("total") or 0
    steps = f"step {step}/{total}" if total else f"step {step}"
    eta = f" · ETA {_duration(job.get('eta_s'))}" if job["status"] in jobs.ACTIVE and job.get("eta_s") else ""
    label = f"job {job['id']} ({job['kind']}) · {job['status']} · {steps} · {fraction:.0%}{eta}"
    return (f"<div class='visrl-progress' data-status='{job['status']}'>"
            f"<progress max='1' value='{fraction:.4f}' style='width:100%'></progress>"
            f"<div>{html.escape(label)}</div></div>")


def status_markdown(job: dict[str, Any] | None) -> str:
    if job is None:
        return "No job started from here yet."
    lines = [f"**Job {job['id']}** · {job['kind']} · **{job['status']}**"]
    if job.get("config_path"):
        lines.append(f"config `{job['config_path']}`")
    if job.get("message"):
        lines.append(f"message: {job['message'].splitlines()[0][:300]}")
    return " · ".join(lines)


def history_rows(ctx: AppContext, kinds: tuple[str, ...]) -> list[list[Any]]:
    jobs.refresh_jobs(ctx.store)
    return [[j["id"], j["kind"], j["name"], j["status"], round(float(j.get("progress") or 0.0), 3),
             j["created_at"], j.get("ended_at") or "", (j.get("message") or "").splitlines()[0][:120]
             if j.get("message") else ""]
            for j in ctx.store.jobs(limit=50) if j["kind"] in kinds]


def metrics_frame(ctx: AppContext, job_id: int | None, contains: str = "loss") -> Any:
    """Long-format metrics of a job (step, value, name) whose name contains ``contains``."""
    import pandas as pd  # gradio depends on pandas; imported here to keep start-up lean

    rows = [] if job_id is None else [
        {"step": r["step"], "value": r["value"], "name": r["name"]}
        for r in ctx.store.metrics(job_id) if contains in r["name"]]
    return pd.DataFrame(rows, columns=["step", "value", "name"])


def job_view(ctx: AppContext, kinds: tuple[str, ...], job_id: int | None,
             log_lines: int = 60) -> tuple[Any, ...]:
    """(status markdown, progress html, log tail, history rows, loss frame) of ``job_id``."""
    job = None
    if job_id is not None:
        try:
            job = jobs.job_status(ctx.workspace, job_id)
        except VisRLError:
            job = None
    log = jobs.log_tail(ctx.workspace, job_id, lines=log_lines) if job else ""
    return (status_markdown(job), progress_html(job), log, history_rows(ctx, kinds),
            metrics_frame(ctx, job_id))


def stop(ctx: AppContext, job_id: int | None) -> str:
    if job_id is None:
        return warn("no job to stop")
    try:
        job = jobs.stop_job(ctx.workspace, job_id, timeout=1.0)
    except VisRLError as exc:
        return warn(str(exc))
    return f"stop requested: job {job_id} is {job['status']}"


def create_job_monitor(ctx: AppContext, kinds: tuple[str, ...], job_state: gr.State,
                       prefix: str, plot: bool = False) -> dict[str, Any]:
    """Status line, progress bar, stop button, log tail, optional loss plot and history table."""
    status = gr.Markdown(elem_id=f"{prefix}-status")
    with gr.Row():
        bar = gr.HTML(progress_html(None), elem_id=f"{prefix}-progress", scale=4)
        stop_button = gr.Button("Stop job", variant="stop", elem_id=f"{prefix}-stop", scale=1)
    loss = gr.LinePlot(metrics_frame(ctx, None), x="step", y="value", color="name", title="Loss",
                       visible=plot, elem_id=f"{prefix}-loss", height=260)
    log = gr.Textbox(label="Log (tail)", lines=12, max_lines=12, autoscroll=True,
                     elem_id=f"{prefix}-log", elem_classes=["visrl-mono"])
    with gr.Accordion("Job history", open=False):
        history = gr.Dataframe(headers=HISTORY_COLUMNS, value=history_rows(ctx, kinds),
                               interactive=False, elem_id=f"{prefix}-history", wrap=True)
    outputs = [status, bar, log, history, loss]
    view = functools.partial(job_view, ctx, kinds)
    timer = gr.Timer(POLL_S)
    timer.tick(view, [job_state], outputs, api_visibility="undocumented", show_progress="hidden")
    stop_button.click(functools.partial(stop, ctx), [job_state], [status],
                      api_visibility="undocumented").then(view, [job_state], outputs,
                                                           api_visibility="undocumented")
    return {"outputs": outputs, "view": view, "timer": timer}


def load_latest(ctx: AppContext, kinds: tuple[str, ...]) -> tuple[Any, ...]:
    """On page load: watch the newest running job of these kinds again (survives reloads)."""
    job_id = latest_job(ctx, kinds)
    return (job_id, *job_view(ctx, kinds, job_id))
