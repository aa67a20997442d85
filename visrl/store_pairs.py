"""The store's review tables: ``pairs``, the ``reviews`` audit, ``pair_claims``, and the counts
that triggers keep (``pair_counts``, ``decision_counts``); :class:`PairFilter`, the desk's query.

The review actions and their rules (version checks, what each action changes, who may undo)
live in :mod:`visrl.review` and :mod:`visrl.desk`; this module holds their statements. Boxes
are JSON pixel boxes of the item's original image.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from visrl.errors import DataError
from visrl.store_connection import now
from visrl.store_items import PARAMS_PER_QUERY, ItemTables
from visrl.vocabulary import PAIR_STATUSES

# The desk's sort orders: name -> (ORDER BY, the columns of a keyset position).
PAIR_SORTS = {
    "priority": ("p.priority DESC, p.id ASC", ("priority", "id")),
    "oldest": ("p.id ASC", ("id",)),
    "newest": ("p.id DESC", ("id",)),
}
TRIGRAM = 3  # FTS5's trigram tokenizer indexes runs of 3 characters; shorter searches use LIKE
PairPosition = tuple[Any, ...]  # a pair's values of its sort's keyset columns (PAIR_SORTS)
_PAIR_SELECT = (
    "SELECT p.*, i.question, i.answer AS reference, i.image, i.width, i.height, i.gt_box, "
    "i.split, (SELECT d.name FROM datasets d WHERE d.id = p.dataset_id) AS dataset "
    "FROM pairs p JOIN items i ON i.id = p.item_id"
)


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

    @property
    def indexed_search(self) -> bool:
        """True when the search is long enough for the trigram indexes."""
        return bool(self.search) and len(self.search or "") >= TRIGRAM

    def accepts(self, pair: dict[str, Any]) -> bool:
        """Whether ``pair`` (as :func:`visrl.review.get_pair` returns it) matches, decided in
        Python: keeps a matching count current after an action without a query (claims are not
        checked)."""
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


class PairTables(ItemTables):
    """Pairs, their review audit, claims and counts."""

    # ------------------------------------------------------------------ pairs

    def insert_pair(self, row: dict[str, Any]) -> int:
        """Insert a pair row, or return the id of the pair with the same item and rollouts."""
        existing = self.db.execute(
            "SELECT id FROM pairs WHERE item_id = ? AND chosen_rollout_id = ? AND rejected_rollout_id = ?",
            [row["item_id"], row["chosen_rollout_id"], row["rejected_rollout_id"]]).fetchone()
        if existing:
            return existing[0]
        return self.db["pairs"].insert(row).last_pk

    def pair(self, pair_id: int) -> dict[str, Any] | None:
        """The pair with its item's question, reference answer, image and size, and dataset name."""
        rows = self._dicts(f"{_PAIR_SELECT} WHERE p.id = ?", [pair_id])
        return rows[0] if rows else None

    def source_pairs(self, source: str, item_ids: list[int]) -> list[dict[str, Any]]:
        """The pairs of ``source`` on ``item_ids``: id, item, both rollout ids, and ``reviewed``
        (a person accepted, rejected or edited it, or it has any review, e.g. an undone one)."""
        rows: list[dict[str, Any]] = []
        for start in range(0, len(item_ids), PARAMS_PER_QUERY):
            chunk = item_ids[start:start + PARAMS_PER_QUERY]
            rows += self._dicts(
                "SELECT p.id, p.item_id, p.chosen_rollout_id, p.rejected_rollout_id, "
                "(p.status != 'pending' OR p.edited != 0 OR EXISTS "
                "(SELECT 1 FROM reviews r WHERE r.pair_id = p.id)) AS reviewed "
                f"FROM pairs p WHERE p.source = ? AND p.item_id IN ({', '.join('?' for _ in chunk)})",
                [source, *chunk])
        return rows

    def count_source_pairs(self, source: str) -> int:
        return self.db.execute("SELECT count(*) FROM pairs WHERE source = ?", [source]).fetchone()[0]

    def delete_unreviewed_pair(self, pair_id: int) -> bool:
        """Delete a pair no person has touched (pending, unedited, no review); False if one has."""
        cursor = self.db.execute(
            "DELETE FROM pairs WHERE id = ? AND status = 'pending' AND edited = 0 "
            "AND NOT EXISTS (SELECT 1 FROM reviews r WHERE r.pair_id = pairs.id)", [pair_id])
        return cursor.rowcount == 1

    # ------------------------------------------------------------------ the desk's queries

    def page_pairs(self, flt: PairFilter, sort: str, offset: int, limit: int) -> list[dict[str, Any]]:
        where, args = self._pair_where(flt)
        order = _order(sort)[0]
        return self._dicts(f"{_PAIR_SELECT} WHERE {where} ORDER BY {order} LIMIT ? OFFSET ?",
                           [*args, limit, offset])

    def count_pairs(self, flt: PairFilter) -> int:
        """Pairs ``flt`` matches, counted row by row (claims included)."""
        driven = self._from_matches(flt)
        if driven is not None:
            source, where, args = driven
            return self.db.execute(f"SELECT count(*) FROM {source} WHERE {where}", args).fetchone()[0]
        where, args = self._pair_where(flt)
        return self.db.execute(f"SELECT count(*) FROM pairs p WHERE {where}", args).fetchone()[0]

    def pair_matches(self, flt: PairFilter, pair_id: int) -> bool:
        where, args = self._pair_where(flt)
        return self.db.execute(f"SELECT 1 FROM pairs p WHERE p.id = ? AND {where}",
                               [pair_id, *args]).fetchone() is not None

    def pair_status_counts(self, dataset: str | None = None) -> dict[str, int]:
        """Pairs per status present (``pair_counts``, kept exact by triggers), of one dataset or all."""
        where, args = ("dataset_id = ?", [self.dataset(dataset)["id"]]) if dataset else ("1 = 1", [])
        return dict(self.db.execute(
            f"SELECT status, sum(n) FROM pair_counts WHERE {where} GROUP BY status", args).fetchall())

    def pair_total(self) -> int:
        return self.db.execute("SELECT coalesce(sum(n), 0) FROM pair_counts").fetchone()[0]

    def pair_position(self, sort: str, pair_id: int | None) -> PairPosition | None:
        """Pair ``pair_id``'s place in ``sort`` order (None: no such pair, or no id)."""
        keys = _order(sort)[1]
        if pair_id is None:
            return None
        return self.db.execute(f"SELECT {', '.join(keys)} FROM pairs WHERE id = ?", [pair_id]).fetchone()

    def next_pair(self, flt: PairFilter, sort: str, position: PairPosition | None,
                  backwards: bool) -> dict[str, Any] | None:
        """The first pair ``flt`` matches after (before) ``position`` in ``sort`` order."""
        cond, cargs, order = _walk(sort, position, backwards)
        driven = self._from_matches(flt)
        if driven is not None:  # a rare match: sort the few matches rather than walk the table
            source, where, args = driven
            select = _PAIR_SELECT.replace("FROM pairs p JOIN", f"FROM {source} JOIN")
        else:
            where, args = self._pair_where(flt)
            select = _PAIR_SELECT
        rows = self._dicts(f"{select} WHERE {where} AND {cond} ORDER BY {order} LIMIT 1", [*args, *cargs])
        return rows[0] if rows else None

    def walk_pair_texts(self, flt: PairFilter, sort: str, position: PairPosition | None, backwards: bool,
                        limit: int) -> Iterator[tuple[int, str, str | None, str | None]]:
        """(id, question, chosen answer, rejected answer) of up to ``limit`` pairs after
        ``position`` in walk order, matching ``flt`` but for its search, read one by one (close
        the iterator to stop early)."""
        cond, cargs, order = _walk(sort, position, backwards)
        base, args = self._pair_where(PairFilter(**{**flt.__dict__, "search": None}))
        cursor = self.db.execute(
            f"SELECT p.id, i.question, p.chosen_answer, p.rejected_answer FROM pairs p "
            f"JOIN items i ON i.id = p.item_id WHERE {base} AND {cond} ORDER BY {order} LIMIT {int(limit)}",
            [*args, *cargs])
        try:
            yield from cursor
        finally:
            cursor.close()

    def _pair_where(self, flt: PairFilter) -> tuple[str, list[Any]]:
        where, args = ["1 = 1"], []
        if flt.status:
            if flt.status not in PAIR_STATUSES:
                raise DataError(f"unknown status {flt.status!r}; use one of {', '.join(PAIR_STATUSES)}")
            where.append("p.status = ?")
            args.append(flt.status)
        if flt.dataset:
            where.append("p.dataset_id = ?")
            args.append(self.dataset(flt.dataset)["id"])
        for column, op, value in (("p.margin", ">=", flt.min_margin), ("p.margin", "<=", flt.max_margin),
                                  ("p.chosen_score", ">=", flt.min_chosen_score),
                                  ("p.rejected_score", "<=", flt.max_rejected_score)):
            if value is not None:
                where.append(f"{column} {op} ?")
                args.append(value)
        if flt.search:
            clause, search_args = _search_sql(flt.search)
            where.append(clause)
            args += search_args
        if flt.viewer:
            where.append("NOT EXISTS (SELECT 1 FROM pair_claims c WHERE c.pair_id = p.id "
                         "AND c.reviewer != ? AND c.expires_at > ?)")
            args += [flt.viewer, time.time()]
        return " AND ".join(where), args

    def _from_matches(self, flt: PairFilter) -> tuple[str, str, list[Any]] | None:
        """(FROM clause driven by the search's matches, the other conditions, their args), or None
        when the search cannot use the index. ``CROSS JOIN`` makes SQLite start from the matches:
        left to itself it walks the status index (700,000 pending pairs at 1M) probing each one."""
        if not flt.indexed_search:
            return None
        ids, args = _match_ids_sql(flt.search or "")
        base, base_args = self._pair_where(PairFilter(**{**flt.__dict__, "search": None}))
        return f"({ids}) m CROSS JOIN pairs p ON p.id = m.id", base, [*args, *base_args]

    # ------------------------------------------------------------------ the review audit

    def record_review(self, pair_id: int, version: int, before: dict[str, Any], after: dict[str, Any],
                      reviewer: str, action: str, undoes: int | None = None) -> None:
        """Write ``after`` onto the pair as version ``version + 1`` and append its audit row (call
        inside the ``write()`` transaction that checked ``version``)."""
        self.db["pairs"].update(pair_id, {**after, "version": version + 1, "updated_at": now()})
        self.db["reviews"].insert({"pair_id": pair_id, "reviewer": reviewer, "action": action,
                                   "before": json.dumps(before), "after": json.dumps(after),
                                   "undoes": undoes, "created_at": now()})

    def reviews(self, pair_id: int) -> list[dict[str, Any]]:
        """The pair's audit rows, oldest first."""
        return list(self.db["reviews"].rows_where("pair_id = ?", [pair_id], order_by="id"))

    def undo_target(self, pair_id: int) -> dict[str, Any] | None:
        """The pair's latest review that is neither an undo nor undone (or None)."""
        rows = self._dicts("SELECT r.* FROM reviews r WHERE r.pair_id = ? AND r.action != 'undo' "
                           "AND NOT EXISTS (SELECT 1 FROM reviews u WHERE u.undoes = r.id) "
                           "ORDER BY r.id DESC LIMIT 1", [pair_id])
        return rows[0] if rows else None

    # ------------------------------------------------------------------ decisions and claims

    def reviewer_decisions(self, reviewer: str) -> dict[str, int]:
        """Pairs whose current status ``reviewer`` set, per decided status (``decision_counts``)."""
        return dict(self.db.execute("SELECT status, n FROM decision_counts WHERE reviewer = ? AND n > 0 "
                                    "AND status != 'pending'", [reviewer]).fetchall())

    def team_decisions(self) -> dict[str, dict[str, int]]:
        """:meth:`reviewer_decisions` of every reviewer."""
        return _by_reviewer(self.db.execute("SELECT reviewer, status, n FROM decision_counts WHERE n > 0 "
                                            "AND status != 'pending' ORDER BY reviewer, status"))

    def recount_decisions(self) -> dict[str, dict[str, int]]:
        """:meth:`team_decisions` counted from the pairs table itself (a full scan)."""
        return _by_reviewer(self.db.execute("SELECT decided_by, status, count(*) FROM pairs WHERE decided_by "
                                            "IS NOT NULL AND status != 'pending' GROUP BY 1, 2 ORDER BY 1, 2"))

    def claim_pair(self, pair_id: int, reviewer: str, ttl_s: float) -> str | None:
        """Claim ``pair_id`` for ``reviewer`` for ``ttl_s`` seconds, ending their other claim (and
        expired ones); returns None, or the other reviewer whose live claim stands (no change)."""
        stamp = time.time()
        with self.write() as db:
            holder = db.execute("SELECT reviewer FROM pair_claims WHERE pair_id = ? AND expires_at > ?",
                                [pair_id, stamp]).fetchone()
            if holder is not None and holder[0] != reviewer:
                return holder[0]
            db.execute("DELETE FROM pair_claims WHERE reviewer = ? OR expires_at <= ?", [reviewer, stamp])
            db.execute("INSERT OR REPLACE INTO pair_claims (pair_id, reviewer, expires_at) VALUES (?, ?, ?)",
                       [pair_id, reviewer, stamp + ttl_s])
        return None

    def release_claims(self, reviewer: str) -> None:
        with self.write() as db:
            db.execute("DELETE FROM pair_claims WHERE reviewer = ?", [reviewer])

    # ------------------------------------------------------------------ bulk actions

    def count_pairs_to_set(self, flt: PairFilter, status: str) -> int:
        """Pairs ``flt`` matches that are not in ``status`` already."""
        where, args = self._pair_where(flt)
        return self.db.execute(f"SELECT count(*) FROM pairs p WHERE {where} AND p.status != ?",
                               [*args, status]).fetchone()[0]

    def pairs_to_set(self, flt: PairFilter, status: str) -> list[dict[str, Any]]:
        """id, status and decided_by of the pairs :meth:`count_pairs_to_set` counts."""
        where, args = self._pair_where(flt)
        return self._dicts(f"SELECT p.id, p.status, p.decided_by FROM pairs p WHERE {where} AND p.status != ?",
                           [*args, status])

    def set_pair_statuses(self, pairs: list[dict[str, Any]], status: str, decider: str | None,
                          reviewer: str, action: str, batch: str) -> None:
        """Set ``pairs`` (rows of :meth:`pairs_to_set`) to ``status``, each with an audit row of
        ``batch`` (call inside one ``write()`` transaction)."""
        stamp = now()
        self.db.conn.executemany("UPDATE pairs SET status = ?, decided_by = ?, version = version + 1, "
                                 "updated_at = ? WHERE id = ?", [(status, decider, stamp, p["id"]) for p in pairs])
        self.db.conn.executemany(
            "INSERT INTO reviews (pair_id, reviewer, action, before, after, undoes, created_at, batch) "
            "VALUES (?, ?, ?, ?, ?, NULL, ?, ?)",
            [(p["id"], reviewer, action, json.dumps({"status": p["status"], "decided_by": p["decided_by"]}),
              json.dumps({"status": status, "decided_by": decider}), stamp, batch) for p in pairs])

    def batch_reviews(self, batch: str) -> list[dict[str, Any]]:
        """The audit rows of ``batch`` not undone: id, pair_id, reviewer, before, and ``latest``
        (the id of the pair's latest audit row: equal to ``id`` while nothing changed it since)."""
        return self._dicts(
            "SELECT r.id, r.pair_id, r.reviewer, r.before, "
            "(SELECT max(id) FROM reviews l WHERE l.pair_id = r.pair_id) AS latest "
            "FROM reviews r WHERE r.batch = ? AND r.action != 'undo' "
            "AND NOT EXISTS (SELECT 1 FROM reviews u WHERE u.undoes = r.id)", [batch])

    def has_batch(self, batch: str) -> bool:
        return self.db.execute("SELECT 1 FROM reviews WHERE batch = ? LIMIT 1", [batch]).fetchone() is not None

    def revert_reviews(self, reviews: list[dict[str, Any]], reviewer: str, batch: str) -> None:
        """Restore each pair's status (and decider) from before its audit row in ``reviews`` (rows
        of :meth:`batch_reviews`), audited as undos in ``batch`` (call inside ``write()``)."""
        stamp = now()
        # an audit row from before m006 has no decided_by: the restored status then has no decider
        self.db.conn.executemany("UPDATE pairs SET status = ?, decided_by = ?, version = version + 1, "
                                 "updated_at = ? WHERE id = ?",
                                 [(json.loads(r["before"])["status"], json.loads(r["before"]).get("decided_by"),
                                   stamp, r["pair_id"]) for r in reviews])
        self.db.conn.executemany(
            "INSERT INTO reviews (pair_id, reviewer, action, before, after, undoes, created_at, batch) "
            "SELECT pair_id, ?, 'undo', after, before, id, ?, ? FROM reviews WHERE id = ?",
            [(reviewer, stamp, batch, r["id"]) for r in reviews])

    def last_batch(self, reviewer: str) -> str | None:
        """The reviewer's latest bulk batch (``bulk-...``) with no ``undo-`` batch of its own."""
        row = self.db.execute(
            "SELECT r.batch FROM reviews r WHERE r.reviewer = ? AND r.batch LIKE 'bulk-%' AND "
            "NOT EXISTS (SELECT 1 FROM reviews u WHERE u.batch = 'undo-' || r.batch) ORDER BY r.id DESC LIMIT 1",
            [reviewer]).fetchone()
        return row[0] if row else None


def _order(sort: str) -> tuple[str, tuple[str, ...]]:
    if sort not in PAIR_SORTS:
        raise DataError(f"unknown sort {sort!r}; use one of {', '.join(PAIR_SORTS)}")
    return PAIR_SORTS[sort]


def _walk(sort: str, position: PairPosition | None, backwards: bool) -> tuple[str, list[Any], str]:
    """(condition, its args, ORDER BY) of the pairs after ``position`` (None: from the start)."""
    order = _order(sort)[0]
    cond, cargs = ("1 = 1", []) if position is None else _keyset(sort, position, backwards)
    if backwards:
        order = order.replace("DESC", "_D_").replace("ASC", "DESC").replace("_D_", "ASC")
    return cond, cargs, order


def _keyset(sort: str, current: PairPosition, backwards: bool) -> tuple[str, list[Any]]:
    if sort == "priority":
        prio, pid = current
        if backwards:
            return "p.priority >= ? AND (p.priority > ? OR p.id < ?)", [prio, prio, pid]
        # Written with a leading range on priority so SQLite walks the (status, priority DESC, id)
        # index from the current pair instead of merging two scans and sorting.
        return "p.priority <= ? AND (p.priority < ? OR p.id > ?)", [prio, prio, pid]
    ascending = (sort == "oldest") != backwards
    return ("p.id > ?" if ascending else "p.id < ?"), [current[0]]


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


def _by_reviewer(rows: Any) -> dict[str, dict[str, int]]:
    """(reviewer, status, n) rows as {reviewer: {status: n}}."""
    out: dict[str, dict[str, int]] = {}
    for who, status, n in rows:
        out.setdefault(who, {})[status] = n
    return out
