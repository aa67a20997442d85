"""The Train tab: pick a stage, edit its YAML recipe, validate, start, watch, stop.

The recipe text is validated with the stage's config class and against the workspace (model
folder, dataset, output folder free and writable: ``visrl.jobs.validate_text``) before anything
starts; errors name the "train recipe" with line and column and show as a warning. The job is
``visrl train|merge CONFIG`` in its own process; the progress bar, ETA, log tail and loss plot
come from the store, so a reloaded page finds a running job again.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import gradio as gr

from visrl import jobs
from visrl.errors import VisRLError
from visrl_app import job_panel
from visrl_app.context import AppContext, warn

KINDS = ("train", "merge")
# stage label -> (job kind, recipe file name)
STAGES: dict[str, tuple[str, str]] = {
    "sft": ("train", "train_sft.yaml"),
    "dpo (VisRL stage 1: box step)": ("train", "train_rl_stage1.yaml"),
    "visrl (VisRL stage 2: box + answer)": ("train", "train_rl_stage2.yaml"),
    "grpo (online RL: IoU reward)": ("train", "train_grpo.yaml"),
    "merge LoRA": ("merge", "merge_lora.yaml"),
}


def recipe_files(ctx: AppContext, stage: str) -> list[str]:
    """Recipe paths for ``stage``: workspace configs first, then the repo's demo and full ones."""
    name = STAGES[stage][1]
    return [str(folder / name) for folder in ctx.config_dirs() if (folder / name).is_file()]


def load_recipe(ctx: AppContext, stage: str) -> tuple[Any, str]:
    files = recipe_files(ctx, stage)
    text = Path(files[0]).read_text(encoding="utf-8") if files else f"# no {STAGES[stage][1]} found\n"
    return gr.Dropdown(choices=files, value=files[0] if files else None), text


def read_recipe(path: str | None) -> str:
    return Path(path).read_text(encoding="utf-8") if path and Path(path).is_file() else ""


def validate(ctx: AppContext, stage: str, text: str) -> str:
    """Check the YAML text (no file is written) with the stage's config class and against the
    workspace: the model, the dataset, the output folder. Returns a one-line verdict."""
    kind = STAGES[stage][0]
    try:
        config = job_panel.check(ctx, kind, text)
    except VisRLError as exc:
        return warn(str(exc))
    gr.Info("the recipe is valid")
    output = jobs.job_target(kind, config, ctx.root)
    return f"✅ valid {kind} recipe" + (f" · writes `{ctx.workspace.relative(output)}`"
                                       if output and ctx.workspace.contains(output) else "")


def start_training(ctx: AppContext, job_id: int | None, stage: str, text: str) -> int | None:
    kind = STAGES[stage][0]
    try:
        new_id = job_panel.start(ctx, kind, text, name=stage.split(" ")[0])
    except VisRLError as exc:
        warn(str(exc))
        return job_id
    gr.Info(f"started {kind} job {new_id}")
    return new_id


def watch_selected(rows: Any, evt: gr.SelectData) -> int | None:
    """Clicking a row of the history watches that job."""
    row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
    try:
        return int(rows.iloc[row, 0]) if hasattr(rows, "iloc") else int(rows[row][0])
    except (IndexError, ValueError, TypeError):
        return None


def create_train_tab(ctx: AppContext) -> dict[str, Any]:
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
    monitor = job_panel.create_job_monitor(ctx, KINDS, job_state, "train", start_button, plot=True)
    history = monitor["outputs"][3]
    stage.change(functools.partial(load_recipe, ctx), [stage], [recipe, code], api_visibility="undocumented")
    recipe.change(read_recipe, [recipe], [code], api_visibility="undocumented")
    check.click(functools.partial(validate, ctx), [stage, code], [verdict], api_visibility="undocumented")
    job_panel.wire_start(start_button, functools.partial(start_training, ctx), [job_state, stage, code],
                         job_state, monitor)
    history.select(watch_selected, [history], [job_state],
                   api_visibility="undocumented").then(
        monitor["view"], monitor["watched"], monitor["outputs"], api_visibility="undocumented")
    return {"load": functools.partial(job_panel.load_latest, ctx, KINDS), "load_inputs": [],
            "load_outputs": [job_state, *monitor["outputs"]]}
