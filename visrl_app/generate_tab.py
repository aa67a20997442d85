"""The Generate tab: start a self-evolution rollout job (``visrl generate``) and watch it.

The form composes a :class:`visrl.generate.GenerateConfig` YAML (starting from the demo recipe's
values), saved under ``runs/app-configs/``; the job writes rollouts and pending pairs to the store,
where the Pairs tab finds them. The form's components are named after the config's fields
(:class:`GenerateForm`); the judges offered are the library's (:mod:`visrl.judges`).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import gradio as gr

from visrl.config import read_yaml
from visrl.errors import VisRLError
from visrl.vocabulary import ANSWER_JUDGES, CROP_JUDGES
from visrl_app import job_panel
from visrl_app.components import Components, Tab, fields, joined
from visrl_app.context import AppContext, model_choices, model_dropdown, resolve_model, warn

KINDS = ("generate",)


class GenerateForm(NamedTuple):
    """The form's values, in the order of its inputs (:func:`compose_config`'s parameters); each
    field is also the name of its component."""

    model: str
    dataset: str
    split: str
    limit: float | None
    attempts: float
    temperature: float
    answer_judge: str
    crop_judge: str
    judge_base_url: str
    judge_model: str
    judge_api_key_env: str = ""


GenerateLoad = joined("GenerateLoad", job_panel.LatestJob, "model", "limit", "ready")  # page load


def base_recipe(ctx: AppContext) -> dict[str, Any]:
    """The first generate.yaml found (workspace configs, then the repo's demo), else {}."""
    for folder in ctx.config_dirs():
        path = folder / "generate.yaml"
        if path.is_file():
            return read_yaml(path)
    return {}


def compose_config(ctx: AppContext, model: str, dataset: str, split: str, limit: float | None,
                   attempts: float, temperature: float, answer_judge: str, crop_judge: str,
                   judge_base_url: str, judge_model: str, judge_api_key_env: str = "") -> dict[str, Any]:
    """The GenerateConfig mapping for the form's values (unknown keys never reach the file).

    ``judge_api_key_env`` is the NAME of the variable holding the judge server's key (configs are
    stored with each job; the key never is). The form runs the model in-process only, so the
    remote backend's ``api_key_env`` comes from a recipe (generate.yaml), never from the form."""
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
        config.update(judge_base_url=judge_base_url or None, judge_model=judge_model or None,
                      judge_api_key_env=(judge_api_key_env or "").strip() or None)
    elif crop_judge == "policy":  # judge_model names a local model folder; no server, no key
        config.update(judge_model=judge_model or None)
    return config


def start_generation(ctx: AppContext, job_id: int | None, *form: Any) -> int | None:
    """Start the form's run, unless it has nothing to do (then say why and start nothing)."""
    try:
        config = compose_config(ctx, *form)
        plan = run_plan(ctx, config)
    except VisRLError as exc:
        warn(str(exc))
        return job_id
    if not plan.has_work:  # stored rollouts new judges have not scored are work too
        warn(plan.summary())
        return job_id
    return job_panel.start_from_form(ctx, "generate", lambda: config, job_id, "generation")


def run_plan(ctx: AppContext, config: dict[str, Any]) -> Any:
    """The :class:`visrl.generate.RunPlan` of a composed config (validated, with what it needs)."""
    from visrl.config import from_dict
    from visrl.generate import GenerateConfig, plan_run

    validated = job_panel.check(ctx, "generate", config)
    return plan_run(ctx.store, from_dict(GenerateConfig, validated, source="generate recipe"))


def readiness(ctx: AppContext, *form: Any) -> str:
    """One line under the form: how many items a start would generate, or why nothing."""
    try:
        plan = run_plan(ctx, compose_config(ctx, *form))
    except VisRLError as exc:
        return f"⚠️ {exc}"
    return ("Ready: " if plan.has_work else "⚠️ ") + plan.summary()


def useful_limit(ctx: AppContext, *form: Any) -> Any:
    """The form's item limit, moved past the items an earlier identical run already covers.

    On the demo the default form equals the build's first run, which would do nothing: the
    next ``limit`` items of the split are the useful default.
    """
    values = GenerateForm(*form)
    limit = values.limit
    try:
        plan = run_plan(ctx, compose_config(ctx, *values))
    except VisRLError:
        return limit
    if plan.pending or not limit:
        return limit
    total = len(ctx.store.items(values.dataset, values.split or "train"))
    return min(total, len(plan.items) + int(limit)) if total > len(plan.items) else limit


def split_choices(ctx: AppContext) -> list[str]:
    return ctx.store.splits() or ["train"]


def create_generate_tab(ctx: AppContext) -> Tab:
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
        judge_key_env = gr.Textbox(recipe.get("judge_api_key_env") or "", label="Judge API key variable",
                                   placeholder="JUDGE_API_KEY", elem_id="generate-judge-key-env",
                                   info="the NAME of the environment variable holding the key; empty = no key")
    with gr.Row():
        ready = gr.Markdown(elem_id="generate-ready")
        start_button = gr.Button("Start generation", variant="primary", elem_id="generate-start", scale=0,
                                 min_width=200)
    monitor = job_panel.create_job_monitor(ctx, KINDS, job_state, "generate", start_button)
    components = Components(
        job_state=job_state, model=model, refresh=refresh, dataset=dataset, split=split, limit=limit,
        attempts=attempts, temperature=temperature, answer_judge=answer_judge, crop_judge=crop_judge,
        judge_base_url=judge_url, judge_model=judge_model, judge_api_key_env=judge_key_env, ready=ready,
        start=start_button).merge(monitor.components)
    form = components.pick(*GenerateForm._fields)
    job_panel.wire_start(start_button, functools.partial(start_generation, ctx), [job_state, *form], monitor)
    refresh.click(functools.partial(model_dropdown, ctx), [model], [model], api_visibility="undocumented")
    check = functools.partial(readiness, ctx)
    for part in form:
        part.change(check, form, [ready], api_visibility="undocumented", show_progress="hidden")

    def load(*values: Any) -> Any:
        current = GenerateForm(*values)
        choices = model_choices(ctx)  # re-read: a checkpoint trained since start shows up
        known = [value for _, value in choices]
        picked = current.model if current.model in known else (known[0] if known else None)
        current = current._replace(model=picked)
        current = current._replace(limit=useful_limit(ctx, *current))
        return GenerateLoad(**job_panel.load_latest(ctx, KINDS)._asdict(),
                            model=gr.Dropdown(choices=choices, value=picked), limit=current.limit,
                            ready=readiness(ctx, *current))
    return Tab(components, load, load_inputs=GenerateForm._fields, load_outputs=fields(GenerateLoad))
