"""The store's connection and transactions, and the value encodings every table shares.

The store layer is this module, ``store_items`` (datasets, items, rollouts, judgements, runs),
``store_pairs`` (pairs, reviews, claims and their counts), ``store_jobs`` (jobs, metrics, run
leases) and ``store`` (the :class:`~visrl.store.Store` that joins them, checkpoints,
evaluations). Every SQL statement of the package lives in these modules and in
:mod:`visrl.schema` (migrations); ``tests/test_sql_owner.py`` fails on one anywhere else.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from visrl.boxes import Box
from visrl.errors import ConflictError, WorkspaceError
from visrl.workspace import Workspace


def now() -> str:
    """UTC timestamp as stored everywhere: ISO 8601 with seconds."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def box_to_json(box: Box | None) -> str | None:
    return None if box is None else json.dumps([round(v, 2) for v in box.as_list()])


def box_from_json(text: str | None) -> Box | None:
    return None if not text else Box.from_list(json.loads(text))


def loads(text: str | None, default: Any = None) -> Any:
    return default if text in (None, "") else json.loads(text)


class StoreConnection:
    """One workspace database file: a connection per thread, and the two kinds of transaction."""

    workspace: Workspace
    path: Path

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace
        self.path = workspace.db_path
        self._local = threading.local()

    @property
    def db(self) -> Database:
        """This thread's connection (sqlite3 connections must not cross threads)."""
        db = getattr(self._local, "db", None)
        if db is None:
            try:
                # 30 s busy timeout: a training job and the app write the same file.
                conn = sqlite3.connect(str(self.path), timeout=30)
            except sqlite3.Error as exc:
                raise WorkspaceError(f"cannot open {self.path}: {exc}") from None
            conn.execute("PRAGMA foreign_keys = ON")
            db = Database(conn)
            self._local.db = db
        return db

    @contextlib.contextmanager
    def atomic(self) -> Iterator[Database]:
        with self.db.atomic() as db:
            yield db

    @contextlib.contextmanager
    def write(self) -> Iterator[Database]:
        """A transaction that holds the write lock from its first statement (``BEGIN IMMEDIATE``).

        For read-check-write actions (review actions check a pair's ``version`` first): a deferred
        ``BEGIN`` reads a snapshot, and when another writer commits in between, the upgrade to a
        write fails at once with "database is locked" (SQLite cannot wait: the snapshot is stale).
        Taking the lock up front makes a second writer wait (busy timeout, 30 s) and then read the
        committed state, so a stale version is a clean :class:`ConflictError`. Nested inside another
        transaction it is a savepoint of that one. A lock not obtained within the busy timeout
        raises :class:`ConflictError` too (the caller can retry), never ``OperationalError``.
        """
        db = self.db
        if db.conn.in_transaction:
            with db.atomic():
                yield db
            return
        try:
            db.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise ConflictError(f"the workspace database is busy ({exc}: another process held the "
                                "write lock for over 30 s); try again") from None
        try:
            yield db
        except BaseException:
            db.rollback()
            raise
        try:
            db.conn.execute("COMMIT")
        except BaseException:
            db.rollback()
            raise

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    def _dicts(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """The rows of one query as dicts keyed by column name."""
        cursor = self.db.execute(sql, list(args))
        names = [c[0] for c in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
