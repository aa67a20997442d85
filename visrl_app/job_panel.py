"""Watching background jobs (generate, train, merge, eval) from a tab.

Jobs are ``visrl.jobs`` subprocesses; the ``jobs`` table is the truth, so a reloaded page or a
restarted app finds a running job again (:func:`latest_job`). A ``gr.Timer`` polls
:func:`job_view`; the job being watched is per-browser ``gr.State``. The panel's components are a
named set (:class:`JobMonitor`); its handlers return views named after them (:mod:`visrl_app.components`).
"""

from __future__ import annotations

import datetime as dt
import functools
import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr
import yaml

from visrl import jobs
from visrl.errors import VisRLError
from visrl_app import curves
from visrl_app.components import Components, joined
from visrl_app.context import AppContext, warn

POLL_S = 2.0  # a job step takes seconds; polling faster only loads the store
HISTORY_COLUMNS = ["id", "kind", "name", "status", "progress", "created", "ended", "message"]


class JobView(NamedTuple):
    """:func:`job_view`'s outputs, named after the panel's components."""

    status: str  # markdown line
    progress: str  # html bar
    log: str  # tail of the job's log
    history: list[list[Any]]  # rows of HISTORY_COLUMNS
    loss: Any  # frame of the loss curves


class Controls(NamedTuple):
    """:func:`controls`: the start, stop and kill buttons' updates."""

    start: Any
    stop: Any
    kill: Any


PanelView = joined("PanelView", JobView, Controls)  # panel_view: the timer's outputs
LatestJob = joined("LatestJob", "job_state", PanelView)  # load_latest: the job watched, then its panel


def write_config(ctx: AppContext, kind: str, text: str) -> Path:
    """Save a YAML recipe the app composed or the user edited under ``runs/app-configs/``."""
    folder = ctx.workspace.runs_dir / "app-configs"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    path = folder / f"{kind}-{stamp}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def start(ctx: AppContext, kind: str, config: str | dict[str, Any], name: str = "") -> int:
    """Check ``config`` (YAML text or a mapping) and what it needs, write it and start the job.

    The text is checked before it is written, so an error names the "recipe" with its line and
    column, not a file under runs/app-configs/. JobError while another job writes its output.
    """
    text = recipe_text(config)
    check(ctx, kind, text)
    path = write_config(ctx, kind, text)
    return jobs.start_job(ctx.workspace, kind, path, name=name or kind)


def recipe_text(config: str | dict[str, Any]) -> str:
    return config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)


def check(ctx: AppContext, kind: str, config: str | dict[str, Any]) -> dict[str, Any]:
    """The validated recipe: keys and values, the model, dataset and output folder it needs,
    and no active job writing its output (a user error says which, else the mapping)."""
    validated = jobs.validate_text(kind, recipe_text(config), ctx.workspace, source=f"{kind} recipe")
    jobs.check_output_free(ctx.store, kind, validated)
    return validated


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


def done_fraction(job: dict[str, Any]) -> float:
    """How much of ``job`` is done, 0-1 (a succeeded job is done, whatever its last step said)."""
    return 1.0 if job["status"] == "succeeded" else float(job.get("progress") or 0.0)


def progress_html(job: dict[str, Any] | None) -> str:
    """A progress bar with step, percentage and ETA (the job's ``eta_s`` as its Progress wrote it)."""
    if job is None:
        return "<div class='visrl-progress'>No job yet.</div>"
    fraction = done_fraction(job)
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
    return [[j["id"], j["kind"], j["name"], j["status"], f"{done_fraction(j):.0%}",
             j["created_at"], j.get("ended_at") or "", (j.get("message") or "").splitlines()[0][:120]
             if j.get("message") else ""]
            for j in ctx.store.jobs(limit=50) if j["kind"] in kinds]


def job_view(ctx: AppContext, kinds: tuple[str, ...], job_id: int | None,
             log_lines: int = 60, overlay: Sequence[int] = ()) -> JobView:
    """The status line, progress bar, log tail, history rows and loss frame of ``job_id``.

    The loss frame follows a resumed job back through the jobs it continues and adds the
    ``overlay`` jobs' curves (:func:`visrl_app.curves.loss_frame`).
    """
    job = None
    if job_id is not None:
        try:
            job = jobs.job_status(ctx.workspace, job_id)
        except VisRLError:
            job = None
    log = jobs.log_tail(ctx.workspace, job_id, lines=log_lines) if job else ""
    return JobView(status=status_markdown(job), progress=progress_html(job), log=log,
                   history=history_rows(ctx, kinds), loss=curves.loss_frame(ctx, job_id if job else None, overlay))


def stop(ctx: AppContext, job_id: int | None) -> str:
    """Ask the job to stop once (it saves at the end of its step); a repeat changes nothing."""
    if job_id is None:
        return warn("no job to stop")
    try:
        before = ctx.store.job(job_id)["status"]
        job = jobs.stop_job(ctx.workspace, job_id, timeout=1.0)
    except VisRLError as exc:
        return warn(str(exc))
    if before == "stopping":
        return (f"job {job_id} is already stopping: it saves at the end of its current step. "
                "Kill it only if it hangs.")
    return f"stop requested: job {job_id} is {job['status']}"


def ask_kill(ctx: AppContext, job_id: int | None) -> tuple[Any, Any, str]:
    """Show the kill confirmation for the watched job (row, the job it is about, question)."""
    job = ctx.store.job(job_id) if job_id is not None else None
    if job is None or job["status"] not in jobs.ACTIVE:
        return gr.Row(visible=False), None, warn("no running job to kill")
    question = (f"**Kill job {job_id} ({job['kind']}) now?** It gets no chance to save: work since "
                "its last checkpoint is lost. Stop is the safe way.")
    return gr.Row(visible=True), job_id, question


def kill(ctx: AppContext, job_id: int | None) -> tuple[Any, None, str]:
    """Kill the job the confirmation was about (not whichever is watched by now)."""
    hidden = gr.Row(visible=False)
    if job_id is None:
        return hidden, None, ""
    try:
        job = jobs.kill_job(ctx.workspace, job_id)
    except VisRLError as exc:
        return hidden, None, warn(str(exc))
    return hidden, None, f"job {job_id} killed: {job['status']}"


def controls(job: dict[str, Any] | None) -> Controls:
    """(start, stop, kill) buttons for the watched job: Start is off while it runs, Stop is
    off once it is stopping (one request is enough), Kill is there only while it is active."""
    status = job["status"] if job else None
    active = status in jobs.ACTIVE
    return Controls(start=gr.Button(interactive=not active),
                    stop=gr.Button(interactive=status in jobs.STOPPABLE,
                                   value="Stopping…" if status == "stopping" else "Stop job"),
                    kill=gr.Button(visible=active))


def shown_job(ctx: AppContext, job_id: int | None) -> dict[str, Any] | None:
    """The job a panel shows, or None when it shows none or the job is gone."""
    if job_id is None:
        return None
    try:
        return ctx.store.job(job_id)
    except VisRLError:
        return None


def panel_view(ctx: AppContext, kinds: tuple[str, ...], job_id: int | None,
               overlay: Sequence[int] | None = None) -> Any:
    """:func:`job_view`'s outputs and the :func:`controls` of the same job (a ``PanelView``)."""
    job = shown_job(ctx, job_id)
    return PanelView(**job_view(ctx, kinds, job_id, overlay=overlay or ())._asdict(), **controls(job)._asdict())


@dataclass(frozen=True)
class JobMonitor:
    """A built job panel: its components by name (``job_state``, ``status``, ``progress``,
    ``log``, ``history``, ``loss``, ``overlay``, ``start``, ``stop``, ``kill``, the kill
    confirmation's parts) and ``view``, the :func:`panel_view` of the job ``watched`` names."""

    components: Components
    view: Callable[..., Any]

    @property
    def watched(self) -> list[Any]:
        """The view's inputs: the watched job and the loss plot's overlaid runs."""
        return self.components.pick("job_state", "overlay")

    @property
    def outputs(self) -> list[Any]:
        """The view's outputs (a ``PanelView``'s fields)."""
        return self.components.outputs(PanelView)


def create_job_monitor(ctx: AppContext, kinds: tuple[str, ...], job_state: gr.State,
                       prefix: str, start_button: gr.Button, plot: bool = False) -> JobMonitor:
    """Status line, progress bar, stop and kill buttons, log tail, optional loss plot and history.

    ``start_button`` is disabled while the watched job runs (and at once on a click, before
    the server answers); :func:`visrl.jobs.start_job` refuses a second job into the same output
    folder whatever the page shows.
    """
    status = gr.Markdown(elem_id=f"{prefix}-status")
    with gr.Row():
        bar = gr.HTML(progress_html(None), elem_id=f"{prefix}-progress", scale=4)
        stop_button = gr.Button("Stop job", variant="stop", elem_id=f"{prefix}-stop", scale=1,
                                interactive=False)
        kill_button = gr.Button("Kill…", variant="secondary", elem_id=f"{prefix}-kill", scale=0,
                                min_width=80, visible=False)
    pending_kill = gr.State(None)
    with gr.Row(visible=False, elem_id=f"{prefix}-kill-confirm") as confirm_row:
        question = gr.Markdown(elem_id=f"{prefix}-kill-question")
        confirm = gr.Button("Yes, kill it", variant="stop", elem_id=f"{prefix}-kill-yes", scale=0, min_width=120)
        cancel = gr.Button("Cancel", elem_id=f"{prefix}-kill-cancel", scale=0, min_width=90)
    with gr.Row(visible=plot):
        # From 0: on an axis fitted to the data, a loss going 1.27 -> 1.00 (-21 %) looked like a fall to nothing.
        empty = curves.loss_frame(ctx, None)
        loss = gr.LinePlot(empty, x="step", y="value", color="name", title="Loss", elem_id=f"{prefix}-loss",
                           height=260, scale=4, y_lim=[0, None], color_map=curves.color_map([]))
        overlay = gr.Dropdown(curves.overlay_choices(ctx) if plot else [], multiselect=True, value=[],
                              label="Overlay runs", elem_id=f"{prefix}-overlay", scale=1, min_width=180)
    log = gr.Textbox(label="Log (tail)", lines=12, max_lines=12, autoscroll=True,
                     elem_id=f"{prefix}-log", elem_classes=["visrl-mono"])
    with gr.Accordion("Job history", open=False):
        history = gr.Dataframe(headers=HISTORY_COLUMNS, value=history_rows(ctx, kinds),
                               interactive=False, elem_id=f"{prefix}-history", wrap=True)
    components = Components(job_state=job_state, status=status, progress=bar, log=log, history=history,
                            loss=loss, overlay=overlay, start=start_button, stop=stop_button, kill=kill_button,
                            pending_kill=pending_kill, kill_confirm=confirm_row, kill_question=question,
                            kill_yes=confirm, kill_cancel=cancel)
    monitor = JobMonitor(components, functools.partial(panel_view, ctx, kinds))
    view, watched, outputs = monitor.view, monitor.watched, monitor.outputs
    if plot:  # (a hidden plot needs no colours, nor a request at every poll)
        loss.change(curves.recolor, [loss], [loss], api_visibility="undocumented", queue=False,
                    show_progress="hidden")
    timer = gr.Timer(POLL_S)
    components.add(timer=timer)
    timer.tick(view, watched, outputs, api_visibility="undocumented", show_progress="hidden")
    overlay.input(view, watched, outputs, api_visibility="undocumented")
    overlay.focus(lambda: gr.Dropdown(choices=curves.overlay_choices(ctx)), None, [overlay],
                  api_visibility="undocumented", queue=False)
    # Disabled at once, in the browser: a second click must not reach the server as a second stop.
    stop_button.click(lambda: gr.Button(interactive=False), None, [stop_button], queue=False,
                      api_visibility="undocumented").then(
        functools.partial(stop, ctx), [job_state], [status], api_visibility="undocumented").then(
        view, watched, outputs, api_visibility="undocumented")
    kill_button.click(functools.partial(ask_kill, ctx), [job_state], [confirm_row, pending_kill, question],
                      api_visibility="undocumented")
    confirm.click(functools.partial(kill, ctx), [pending_kill], [confirm_row, pending_kill, status],
                  api_visibility="undocumented").then(view, watched, outputs, api_visibility="undocumented")
    cancel.click(lambda: (gr.Row(visible=False), None), None, [confirm_row, pending_kill],
                 api_visibility="undocumented", queue=False)
    return monitor


def wire_start(start_button: gr.Button, start_fn: Any, inputs: list[Any], monitor: JobMonitor,
               outputs: Sequence[Any] | None = None) -> None:
    """Start button: disabled at once (a double click sends one start), then ``start_fn``
    (returning the job to watch, or a view filling ``outputs``, the watched job among them),
    then the panel shows the new job (and enables Start again if nothing runs)."""
    start_button.click(lambda: gr.Button(interactive=False), None, [start_button], queue=False,
                       api_visibility="undocumented").then(
        start_fn, inputs, list(outputs) if outputs is not None else monitor.components.pick("job_state"),
        api_visibility="undocumented").then(
        monitor.view, monitor.watched, monitor.outputs, api_visibility="undocumented")


def load_latest(ctx: AppContext, kinds: tuple[str, ...]) -> Any:
    """On page load: watch the newest running job of these kinds again (survives reloads); a
    ``LatestJob`` view (the job, then its panel)."""
    job_id = latest_job(ctx, kinds)
    return LatestJob(job_state=job_id, **panel_view(ctx, kinds, job_id)._asdict())
