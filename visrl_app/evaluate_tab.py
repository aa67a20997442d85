"""The Evaluate tab: run ``visrl eval`` on a checkpoint as a job; compare stored evaluations."""

from __future__ import annotations

import functools
from typing import Any

import gradio as gr

from visrl.config import read_yaml
from visrl.errors import VisRLError
from visrl_app import job_panel
from visrl_app.context import AppContext, model_choices, model_dropdown, resolve_model
from visrl_app.generate_tab import split_choices

KINDS = ("eval",)
BASE_COLUMNS = ["id", "model", "adapter", "dataset", "split", "n", "created"]


def base_recipe(ctx: AppContext) -> dict[str, Any]:
    for folder in ctx.config_dirs():
        if (folder / "eval.yaml").is_file():
            return read_yaml(folder / "eval.yaml")
    return {}


def compose_config(ctx: AppContext, model: str, dataset: str, split: str, limit: float | None,
                   direct_baseline: bool) -> dict[str, Any]:
    if not model or not dataset:
        raise VisRLError("pick a model or checkpoint and a dataset to evaluate")
    model_path, adapter = resolve_model(ctx, model)
    return {**base_recipe(ctx), "model_name_or_path": model_path, "adapter_name_or_path": adapter,
            "dataset": dataset, "split": split or "test", "limit": int(limit) if limit else None,
            "direct_baseline": bool(direct_baseline), "output_dir": None}


def start_eval(ctx: AppContext, job_id: int | None, *form: Any) -> int | None:
    return job_panel.start_from_form(ctx, "eval", lambda: compose_config(ctx, *form), job_id, "evaluation")


def metric_names(evaluations: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for row in evaluations:
        for key, value in (row["metrics"] or {}).items():
            if isinstance(value, (int, float)) and key not in names:
                names.append(key)
    return names


def evaluation_table(ctx: AppContext) -> Any:
    """One row per stored evaluation, one column per numeric metric."""
    import pandas as pd

    evaluations = ctx.store.evaluations()
    names = metric_names(evaluations)
    rows = [[e["id"], e["model"], e["adapter"] or "", e["dataset"], e["split"], e["n"], e["created_at"],
             *(_round(e["metrics"].get(name)) for name in names)] for e in evaluations]
    return pd.DataFrame(rows, columns=[*BASE_COLUMNS, *names])


def _round(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def comparison_frame(ctx: AppContext, metric: str | None) -> Any:
    """(checkpoint label, value) of ``metric`` per evaluation, for the bar plot."""
    import pandas as pd

    rows = []
    for e in ctx.store.evaluations():
        value = (e["metrics"] or {}).get(metric) if metric else None
        if isinstance(value, (int, float)):
            label = f"#{e['id']} {e['adapter'] or e['model']}"
            rows.append({"checkpoint": label[-48:], "value": float(value)})
    return pd.DataFrame(rows, columns=["checkpoint", "value"])


def refresh(ctx: AppContext, metric: str | None) -> tuple[Any, Any, Any]:
    names = metric_names(ctx.store.evaluations())
    metric = metric if metric in names else (names[0] if names else None)
    return (evaluation_table(ctx), gr.Dropdown(choices=names, value=metric),
            comparison_frame(ctx, metric))


def create_evaluate_tab(ctx: AppContext) -> dict[str, Any]:
    recipe = base_recipe(ctx)
    models = model_choices(ctx)
    datasets = [d["name"] for d in ctx.store.datasets()]
    splits = split_choices(ctx)
    job_state = gr.State(None)
    with gr.Row():
        model = gr.Dropdown(models, value=models[-1][1] if models else None, label="Model / checkpoint",
                            scale=3, elem_id="eval-model", allow_custom_value=True)
        dataset = gr.Dropdown(datasets, value=datasets[0] if datasets else None, label="Dataset", scale=2)
        split = gr.Dropdown(splits, value="test" if "test" in splits else splits[0], label="Split", scale=1)
        limit = gr.Number(recipe.get("limit") or 40, label="Items (0 = all)", precision=0, scale=1)
        direct = gr.Checkbox(value=recipe.get("direct_baseline", True), label="Direct baseline", scale=1)
    start_button = gr.Button("Run evaluation", variant="primary", elem_id="eval-start")
    monitor = job_panel.create_job_monitor(ctx, KINDS, job_state, "eval")
    gr.Markdown("### Evaluations")
    table = gr.Dataframe(evaluation_table(ctx), interactive=False, elem_id="eval-table", wrap=True)
    with gr.Row():
        metric = gr.Dropdown([], label="Compare checkpoints on", scale=1, elem_id="eval-metric")
        again = gr.Button("↻ Refresh", scale=0, min_width=90)
    plot = gr.BarPlot(comparison_frame(ctx, None), x="checkpoint", y="value", title="Metric per checkpoint",
                      elem_id="eval-plot", height=280)
    form = [model, dataset, split, limit, direct]
    view = functools.partial(refresh, ctx)
    start_button.click(functools.partial(start_eval, ctx), [job_state, *form], [job_state],
                       api_visibility="undocumented").then(
        monitor["view"], [job_state], monitor["outputs"], api_visibility="undocumented")
    metric.change(functools.partial(comparison_frame, ctx), [metric], [plot], api_visibility="undocumented")
    again.click(view, [metric], [table, metric, plot], api_visibility="undocumented")
    # A finished eval job adds a row; re-reading every 10 s is enough for minutes-long evaluations.
    gr.Timer(10.0).tick(view, [metric], [table, metric, plot], api_visibility="undocumented",
                          show_progress="hidden")

    def load(current: str | None) -> tuple[Any, ...]:
        return (*job_panel.load_latest(ctx, KINDS), *view(None), model_dropdown(ctx, current))
    return {"load": load, "load_inputs": [model],
            "load_outputs": [job_state, *monitor["outputs"], table, metric, plot, model]}
