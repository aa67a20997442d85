"""Export of the curated set from the Pairs tab (TRL SFT / DPO, LLaMA-Factory) via visrl.formats."""

from __future__ import annotations

import datetime as dt
import functools
from pathlib import Path

import gradio as gr

from visrl.errors import DataError, VisRLError
from visrl.vocabulary import PAIR_STATUSES
from visrl_app.context import AppContext, warn

# label -> (format name for visrl.formats.export, DPO stage or None)
FORMATS: dict[str, tuple[str, int | None]] = {
    "TRL DPO, stage 1 (box step)": ("trl-dpo", 1),
    "TRL DPO, stage 2 (box + answer)": ("trl-dpo", 2),
    "TRL SFT (annotated items)": ("trl-sft", None),
    "LLaMA-Factory (sharegpt + dataset_info.json)": ("llamafactory", None),
}


def export_pairs(ctx: AppContext, label: str, statuses: list[str], dataset: str | None) -> str:
    """Write the chosen export under ``exports/`` and say where; errors become a warning."""
    fmt, stage = FORMATS[label]
    if not statuses and fmt != "trl-sft":
        return warn("tick at least one status to export (usually 'accepted')")
    name = dataset if dataset not in (None, "", "any") else None
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = ctx.workspace.exports_dir / f"{fmt}{'-stage' + str(stage) if stage else ''}-{stamp}"
    try:
        rows = _export(ctx, fmt, stage, tuple(statuses), name, out_dir)
    except ImportError as exc:  # a part of visrl.formats this install lacks
        return warn(f"this install cannot export {label}: {exc}")
    except VisRLError as exc:
        return warn(str(exc))
    where = ctx.workspace.relative(out_dir)
    gr.Info(f"exported {rows} rows to {where}")
    return f"Exported **{rows}** rows to `{where}`"


def _export(ctx: AppContext, fmt: str, stage: int | None, statuses: tuple[str, ...],
            dataset: str | None, out_dir: Path) -> int:
    if fmt == "llamafactory":
        from visrl.formats import export as exporter  # lazy: pulls in datasets

        result = exporter.export(ctx.store, ctx.workspace, "llamafactory", out_dir, statuses=statuses,
                                 dataset=dataset)
        return int(result.get("rows", 0)) if isinstance(result, dict) else int(result)
    from visrl.formats import trl

    if fmt == "trl-sft":
        rows = trl.sft_rows(ctx.store, ctx.workspace, dataset=dataset)
    else:
        rows = trl.dpo_rows(ctx.store, ctx.workspace, statuses=statuses, stage=stage or 1, dataset=dataset)
    if not rows:
        what = "annotated items" if fmt == "trl-sft" else f"pairs with status {', '.join(statuses)}"
        raise DataError(f"nothing to export: no {what}" + (f" in dataset {dataset!r}" if dataset else ""))
    trl.save_dataset(rows, out_dir)
    return len(rows)


def create_export_panel(ctx: AppContext, dataset: gr.Dropdown) -> None:
    with gr.Accordion("Export the curated set", open=False):
        with gr.Row():
            fmt = gr.Dropdown(list(FORMATS), value=next(iter(FORMATS)), label="Format", scale=2)
            # visrl.review's statuses, alphabetical: accepted (what an export usually takes) first
            statuses = gr.CheckboxGroup(sorted(PAIR_STATUSES), value=["accepted"],
                                        label="Pairs with status", scale=2)
            button = gr.Button("Export", elem_id="pairs-export", scale=1)
        result = gr.Markdown(elem_id="pairs-export-result")
    button.click(functools.partial(export_pairs, ctx), [fmt, statuses, dataset], [result],
                 api_visibility="undocumented")
