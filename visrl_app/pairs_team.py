"""The desk's team tools: the pair's history, bulk actions on the filtered set, and their handlers.

Bulk actions are two steps: Preview counts the pairs the filters match (those not already in the
target status) and holds that count in the browser's state; Confirm applies the action only if
the store still holds exactly that many (:func:`visrl.desk.bulk_apply`), as one transaction and
one audit batch, which "Undo my last bulk action" reverts as a unit.
"""

from __future__ import annotations

from typing import Any

from visrl import desk, review
from visrl.errors import VisRLError
from visrl_app.context import AppContext, warn

HISTORY_ROWS = 12  # newest audit rows shown under the pair
HISTORY_CHARS = 90  # a history line longer than this is cut; the whole change opens below it
BULK_LABELS = {"accept": "accept", "reject": "reject", "reset": "put back to pending"}


def history_markdown(ctx: AppContext, pair_id: int) -> str:
    """Who did what to the pair, when (newest first)."""
    rows = review.reviews(ctx.store, pair_id)
    if not rows:
        return f"**History of pair {pair_id}:** no review yet."
    lines = [f"**History of pair {pair_id}** ({len(rows)} actions, newest first)", "",
             "| when (UTC) | who | what |", "|---|---|---|"]
    for row in reversed(rows[-HISTORY_ROWS:]):
        lines.append(f"| {row['created_at'][:19].replace('T', ' ')} | {row['reviewer'] or 'local'} | "
                     f"{history_cell(row)} |")
    return "\n".join(lines)


def history_cell(row: dict[str, Any]) -> str:
    """What an audit row changed, cut to :data:`HISTORY_CHARS`; a cut line opens to the whole
    change (every value in full) on a click."""
    def what(limit: int | None) -> str:
        text = review.describe(row, limit).split("'s ", 1)[1].rsplit(" at ", 1)[0]
        return text + (f" (reverts #{row['undoes']})" if row["undoes"] else "")

    def cell(text: str) -> str:  # inside a markdown table: no pipes, no line breaks, no markup
        return text.replace("&", "&amp;").replace("<", "&lt;").replace("|", "&#124;").replace("\n", " ")
    short = what(40)
    if len(short) <= HISTORY_CHARS:
        return cell(short)
    return f"<details><summary>{cell(short[:HISTORY_CHARS - 1])}…</summary>{cell(what(None))}</details>"


def bulk_preview(ctx: AppContext, state: dict[str, Any], action: str, flt: review.PairFilter,
                 reviewer: str) -> tuple[str, dict[str, Any]]:
    """(message, state holding the count to confirm) for ``action`` on the filtered set."""
    try:
        count = desk.bulk_preview(ctx.store, flt, action)
    except VisRLError as exc:
        return warn(str(exc)), {**state, "bulk": None}
    if count == 0:
        return f"No pair matching the filters would change by **{BULK_LABELS[action]}**.", {**state, "bulk": None}
    pending = {"action": action, "expect": count, "filter": repr({**flt.__dict__, "viewer": None})}
    return (f"**{count}** pairs match the filters and would be changed by **{BULK_LABELS[action]}** "
            f"(as {reviewer}). Press **Confirm** to apply, or change the filters to cancel."), {**state, "bulk": pending}


def bulk_confirm(ctx: AppContext, state: dict[str, Any], action: str, flt: review.PairFilter,
                 reviewer: str) -> tuple[str, dict[str, Any]]:
    """Apply the previewed bulk action if the filters and action are the ones previewed."""
    pending = state.get("bulk")
    if not pending or pending["action"] != action or pending["filter"] != repr({**flt.__dict__, "viewer": None}):
        return warn("preview the bulk action with these filters first, then confirm its count"), state
    try:
        batch, count = desk.bulk_apply(ctx.store, flt, action, reviewer, pending["expect"])
    except VisRLError as exc:
        return warn(str(exc)), {**state, "bulk": None}
    return (f"Done: **{count}** pairs ({BULK_LABELS[action]}), batch `{batch}`. "
            "“Undo my last bulk action” reverts it as one unit."), {**state, "bulk": None, "count": None}


def bulk_undo(ctx: AppContext, state: dict[str, Any], reviewer: str) -> tuple[str, dict[str, Any]]:
    batch = desk.last_batch(ctx.store, reviewer)
    if batch is None:
        return warn(f"{reviewer} has no bulk action left to undo"), state
    try:
        reverted, skipped = desk.undo_batch(ctx.store, batch, reviewer)
    except VisRLError as exc:
        return warn(str(exc)), state
    kept = f"; {skipped} changed since were left as they are" if skipped else ""
    return f"Undid bulk action `{batch}`: **{reverted}** pairs reverted{kept}.", {**state, "count": None}
