"""Preference pairs: creation, the queries of the curation desk, and review actions.

Every review action (accept, reject, swap, edit a box, edit an answer, undo) is one transaction
that checks the pair's ``version`` (optimistic locking: a second reviewer holding an old copy gets
a :class:`ConflictError`, never a silent overwrite), bumps it, and appends a row to the
append-only ``reviews`` audit with the fields before and after. Undo reads that audit.
Boxes are absolute pixels of the item's original image.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Literal

from visrl import rescore
from visrl.boxes import Box
from visrl.errors import ConflictError, DataError, NotFoundError
from visrl.store import Store, box_from_json, box_to_json, loads, now
from visrl.vocabulary import PAIR_STATUSES

Side = Literal["chosen", "rejected"]
STATUSES = PAIR_STATUSES  # the name review callers know
SORTS = {
    "priority": ("p.priority DESC, p.id ASC", ("priority", "id")),
    "oldest": ("p.id ASC", ("id",)),
    "newest": ("p.id DESC", ("id",)),
}
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


@dataclass
class PairFilter:
    """What the desk shows. ``None`` means "any". Scores are the answer judge's, in [0, 1].

    ``viewer``: the reviewer whose screen this is; pairs another reviewer has claimed (on their
    screen, claim not expired) are left out so two people never review the same pair at once.
    """

    status: str | None = "pending"
    dataset: str | None = None
    min_margin: float | None = None
    max_margin: float | None = None
    min_chosen_score: float | None = None
    max_rejected_score: float | None = None
    search: str | None = None  # literal substring of the question or either answer, any case
    viewer: str | None = None

    @property
    def counted(self) -> bool:
        """True when ``pair_counts`` answers the count (only status and dataset are set)."""
        return not (self.search or self.viewer or any(v is not None for v in (
            self.min_margin, self.max_margin, self.min_chosen_score, self.max_rejected_score)))

    def accepts(self, pair: dict[str, Any]) -> bool:
        """Whether ``pair`` (as :func:`get_pair` returns it) matches, decided in Python: keeps a
        matching count current after an action without a query (claims are not checked)."""
        if (self.status and pair["status"] != self.status) or (self.dataset and pair["dataset"] != self.dataset):
            return False
        for value, bound, low in ((pair["margin"], self.min_margin, True), (pair["margin"], self.max_margin, False),
                                  (pair["chosen_score"], self.min_chosen_score, True),
                                  (pair["rejected_score"], self.max_rejected_score, False)):
            if bound is not None and (value is None or (value < bound if low else value > bound)):
                return False
        if self.search:
            needle = self.search.casefold()
            return any(needle in (pair[key] or "").casefold()
                       for key in ("question", "chosen_answer", "rejected_answer"))
        return True

    def sql(self, store: Store) -> tuple[str, list[Any]]:
        where, args = ["1 = 1"], []
        if self.status:
            if self.status not in STATUSES:
                raise DataError(f"unknown status {self.status!r}; use one of {', '.join(STATUSES)}")
            where.append("p.status = ?")
            args.append(self.status)
        if self.dataset:
            where.append("p.dataset_id = ?")
            args.append(store.dataset(self.dataset)["id"])
        for column, op, value in (("p.margin", ">=", self.min_margin), ("p.margin", "<=", self.max_margin),
                                  ("p.chosen_score", ">=", self.min_chosen_score),
                                  ("p.rejected_score", "<=", self.max_rejected_score)):
            if value is not None:
                where.append(f"{column} {op} ?")
                args.append(value)
        if self.search:
            clause, search_args = _search_sql(self.search)
            where.append(clause)
            args += search_args
        if self.viewer:
            where.append("NOT EXISTS (SELECT 1 FROM pair_claims c WHERE c.pair_id = p.id "
                         "AND c.reviewer != ? AND c.expires_at > ?)")
            args += [self.viewer, time.time()]
        return " AND ".join(where), args


TRIGRAM = 3  # FTS5's trigram tokenizer indexes runs of 3 characters; shorter searches use LIKE


def _search_sql(text: str, use_index: bool = True) -> tuple[str, list[Any]]:
    """A literal, case-insensitive substring search of the question and both answers.

    Three characters or more go through the FTS5 trigram indexes (``items_fts``, ``pairs_fts``)
    as one quoted phrase, so no character is an operator. Shorter text cannot use a trigram
    index; it is matched with ``LIKE`` (such a search matches most pairs, so the desk's walk
    stops early anyway).
    """
    if use_index and len(text) >= TRIGRAM:
        ids, args = _match_ids_sql(text)
        return f"p.id IN ({ids})", args
    # % and _ are LIKE wildcards unless escaped.
    literal = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return ("(p.chosen_answer LIKE ? ESCAPE '\\' OR p.rejected_answer LIKE ? ESCAPE '\\' OR "
            "(SELECT i2.question FROM items i2 WHERE i2.id = p.item_id) LIKE ? ESCAPE '\\')"), [f"%{literal}%"] * 3


def _match_ids_sql(text: str) -> tuple[str, list[Any]]:
    """A query of the ids of pairs whose answers or question hold ``text`` (trigram indexes)."""
    phrase = '"' + text.replace('"', '""') + '"'
    return ("SELECT rowid AS id FROM pairs_fts WHERE pairs_fts MATCH ? UNION "
            "SELECT x.id FROM pairs x WHERE x.item_id IN "
            "(SELECT rowid FROM items_fts WHERE items_fts MATCH ?)"), [phrase, phrase]


def _from_matches(flt: PairFilter, store: Store) -> tuple[str, str, list[Any]] | None:
    """(FROM clause driven by the search's matches, the other conditions, their args), or None
    when the search cannot use the index. ``CROSS JOIN`` makes SQLite start from the matches:
    left to itself it walks the status index (700,000 pending pairs at 1M) probing each one."""
    if not flt.search or len(flt.search) < TRIGRAM:
        return None
    ids, args = _match_ids_sql(flt.search)
    base, base_args = PairFilter(**{**flt.__dict__, "search": None}).sql(store)
    return f"({ids}) m CROSS JOIN pairs p ON p.id = m.id", base, [*args, *base_args]


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
    existing = store.db.execute(
        "SELECT id FROM pairs WHERE item_id = ? AND chosen_rollout_id = ? AND rejected_rollout_id = ?",
        [item_id, chosen["id"], rejected["id"]]).fetchone()
    if existing:
        return existing[0]
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
    return store.db["pairs"].insert(row).last_pk


def source_pairs(store: Store, source: str, item_ids: list[int]) -> list[dict[str, Any]]:
    """The pairs of ``source`` on ``item_ids``: id, item, both rollout ids, and ``reviewed``
    (a person accepted, rejected or edited it, or it has any review, e.g. an undone one)."""
    rows: list[dict[str, Any]] = []
    for start in range(0, len(item_ids), 500):  # SQLite's bound-parameter limit
        chunk = item_ids[start:start + 500]
        rows += _query(store, (
            "SELECT p.id, p.item_id, p.chosen_rollout_id, p.rejected_rollout_id, "
            "(p.status != 'pending' OR p.edited != 0 OR EXISTS "
            "(SELECT 1 FROM reviews r WHERE r.pair_id = p.id)) AS reviewed "
            f"FROM pairs p WHERE p.source = ? AND p.item_id IN ({', '.join('?' for _ in chunk)})"),
            [source, *chunk])
    return rows


def remove_unreviewed_pair(store: Store, pair_id: int) -> bool:
    """Delete a pair no person has touched (pending, unedited, no review); False if one has."""
    cursor = store.db.execute(
        "DELETE FROM pairs WHERE id = ? AND status = 'pending' AND edited = 0 "
        "AND NOT EXISTS (SELECT 1 FROM reviews r WHERE r.pair_id = pairs.id)", [pair_id])
    return cursor.rowcount == 1


_PAIR_SELECT = (
    "SELECT p.*, i.question, i.answer AS reference, i.image, i.width, i.height, i.gt_box, "
    "i.split, (SELECT d.name FROM datasets d WHERE d.id = p.dataset_id) AS dataset "
    "FROM pairs p JOIN items i ON i.id = p.item_id"
)


def get_pair(store: Store, pair_id: int) -> dict[str, Any]:
    """The pair with its item's question, reference answer, image and size, and dataset name."""
    rows = _query(store, f"{_PAIR_SELECT} WHERE p.id = ?", [pair_id])
    if not rows:
        raise NotFoundError(f"no pair with id {pair_id}")
    return rows[0]


def page_pairs(store: Store, flt: PairFilter, sort: str = "priority", offset: int = 0,
               limit: int = 50) -> list[dict[str, Any]]:
    where, args = flt.sql(store)
    order = _order(sort)[0]
    return _query(store, f"{_PAIR_SELECT} WHERE {where} ORDER BY {order} LIMIT ? OFFSET ?",
                  [*args, limit, offset])


def count_pairs(store: Store, flt: PairFilter) -> int:
    """Pairs ``flt`` matches. Status/dataset-only filters read the ``pair_counts`` table (a few
    rows, kept by triggers); anything else counts the matching rows."""
    if flt.counted:
        return sum(status_counts(store, flt.dataset, flt.status).values())
    driven = _from_matches(flt, store)
    if driven is not None:
        source, where, args = driven
        count = store.db.execute(f"SELECT count(*) FROM {source} WHERE {where}", args).fetchone()[0]
        _remember_matches(flt.search or "", count)
        return count
    where, args = flt.sql(store)
    return store.db.execute(f"SELECT count(*) FROM pairs p WHERE {where}", args).fetchone()[0]


def matches(store: Store, flt: PairFilter, pair_id: int) -> bool:
    """Whether pair ``pair_id`` is among those ``flt`` matches now (one indexed lookup)."""
    where, args = flt.sql(store)
    return store.db.execute(f"SELECT 1 FROM pairs p WHERE p.id = ? AND {where}",
                            [pair_id, *args]).fetchone() is not None


def status_counts(store: Store, dataset: str | None = None, status: str | None = None) -> dict[str, int]:
    """Pairs per status (every status present, zero when none), optionally for one dataset;
    with ``status`` only that one. Read from ``pair_counts`` (exact: triggers keep it)."""
    where, args = ("dataset_id = ?", [store.dataset(dataset)["id"]]) if dataset else ("1 = 1", [])
    counts = dict(store.db.execute(
        f"SELECT status, sum(n) FROM pair_counts WHERE {where} GROUP BY status", args).fetchall())
    return {s: counts.get(s, 0) for s in STATUSES if status in (None, s)}


def next_pair(store: Store, flt: PairFilter, sort: str = "priority", after: int | None = None,
              backwards: bool = False) -> dict[str, Any] | None:
    """The pair after (or before) pair ``after`` in ``sort`` order among those ``flt`` matches.

    Keyset navigation: ``after`` need not match the filter any more (a pair just accepted leaves
    the "pending" view), the walk continues from where it stood.
    """
    order, keys = _order(sort)
    cond, cargs = "1 = 1", []
    if after is not None:
        current = store.db.execute(f"SELECT {', '.join(keys)} FROM pairs WHERE id = ?", [after]).fetchone()
        if current is not None:
            cond, cargs = _keyset(sort, current, backwards)
    if backwards:
        order = order.replace("DESC", "_D_").replace("ASC", "DESC").replace("_D_", "ASC")
    if flt.search and len(flt.search) >= TRIGRAM and flt.search.isascii() and not _known_rare(store, flt.search):
        found, exhausted = _scan_for_search(store, flt, cond, cargs, order)
        if found is not None or exhausted:
            return get_pair(store, found) if found is not None else None
    driven = _from_matches(flt, store)
    if driven is not None:  # a rare match: sort the few matches rather than walk the table
        source, where, args = driven
        select = _PAIR_SELECT.replace("FROM pairs p JOIN", f"FROM {source} JOIN")
    else:
        where, args = flt.sql(store)
        select = _PAIR_SELECT
    rows = _query(store, f"{select} WHERE {where} AND {cond} ORDER BY {order} LIMIT 1", [*args, *cargs])
    return rows[0] if rows else None


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
    total = store.db.execute("SELECT coalesce(sum(n), 0) FROM pair_counts").fetchone()[0]
    return count * SCAN_CANDIDATES < total


def _scan_for_search(store: Store, flt: PairFilter, cond: str, cargs: list[Any],
                     order: str) -> tuple[int | None, bool]:
    """(id of the next match among the next ``SCAN_CANDIDATES`` pairs in walk order, whether
    there were no more pairs to check).

    A common search (1 pair in 100) is found a few hundred pairs down the walk, reading rows one
    by one and stopping at the first match (~3 us a row); asking the trigram index instead reads
    every match's postings (12 ms at 100,000 pairs, growing with the table). A rare search is not
    found here and goes to the index, which is fast for it. Plain ASCII only: there Python's case
    folding equals the index's.
    """
    base, args = PairFilter(**{**flt.__dict__, "search": None}).sql(store)
    needle = (flt.search or "").casefold()
    cursor = store.db.execute(
        f"SELECT p.id, i.question, p.chosen_answer, p.rejected_answer FROM pairs p "
        f"JOIN items i ON i.id = p.item_id WHERE {base} AND {cond} ORDER BY {order} LIMIT {SCAN_CANDIDATES}",
        [*args, *cargs])
    seen = 0
    for pair_id, *texts in cursor:
        seen += 1
        if any(needle in (text or "").casefold() for text in texts):
            cursor.close()
            return pair_id, False
    return None, seen < SCAN_CANDIDATES


def _order(sort: str) -> tuple[str, tuple[str, ...]]:
    if sort not in SORTS:
        raise DataError(f"unknown sort {sort!r}; use one of {', '.join(SORTS)}")
    return SORTS[sort]


def _keyset(sort: str, current: tuple, backwards: bool) -> tuple[str, list[Any]]:
    if sort == "priority":
        prio, pid = current
        if backwards:
            return "p.priority >= ? AND (p.priority > ? OR p.id < ?)", [prio, prio, pid]
        # Written with a leading range on priority so SQLite walks the (status, priority DESC, id)
        # index from the current pair instead of merging two scans and sorting.
        return "p.priority <= ? AND (p.priority < ? OR p.id > ?)", [prio, prio, pid]
    ascending = (sort == "oldest") != backwards
    return ("p.id > ?" if ascending else "p.id < ?"), [current[0]]


def _query(store: Store, sql: str, args: list[Any]) -> list[dict[str, Any]]:
    cursor = store.db.execute(sql, args)
    names = [c[0] for c in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


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
    rows = _query(store, "SELECT r.* FROM reviews r WHERE r.pair_id = ? AND r.action != 'undo' "
                  "AND NOT EXISTS (SELECT 1 FROM reviews u WHERE u.undoes = r.id) ORDER BY r.id DESC LIMIT 1",
                  [pair_id])
    return rows[0] if rows else None


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
    return list(store.db["reviews"].rows_where("pair_id = ?", [pair_id], order_by="id"))


def _side(side: str) -> str:
    if side not in ("chosen", "rejected"):
        raise DataError(f"side must be 'chosen' or 'rejected', not {side!r}")
    return side


def _apply(store: Store, pair_id: int, version: int, reviewer: str, action: str, change: Any,
           undoes: int | None = None) -> dict[str, Any]:
    # store.write(): the write lock is taken before the version is read, so of two reviewers
    # acting at once the second waits and then sees the first's version: ConflictError.
    with store.write() as db:
        pair = get_pair(store, pair_id)
        if pair["version"] != version:
            raise ConflictError(
                f"pair {pair_id} was changed by someone else (you have version {version}, the store "
                f"has {pair['version']}, updated {pair['updated_at']}); reload it and redo your change")
        after = change(pair)
        before = {key: pair[key] for key in after}
        if before == after:  # e.g. Accept on an accepted pair: nothing to store or audit
            return pair
        db["pairs"].update(pair_id, {**after, "version": version + 1, "updated_at": now()})
        db["reviews"].insert({"pair_id": pair_id, "reviewer": reviewer, "action": action,
                              "before": json.dumps(before), "after": json.dumps(after),
                              "undoes": undoes, "created_at": now()})
        return get_pair(store, pair_id)


def pair_boxes(pair: dict[str, Any]) -> dict[str, Box | None]:
    """The pair's chosen, rejected and annotated boxes as :class:`Box` (pixels)."""
    return {"chosen": box_from_json(pair.get("chosen_box")),
            "rejected": box_from_json(pair.get("rejected_box")),
            "gt": box_from_json(pair.get("gt_box"))}
