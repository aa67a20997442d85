"""The Pairs tab: the curation desk for generated preference pairs.

The pair on screen, its ``version``, the reviewer and this tab's own actions live in ``gr.State``
(kept on the server, one per browser); every action is a :mod:`visrl.desk` / :mod:`visrl.review`
call with that version, so a pair changed in another tab or by another reviewer raises
:class:`~visrl.errors.ConflictError`, shown as a warning, and the pair reloads.

Edits on screen (a dragged box, a typed answer) are saved before any action or navigation takes
the pair off the screen (autosave); edits that cannot be saved keep the desk on the pair with a
warning. Undo first discards unsaved edits, then reverts this tab's own actions, newest first,
saying what it reverted. Handlers are plain functions of ``(ctx, state, ...)`` so tests drive
them without a browser. The tab's components are a named set; a handler returns a :class:`PairView`
named after them, and reads the filters as :class:`Filters` (:mod:`visrl_app.components`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import gradio as gr
from gradio_image_annotation import image_annotator

from visrl import desk, review
from visrl.errors import ConflictError, VisRLError
from visrl_app import desk_images, pairs_team, render
from visrl_app.components import Components, Tab, fields, joined
from visrl_app.context import AppContext, warn
from visrl_app.pairs_edits import pending_edits
from visrl_app.pairs_export import create_export_panel
from visrl_app.pairs_info import all_done_markdown, info_markdown, team_line

ANY = "any"
STATUS_CHOICES = [ANY, *review.STATUSES]
# Keyboard shortcuts: key -> (button elem_id, label). keyboard.js reads the same table from the
# buttons' elem_ids; the legend on screen is generated from it so the two cannot drift apart.
SHORTCUTS: dict[str, tuple[str, str]] = {
    "accept": ("A", "Accept"), "reject": ("R", "Reject"), "swap": ("S", "Swap"),
    "undo": ("U", "Undo"), "reset": ("P", "Back to pending"), "save_boxes": ("B", "Save boxes"),
    "save_answers": ("W", "Save answers"), "prev": ("K / ←", "Previous"), "next": ("J / →", "Next"),
}
HISTORY_LIMIT = 200  # undo depth per browser session
NO_EDITS = (None, None, None)  # (annotator value, chosen answer, rejected answer): nothing on screen
# In the ticket of an answer that left the edits on screen unsaved (stay()): keyboard.js keeps the
# desk marked dirty when it sees this, so a reload still asks before dropping them.
EDITS_KEPT = "edits kept on screen, not saved"


class Filters(NamedTuple):
    """The filter row's values: the last inputs of every desk handler, in this order (each
    field is also the name of its component)."""

    status: str | None
    dataset: str | None
    min_margin: float | None
    max_margin: float | None
    search: str | None
    sort: str


# The edits on screen, after the state: the view they belong to (see current_view), the
# annotator's boxes, the two answers.
EDITS = ("view", "annotator", "chosen_answer", "rejected_answer")


class PairView(NamedTuple):
    """Every output of the desk (:func:`pair_view`), named after its components."""

    annotator: Any  # {"image": path, "boxes": [...]} in display pixels, or None
    chosen_crop: Any
    rejected_crop: Any
    info: str
    chosen_answer: Any
    rejected_answer: Any
    progress: str
    ticket: str
    history: str
    state: dict[str, Any]


BulkView = joined("BulkView", PairView, "bulk_message")  # bulk(): the desk's outputs, then the message


def split_filters(values: Sequence[Any]) -> tuple[tuple[Any, ...], Filters]:
    """(the handler's own inputs, the filters) of ``values``, whose last inputs are the filters."""
    own = len(values) - len(Filters._fields)
    return tuple(values[:own]), Filters(*values[own:])


def empty_state(reviewer: str | None = None) -> dict[str, Any]:
    """Per-browser desk state: the pair on screen, its version, an action counter, this session's
    actions as [pair id, version after] (what Undo reverts, newest last), the reviewer, how the
    image is displayed (render.display_geometry) and which side a newly drawn box replaces."""
    return {"pair_id": None, "version": None, "n": 0, "history": [], "reviewer": reviewer,
            "count": None, "pad": 0, "scale": 1.0, "new_side": "chosen"}


def reviewer_of(ctx: AppContext, state: dict[str, Any]) -> str:
    return state.get("reviewer") or ctx.user


def make_filter(ctx: AppContext, status: str | None, dataset: str | None, min_margin: float | None,
                max_margin: float | None, search: str | None) -> review.PairFilter:
    """The store's filter for the filter row's values (:func:`filter_of` takes them as :class:`Filters`)."""
    return review.PairFilter(
        status=None if status in (None, "", ANY) else status,
        dataset=None if dataset in (None, "", ANY) else dataset,
        min_margin=None if min_margin in (None, "") or float(min_margin) <= -1 else float(min_margin),
        max_margin=None if max_margin in (None, "") or float(max_margin) >= 1 else float(max_margin),
        search=(search or "").strip() or None)


def filter_of(ctx: AppContext, filters: Filters) -> review.PairFilter:
    return make_filter(ctx, status=filters.status, dataset=filters.dataset, min_margin=filters.min_margin,
                       max_margin=filters.max_margin, search=filters.search)


# ---------------------------------------------------------------------- the view

def pair_view(ctx: AppContext, pair: dict[str, Any] | None, state: dict[str, Any],
              flt: review.PairFilter, note: str = "", progress: desk.Progress | None = None,
              claim: bool = True) -> PairView:
    """Every output of the desk for ``pair`` (None: nothing matches the filter)."""
    state = {**state, "n": state.get("n", 0) + 1}
    reviewer = reviewer_of(ctx, state)
    if progress is None:
        # Recounted on every answer: a carried count missed other reviewers' actions (issue 19).
        progress = desk.progress(ctx.store, flt, reviewer)
    progress_md = progress.line(reviewer) + team_line(ctx, reviewer)
    if pair is None:
        state.update(pair_id=None, version=None, pad=0)
        ticket = f"All done: no pair matches the filters · #{state['n']}" + (f" · {note}" if note else "")
        return PairView(annotator=None, chosen_crop=None, rejected_crop=None, info=all_done_markdown(flt),
                        chosen_answer="", rejected_answer="", progress=progress_md, ticket=ticket, history="",
                        state=state)
    if claim:
        holder = desk.claim(ctx.store, pair["id"], reviewer)
        if holder:
            note = f"{holder} has this pair open too" + (f" · {note}" if note else "")
    boxes = review.pair_boxes(pair)
    shown, chosen_crop, rejected_crop, scale, pad = desk_images.pair_images(ctx, pair)
    state.update(pair_id=pair["id"], version=pair["version"], pad=pad, scale=scale)
    annot_boxes = [render.annotator_box(render.to_display(boxes[side], scale, pad), side, color)
                   for side, color in (("chosen", render.GREEN), ("rejected", render.RED))
                   if boxes[side] is not None]
    annotated = {"image": shown, "boxes": annot_boxes}
    ticket = (f"pair {pair['id']} · v{pair['version']} · {pair['status']} · #{state['n']}"
              + (f" · {note}" if note else ""))
    return PairView(annotator=annotated, chosen_crop=chosen_crop, rejected_crop=rejected_crop,
                    info=info_markdown(pair), chosen_answer=pair["chosen_answer"] or "",
                    rejected_answer=pair["rejected_answer"] or "", progress=progress_md, ticket=ticket,
                    history=pairs_team.history_markdown(ctx, pair["id"]), state=state)


def stay(state: dict[str, Any], message: str) -> PairView:
    """Leave the pair and the edits on screen as they are and warn (an edit that cannot be saved
    must not vanish by navigating away)."""
    state = {**state, "n": state.get("n", 0) + 1}
    message = f"{message} (Undo (U) discards your unsaved edits)" if "Undo (U)" not in message else message
    ticket = f"pair {state.get('pair_id')} · v{state.get('version')} · #{state['n']} · {EDITS_KEPT} · {warn(message)}"
    keep = gr.update()
    return PairView(**dict.fromkeys(PairView._fields, keep))._replace(ticket=ticket, state=state)


# ---------------------------------------------------------------------- edits on screen

def save_edits(ctx: AppContext, state: dict[str, Any], annotated: dict[str, Any] | None,
               chosen: str | None, rejected: str | None) -> tuple[dict[str, Any], str]:
    """Store the edits on screen for the pair in ``state``; returns the new state and a note.

    Raises :class:`VisRLError` when they cannot be stored (the caller keeps them on screen).
    """
    pair_id = state.get("pair_id")
    if pair_id is None or (annotated, chosen, rejected) == NO_EDITS:
        return state, ""
    pair = review.get_pair(ctx.store, pair_id)
    edits = pending_edits(pair, annotated, chosen, rejected, state.get("pad") or 0, state.get("scale") or 1.0,
                          state.get("new_side") or "chosen")
    if not edits:
        return state, ""
    if pair["version"] != state["version"]:
        raise ConflictError(f"pair {pair_id} was changed elsewhere while you edited it (you have version "
                            f"{state['version']}, the store has {pair['version']}); your edits are still on "
                            "screen: copy what you need, then press Undo (U) to discard them and reload")
    reviewer = reviewer_of(ctx, state)
    history = list(state.get("history") or [])
    with ctx.store.write():  # all edits of one save together, or none
        for kind, side, value in edits:
            edit = review.edit_box if kind == "box" else review.edit_answer
            pair = edit(ctx.store, pair_id, pair["version"], side, value, reviewer=reviewer)
            history.append([pair_id, pair["version"]])
    done = " and ".join(f"{side} {kind}" for kind, side, _ in edits)
    return {**state, "version": pair["version"], "history": history[-HISTORY_LIMIT:]}, f"saved {done}"


# ---------------------------------------------------------------------- handlers

def _with_saved_edits(handler: Callable[..., PairView]) -> Callable[..., PairView]:
    """Run ``handler(ctx, state, note, flt, sort, ...)`` after saving the edits on screen; when
    they cannot be saved, stay on the pair with the edits and a warning. The handler's own
    inputs (a target id, a direction) come between the edits and the :class:`Filters`."""
    def run(ctx: AppContext, state: dict[str, Any], annotated: Any, chosen: Any, rejected: Any,
            *values: Any) -> PairView:
        own, filters = split_filters(values)
        try:
            flt = filter_of(ctx, filters)
            state, note = save_edits(ctx, state, annotated, chosen, rejected)
        except VisRLError as exc:
            return stay(state, str(exc))
        flt.viewer = reviewer_of(ctx, state)
        return handler(ctx, state, note, flt, filters.sort, *own)
    # Not functools.wraps: gradio reads the signature (and __wrapped__'s) to count the inputs.
    run.__doc__, run.__name__ = handler.__doc__, getattr(handler, "__name__", "handler")
    return run


@_with_saved_edits
def show_first(ctx: AppContext, state: dict[str, Any], note: str, flt: review.PairFilter,
               sort: str) -> PairView:
    """The first pair of the filtered, sorted list (filters changed, or the page opened)."""
    pair = review.next_pair(ctx.store, flt, sort)
    if pair is not None:
        desk_images.prefetch(ctx, flt, sort, pair["id"])
    return pair_view(ctx, pair, {**state, "count": None}, flt, note)


def _navigate(ctx: AppContext, state: dict[str, Any], note: str, flt: review.PairFilter, sort: str,
              backwards: bool) -> PairView:
    current = state.get("pair_id")
    pair = review.next_pair(ctx.store, flt, sort, after=current, backwards=backwards)
    if pair is None and current is not None:
        pair, end = _reload(ctx, current), ("first pair" if backwards else "last pair")
        note = f"{note} · {end}" if note else end
    if pair is not None:
        desk_images.prefetch(ctx, flt, sort, pair["id"])
    return pair_view(ctx, pair, state, flt, note)


def navigate(ctx: AppContext, backwards: bool, state: dict[str, Any], annotated: Any, chosen: Any,
             rejected: Any, *filters: Any) -> PairView:
    """Next (or previous) pair after the one on screen, edits saved first; stays put at either end."""
    return _with_saved_edits(_navigate)(ctx, state, annotated, chosen, rejected, backwards, *filters)


def _reload(ctx: AppContext, pair_id: int | None) -> dict[str, Any] | None:
    if pair_id is None:
        return None
    try:
        return review.get_pair(ctx.store, pair_id)
    except VisRLError:
        return None


@_with_saved_edits
def jump(ctx: AppContext, state: dict[str, Any], note: str, flt: review.PairFilter, sort: str,
         target: Any) -> PairView:
    """Show pair ``target`` (an id typed by the user), whatever the filters."""
    try:
        pair_id = int(float(str(target).strip().lstrip("#")))
        pair = review.get_pair(ctx.store, pair_id)
    except (TypeError, ValueError):
        return stay(state, f"type a pair id (a whole number), not {str(target)[:40]!r}")
    except VisRLError as exc:
        return stay(state, str(exc))
    return pair_view(ctx, pair, state, flt, f"{note} · jumped to pair {pair_id}" if note else f"jumped to pair {pair_id}")


def act(ctx: AppContext, action: str, state: dict[str, Any], annotated: Any, chosen: Any, rejected: Any,
        *filters: Any) -> PairView:
    """Apply review ``action`` to the pair on screen with the version held in ``state``.

    Undo first discards edits not yet saved; otherwise it reverts this session's latest action
    (the desk moved on after an accept: undo brings that pair back) and never another tab's.
    Other actions save the edits on screen first.
    """
    if action == "undo":
        return _undo(ctx, state, annotated, chosen, rejected, *filters)
    return _with_saved_edits(functools.partial(_act, action=action))(
        ctx, state, annotated, chosen, rejected, *filters)


def _act(ctx: AppContext, state: dict[str, Any], note: str, flt: review.PairFilter, sort: str,
         action: str) -> PairView:
    history = list(state.get("history") or [])
    pair_id, version = state.get("pair_id"), state.get("version")
    if pair_id is None:  # all done: say so, change nothing
        return pair_view(ctx, None, state, flt, f"nothing to {review.action_label(action)}: no pair on screen")
    try:
        step = desk.act(ctx.store, action, pair_id, version, flt, sort, reviewer_of(ctx, state))
    except VisRLError as exc:
        return pair_view(ctx, _reload(ctx, pair_id), {**state, "history": history}, flt, warn(str(exc)))
    if step.acted["version"] != version:  # a no-op (Accept on an accepted pair) is not undoable
        history = [*history, [pair_id, step.acted["version"]]][-HISTORY_LIMIT:]
    note = f"{note} · {step.note}" if note else step.note
    if step.shown is not None:
        desk_images.prefetch(ctx, flt, sort, step.shown["id"])
    return pair_view(ctx, step.shown, {**state, "history": history}, flt, note, step.progress, claim=False)


def _undo(ctx: AppContext, state: dict[str, Any], annotated: Any, chosen: Any, rejected: Any,
          *values: Any) -> PairView:
    filters = Filters(*values)
    flt, sort = filter_of(ctx, filters), filters.sort
    flt.viewer = reviewer_of(ctx, state)
    history = list(state.get("history") or [])
    pair_id = state.get("pair_id")
    pair = _reload(ctx, pair_id)
    if pair is not None:
        try:
            unsaved = bool(pending_edits(pair, annotated, chosen, rejected, state.get("pad") or 0,
                                         state.get("scale") or 1.0, state.get("new_side") or "chosen"))
        except VisRLError:
            unsaved = True  # boxes that cannot even be read are unsaved edits too
        if unsaved:
            return pair_view(ctx, pair, state, flt, f"Discarded your unsaved edits to pair {pair_id}")
    if not history:
        return pair_view(ctx, pair, state, flt,
                         warn("nothing of yours to undo in this tab (Undo reverts only what you did here)"))
    target_id, version = history.pop()
    try:
        step = desk.act(ctx.store, "undo", target_id, version, flt, sort, reviewer_of(ctx, state))
    except VisRLError as exc:
        return pair_view(ctx, _reload(ctx, target_id), {**state, "history": history}, flt, warn(str(exc)))
    # later undos of the same pair must quote the version this undo produced
    history = [[pid, step.acted["version"] if pid == target_id else v] for pid, v in history]
    return pair_view(ctx, step.shown, {**state, "history": history, "count": None}, flt, step.note)


def save_boxes(ctx: AppContext, state: dict[str, Any], annotated: dict[str, Any] | None,
               *filters: Any) -> PairView:
    """Store the boxes read back from the annotator (pixels of the original image)."""
    return _save(ctx, state, (annotated, None, None), "box", *filters)


def save_answers(ctx: AppContext, state: dict[str, Any], chosen: str, rejected: str,
                 *filters: Any) -> PairView:
    """Store edited answers (only the sides whose text changed)."""
    return _save(ctx, state, (None, chosen, rejected), "answer", *filters)


def _save(ctx: AppContext, state: dict[str, Any], edits: tuple[Any, Any, Any], what: str,
          *values: Any) -> PairView:
    flt = filter_of(ctx, Filters(*values))
    if state.get("pair_id") is None:
        return pair_view(ctx, None, state, flt, warn("no pair on screen"))
    try:
        state, note = save_edits(ctx, state, *edits)
    except VisRLError as exc:
        return stay(state, str(exc))  # the edits stay on screen to be fixed
    return pair_view(ctx, _reload(ctx, state["pair_id"]), state, flt, note or f"no {what} changed")


def load(ctx: AppContext, state: dict[str, Any], *filters: Any, request: gr.Request | None = None) -> PairView:
    """Page opened: the reviewer is the login name under ``--auth``, else the app's ``--user``."""
    user = getattr(request, "username", None) if request is not None else None
    fresh = empty_state(user or state.get("reviewer") or ctx.user)
    return show_first(ctx, fresh, *NO_EDITS, *filters)


def bulk(ctx: AppContext, step: str, state: dict[str, Any], action: str, *values: Any) -> Any:
    """Bulk ``step`` ("confirm" or "undo") on the filtered set; the desk then shows the filter's
    first pair. A ``BulkView``: the desk's outputs, then the bulk message."""
    filters = Filters(*values)
    flt = filter_of(ctx, filters)
    reviewer = reviewer_of(ctx, state)
    if step == "confirm":
        message, state = pairs_team.bulk_confirm(ctx, state, action, flt, reviewer)
    else:
        message, state = pairs_team.bulk_undo(ctx, state, reviewer)
    flt.viewer = reviewer
    view = pair_view(ctx, review.next_pair(ctx.store, flt, filters.sort), state, flt)
    return BulkView(**view._asdict(), bulk_message=message)


def choose_new_side(state: dict[str, Any], side: str) -> dict[str, Any]:
    """Which stored box a newly drawn box replaces (it is drawn with the default label, chosen)."""
    return {**state, "new_side": side if side in ("chosen", "rejected") else "chosen"}


def bulk_preview(ctx: AppContext, state: dict[str, Any], action: str, *values: Any) -> tuple[str, dict[str, Any]]:
    """(bulk message, state): how many pairs the bulk action would change."""
    flt = filter_of(ctx, Filters(*values))
    return pairs_team.bulk_preview(ctx, state, action, flt, reviewer_of(ctx, state))


def current_view(handler: Callable[..., PairView]) -> Callable[..., PairView]:
    """``handler(state, annotated, chosen, rejected, ...)`` fed the edits on screen only if they
    belong to the view the server last sent (``view`` == ``state["n"]``, kept by keyboard.js).

    A click made while the previous request ran carries the inputs of the pair shown before it
    (measured: rapid presses saved pair 8's boxes and answers onto pairs 7, 6, 5); those are not
    edits of the pair now in ``state`` and must not be saved onto it.
    """
    def run(state: dict[str, Any], view: Any, annotated: Any, chosen: Any, rejected: Any,
            *rest: Any) -> PairView:
        if str(view or "") != str(state.get("n")):
            annotated, chosen, rejected = NO_EDITS
        return handler(state, annotated, chosen, rejected, *rest)
    return run


def _save_all(ctx: AppContext, what: str, state: dict[str, Any], annotated: Any, chosen: Any,
              rejected: Any, *filters: Any) -> PairView:
    if what == "box":
        return save_boxes(ctx, state, annotated, *filters)
    return save_answers(ctx, state, chosen, rejected, *filters)


# ---------------------------------------------------------------------- layout

def shortcut_legend() -> str:
    return "**Keys:** " + " · ".join(f"`{key}` {label}" for key, label in SHORTCUTS.values())


def dataset_choices(ctx: AppContext) -> list[str]:
    return [ANY, *(d["name"] for d in ctx.store.datasets())]


def _pair_panel() -> Components:
    """The image with draggable boxes beside both answers, the pair's facts, crops and history."""
    with gr.Row(elem_id="pairs-panel"):
        with gr.Column(scale=3, min_width=380):
            annotator = image_annotator(
                # No block label: gradio draws it over the canvas's top rows, where the label of
                # a box at the image's top edge goes.
                None, label="Image", show_label=False,
                label_list=["chosen", "rejected"],
                label_colors=[render.GREEN, render.RED], sources=[], image_type="pil",
                show_clear_button=False, show_download_button=False, show_remove_button=True,
                use_default_label=True, box_min_size=4, handle_size=6, boxes_alpha=0.12,
                elem_id="pairs-annotator", height=420)
            # The desk reads back only boxes and never uses the image a browser sends (it shows
            # the stored one): skip decoding it, 10-45 ms per key press. (A subclass would need
            # its own frontend: gradio finds a custom component's JS by its class name.)
            annotator.preprocess_image = lambda image: None
            gr.Markdown("<span style='color:#22c55e'>■</span> chosen · "
                        "<span style='color:#ef4444'>■</span> rejected · "
                        "<span style='color:#2563eb'>┅</span> annotated (reference only) · drag a box "
                        "to fix it (saved by your next action) · a new box (drawn green) replaces the "
                        "side picked here; double-click a box to relabel it · select a box and press "
                        "Del to remove it · mouse wheel zooms",
                        elem_id="pairs-legend")
            # With container=False gradio drops the label, and the two bare options said nothing.
            new_side = gr.Radio(["chosen", "rejected"], value="chosen", label="A new box replaces the box of",
                                elem_id="pairs-new-side")
        with gr.Column(scale=2, min_width=300):
            chosen_answer = gr.Textbox(label="Chosen answer", lines=2, max_lines=6, elem_id="pairs-chosen-answer")
            rejected_answer = gr.Textbox(label="Rejected answer", lines=2, max_lines=6,
                                         elem_id="pairs-rejected-answer")
            info = gr.Markdown(elem_id="pairs-info")
            with gr.Row():
                chosen_crop = gr.Image(label="Chosen crop", type="pil", interactive=False, height=150, buttons=[])
                rejected_crop = gr.Image(label="Rejected crop", type="pil", interactive=False, height=150,
                                         buttons=[])
            history = gr.Markdown(elem_id="pairs-history")
    return Components(annotator=annotator, info=info, chosen_crop=chosen_crop, rejected_crop=rejected_crop,
                      chosen_answer=chosen_answer, rejected_answer=rejected_answer, history=history,
                      new_side=new_side)


def _bulk_panel() -> Components:
    with gr.Accordion("Bulk action on the filtered set", open=False, elem_id="pairs-bulk"):
        with gr.Row(equal_height=True):
            action = gr.Dropdown([(label.capitalize(), name) for name, label in pairs_team.BULK_LABELS.items()],
                                 value="accept", label="Action", scale=1)
            preview = gr.Button("Preview count", elem_id="pairs-bulk-preview", scale=1)
            confirm = gr.Button("Confirm", variant="primary", elem_id="pairs-bulk-confirm", scale=1)
            undo = gr.Button("Undo my last bulk action", elem_id="pairs-bulk-undo", scale=1)
        message = gr.Markdown(elem_id="pairs-bulk-message")
    return Components(bulk_action=action, bulk_preview=preview, bulk_confirm=confirm, bulk_undo=undo,
                      bulk_message=message)


def create_pairs_tab(ctx: AppContext) -> Tab:
    """Build the Pairs tab inside the current ``gr.Blocks``; returns its components by name."""
    state = gr.State(empty_state())
    with gr.Column(elem_id="pairs-desk"):
        with gr.Row(equal_height=True):
            status = gr.Dropdown(STATUS_CHOICES, value="pending", label="Status", scale=1, min_width=110)
            dataset = gr.Dropdown(dataset_choices(ctx), value=ANY, label="Dataset", scale=1, min_width=110)
            # Margins (chosen - rejected answer score) lie in [-1, 1]; the ends mean "no limit".
            min_margin = gr.Slider(-1, 1, value=-1, step=0.05, label="Min margin", scale=1, min_width=120)
            max_margin = gr.Slider(-1, 1, value=1, step=0.05, label="Max margin", scale=1, min_width=120)
            search = gr.Textbox(label="Search question / answers", scale=2, min_width=140)
            sort = gr.Dropdown(list(review.SORTS), value="priority", label="Sort", scale=1, min_width=110)
            target = gr.Textbox(label="Go to pair #", scale=1, min_width=90, elem_id="pairs-jump")
        progress = gr.Markdown(elem_id="pairs-progress")
        with gr.Row(elem_id="pairs-buttons"):
            buttons = {name: gr.Button(f"{label} ({key.split(' ')[0]})", elem_id=f"pairs-{name.replace('_', '-')}",
                                       variant=_variant(name), size="sm", min_width=80)
                       for name, (key, label) in SHORTCUTS.items()}
        # keyboard.js marks #pairs-desk "visrl-dirty" while edits are unsaved; style.css then
        # appends "● unsaved edits" to this line.
        ticket = gr.Markdown(elem_id="pairs-ticket")
        components = Components(state=state, status=status, dataset=dataset, min_margin=min_margin,
                                max_margin=max_margin, search=search, sort=sort, target=target,
                                progress=progress, ticket=ticket,
                                **{f"button_{name}": button for name, button in buttons.items()})
        components.merge(_pair_panel()).merge(_bulk_panel())
        create_export_panel(ctx, dataset)

    components.add(view=gr.Textbox(value="", elem_id="pairs-view", show_label=False, container=False))
    filters = components.pick(*Filters._fields)
    edits = components.pick(*EDITS)
    outputs = components.outputs(PairView)
    new_side, bulk_action, bulk_message = components.pick("new_side", "bulk_action", "bulk_message")
    # Review actions run one at a time (they take milliseconds), in the order they were triggered.
    # No progress overlay: a key press takes milliseconds, and the overlay on ten outputs cost
    # the browser more than the answer did.
    common = {"outputs": outputs, "trigger_mode": "multiple", "api_visibility": "undocumented",
              "concurrency_id": "pairs-review", "concurrency_limit": 1, "show_progress": "hidden"}
    for name in ("accept", "reject", "swap", "undo", "reset"):
        buttons[name].click(current_view(functools.partial(act, ctx, name)), [state, *edits, *filters], **common)
    buttons["next"].click(current_view(functools.partial(navigate, ctx, False)), [state, *edits, *filters], **common)
    buttons["prev"].click(current_view(functools.partial(navigate, ctx, True)), [state, *edits, *filters], **common)
    buttons["save_boxes"].click(current_view(functools.partial(_save_all, ctx, "box")), [state, *edits, *filters],
                                **common)
    buttons["save_answers"].click(current_view(functools.partial(_save_all, ctx, "answer")),
                                  [state, *edits, *filters], **common)
    first = current_view(functools.partial(show_first, ctx))
    for component in (status, dataset, sort):
        component.change(first, [state, *edits, *filters], **common)
    for component in (min_margin, max_margin):
        component.release(first, [state, *edits, *filters], **common)
    search.submit(first, [state, *edits, *filters], **common)
    new_side.change(choose_new_side, [state, new_side], [state], api_visibility="undocumented",
                    concurrency_id="pairs-review", show_progress="hidden")
    target.submit(current_view(functools.partial(jump, ctx)), [state, *edits, target, *filters], **common)
    bulk_outputs = components.outputs(BulkView)
    components["bulk_preview"].click(functools.partial(bulk_preview, ctx), [state, bulk_action, *filters],
                                     [bulk_message, state], api_visibility="undocumented",
                                     concurrency_id="pairs-review")
    for step in ("confirm", "undo"):
        components[f"bulk_{step}"].click(functools.partial(bulk, ctx, step), [state, bulk_action, *filters],
                                         bulk_outputs, api_visibility="undocumented", concurrency_id="pairs-review")

    def on_load(state: dict[str, Any], status: Any, dataset: Any, min_margin: Any, max_margin: Any,
                search: Any, sort: Any, request: gr.Request) -> PairView:
        return load(ctx, state, status, dataset, min_margin, max_margin, search, sort, request=request)

    return Tab(components, on_load, load_inputs=("state", *Filters._fields), load_outputs=fields(PairView))


def _variant(name: str) -> str:
    return {"accept": "primary", "reject": "stop"}.get(name, "secondary")
