"""The curation desk's work per key press, shared by the app and ``visrl review``.

One key press = one review action (:mod:`visrl.review`, version-checked) + the next pair to show
(claimed for this reviewer, so nobody else is served it at the same time) + the progress line.
Counts come from the ``pair_counts`` / ``decision_counts`` tables that triggers keep exact. The
count of pairs matching a filter with a search or margins is recounted on every key press by the
desk (a count carried from press to press missed other reviewers' actions); a caller acting alone
may pass the previous count, which :func:`act` moves by the pair it changed
(:meth:`visrl.review.PairFilter.accepts`). bench/bench_store.py times it: p95 targets 30 ms at
100,000 pairs.

Bulk actions change every pair a filter matches in one transaction, after the caller confirmed
the count, and share one ``batch`` id in the audit so :func:`undo_batch` reverts them as a unit.
"""

from __future__ import annotations

import getpass
import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

from visrl import review
from visrl.errors import ConflictError, DataError
from visrl.review import PairFilter
from visrl.store import Store
from visrl.vocabulary import DECIDED_PAIR_STATUSES

CLAIM_TTL_S = 300.0  # a pair stays on one screen this long without a key press (5 min), then frees
BULK_ACTIONS = {"accept": "accepted", "reject": "rejected", "reset": "pending"}
ACTIONS = {"accept": review.accept, "reject": review.reject, "swap": review.swap,
           "reset": review.reset, "undo": review.undo}
ADVANCE_AFTER = {"accept", "reject"}  # a decided pair moves the desk on to the next one


def default_reviewer() -> str:
    """Who acts when nobody logged in: ``$VISRL_USER``, else the OS login name, else "local"."""
    name = os.environ.get("VISRL_USER", "").strip()
    if not name:
        try:
            name = getpass.getuser()
        except (KeyError, OSError):  # no passwd entry (some containers)
            name = ""
    return name or "local"


def check_reviewer(name: str) -> str:
    """A reviewer name as stored on audit rows: 1-64 printable characters, no surrounding spaces."""
    name = (name or "").strip()
    if not name or len(name) > 64 or not name.isprintable():
        raise DataError(f"reviewer name {name[:80]!r} must be 1-64 printable characters")
    return name


@dataclass
class Progress:
    """Pairs per status (for the filter's dataset), pairs matching the filter, and this
    reviewer's standing decisions: pairs whose current status they set, per status."""

    counts: dict[str, int]
    matching: int
    mine: dict[str, int] = field(default_factory=dict)

    def line(self, reviewer: str) -> str:
        total = sum(self.counts.values())
        reviewed = self.counts["accepted"] + self.counts["rejected"]
        mine = decisions_text(self.mine) if self.mine else "nothing decided yet"
        return (f"**Reviewed {reviewed} / {total}** · accepted {self.counts['accepted']} · rejected "
                f"{self.counts['rejected']} · pending {self.counts['pending']} · {self.matching} match "
                f"the filters · {reviewer}: {mine}")


DECIDED = DECIDED_PAIR_STATUSES


def decisions_text(counts: dict[str, int]) -> str:
    """"3 accepted, 1 rejected": one reviewer's standing decisions."""
    return ", ".join(f"{counts.get(status, 0)} {status}" for status in DECIDED)


def reviewer_counts(store: Store, reviewer: str) -> dict[str, int]:
    """Pairs whose current status ``reviewer`` set, per status (accepted, rejected).

    The pairs' current rows, not the audit: an accept later undone, reset or overruled by another
    reviewer no longer counts. Read from ``decision_counts``, which triggers keep equal to
    :func:`recount_decisions`."""
    return store.reviewer_decisions(reviewer)


def team_progress(store: Store) -> dict[str, dict[str, int]]:
    """Every reviewer's standing decisions, as :func:`reviewer_counts`."""
    return store.team_decisions()


def recount_decisions(store: Store) -> dict[str, dict[str, int]]:
    """:func:`team_progress` counted from the pairs table itself (a full scan: checks and tests)."""
    return store.recount_decisions()


def progress(store: Store, flt: PairFilter, reviewer: str, matching: int | None = None) -> Progress:
    """The progress line's numbers; ``matching`` if the caller keeps that count already."""
    counts = review.status_counts(store, flt.dataset)
    if matching is None:
        matching = review.count_pairs(store, PairFilter(**{**flt.__dict__, "viewer": None}))
    return Progress(counts, matching, reviewer_counts(store, reviewer))


# ---------------------------------------------------------------------- claims

def claim(store: Store, pair_id: int, reviewer: str, ttl_s: float = CLAIM_TTL_S) -> str | None:
    """Put ``pair_id`` on ``reviewer``'s screen: their previous claim ends, this one lasts
    ``ttl_s`` seconds. Returns None, or the other reviewer who holds a live claim on it (the pair
    is then shown anyway but not claimed: two tabs may race to it; versions keep that safe)."""
    return store.claim_pair(pair_id, reviewer, ttl_s)


def release(store: Store, reviewer: str) -> None:
    store.release_claims(reviewer)


# ---------------------------------------------------------------------- one key press

@dataclass
class Step:
    """The outcome of one key press: the pair acted on (after), the pair to show next, the
    progress, and the matching count to carry to the next key press."""

    acted: dict[str, Any]
    shown: dict[str, Any] | None
    progress: Progress
    note: str


def act(store: Store, action: str, pair_id: int, version: int, flt: PairFilter, sort: str,
        reviewer: str, matching: int | None = None) -> Step:
    """Apply ``action`` (accept, reject, swap, reset, undo) with the version the reviewer holds,
    then pick and claim the pair to show. Raises what the action raises (ConflictError, ...).

    After a decision the desk shows the next matching pair, else the first one (pairs skipped
    earlier), else none (``shown`` None: the filter has run empty, all done) - never the pair just
    decided, where a second key press would decide it again."""
    if action not in ACTIONS:
        raise DataError(f"unknown action {action!r}; use one of {', '.join(ACTIONS)}")
    # One transaction for the action and the next pair's claim: one commit (one fsync, ~8 ms on
    # this disk) per key press instead of two.
    with store.write():
        target = review.undo_target(store, pair_id) if action == "undo" else None
        before = review.get_pair(store, pair_id)
        pair = ACTIONS[action](store, pair_id, version, reviewer=reviewer)
        shown = pair
        if action in ADVANCE_AFTER:
            shown = review.next_pair(store, flt, sort, after=pair_id) or review.next_pair(store, flt, sort)
            if shown is not None:
                claim(store, shown["id"], reviewer)
    if matching is not None:
        matching += int(flt.accepts(pair)) - int(flt.accepts(before))
    note = undone_note(target, pair) if target else f"{review.action_label(action)}: pair {pair_id}"
    return Step(pair, shown, progress(store, flt, reviewer, matching), note)


def undone_note(target: dict[str, Any], pair: dict[str, Any]) -> str:
    """What an undo did, worded as a reversal: "Undone: ana's accept (status pending -> accepted)
    at ...; pair 3 is pending again"."""
    if "status" in json.loads(target.get("after") or "{}"):
        return f"Undone: {review.describe(target)}; pair {pair['id']} is {pair['status']} again"
    return f"Undone: {review.describe(target)}; pair {pair['id']} is back as it was before"


# ---------------------------------------------------------------------- bulk

def bulk_preview(store: Store, flt: PairFilter, action: str) -> int:
    """How many pairs :func:`bulk_apply` would change (those matching, not already in the target
    status): the count the user confirms."""
    return store.count_pairs_to_set(flt, _bulk_status(action))


def bulk_apply(store: Store, flt: PairFilter, action: str, reviewer: str, expect: int) -> tuple[str, int]:
    """Set every pair ``flt`` matches to ``action``'s status in one transaction; returns
    (batch id, pairs changed). ``expect`` is the count the user confirmed: if the store now holds
    another number (someone acted meanwhile), nothing changes and :class:`ConflictError` says so."""
    target = _bulk_status(action)
    batch = f"bulk-{uuid.uuid4().hex[:12]}"
    with store.write():
        rows = store.pairs_to_set(flt, target)
        if len(rows) != expect:
            raise ConflictError(f"nothing changed: the filters match {len(rows)} pairs to {action} now, "
                                f"but {expect} were expected; the set of matching pairs is not the one "
                                "counted. Preview again and confirm the new count")
        store.set_pair_statuses(rows, target, None if target == "pending" else reviewer, reviewer, action, batch)
    return batch, len(rows)


def undo_batch(store: Store, batch: str, reviewer: str) -> tuple[int, int]:
    """Revert a bulk action as one unit; returns (pairs reverted, pairs skipped). A pair changed
    again since the batch is skipped (its later change stands). Only the batch's reviewer may."""
    with store.write():
        rows = store.batch_reviews(batch)
        if not rows or store.has_batch(f"undo-{batch}"):
            raise DataError(f"no bulk action {batch!r} left to undo")
        owners = {r["reviewer"] for r in rows}
        if owners != {reviewer}:
            raise ConflictError(f"bulk action {batch} was made by {', '.join(sorted(owners))}; "
                                f"only they can undo it")
        live = [r for r in rows if r["id"] == r["latest"]]  # nothing changed the pair since
        if not live:
            raise DataError(f"every pair of bulk action {batch} has changed since; nothing to undo")
        store.revert_reviews(live, reviewer, f"undo-{batch}")
    return len(live), len(rows) - len(live)


def last_batch(store: Store, reviewer: str) -> str | None:
    """The reviewer's latest bulk action not yet undone (what "Undo bulk" reverts)."""
    return store.last_batch(reviewer)


def _bulk_status(action: str) -> str:
    if action not in BULK_ACTIONS:
        raise DataError(f"bulk action must be one of {', '.join(BULK_ACTIONS)}, not {action!r}")
    return BULK_ACTIONS[action]


# ---------------------------------------------------------------------- scripted (the CLI)

def apply(store: Store, action: str, pair_id: int, reviewer: str, version: int | None = None,
          side: str | None = None, box: Any = None, answer: str | None = None) -> dict[str, Any]:
    """One review action as ``visrl review`` runs it: accept, reject, reset, swap, undo,
    edit-box (``side``, ``box``: a Box in original-image pixels), edit-answer (``side``, ``answer``).

    ``version`` None means the pair's current version (scripted curation); a change by someone
    else between that read and the write is still a :class:`ConflictError`.
    """
    if version is None:
        version = review.get_pair(store, pair_id)["version"]
    if action == "edit-box":
        return review.edit_box(store, pair_id, version, side or "", box, reviewer=reviewer)  # type: ignore[arg-type]
    if action == "edit-answer":
        return review.edit_answer(store, pair_id, version, side or "", answer or "", reviewer=reviewer)  # type: ignore[arg-type]
    if action not in ACTIONS:
        raise DataError(f"unknown action {action!r}; use one of {', '.join([*ACTIONS, 'edit-box', 'edit-answer'])}")
    return ACTIONS[action](store, pair_id, version, reviewer=reviewer)
