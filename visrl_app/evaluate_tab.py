"""The Evaluate tab: run ``visrl eval`` on a checkpoint as a job; compare stored evaluations.

The tab's components are a named set; handlers return views named after them
(:mod:`visrl_app.components`).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import gradio as gr

from visrl.config import read_yaml
from visrl.errors import VisRLError
from visrl.uncertainty import interval, same_items, verdict
from visrl_app import eval_chart, job_panel
from visrl_app.components import Components, Tab, fields, joined
from visrl_app.context import AppContext, model_choices, model_dropdown, resolve_model
from visrl_app.generate_tab import split_choices

KINDS = ("eval",)
BASE_COLUMNS = ["id", "model", "data", "n"]
# The metrics that answer "is it better?" first: detection accuracy, then answer accuracy.
PREFERRED = ("acc50", "answer_acc", "direct_answer_acc", "mean_iou", "parse_rate")
LABELS = {"acc50": "Acc@0.5", "answer_acc": "answer acc", "direct_answer_acc": "direct acc",
          "mean_iou": "mean IoU", "parse_rate": "parse rate", "n_box": "n boxed",
          "seconds": "seconds", "items_per_s": "items/s", "unscored": "unscored",
          "direct_unscored": "direct unscored", "true_crop_answer_acc": "true-crop acc", "pairs": "pairs"}
# A multi-seed result stores each metric's spread as METRIC_std: shown in its metric's cell
# ("0.26 ± 0.03"), never as a column or a metric to compare on (a spread is not a score).
STD = "_std"
LABEL_CHARS = 44  # an evaluation's name in the plot and the notes: ~ a bar's width at 1024 px
RATES = frozenset(PREFERRED)  # fractions in [0, 1]: their axis is fixed to 0-1
OWN_COLUMNS = ("n",)  # shown once, as the table's n column
# How many training seeds a benchmark arm averages (visrl.demo stores it): it widens the arm's
# intervals (visrl.uncertainty), it is no score.
NOT_SCORES = ("seeds",)
# In the picker, not the table: seconds = n / items_per_s, n_box is n for boxed data, and pairs
# (how many a benchmark arm trained on) is an input its name states, not a score.
TABLE_ONLY_IN_PLOT = ("seconds", "n_box", "pairs")
# Answers a judge model left without a score (visrl.evaluate: outside the accuracies). A count of
# judge replies, not a quality to compare: a table column only, and only when an evaluation has one
# (rule judges never leave one, and the table must stay inside the page).
UNSCORED_COUNTS = ("unscored", "direct_unscored")
# Pixel widths that fit id, model, data, n, 6 metrics and the date in a 1024 px window (~960 px).
WIDTHS = {"id": 40, "model": 170, "data": 100, "n": 44, "created": 100}
METRIC_WIDTH = 78


class EvalForm(NamedTuple):
    """The form's values, in the order of its inputs (:func:`compose_config`'s parameters); each
    field is also the name of its component."""

    model: str
    dataset: str
    split: str
    limit: float | None
    direct_baseline: bool


class Comparison(NamedTuple):
    """:func:`refresh`: the table, the metric and baseline pickers, the chart and its note."""

    table: Any
    metric: Any
    baseline: Any
    plot: Any
    note: str


EvalLoad = joined("EvalLoad", job_panel.LatestJob, Comparison, "model", "ready")  # page load


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
    """Numeric metric keys: the :data:`PREFERRED` ones first, then the rest as first seen (not the
    :data:`UNSCORED_COUNTS`, nor a METRIC_std spread)."""
    seen: list[str] = []
    for row in evaluations:
        for key, value in (row["metrics"] or {}).items():
            if (isinstance(value, (int, float)) and key not in seen
                    and key not in (*OWN_COLUMNS, *UNSCORED_COUNTS, *NOT_SCORES) and not key.endswith(STD)):
                seen.append(key)
    return [m for m in PREFERRED if m in seen] + [m for m in seen if m not in PREFERRED]


def label(metric: str) -> str:
    return LABELS.get(metric, metric)


def evaluation_label(row: dict[str, Any]) -> str:
    """``#id model`` (the adapter when there is one), the name at most :data:`LABEL_CHARS` long.

    A long "title: detail" name (the demo's "learning benchmark (1 seed): warm-up + VisRL") keeps
    its detail; a long path keeps its tail ("…/checkpoint-60"), cut at a ``/`` or a space, never
    inside a word.
    """
    name = row["adapter"] or row["model"]
    if len(name) > LABEL_CHARS and ": " in name:
        name = name.split(": ", 1)[1]
    if len(name) > LABEL_CHARS:
        tail = name[-(LABEL_CHARS - 1):]
        cut = min((i for i in (tail.find("/"), tail.find(" ")) if i >= 0), default=-1)
        name = "…" + (tail[cut + 1:] if 0 <= cut < len(tail) - 1 else tail)
    return f"#{row['id']} {name}"


def evaluation_table(ctx: AppContext) -> Any:
    """One row per stored evaluation: who, on what, n once, then one column per metric (a share
    with its 95% interval, "0.255 ±0.06")."""
    import pandas as pd

    evaluations = ctx.store.evaluations()
    names = [n for n in metric_names(evaluations) if n not in TABLE_ONLY_IN_PLOT]
    names += [n for n in UNSCORED_COUNTS if any((e["metrics"] or {}).get(n) for e in evaluations)]
    rows = [[e["id"], e["model"] + (f" + {e['adapter']}" if e["adapter"] else ""),
             f"{e['dataset']}/{e['split']}", e["n"], *(_cell(e, name) for name in names),
             (e["created_at"] or "")[:16].replace("T", " ")] for e in evaluations]
    return pd.DataFrame(rows, columns=[*BASE_COLUMNS, *(label(n) for n in names), "created"])


def table(ctx: AppContext) -> Any:
    """:func:`evaluation_table` with column widths that keep it inside the page."""
    frame = evaluation_table(ctx)
    return gr.Dataframe(frame, column_widths=[f"{WIDTHS.get(c, METRIC_WIDTH)}px" for c in frame.columns])


def _round(value: Any) -> Any:
    return round(value, 3) if isinstance(value, float) else value


def _cell(evaluation: dict[str, Any], name: str) -> Any:
    """``name``'s value, and for a share the half-width of its 95% interval, the wider side
    ("0.255 ±0.06": the table stays inside a 1024 px window; the chart and the note give the exact
    interval). A seeds' spread is inside that interval (visrl.uncertainty)."""
    metrics = evaluation["metrics"] or {}
    found = interval(metrics, name, int(evaluation["n"] or 0))
    if found is None:
        return _round(metrics.get(name))
    return f"{found.value:.3f} ±{max(found.value - found.low, found.high - found.value):.2f}"


def _interval_of(evaluation: dict[str, Any] | None, metric: str | None) -> Any:
    if evaluation is None or not metric:
        return None
    return interval(evaluation["metrics"] or {}, metric, int(evaluation["n"] or 0))


def comparison_frame(ctx: AppContext, metric: str | None, baseline: int | None = None) -> Any:
    """Per evaluation: label, value, 95% interval (low, high) and its n, how it compares with
    ``baseline`` (:func:`versus`), whether it scored the baseline's items, and its seeds' spread."""
    import pandas as pd

    evaluations = ctx.store.evaluations()
    base = next((e for e in evaluations if e["id"] == baseline), None)
    rows = []
    for e in evaluations:
        value = (e["metrics"] or {}).get(metric) if metric else None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        found = _interval_of(e, metric)
        items = ("" if base is None else "baseline" if e is base
                 else "same items" if same_items(e, base) else "other items")
        rows.append({"evaluation": evaluation_label(e), "value": float(value),
                     "low": found.low if found else None, "high": found.high if found else None,
                     "n": found.n if found else e["n"], "vs baseline": versus(e, base, metric),
                     "items": items, "spread": _spread(e, metric)})
    return pd.DataFrame(rows, columns=["evaluation", "value", "low", "high", "n", "vs baseline", "items", "spread"])


def versus(evaluation: dict[str, Any], base: dict[str, Any] | None, metric: str | None) -> str:
    """"baseline", "better", "worse", "within noise" (visrl.uncertainty.verdict: only intervals
    that do not overlap make a difference), "not compared" for a metric with no interval (seconds),
    "no baseline"."""
    if base is None or not isinstance((base["metrics"] or {}).get(metric or ""), (int, float)):
        return "no baseline"
    if evaluation["id"] == base["id"]:
        return "baseline"
    mine, theirs = _interval_of(evaluation, metric), _interval_of(base, metric)
    if mine is None or theirs is None:
        return "not compared"
    return verdict(mine, theirs)


def _spread(evaluation: dict[str, Any], metric: str | None) -> str:
    """"sd 0.030 over 3 seeds" where a result averages seeds with a spread, else ""."""
    metrics = evaluation["metrics"] or {}
    std, seeds = metrics.get(f"{metric}{STD}"), metrics.get("seeds")
    if not isinstance(std, (int, float)) or std <= 0:
        return ""
    return f"sd {std:.3f}" + (f" over {int(seeds)} seeds" if isinstance(seeds, (int, float)) else "")


def _described(e: dict[str, Any], metric: str, value: float) -> str:
    found = _interval_of(e, metric)
    return found.text() if found is not None else f"{value:.3f}, n={e['n']}"


def comparison_note(ctx: AppContext, metric: str | None, baseline: int | None) -> str:
    """Each evaluation's ``metric`` with its interval and n, its difference to the baseline's, and
    the verdict; comparisons on other items than the baseline's say so."""
    evaluations = ctx.store.evaluations()
    base_row = next((e for e in evaluations if e["id"] == baseline), None)
    base = base_row["metrics"].get(metric) if base_row and metric else None
    if not isinstance(base, (int, float)):
        return "Pick a baseline evaluation to see each one's difference to it."
    parts = []
    for e in evaluations:
        value = e["metrics"].get(metric)
        if isinstance(value, (int, float)) and e["id"] != baseline:
            other = "" if same_items(e, base_row) else f"; other items: {e['dataset']}/{e['split']}, n={e['n']}"
            parts.append(f"{evaluation_label(e)}: {_described(e, metric, value)} "
                         f"(**{value - base:+.3f}**, {versus(e, base_row, metric)}{other})")
    # "Acc@0.5" would render as an e-mail link in Markdown: the entity keeps it text.
    head = (f"**{label(metric).replace('@', '&#64;')}** vs baseline {evaluation_label(base_row)} "
            f"({_described(base_row, metric, base)}; {base_row['dataset']}/{base_row['split']})")
    return head + (":\n\n- " + "\n- ".join(parts) if parts else ": no other evaluation yet")


def comparison_plot(ctx: AppContext, metric: str | None, baseline: int | None) -> Any:
    """The chart of ``metric`` (:mod:`visrl_app.eval_chart`): bars from 0, whiskers, n, verdicts."""
    rows = comparison_frame(ctx, metric, baseline).to_dict("records")
    return gr.HTML(eval_chart.chart_html(rows, label(metric) if metric else "value", metric in RATES))


def baseline_choices(ctx: AppContext) -> list[tuple[str, int]]:
    return [(evaluation_label(e), e["id"]) for e in ctx.store.evaluations()]


def refresh(ctx: AppContext, metric: str | None, baseline: int | None) -> Comparison:
    """The table, the pickers, the plot and its note: the first preferred metric and the oldest
    evaluation (usually the base model) unless the user picked others."""
    names = metric_names(ctx.store.evaluations())
    metric = metric if metric in names else (names[0] if names else None)
    choices = baseline_choices(ctx)
    ids = [value for _, value in choices]
    baseline = baseline if baseline in ids else (ids[0] if ids else None)
    return Comparison(table=table(ctx), metric=gr.Dropdown(choices=[(label(n), n) for n in names], value=metric),
                      baseline=gr.Dropdown(choices=choices, value=baseline),
                      plot=comparison_plot(ctx, metric, baseline), note=comparison_note(ctx, metric, baseline))


def readiness(ctx: AppContext, *form: Any) -> str:
    """One line under the form: what a start would run, or what is missing (nothing starts)."""
    try:
        config = compose_config(ctx, *form)
        job_panel.check(ctx, "eval", config)
    except VisRLError as exc:
        return f"⚠️ {exc}"
    n = len(ctx.store.items(config["dataset"], config["split"], limit=config["limit"]))
    if not n:
        return f"⚠️ {config['dataset']}/{config['split']} has no items: pick another split"
    return f"Ready: {n} items of {config['dataset']}/{config['split']}."


def create_evaluate_tab(ctx: AppContext) -> Tab:
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
    with gr.Row():
        ready = gr.Markdown(elem_id="eval-ready")
        start_button = gr.Button("Run evaluation", variant="primary", elem_id="eval-start", scale=0, min_width=200)
    monitor = job_panel.create_job_monitor(ctx, KINDS, job_state, "eval", start_button)
    gr.Markdown("### Evaluations\nEach share reads value ± its 95% interval (the wider side; the chart "
                "below gives both ends and each metric's n). n: the items scored.")
    # Every row shows: a fixed height hid the older evaluations behind an unnoticed scroll.
    shown = gr.Dataframe(evaluation_table(ctx), interactive=False, elem_id="eval-table", wrap=True,
                         max_height=10_000)
    with gr.Row():
        metric = gr.Dropdown([], label="Compare on", scale=2, elem_id="eval-metric")
        baseline = gr.Dropdown([], label="Baseline", scale=2, elem_id="eval-baseline")
        again = gr.Button("↻ Refresh", scale=0, min_width=90)
    plot = gr.HTML(eval_chart.chart_html([], "value", True), elem_id="eval-plot")
    note = gr.Markdown(elem_id="eval-note")
    components = Components(
        job_state=job_state, model=model, dataset=dataset, split=split, limit=limit, direct_baseline=direct,
        ready=ready, start=start_button, table=shown, metric=metric, baseline=baseline, refresh=again, plot=plot,
        note=note).merge(monitor.components)
    form = components.pick(*EvalForm._fields)
    view = functools.partial(refresh, ctx)
    outputs = components.outputs(Comparison)
    job_panel.wire_start(start_button, functools.partial(start_eval, ctx), [job_state, *form], monitor)
    check = functools.partial(readiness, ctx)
    for part in form:
        part.change(check, form, [ready], api_visibility="undocumented", show_progress="hidden")
    compare = components.pick("metric", "baseline")
    for part in compare:
        part.input(lambda m, b: {plot: comparison_plot(ctx, m, b), note: comparison_note(ctx, m, b)}, compare,
                   [plot, note], api_visibility="undocumented")
    again.click(view, compare, outputs, api_visibility="undocumented")
    # A finished eval job adds a row; re-reading every 10 s is enough for minutes-long evaluations.
    gr.Timer(10.0).tick(view, compare, outputs, api_visibility="undocumented", show_progress="hidden")

    def load(*values: Any) -> Any:
        current = EvalForm(*values)
        return EvalLoad(**job_panel.load_latest(ctx, KINDS)._asdict(), **view(None, None)._asdict(),
                        model=model_dropdown(ctx, current.model), ready=readiness(ctx, *current))
    return Tab(components, load, load_inputs=EvalForm._fields, load_outputs=fields(EvalLoad))
