"""The Generate tab: start a self-evolution rollout job (``visrl generate``) and watch it.

The form composes a :class:`visrl.generate.GenerateConfig` YAML (starting from the demo recipe's
values), saved under ``runs/app-configs/``; the job writes rollouts and pending pairs to the store,
where the Pairs tab finds them.
"""

from __future__ import annotations

import functools
from typing import Any

import gradio as gr

from visrl.config import read_yaml
from visrl.errors import VisRLError
from visrl_app import job_panel
from visrl_app.context import AppContext, model_choices, model_dropdown, resolve_model

KINDS = ("generate",)
ANSWER_JUDGES = ("auto", "exact", "f1", "anls", "number", "model")  # visrl.judges.ANSWER_JUDGES
CROP_JUDGES = ("iou", "iou_threshold", "model", "none")  # visrl.judges.CROP_JUDGES


def base_recipe(ctx: AppContext) -> dict[str, Any]:
    """The first generate.yaml found (workspace configs, then the repo's demo), else {}."""
    for folder in ctx.config_dirs():
        path = folder / "generate.yaml"
        if path.is_file():
            return read_yaml(path)
    return {}


def compose_config(ctx: AppContext, model: str, dataset: str, split: str, limit: float | None,
                   attempts: float, temperature: float, answer_judge: str, crop_judge: str,
                   judge_base_url: str, judge_model: str) -> dict[str, Any]:
    """The GenerateConfig mapping for the form's values (unknown keys never reach the file)."""
    if not model:
        raise VisRLError("pick a model or checkpoint to generate with")
    if not dataset:
        raise VisRLError("pick a dataset to generate on")
    model_path, adapter = resolve_model(ctx, model)
    config = {**base_recipe(ctx), "model_name_or_path": model_path, "adapter_name_or_path": adapter,
              "dataset": dataset, "split": split or "train",
              "limit": int(limit) if limit else None, "attempts": int(attempts),
              "temperature": float(temperature), "answer_judge": answer_judge, "crop_judge": crop_judge}
    if "model" in (answer_judge, crop_judge):
        config.update(judge_base_url=judge_base_url or None, judge_model=judge_model or None)
    return config


def start_generation(ctx: AppContext, job_id: int | None, *form: Any) -> int | None:
    return job_panel.start_from_form(ctx, "generate", lambda: compose_config(ctx, *form), job_id, "generation")


def split_choices(ctx: AppContext) -> list[str]:
    rows = ctx.store.db.execute("SELECT DISTINCT split FROM items ORDER BY split").fetchall()
    return [r[0] for r in rows] or ["train"]


def create_generate_tab(ctx: AppContext) -> dict[str, Any]:
    recipe = base_recipe(ctx)
    models = model_choices(ctx)
    datasets = [d["name"] for d in ctx.store.datasets()]
    job_state = gr.State(None)
    gr.Markdown("Sample boxes from a model, answer on each crop, score with the judges, and keep "
                "items whose best and worst rollouts differ clearly as **pending pairs** for the Pairs tab.")
    with gr.Row():
        model = gr.Dropdown(models, value=models[0][1] if models else None, label="Model / checkpoint",
                            elem_id="generate-model", scale=3, allow_custom_value=True)
        refresh = gr.Button("↻", scale=0, min_width=40)
        dataset = gr.Dropdown(datasets, value=recipe.get("dataset") if recipe.get("dataset") in datasets
                              else (datasets[0] if datasets else None), label="Dataset", scale=2)
        splits = split_choices(ctx)
        split = gr.Dropdown(splits, value="train" if "train" in splits else splits[0], label="Split", scale=1)
    with gr.Row():
        limit = gr.Number(recipe.get("limit") or 40, label="Items (0 = all)", precision=0)
        attempts = gr.Slider(1, 8, value=recipe.get("attempts", 3), step=1, label="Attempts per item")
        temperature = gr.Slider(0.1, 2.0, value=recipe.get("temperature", 1.0), step=0.1,
                                label="Box temperature")
    with gr.Row():
        answer_judge = gr.Dropdown(list(ANSWER_JUDGES), value=recipe.get("answer_judge", "auto"),
                                   label="Answer judge")
        crop_judge = gr.Dropdown(list(CROP_JUDGES), value=recipe.get("crop_judge", "iou"), label="Crop judge")
        judge_url = gr.Textbox(label="Judge endpoint (model judges)", placeholder="http://127.0.0.1:8000/v1")
        judge_model = gr.Textbox(label="Judge model name")
    start_button = gr.Button("Start generation", variant="primary", elem_id="generate-start")
    monitor = job_panel.create_job_monitor(ctx, KINDS, job_state, "generate")
    form = [model, dataset, split, limit, attempts, temperature, answer_judge, crop_judge,
            judge_url, judge_model]
    start_button.click(functools.partial(start_generation, ctx), [job_state, *form], [job_state],
                       api_visibility="undocumented").then(
        monitor["view"], [job_state], monitor["outputs"], api_visibility="undocumented")
    refresh.click(functools.partial(model_dropdown, ctx), [model], [model], api_visibility="undocumented")

    def load(current: str | None) -> tuple[Any, ...]:
        return (*job_panel.load_latest(ctx, KINDS), model_dropdown(ctx, current))
    return {"load": load, "load_inputs": [model], "load_outputs": [job_state, *monitor["outputs"], model]}
