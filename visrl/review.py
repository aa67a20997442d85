"""Preference pairs: creation, the queries of the curation desk, and review actions.

Every review action (accept, reject, swap, edit a box, edit an answer, undo) is one transaction
that checks the pair's ``version`` (optimistic locking: a second reviewer holding an old copy gets
a :class:`ConflictError`, never a silent overwrite), bumps it, and appends a row to the
append-only ``reviews`` audit with the fields before and after. Undo reads that audit.
Boxes are absolute pixels of the item's original image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from visrl.boxes import Box
from visrl.errors import ConflictError, DataError, NotFoundError
from visrl.store import Store, box_from_json, box_to_json, now

Side = Literal["chosen", "rejected"]
STATUSES = ("pending", "accepted", "rejected")
SORTS = {
    "priority": ("p.priority DESC, p.id ASC", ("priority", "id")),
    "oldest": ("p.id ASC", ("id",)),
    "newest": ("p.id DESC", ("id",)),
}
_SIDE_FIELDS = ("rollout_id", "box", "answer", "score", "crop_score")


@dataclass
class PairFilter:
    """What the desk shows. ``None`` means "any". Scores are the answer judge's, in [0, 1]."""

    status: str | None = "pending"
    dataset: str | None = None
    min_margin: float | None = None
    max_margin: float | None = None
    min_chosen_score: float | None = None
    max_rejected_score: float | None = None
    search: str | None = None  # substring of the question or either answer

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
            # The search is literal text: % and _ are LIKE wildcards unless escaped.
            where.append("(i.question LIKE ? ESCAPE '\\' OR p.chosen_answer LIKE ? ESCAPE '\\'"
                         " OR p.rejected_answer LIKE ? ESCAPE '\\')")
            literal = self.search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            args += [f"%{literal}%"] * 3
        return " AND ".join(where), args


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
    where, args = flt.sql(store)
    join = " JOIN items i ON i.id = p.item_id" if flt.search else ""  # only a search reads items
    return store.db.execute(f"SELECT count(*) FROM pairs p{join} WHERE {where}", args).fetchone()[0]


def status_counts(store: Store, dataset: str | None = None) -> dict[str, int]:
    """Pairs per status (every status present, zero when none), optionally for one dataset."""
    where, args = ("dataset_id = ?", [store.dataset(dataset)["id"]]) if dataset else ("1 = 1", [])
    counts = dict(store.db.execute(
        f"SELECT status, count(*) FROM pairs WHERE {where} GROUP BY status", args).fetchall())
    return {status: counts.get(status, 0) for status in STATUSES}


def next_pair(store: Store, flt: PairFilter, sort: str = "priority", after: int | None = None,
              backwards: bool = False) -> dict[str, Any] | None:
    """The pair after (or before) pair ``after`` in ``sort`` order among those ``flt`` matches.

    Keyset navigation: ``after`` need not match the filter any more (a pair just accepted leaves
    the "pending" view), the walk continues from where it stood.
    """
    where, args = flt.sql(store)
    order, keys = _order(sort)
    if after is not None:
        current = store.db.execute(f"SELECT {', '.join(keys)} FROM pairs WHERE id = ?", [after]).fetchone()
        if current is not None:
            cond, cargs = _keyset(sort, current, backwards)
            where, args = f"{where} AND {cond}", [*args, *cargs]
    if backwards:
        order = order.replace("DESC", "_D_").replace("ASC", "DESC").replace("_D_", "ASC")
    rows = _query(store, f"{_PAIR_SELECT} WHERE {where} ORDER BY {order} LIMIT 1", args)
    return rows[0] if rows else None


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

def accept(store: Store, pair_id: int, version: int, reviewer: str = "local") -> dict[str, Any]:
    return _apply(store, pair_id, version, reviewer, "accept", lambda p: {"status": "accepted"})


def reject(store: Store, pair_id: int, version: int, reviewer: str = "local") -> dict[str, Any]:
    return _apply(store, pair_id, version, reviewer, "reject", lambda p: {"status": "rejected"})


def reset(store: Store, pair_id: int, version: int, reviewer: str = "local") -> dict[str, Any]:
    """Back to pending (a reviewer changing their mind without undoing later edits)."""
    return _apply(store, pair_id, version, reviewer, "reset", lambda p: {"status": "pending"})


def swap(store: Store, pair_id: int, version: int, reviewer: str = "local") -> dict[str, Any]:
    """Exchange chosen and rejected (every side field), e.g. when the judges got it backwards."""
    def change(p: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for field in _SIDE_FIELDS:
            out[f"chosen_{field}"], out[f"rejected_{field}"] = p[f"rejected_{field}"], p[f"chosen_{field}"]
        out["margin"] = -(p["margin"] or 0.0)
        return out
    return _apply(store, pair_id, version, reviewer, "swap", change)


def edit_box(store: Store, pair_id: int, version: int, side: Side, box: Box,
             reviewer: str = "local") -> dict[str, Any]:
    """Replace one side's box (pixels of the original image); it must lie inside the image."""
    def change(p: dict[str, Any]) -> dict[str, Any]:
        size = (p["width"], p["height"])
        if not box.is_valid() or not box.inside(size):
            raise DataError(f"box {box.as_list()} is empty or leaves the {size[0]}x{size[1]} image; "
                            "draw it inside the image")
        return {f"{_side(side)}_box": box_to_json(box.clamp(size)), "edited": 1}
    return _apply(store, pair_id, version, reviewer, f"edit_{side}_box", change)


def edit_answer(store: Store, pair_id: int, version: int, side: Side, answer: str,
                reviewer: str = "local") -> dict[str, Any]:
    def change(p: dict[str, Any]) -> dict[str, Any]:
        if not answer.strip():
            raise DataError("an answer cannot be empty; type the answer or undo")
        return {f"{_side(side)}_answer": answer.strip(), "edited": 1}
    return _apply(store, pair_id, version, reviewer, f"edit_{side}_answer", change)


def undo(store: Store, pair_id: int, version: int, reviewer: str = "local") -> dict[str, Any]:
    """Revert the pair's latest review that is not itself undone (undo of undo is redo-free)."""
    with store.atomic():
        last = store.db.execute(
            "SELECT r.id, r.action, r.before FROM reviews r WHERE r.pair_id = ? AND r.action != 'undo' "
            "AND NOT EXISTS (SELECT 1 FROM reviews u WHERE u.undoes = r.id) ORDER BY r.id DESC LIMIT 1",
            [pair_id]).fetchone()
        if last is None:
            raise DataError(f"pair {pair_id} has nothing to undo")
        return _apply(store, pair_id, version, reviewer, "undo", lambda p: json.loads(last[2]),
                      undoes=last[0])


def reviews(store: Store, pair_id: int) -> list[dict[str, Any]]:
    return list(store.db["reviews"].rows_where("pair_id = ?", [pair_id], order_by="id"))


def _side(side: str) -> str:
    if side not in ("chosen", "rejected"):
        raise DataError(f"side must be 'chosen' or 'rejected', not {side!r}")
    return side


def _apply(store: Store, pair_id: int, version: int, reviewer: str, action: str, change: Any,
           undoes: int | None = None) -> dict[str, Any]:
    with store.atomic() as db:
        pair = get_pair(store, pair_id)
        if pair["version"] != version:
            raise ConflictError(
                f"pair {pair_id} was changed by someone else (you have version {version}, the store "
                f"has {pair['version']}, updated {pair['updated_at']}); reload it and redo your change")
        after = change(pair)
        before = {key: pair[key] for key in after}
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
