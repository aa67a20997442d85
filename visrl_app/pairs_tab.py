"""The Pairs tab: the curation desk for generated preference pairs.

The pair on screen and its ``version`` live in ``gr.State`` (one per browser); every action is a
:mod:`visrl.review` call with that version, so a pair changed in another tab or by another
reviewer raises :class:`~visrl.errors.ConflictError`, shown as a warning, and the pair reloads.
Handlers are plain functions of ``(ctx, state, ...)`` so tests drive them without a browser.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import gradio as gr
from gradio_image_annotation import image_annotator
from PIL import Image

from visrl import review
from visrl.boxes import Box
from visrl.errors import ConflictError, DataError, VisRLError
from visrl_app import render
from visrl_app.context import AppContext, warn
from visrl_app.pairs_export import create_export_panel

ANY = "any"
STATUS_CHOICES = [ANY, *review.STATUSES]
# Keyboard shortcuts: key -> (button elem_id, label). keyboard.js reads the same table from the
# buttons' elem_ids; the legend on screen is generated from it so the two cannot drift apart.
SHORTCUTS: dict[str, tuple[str, str]] = {
    "accept": ("A", "Accept"), "reject": ("R", "Reject"), "swap": ("S", "Swap"),
    "undo": ("U", "Undo"), "reset": ("P", "Back to pending"), "save_boxes": ("B", "Save boxes"),
    "save_answers": ("W", "Save answers"), "prev": ("K / ←", "Previous"), "next": ("J / →", "Next"),
}
BOX_TOLERANCE_PX = 0.75  # the annotator rounds to whole pixels; smaller moves are no edit


def empty_state() -> dict[str, Any]:
    """Per-browser desk state: the pair on screen, its version, an action counter, and this
    session's actions as [pair id, version after] (what Undo reverts, newest last)."""
    return {"pair_id": None, "version": None, "n": 0, "history": []}


HISTORY_LIMIT = 200  # undo depth per browser session


def make_filter(ctx: AppContext, status: str | None, dataset: str | None, min_margin: float | None,
                max_margin: float | None, search: str | None) -> review.PairFilter:
    return review.PairFilter(
        status=None if status in (None, "", ANY) else status,
        dataset=None if dataset in (None, "", ANY) else dataset,
        min_margin=None if min_margin in (None, "") or float(min_margin) <= -1 else float(min_margin),
        max_margin=None if max_margin in (None, "") or float(max_margin) >= 1 else float(max_margin),
        search=(search or "").strip() or None)


# ---------------------------------------------------------------------- the view

def pair_view(ctx: AppContext, pair: dict[str, Any] | None, state: dict[str, Any],
              flt: review.PairFilter, note: str = "") -> tuple[Any, ...]:
    """Every output of the desk for ``pair`` (None: nothing matches the filter)."""
    state = {**state, "n": state.get("n", 0) + 1}
    progress = progress_text(ctx, flt)
    if pair is None:
        state.update(pair_id=None, version=None)
        ticket = f"No pair matches the filters. · #{state['n']}" + (f" · {note}" if note else "")
        return (None, None, None, "### No pairs\nNothing matches these filters.", "", "",
                progress, ticket, state)
    state.update(pair_id=pair["id"], version=pair["version"])
    image = Image.open(ctx.workspace.absolute(pair["image"])).convert("RGB")
    boxes = review.pair_boxes(pair)
    shown = render.draw_dashed_box(image, boxes["gt"], render.BLUE) if boxes["gt"] else image
    annot_boxes = [render.annotator_box(boxes[side], side, color)
                   for side, color in (("chosen", render.GREEN), ("rejected", render.RED))
                   if boxes[side] is not None]
    annotated = {"image": shown, "boxes": annot_boxes}
    ticket = (f"pair {pair['id']} · v{pair['version']} · {pair['status']} · #{state['n']}"
              + (f" · {note}" if note else ""))
    return (annotated, render.side_crop(image, boxes["chosen"]), render.side_crop(image, boxes["rejected"]),
            info_markdown(pair), pair["chosen_answer"] or "", pair["rejected_answer"] or "",
            progress, ticket, state)


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _box_text(box: Box | None) -> str:
    return "—" if box is None else "[" + ", ".join(f"{v:.0f}" for v in box.as_list()) + "]"


def info_markdown(pair: dict[str, Any]) -> str:
    boxes = review.pair_boxes(pair)
    edited = " · edited" if pair.get("edited") else ""
    return "\n".join([
        f"### Pair {pair['id']} — **{pair['status']}** (version {pair['version']}{edited})",
        "",
        f"**Question:** {pair['question']}",
        "",
        f"**Reference answer:** {pair['reference'] or '—'}",
        "",
        "| | box (px) | answer score | crop score |",
        "|---|---|---|---|",
        f"| <span style='color:#22c55e'>■</span> chosen | {_box_text(boxes['chosen'])} | {_fmt(pair['chosen_score'])} | {_fmt(pair['chosen_crop_score'])} |",
        f"| <span style='color:#ef4444'>■</span> rejected | {_box_text(boxes['rejected'])} | {_fmt(pair['rejected_score'])} | {_fmt(pair['rejected_crop_score'])} |",
        f"| <span style='color:#2563eb'>┅</span> annotated | {_box_text(boxes['gt'])} | | |",
        "",
        f"margin {_fmt(pair['margin'])} · priority {_fmt(pair['priority'])} · dataset `{pair['dataset']}` "
        f"· split {pair['split']} · {pair['width']}×{pair['height']} px · source {pair.get('source') or '—'}",
    ])


def progress_text(ctx: AppContext, flt: review.PairFilter) -> str:
    counts = review.status_counts(ctx.store, flt.dataset)
    total = sum(counts.values())
    reviewed = counts["accepted"] + counts["rejected"]
    matching = review.count_pairs(ctx.store, flt)
    return (f"**Reviewed {reviewed} / {total}** · accepted {counts['accepted']} · rejected "
            f"{counts['rejected']} · pending {counts['pending']} · {matching} match the filters")


# ---------------------------------------------------------------------- handlers

def show_first(ctx: AppContext, state: dict[str, Any], *filters: Any) -> tuple[Any, ...]:
    """The first pair of the filtered, sorted list (filters changed, or the page opened)."""
    *flt_args, sort = filters
    flt = make_filter(ctx, *flt_args)
    return pair_view(ctx, review.next_pair(ctx.store, flt, sort), state, flt)


def navigate(ctx: AppContext, backwards: bool, state: dict[str, Any], *filters: Any) -> tuple[Any, ...]:
    """Next (or previous) pair after the one on screen; stays put at either end."""
    *flt_args, sort = filters
    flt = make_filter(ctx, *flt_args)
    current = state.get("pair_id")
    pair = review.next_pair(ctx.store, flt, sort, after=current, backwards=backwards)
    note = ""
    if pair is None and current is not None:
        pair, note = _reload(ctx, current), ("first pair" if backwards else "last pair")
    return pair_view(ctx, pair, state, flt, note)


def _reload(ctx: AppContext, pair_id: int | None) -> dict[str, Any] | None:
    if pair_id is None:
        return None
    try:
        return review.get_pair(ctx.store, pair_id)
    except VisRLError:
        return None


ACTIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "accept": review.accept, "reject": review.reject, "swap": review.swap,
    "undo": review.undo, "reset": review.reset,
}
ADVANCE_AFTER = {"accept", "reject"}  # a decided pair moves the desk on to the next one


def act(ctx: AppContext, action: str, state: dict[str, Any], *filters: Any) -> tuple[Any, ...]:
    """Apply review ``action`` to the pair on screen with the version held in ``state``.

    Undo reverts this session's latest action (the desk moved on after an accept: undo brings
    that pair back); with no action in this session it reverts the pair on screen.
    """
    *flt_args, sort = filters
    flt = make_filter(ctx, *flt_args)
    history = list(state.get("history") or [])
    pair_id, version = state.get("pair_id"), state.get("version")
    if action == "undo" and history:
        pair_id, version = history.pop()
    if pair_id is None:
        return pair_view(ctx, None, state, flt, warn("no pair on screen"))
    try:
        pair = ACTIONS[action](ctx.store, pair_id, version)
    except VisRLError as exc:
        return pair_view(ctx, _reload(ctx, pair_id), {**state, "history": history}, flt, warn(str(exc)))
    if action == "undo":
        # later undos of the same pair must quote the version this undo produced
        history = [[pid, pair["version"] if pid == pair_id else v] for pid, v in history]
    else:
        history = [*history, [pair_id, pair["version"]]][-HISTORY_LIMIT:]
    note = f"{action} pair {pair_id}"
    if action in ADVANCE_AFTER:
        pair = review.next_pair(ctx.store, flt, sort, after=pair_id) or pair
    return pair_view(ctx, pair, {**state, "history": history}, flt, note)


def read_annotator_boxes(value: dict[str, Any] | None) -> dict[str, Box]:
    """{"chosen": Box, "rejected": Box} from the annotator's value (labels decide the side)."""
    found: dict[str, Box] = {}
    for raw in (value or {}).get("boxes") or []:
        label = (raw.get("label") or "").strip().lower()
        if label not in ("chosen", "rejected"):
            raise DataError(f"a box is labelled {raw.get('label')!r}; label each box 'chosen' or "
                            "'rejected' (double-click it) and save again")
        if label in found:
            raise DataError(f"two boxes are labelled {label!r}; delete one and save again")
        found[label] = Box(float(raw["xmin"]), float(raw["ymin"]), float(raw["xmax"]), float(raw["ymax"]))
    return found


def _changed(a: Box | None, b: Box) -> bool:
    return a is None or any(abs(x - y) > BOX_TOLERANCE_PX for x, y in zip(a.as_list(), b.as_list(), strict=True))


def save_boxes(ctx: AppContext, state: dict[str, Any], annotated: dict[str, Any] | None,
               *filters: Any) -> tuple[Any, ...]:
    """Store the boxes read back from the annotator (pixels of the original image)."""
    def change(pair: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        stored, done = review.pair_boxes(pair), []
        for side, box in read_annotator_boxes(annotated).items():
            if _changed(stored[side], box):
                pair = review.edit_box(ctx.store, pair["id"], pair["version"], side, box)
                done.append(side)
        return pair, done
    return _edit(ctx, state, filters, change, "box")


def save_answers(ctx: AppContext, state: dict[str, Any], chosen: str, rejected: str,
                 *filters: Any) -> tuple[Any, ...]:
    """Store edited answers (only the sides whose text changed)."""
    def change(pair: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        done = []
        for side, text in (("chosen", chosen), ("rejected", rejected)):
            if (text or "").strip() != (pair[f"{side}_answer"] or "").strip():
                pair = review.edit_answer(ctx.store, pair["id"], pair["version"], side, text or "")
                done.append(side)
        return pair, done
    return _edit(ctx, state, filters, change, "answer")


def _edit(ctx: AppContext, state: dict[str, Any], filters: tuple[Any, ...],
          change: Callable[[dict[str, Any]], tuple[dict[str, Any], list[str]]], what: str) -> tuple[Any, ...]:
    flt = make_filter(ctx, *filters[:-1])
    pair_id = state.get("pair_id")
    if pair_id is None:
        return pair_view(ctx, None, state, flt, warn("no pair on screen"))
    try:
        pair = review.get_pair(ctx.store, pair_id)
        if pair["version"] != state["version"]:
            raise ConflictError(f"pair {pair_id} was changed elsewhere (you have version "
                                f"{state['version']}, the store has {pair['version']}); reloaded it, "
                                "redo your edit")
        pair, done = change(pair)
    except VisRLError as exc:
        return pair_view(ctx, _reload(ctx, pair_id), state, flt, warn(str(exc)))
    note = f"saved {' and '.join(done)} {what}" if done else f"no {what} changed"
    history = list(state.get("history") or [])
    # one entry per stored edit (two sides = two reviews), so Undo reverts them one by one
    history += [[pair["id"], pair["version"] - i] for i in reversed(range(len(done)))]
    return pair_view(ctx, pair, {**state, "history": history[-HISTORY_LIMIT:]}, flt, note)


# ---------------------------------------------------------------------- layout

def shortcut_legend() -> str:
    return "**Keys:** " + " · ".join(f"`{key}` {label}" for key, label in SHORTCUTS.values())


def dataset_choices(ctx: AppContext) -> list[str]:
    return [ANY, *(d["name"] for d in ctx.store.datasets())]


def _pair_panel() -> tuple[Any, ...]:
    """The image with draggable boxes, the pair's facts, both crops and both answers."""
    with gr.Row():
        with gr.Column(scale=3):
            annotator = image_annotator(
                None, label="Image — drag a box to fix it, then Save boxes (B)",
                label_list=["chosen", "rejected"],
                label_colors=[render.GREEN, render.RED], sources=[], image_type="pil",
                show_clear_button=False, show_download_button=False, use_default_label=True,
                box_min_size=4, handle_size=6, boxes_alpha=0.12, elem_id="pairs-annotator", height=480)
            gr.Markdown("<span style='color:#22c55e'>■</span> chosen (drag to fix) · "
                        "<span style='color:#ef4444'>■</span> rejected (drag to fix) · "
                        "<span style='color:#2563eb'>┅</span> dashed blue: annotated box (reference only)")
        with gr.Column(scale=2):
            info = gr.Markdown(elem_id="pairs-info")
            with gr.Row():
                chosen_crop = gr.Image(label="Chosen crop", type="pil", interactive=False, height=180)
                rejected_crop = gr.Image(label="Rejected crop", type="pil", interactive=False, height=180)
            chosen_answer = gr.Textbox(label="Chosen answer", lines=2, elem_id="pairs-chosen-answer")
            rejected_answer = gr.Textbox(label="Rejected answer", lines=2, elem_id="pairs-rejected-answer")
    return annotator, info, chosen_crop, rejected_crop, chosen_answer, rejected_answer


def create_pairs_tab(ctx: AppContext) -> dict[str, Any]:
    """Build the Pairs tab inside the current ``gr.Blocks``; returns its components by name."""
    state = gr.State(empty_state())
    with gr.Column(elem_id="pairs-desk"):
        with gr.Row(equal_height=True):
            status = gr.Dropdown(STATUS_CHOICES, value="pending", label="Status", scale=1)
            dataset = gr.Dropdown(dataset_choices(ctx), value=ANY, label="Dataset", scale=1)
            # Margins (chosen - rejected answer score) lie in [-1, 1]; the ends mean "no limit".
            min_margin = gr.Slider(-1, 1, value=-1, step=0.05, label="Min margin", scale=1)
            max_margin = gr.Slider(-1, 1, value=1, step=0.05, label="Max margin", scale=1)
            search = gr.Textbox(label="Search question / answers", scale=2)
            sort = gr.Dropdown(list(review.SORTS), value="priority", label="Sort", scale=1,
                               info="priority: worth a human's time first")
        progress = gr.Markdown(elem_id="pairs-progress")
        gr.Markdown(shortcut_legend(), elem_id="pairs-keys")
        with gr.Row():
            buttons = {name: gr.Button(f"{label} ({key.split(' ')[0]})", elem_id=f"pairs-{name.replace('_', '-')}",
                                       variant=_variant(name), size="sm", min_width=90)
                       for name, (key, label) in SHORTCUTS.items()}
        ticket = gr.Markdown(elem_id="pairs-ticket")
        annotator, info, chosen_crop, rejected_crop, chosen_answer, rejected_answer = _pair_panel()
        create_export_panel(ctx, dataset)

    filters = [status, dataset, min_margin, max_margin, search, sort]
    outputs = [annotator, chosen_crop, rejected_crop, info, chosen_answer, rejected_answer,
               progress, ticket, state]
    # Review actions run one at a time (they take milliseconds), in the order they were triggered.
    common = {"outputs": outputs, "trigger_mode": "multiple", "api_visibility": "undocumented",
              "concurrency_id": "pairs-review", "concurrency_limit": 1}
    reset_view = functools.partial(show_first, ctx)
    for name in ("accept", "reject", "swap", "undo", "reset"):
        buttons[name].click(functools.partial(act, ctx, name), [state, *filters], **common)
    buttons["next"].click(functools.partial(navigate, ctx, False), [state, *filters], **common)
    buttons["prev"].click(functools.partial(navigate, ctx, True), [state, *filters], **common)
    buttons["save_boxes"].click(functools.partial(save_boxes, ctx), [state, annotator, *filters], **common)
    buttons["save_answers"].click(functools.partial(save_answers, ctx),
                                  [state, chosen_answer, rejected_answer, *filters], **common)
    for component in (status, dataset, sort):
        component.change(reset_view, [state, *filters], **common)
    for component in (min_margin, max_margin):
        component.release(reset_view, [state, *filters], **common)
    search.submit(reset_view, [state, *filters], **common)
    return {"state": state, "filters": filters, "outputs": outputs, "load": reset_view,
            "dataset": dataset, "buttons": buttons, "annotator": annotator}


def _variant(name: str) -> str:
    return {"accept": "primary", "reject": "stop"}.get(name, "secondary")
