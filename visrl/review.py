"""Preference pairs: creation, the queries of the curation desk, and review actions.

Every review action (accept, reject, swap, edit a box, edit an answer, undo) is one transaction
that checks the pair's ``version`` (optimistic locking: a second reviewer holding an old copy gets
a :class:`ConflictError`, never a silent overwrite), bumps it, and appends a row to the
append-only ``reviews`` audit with the fields before and after. Undo reads that audit.
Boxes are absolute pixels of the item's original image. The statements on ``pairs`` and
``reviews`` are :class:`~visrl.store_pairs.PairTables` methods; this module holds the rules.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Literal

from visrl import rescore
from visrl.boxes import Box
from visrl.errors import ConflictError, DataError, NotFoundError
from visrl.store import Store, box_from_json, box_to_json, loads, now
from visrl.store_pairs import PAIR_SORTS, PairFilter, PairPosition
from visrl.vocabulary import PAIR_STATUSES

Side = Literal["chosen", "rejected"]
STATUSES = PAIR_STATUSES  # the name review callers know
SORTS = tuple(PAIR_SORTS)
# PairFilter, the desk's query, is defined beside its SQL (visrl.store_pairs); callers import it from here.
_SIDE_FIELDS = ("rollout_id", "box", "answer", "score", "crop_score")
# What each audit action is called on screen and in the CLI (one mapping, so no internal name
# such as "edit_chosen_answer" shows anywhere).
ACTION_LABELS = {
    "accept": "accept", "reject": "reject", "reset": "back to pending", "swap": "swap sides",
    "undo": "undo", "edit_chosen_box": "edit chosen box", "edit_rejected_box": "edit rejected box",
    "edit_chosen_answer": "edit chosen answer", "edit_rejected_answer": "edit rejected answer",
}
_QUIET_FIELDS = {"edited", "decided_by", "stale_scores"}  # bookkeeping, not shown in a change line


def action_label(action: str) -> str:
    return ACTION_LABELS.get(action, action.replace("_", " "))


def review_priority(margin: float, chosen_crop_score: float | None, chosen_iou: float | None) -> float:
    """How much a pair deserves a human look, higher first.

    A small answer-score margin means the judges barely separated the two sides (1 - margin);
    a crop judge that disagrees with the IoU against an annotated box by more than 0.5 adds 1.
    """
    priority = 1.0 - max(0.0, min(1.0, margin))
    if chosen_crop_score is not None and chosen_iou is not None and abs(chosen_crop_score - chosen_iou) > 0.5:
        priority += 1.0
    return round(priority, 4)


def add_pair(store: Store, item_id: int, chosen: dict[str, Any], rejected: dict[str, Any],
             source: str = "") -> int:
    """Store a pending pair from two rollouts (rows of ``rollouts``). Idempotent per rollout pair."""
    item = store.item(item_id)
    c_score, r_score = chosen.get("answer_score") or 0.0, rejected.get("answer_score") or 0.0
    # Rounded: 0.8 - 0.2 is 0.6000000000000001 in floats, which a desk filter "margin <= 0.6"
    # would wrongly leave out.
    margin = round(c_score - r_score, 6)
    row = {
        "item_id": item_id, "dataset_id": item["dataset_id"],
        "chosen_rollout_id": chosen["id"], "rejected_rollout_id": rejected["id"],
        "chosen_box": chosen.get("box"), "chosen_answer": chosen.get("answer"),
        "chosen_score": c_score, "chosen_crop_score": chosen.get("crop_score"),
        "rejected_box": rejected.get("box"), "rejected_answer": rejected.get("answer"),
        "rejected_score": r_score, "rejected_crop_score": rejected.get("crop_score"),
        "margin": margin,
        "priority": review_priority(margin, chosen.get("crop_score"), chosen.get("iou")),
        "status": "pending", "version": 1, "edited": 0, "source": source,
        "created_at": now(), "updated_at": now(),
    }
    return store.insert_pair(row)


def source_pairs(store: Store, source: str, item_ids: list[int]) -> list[dict[str, Any]]:
    """The pairs of ``source`` on ``item_ids`` (:meth:`~visrl.store.Store.source_pairs`)."""
    return store.source_pairs(source, item_ids)


def remove_unreviewed_pair(store: Store, pair_id: int) -> bool:
    """Delete a pair no person has touched (pending, unedited, no review); False if one has."""
    return store.delete_unreviewed_pair(pair_id)


def get_pair(store: Store, pair_id: int) -> dict[str, Any]:
    """The pair with its item's question, reference answer, image and size, and dataset name."""
    pair = store.pair(pair_id)
    if pair is None:
        raise NotFoundError(f"no pair with id {pair_id}")
    return pair


def page_pairs(store: Store, flt: PairFilter, sort: str = "priority", offset: int = 0,
               limit: int = 50) -> list[dict[str, Any]]:
    return store.page_pairs(flt, sort, offset, limit)


def count_pairs(store: Store, flt: PairFilter) -> int:
    """Pairs ``flt`` matches. Status/dataset-only filters read the ``pair_counts`` table (a few
    rows, kept by triggers); anything else counts the matching rows."""
    if flt.counted:
        return sum(status_counts(store, flt.dataset, flt.status).values())
    count = store.count_pairs(flt)
    if flt.indexed_search:
        _remember_matches(flt.search or "", count)
    return count


def matches(store: Store, flt: PairFilter, pair_id: int) -> bool:
    """Whether pair ``pair_id`` is among those ``flt`` matches now (one indexed lookup)."""
    return store.pair_matches(flt, pair_id)


def status_counts(store: Store, dataset: str | None = None, status: str | None = None) -> dict[str, int]:
    """Pairs per status (every status present, zero when none), optionally for one dataset;
    with ``status`` only that one. Read from ``pair_counts`` (exact: triggers keep it)."""
    counts = store.pair_status_counts(dataset)
    return {s: counts.get(s, 0) for s in STATUSES if status in (None, s)}


def next_pair(store: Store, flt: PairFilter, sort: str = "priority", after: int | None = None,
              backwards: bool = False) -> dict[str, Any] | None:
    """The pair after (or before) pair ``after`` in ``sort`` order among those ``flt`` matches.

    Keyset navigation: ``after`` need not match the filter any more (a pair just accepted leaves
    the "pending" view), the walk continues from where it stood.
    """
    position = store.pair_position(sort, after)
    if flt.indexed_search and (flt.search or "").isascii() and not _known_rare(store, flt.search or ""):
        found, exhausted = _scan_for_search(store, flt, sort, position, backwards)
        if found is not None or exhausted:
            return get_pair(store, found) if found is not None else None
    return store.next_pair(flt, sort, position, backwards)


SCAN_CANDIDATES = 1000  # pairs checked in walk order before a search asks the full-text index
_MATCH_COUNTS: dict[str, int] = {}  # search text -> pairs it matched when last counted (a hint)
_MATCH_COUNTS_MAX = 256


def _remember_matches(text: str, count: int) -> None:
    if len(_MATCH_COUNTS) >= _MATCH_COUNTS_MAX:
        _MATCH_COUNTS.pop(next(iter(_MATCH_COUNTS)))
    _MATCH_COUNTS[text] = count


def _known_rare(store: Store, text: str) -> bool:
    """True when this search was counted (the desk counts it when the filter is set) and matched
    fewer than 1 pair in ``SCAN_CANDIDATES``: scanning the walk first would find nothing (4 ms
    wasted per key press at 1,000,000 pairs). Only a hint: both paths give the same pair."""
    count = _MATCH_COUNTS.get(text)
    if count is None:
        return False
    return count * SCAN_CANDIDATES < store.pair_total()


def _scan_for_search(store: Store, flt: PairFilter, sort: str, position: PairPosition | None,
                     backwards: bool) -> tuple[int | None, bool]:
    """(id of the next match among the next ``SCAN_CANDIDATES`` pairs in walk order, whether
    there were no more pairs to check).

    A common search (1 pair in 100) is found a few hundred pairs down the walk, reading rows one
    by one and stopping at the first match (~3 us a row); asking the trigram index instead reads
    every match's postings (12 ms at 100,000 pairs, growing with the table). A rare search is not
    found here and goes to the index, which is fast for it. Plain ASCII only: there Python's case
    folding equals the index's.
    """
    needle = (flt.search or "").casefold()
    seen = 0
    with contextlib.closing(store.walk_pair_texts(flt, sort, position, backwards, SCAN_CANDIDATES)) as rows:
        for pair_id, *texts in rows:
            seen += 1
            if any(needle in (text or "").casefold() for text in texts):
                return pair_id, False
    return None, seen < SCAN_CANDIDATES


# ---------------------------------------------------------------------- review actions

def _decide(status: str, reviewer: str) -> Any:
    """The change that sets ``status`` and records who decided it (``decided_by``: nobody for
    pending). Setting a pair's own status again changes nothing (no audit row, no new decider)."""
    def change(p: dict[str, Any]) -> dict[str, Any]:
        if p["status"] == status:
            return {"status": status}
        return {"status": status, "decided_by": None if status == "pending" else reviewer}
    return change


def accept(store: Store, pair_id: int, version: int, reviewer: str = "local") -> dict[str, Any]:
    return _apply(store, pair_id, version, reviewer, "accept", _decide("accepted", reviewer))


def reject(store: Store, pair_id: int, version: int, reviewer: str = "local") -> dict[str, Any]:
    return _apply(store, pair_id, version, reviewer, "reject", _decide("rejected", reviewer))


def reset(store: Store, pair_id: int, version: int, reviewer: str = "local") -> dict[str, Any]:
    """Back to pending (a reviewer changing their mind without undoing later edits)."""
    return _apply(store, pair_id, version, reviewer, "reset", _decide("pending", reviewer))


def swap(store: Store, pair_id: int, version: int, reviewer: str = "local") -> dict[str, Any]:
    """Exchange chosen and rejected (every side field), e.g. when the judges got it backwards."""
    def change(p: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for field in _SIDE_FIELDS:
            out[f"chosen_{field}"], out[f"rejected_{field}"] = p[f"rejected_{field}"], p[f"chosen_{field}"]
        out["margin"] = -(p["margin"] or 0.0)
        out["stale_scores"] = rescore.swapped(p)
        return out
    return _apply(store, pair_id, version, reviewer, "swap", change)


def edit_box(store: Store, pair_id: int, version: int, side: Side, box: Box,
             reviewer: str = "local") -> dict[str, Any]:
    """Replace one side's box (pixels of the original image); it must lie inside the image.
    Its crop score is re-scored or marked stale (:mod:`visrl.rescore`)."""
    def change(p: dict[str, Any]) -> dict[str, Any]:
        size = (p["width"], p["height"])
        if not box.is_valid() or not box.inside(size):
            raise DataError(f"box {box.as_list()} is empty or leaves the {size[0]}x{size[1]} image; "
                            "draw it inside the image")
        clamped = box.clamp(size)
        return {f"{_side(side)}_box": box_to_json(clamped), "edited": 1,
                **rescore.after_edit(store, p, side, box=clamped)}
    return _apply(store, pair_id, version, reviewer, f"edit_{side}_box", change)


def edit_answer(store: Store, pair_id: int, version: int, side: Side, answer: str,
                reviewer: str = "local") -> dict[str, Any]:
    def change(p: dict[str, Any]) -> dict[str, Any]:
        if not answer.strip():
            raise DataError("an answer cannot be empty; type the answer or undo")
        return {f"{_side(side)}_answer": answer.strip(), "edited": 1,
                **rescore.after_edit(store, p, _side(side), answer=answer.strip())}
    return _apply(store, pair_id, version, reviewer, f"edit_{side}_answer", change)


def undo_target(store: Store, pair_id: int) -> dict[str, Any] | None:
    """The review :func:`undo` would revert: the pair's latest action not yet undone (or None)."""
    return store.undo_target(pair_id)


def undo(store: Store, pair_id: int, version: int, reviewer: str = "local") -> dict[str, Any]:
    """Revert the pair's latest review that is not itself undone (undo of undo is redo-free).

    Only the reviewer who made that change may undo it: another's change is a
    :class:`ConflictError` naming who did what, and nothing changes.
    """
    with store.write():
        last = undo_target(store, pair_id)
        if last is None:
            get_pair(store, pair_id)  # a missing pair is NotFoundError, not "nothing to undo"
            raise DataError(f"pair {pair_id} has nothing to undo")
        if (last["reviewer"] or "local") != reviewer:
            raise ConflictError(f"pair {pair_id}'s latest change is {describe(last)}; only "
                                f"{last['reviewer']} can undo it (or change the pair yourself)")
        return _apply(store, pair_id, version, reviewer, "undo", lambda p: json.loads(last["before"]),
                      undoes=last["id"])


def describe(row: dict[str, Any], limit: int | None = 40) -> str:
    """One line for an audit row: who did what when, e.g. "ana's accept (status pending ->
    accepted) at 2026-12-01T09:00:00+00:00"; values cut at ``limit`` characters (None: whole)."""
    before, after = loads(row.get("before"), {}), loads(row.get("after"), {})
    changes = ", ".join(f"{k} {_short(before.get(k), limit)} -> {_short(v, limit)}" for k, v in after.items()
                        if k not in _QUIET_FIELDS)
    batch = " (bulk)" if row.get("batch") else ""
    return f"{row.get('reviewer') or 'local'}'s {action_label(row['action'])}{batch} ({changes}) at {row['created_at']}"


def _short(value: Any, limit: int | None = 40) -> str:
    text = "—" if value is None else str(value)
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"


def reviews(store: Store, pair_id: int) -> list[dict[str, Any]]:
    return store.reviews(pair_id)


def _side(side: str) -> str:
    if side not in ("chosen", "rejected"):
        raise DataError(f"side must be 'chosen' or 'rejected', not {side!r}")
    return side


def _apply(store: Store, pair_id: int, version: int, reviewer: str, action: str, change: Any,
           undoes: int | None = None) -> dict[str, Any]:
    # store.write(): the write lock is taken before the version is read, so of two reviewers
    # acting at once the second waits and then sees the first's version: ConflictError.
    with store.write():
        pair = get_pair(store, pair_id)
        if pair["version"] != version:
            raise ConflictError(
                f"pair {pair_id} was changed by someone else (you have version {version}, the store "
                f"has {pair['version']}, updated {pair['updated_at']}); reload it and redo your change")
        after = change(pair)
        before = {key: pair[key] for key in after}
        if before == after:  # e.g. Accept on an accepted pair: nothing to store or audit
            return pair
        store.record_review(pair_id, version, before, after, reviewer, action, undoes)
        return get_pair(store, pair_id)


def pair_boxes(pair: dict[str, Any]) -> dict[str, Box | None]:
    """The pair's chosen, rejected and annotated boxes as :class:`Box` (pixels)."""
    return {"chosen": box_from_json(pair.get("chosen_box")),
            "rejected": box_from_json(pair.get("rejected_box")),
            "gt": box_from_json(pair.get("gt_box"))}
