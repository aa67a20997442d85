"""The Train tab: pick a stage, edit its YAML recipe, validate, start, watch, stop.

The recipe text is validated with the stage's config class and against the workspace (model
folder, dataset, output folder free and writable: ``visrl.jobs.validate_text``) before anything
starts; errors name the "train recipe" with line and column and show as a warning. The job is
``visrl train|merge CONFIG`` in its own process; the progress bar, ETA, log tail and loss plot
come from the store, so a reloaded page finds a running job again. The tab's components are a
named set; handlers return views named after them (:mod:`visrl_app.components`).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr
import yaml

from visrl import jobs, stages
from visrl.errors import VisRLError
from visrl.train import plan as train_plan
from visrl_app import job_panel
from visrl_app.components import Components, Tab, fields, joined
from visrl_app.context import AppContext, warn

# The stages this tab offers (visrl.stages), by the label of their Stage choice.
STAGES: dict[str, stages.Stage] = {stage.title: stage for stage in stages.STAGES if stage.app_tab == "train"}
KINDS = tuple(dict.fromkeys(stage.kind for stage in STAGES.values()))


class StartAnswer(NamedTuple):
    """:func:`start_training`: the job to watch, the finished-run question's row, its text."""

    job_state: int | None
    finished_row: Any
    finished_question: str


class ChangedStart(NamedTuple):
    """:func:`start_changed`: the job to watch, the question's row (hidden), the recipe that runs."""

    job_state: int | None
    finished_row: Any
    code: str


class JobRecipe(NamedTuple):
    """:func:`job_recipe`: the stage, recipe file and editor text of a watched job."""

    stage: Any
    recipe: Any
    code: Any


TrainLoad = joined("TrainLoad", job_panel.LatestJob, JobRecipe)  # page load


def recipe_files(ctx: AppContext, stage: str) -> list[str]:
    """Recipe paths for ``stage``: workspace configs first, then the repo's demo and full ones."""
    name = STAGES[stage].recipe
    return [str(folder / name) for folder in ctx.config_dirs() if (folder / name).is_file()]


def load_recipe(ctx: AppContext, stage: str) -> tuple[Any, str]:
    files = recipe_files(ctx, stage)
    text = Path(files[0]).read_text(encoding="utf-8") if files else f"# no {STAGES[stage].recipe} found\n"
    return gr.Dropdown(choices=files, value=files[0] if files else None), text


def read_recipe(path: str | None) -> str:
    return Path(path).read_text(encoding="utf-8") if path and Path(path).is_file() else ""


def validate(ctx: AppContext, stage: str, text: str) -> str:
    """Check the YAML text (no file is written) with the stage's config class and against the
    workspace: the model, the dataset, the output folder. Returns a one-line verdict."""
    kind = STAGES[stage].kind
    try:
        config = job_panel.check(ctx, kind, text)
    except VisRLError as exc:
        return warn(str(exc))
    if kind == "train":
        try:
            train_plan.check_will_train(config, ctx.root)
        except VisRLError as exc:
            return warn(str(exc))
    gr.Info("the recipe is valid")
    output = jobs.job_target(kind, config, ctx.root)
    writes = f" · writes `{ctx.workspace.relative(output)}`" if output and ctx.workspace.contains(output) else ""
    return f"✅ valid {kind} recipe{writes}" + (
        f" · {train_plan.plan_run(config, ctx.root).describe()}" if kind == "train" else "")


def finished_question(ctx: AppContext, stage: str, text: str) -> str | None:
    """What to ask before starting ``text`` when its output already holds a finished run (it
    would train nothing), else None. An invalid recipe is left to the start's own checks."""
    kind = STAGES[stage].kind
    if kind != "train":
        return None
    try:
        config = job_panel.check(ctx, kind, text)
    except VisRLError:
        return None
    run = train_plan.plan_run(config, ctx.root)
    if not run.finished:
        return None
    steps = train_plan.continued(config, run)["max_steps"]
    return (f"**`{config['output_dir']}` already holds a finished run** ({run.checkpoint.name if run.checkpoint else ''}, "
            f"step {run.start_step} of {run.max_steps}): starting it again would train nothing. "
            f"**Start fresh** writes to `{train_plan.fresh_output(config, ctx.root)}`; **continue training** "
            f"resumes from step {run.start_step} up to step {steps} (max_steps {steps}).")


def set_key(text: str, key: str, value: Any) -> str:
    """``text`` (a YAML recipe) with top-level ``key`` set to ``value``; the rest, comments
    included, as it was. The new line says what changed, so the editor shows what runs."""
    line = f"{key}: {yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
    pattern = re.compile(rf"^{re.escape(key)}\s*:.*$", re.MULTILINE)
    if pattern.search(text):
        return pattern.sub(lambda _: line, text, count=1)
    return text.rstrip("\n") + f"\n{line}\n"


def changed_recipe(ctx: AppContext, stage: str, text: str, how: str) -> str:
    """``text`` made to train something: ``fresh`` = into the next free folder, ``continue`` =
    from its last checkpoint for as many steps again."""
    config = job_panel.check(ctx, STAGES[stage].kind, text)
    if how == "fresh":
        return set_key(text, "output_dir", train_plan.fresh_output(config, ctx.root))
    return set_key(text, "max_steps", train_plan.continued(config, train_plan.plan_run(config, ctx.root))["max_steps"])


def start_training(ctx: AppContext, job_id: int | None, stage: str, text: str) -> StartAnswer:
    """Start the recipe, unless its output holds a finished run: then ask (the choice row)."""
    question = finished_question(ctx, stage, text)
    if question:
        return StartAnswer(job_state=job_id, finished_row=gr.Column(visible=True), finished_question=question)
    return StartAnswer(job_state=_start(ctx, job_id, stage, text), finished_row=gr.Column(visible=False),
                       finished_question="")


def _start(ctx: AppContext, job_id: int | None, stage: str, text: str) -> int | None:
    kind = STAGES[stage].kind
    try:
        new_id = job_panel.start(ctx, kind, text, name=STAGES[stage].name)
    except VisRLError as exc:
        warn(str(exc))
        return job_id
    gr.Info(f"started {kind} job {new_id}")
    return new_id


def start_changed(ctx: AppContext, how: str, job_id: int | None, stage: str, text: str) -> ChangedStart:
    """The choice row's answer: start the recipe changed ``how`` (``fresh`` / ``continue``); the
    editor shows the recipe that runs."""
    try:
        text = changed_recipe(ctx, stage, text, how)
    except VisRLError as exc:
        warn(str(exc))
        return ChangedStart(job_state=job_id, finished_row=gr.Column(visible=False), code=text)
    return ChangedStart(job_state=_start(ctx, job_id, stage, text), finished_row=gr.Column(visible=False), code=text)


def stage_of(job: dict[str, Any]) -> str | None:
    """The Stage choice a job was started as (its kind, and a train job's ``stage``)."""
    stage = stages.stage_of_job(job["kind"], _job_config(job))
    return stage.title if stage is not None and stage.title in STAGES else None


def _job_config(job: dict[str, Any]) -> dict[str, Any]:
    try:
        config = json.loads(job.get("config") or "{}")
    except ValueError:
        return {}
    return config if isinstance(config, dict) else {}


def job_recipe(ctx: AppContext, job_id: int | None) -> JobRecipe:
    """The stage, recipe and editor showing the config of the job the panel shows: its recipe
    file as it was started, else its recorded config. Unchanged when no job is shown."""
    job = job_panel.shown_job(ctx, job_id)
    if job is None or job["kind"] not in KINDS:
        return JobRecipe(stage=gr.skip(), recipe=gr.skip(), code=gr.skip())
    path = Path(job.get("config_path") or "")
    path = ctx.workspace.resolve(path)
    text = (path.read_text(encoding="utf-8") if job.get("config_path") and path.is_file()
            else yaml.safe_dump(_job_config(job), sort_keys=False))
    stage = stage_of(job)
    files = recipe_files(ctx, stage) if stage else []
    shown = str(path) if job.get("config_path") else None
    return JobRecipe(stage=gr.Radio(value=stage) if stage else gr.skip(),
                     recipe=gr.Dropdown(choices=files + ([shown] if shown and shown not in files else []), value=shown),
                     code=text)


def load(ctx: AppContext) -> Any:
    """On page load: the newest job of the tab, and its config in the editor (a ``TrainLoad``)."""
    watched = job_panel.load_latest(ctx, KINDS)
    return TrainLoad(**watched._asdict(), **job_recipe(ctx, watched.job_state)._asdict())


def watch_selected(rows: Any, evt: gr.SelectData) -> int | None:
    """Clicking a row of the history watches that job."""
    row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
    try:
        return int(rows.iloc[row, 0]) if hasattr(rows, "iloc") else int(rows[row][0])
    except (IndexError, ValueError, TypeError):
        return None


def create_train_tab(ctx: AppContext) -> Tab:
    job_state = gr.State(None)
    first = next(iter(STAGES))
    files = recipe_files(ctx, first)
    with gr.Row():
        stage = gr.Radio(list(STAGES), value=first, label="Stage", elem_id="train-stage", scale=3)
        recipe = gr.Dropdown(files, value=files[0] if files else None, label="Recipe", scale=3,
                             elem_id="train-recipe")
    code = gr.Code(read_recipe(files[0] if files else None), language="yaml", label="Config (editable)",
                   elem_id="train-config", lines=14, max_lines=24, interactive=True)
    with gr.Row():
        verdict = gr.Markdown(elem_id="train-verdict")
        check = gr.Button("Validate", elem_id="train-validate", scale=0, min_width=120)
        start_button = gr.Button("Start training", variant="primary", elem_id="train-start", scale=0,
                                 min_width=200)
    # The question on a line of its own, the answers below it: beside it, at 1024 px, each
    # button's label wrapped onto two lines.
    with gr.Column(visible=False, elem_id="train-finished") as finished_row:
        question = gr.Markdown(elem_id="train-finished-question")
        with gr.Row():
            fresh = gr.Button("Start fresh in a new folder", variant="primary", elem_id="train-fresh", scale=0,
                              min_width=260)
            more = gr.Button("Continue training", elem_id="train-continue", scale=0, min_width=200)
            cancel = gr.Button("Cancel", elem_id="train-finished-cancel", scale=0, min_width=100)
    monitor = job_panel.create_job_monitor(ctx, KINDS, job_state, "train", start_button, plot=True)
    components = Components(
        job_state=job_state, stage=stage, recipe=recipe, code=code, verdict=verdict, validate=check,
        start=start_button, finished_row=finished_row, finished_question=question, fresh=fresh, more=more,
        cancel=cancel).merge(monitor.components)
    history = components["history"]
    # .input, not .change: showing a job's config sets these too, and must not load a file over it.
    stage.input(functools.partial(load_recipe, ctx), [stage], [recipe, code], api_visibility="undocumented")
    recipe.input(read_recipe, [recipe], [code], api_visibility="undocumented")
    check.click(functools.partial(validate, ctx), [stage, code], [verdict], api_visibility="undocumented")
    job_panel.wire_start(start_button, functools.partial(start_training, ctx), [job_state, stage, code],
                         monitor, outputs=components.outputs(StartAnswer))
    for button, how in ((fresh, "fresh"), (more, "continue")):
        button.click(functools.partial(start_changed, ctx, how), [job_state, stage, code],
                     components.outputs(ChangedStart), api_visibility="undocumented").then(
            monitor.view, monitor.watched, monitor.outputs, api_visibility="undocumented")
    cancel.click(lambda: gr.Column(visible=False), None, [finished_row], queue=False, api_visibility="undocumented")
    history.select(watch_selected, [history], [job_state],
                   api_visibility="undocumented").then(
        functools.partial(job_recipe, ctx), [job_state], components.outputs(JobRecipe),
        api_visibility="undocumented").then(
        monitor.view, monitor.watched, monitor.outputs, api_visibility="undocumented")
    return Tab(components, functools.partial(load, ctx), load_inputs=(), load_outputs=fields(TrainLoad))
