"""The workspace store: one SQLite file (``visrl.db``) through sqlite-utils, in WAL mode.

Every write that belongs together is one transaction (``with store.atomic():``). A process
(the app's request threads, a training job, the CLI) opens its own :class:`Store`; connections
are per thread, so gradio's worker threads never share one. Pair review actions live in
:mod:`visrl.review`; this module holds the connection and the plain records.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from visrl.boxes import Box
from visrl.errors import ConflictError, DataError, JobError, NotFoundError, WorkspaceError
from visrl.schema import migrations
from visrl.workspace import Workspace

_MIGRATED: set[str] = set()  # db paths migrated in this process (migrating is idempotent but not free)
_MIGRATE_LOCK = threading.Lock()


def now() -> str:
    """UTC timestamp as stored everywhere: ISO 8601 with seconds."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def box_to_json(box: Box | None) -> str | None:
    return None if box is None else json.dumps([round(v, 2) for v in box.as_list()])


def box_from_json(text: str | None) -> Box | None:
    return None if not text else Box.from_list(json.loads(text))


def loads(text: str | None, default: Any = None) -> Any:
    return default if text in (None, "") else json.loads(text)


class Store:
    """Typed access to one workspace database. Cheap to create; migrates on first open."""

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace
        self.path = workspace.db_path
        self._local = threading.local()
        key = str(self.path)
        with _MIGRATE_LOCK:
            # A file deleted since it was migrated (a rebuilt workspace) is a new, empty database.
            if key not in _MIGRATED or not self.path.exists():
                db = self.db
                db.enable_wal()
                migrations.apply(db)
                _MIGRATED.add(key)

    @classmethod
    def open(cls, workspace: str | Path | Workspace | None = None, create: bool = True) -> Store:
        ws = workspace if isinstance(workspace, Workspace) else Workspace.open(workspace, create=create)
        return cls(ws)

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

    # ------------------------------------------------------------------ datasets and items

    def add_dataset(self, name: str, format: str, source: str = "") -> int:
        if self.db["datasets"].count_where("name = ?", [name]):
            raise DataError(f"a dataset named {name!r} already exists; choose another --dataset name")
        return self.db["datasets"].insert(
            {"name": name, "format": format, "source": source, "created_at": now()}
        ).last_pk

    def dataset(self, name: str) -> dict[str, Any]:
        rows = list(self.db["datasets"].rows_where("name = ?", [name]))
        if not rows:
            known = ", ".join(r["name"] for r in self.db["datasets"].rows) or "none"
            raise NotFoundError(f"no dataset named {name!r} (datasets: {known})")
        return rows[0]

    def datasets(self) -> list[dict[str, Any]]:
        return list(self.db["datasets"].rows_where(order_by="id"))

    def add_items(self, dataset_id: int, items: list[dict[str, Any]]) -> list[int]:
        """Insert items (keys as in the ``items`` table; ``gt_box`` may be a Box). Returns ids."""
        ids = []
        table = self.db["items"]
        for item in items:
            row = {**item, "dataset_id": dataset_id, "created_at": now()}
            if isinstance(row.get("gt_box"), Box):
                row["gt_box"] = box_to_json(row["gt_box"])
            if isinstance(row.get("meta"), dict):
                row["meta"] = json.dumps(row["meta"])
            ids.append(table.insert(row).last_pk)
        return ids

    def item(self, item_id: int) -> dict[str, Any]:
        try:
            return self.db["items"].get(item_id)
        except Exception:
            raise NotFoundError(f"no item with id {item_id}") from None

    def items(self, dataset: str | None = None, split: str | None = None,
              limit: int | None = None, with_box: bool | None = None) -> list[dict[str, Any]]:
        where, args = ["1 = 1"], []
        if dataset:
            where.append("dataset_id = ?")
            args.append(self.dataset(dataset)["id"])
        if split:
            where.append("split = ?")
            args.append(split)
        if with_box is not None:
            where.append("gt_box IS NOT NULL" if with_box else "gt_box IS NULL")
        return list(self.db["items"].rows_where(" AND ".join(where), args, order_by="id", limit=limit))

    def item_box(self, item: dict[str, Any]) -> Box | None:
        return box_from_json(item.get("gt_box"))

    # ------------------------------------------------------------------ rollouts and judgements

    def add_rollout(self, rollout: dict[str, Any]) -> int:
        """Insert a rollout; with a ``run_key`` an existing (run, item, attempt, kind) is kept.

        Returns the id of the stored row either way, which makes generation resumable.
        """
        row = {**rollout, "created_at": now()}
        for key in ("box",):
            if isinstance(row.get(key), Box):
                row[key] = box_to_json(row[key])
        if isinstance(row.get("scores"), dict):
            row["scores"] = json.dumps(row["scores"])
        if row.get("run_key"):
            existing = list(self.db["rollouts"].rows_where(
                "run_key = ? AND item_id = ? AND attempt = ? AND kind = ?",
                [row["run_key"], row["item_id"], row.get("attempt"), row.get("kind")], limit=1))
            if existing:
                return existing[0]["id"]
        return self.db["rollouts"].insert(row).last_pk

    def update_rollout(self, rollout_id: int, **fields: Any) -> None:
        if isinstance(fields.get("scores"), dict):
            fields["scores"] = json.dumps(fields["scores"])
        self.db["rollouts"].update(rollout_id, fields)

    def rollouts(self, item_id: int | None = None, run_key: str | None = None) -> list[dict[str, Any]]:
        where, args = ["1 = 1"], []
        if item_id is not None:
            where.append("item_id = ?")
            args.append(item_id)
        if run_key is not None:
            where.append("run_key = ?")
            args.append(run_key)
        return list(self.db["rollouts"].rows_where(" AND ".join(where), args, order_by="id"))

    def done_attempts(self, run_key: str) -> set[tuple[int, int, str]]:
        """(item_id, attempt, kind) already stored for a run: what a resumed run skips."""
        rows = self.db.execute(
            "SELECT item_id, attempt, kind FROM rollouts WHERE run_key = ?", [run_key]).fetchall()
        return {(r[0], r[1], r[2]) for r in rows}

    def unjudged_rollouts(self, run_key: str, judges: list[str]) -> int:
        """Rollouts of a run with a box that lack a score from one of ``judges`` (judge keys):
        what a run with these judges would judge (again)."""
        if not judges:
            return 0
        # json_type, not json_extract: a judge that did not apply stored a JSON null, which counts.
        missing = " OR ".join("json_type(coalesce(scores, '{}'), ?) IS NULL" for _ in judges)
        paths = [f'$."{key}"' for key in judges]
        return self.db.execute(
            f"SELECT count(*) FROM rollouts WHERE run_key = ? AND box IS NOT NULL AND ({missing})",
            [run_key, *paths]).fetchone()[0]

    def record_generate_run(self, run_key: str, lineage: str, model: str, identity: dict[str, Any]) -> None:
        """Record (or refresh) what run ``run_key`` samples from; see ``m005_generate_runs``."""
        existing = self.generate_run(run_key)
        row = {"run_key": run_key, "lineage": lineage, "model": model, "identity": json.dumps(identity),
               "created_at": existing["created_at"] if existing else now(), "updated_at": now()}
        self.db["generate_runs"].upsert(row, pk="run_key")

    def generate_run(self, run_key: str) -> dict[str, Any] | None:
        rows = list(self.db["generate_runs"].rows_where("run_key = ?", [run_key], limit=1))
        return {**rows[0], "identity": loads(rows[0]["identity"], {})} if rows else None

    def generate_runs_of_lineage(self, lineage: str) -> list[dict[str, Any]]:
        """Runs with these settings (any model), newest first, each with its rollout count."""
        rows = self.db.execute(
            "SELECT r.run_key, r.model, r.identity, r.updated_at, "
            "(SELECT count(*) FROM rollouts o WHERE o.run_key = r.run_key) AS rollouts "
            "FROM generate_runs r WHERE r.lineage = ? ORDER BY r.updated_at DESC, r.run_key", [lineage]).fetchall()
        return [{"run_key": k, "model": m, "identity": loads(i, {}), "updated_at": u, "rollouts": n}
                for k, m, i, u, n in rows]

    def cached_judgement(self, rollout_id: int, judge: str) -> float | None:
        row = self.db.execute("SELECT score FROM judgements WHERE rollout_id = ? AND judge = ?",
                              [rollout_id, judge]).fetchone()
        return None if row is None else row[0]

    def save_judgement(self, rollout_id: int, judge: str, score: float, detail: str = "") -> None:
        self.db["judgements"].upsert(
            {"rollout_id": rollout_id, "judge": judge, "score": score, "detail": detail,
             "created_at": now()}, pk=("rollout_id", "judge"))

    # ------------------------------------------------------------------ jobs and metrics

    def create_job(self, kind: str, config: dict[str, Any], config_path: str = "",
                   name: str = "", command: list[str] | None = None) -> int:
        return self.db["jobs"].insert({
            "kind": kind, "name": name or kind, "config": json.dumps(config, default=str),
            "config_path": config_path, "command": json.dumps(command or []),
            "status": "queued", "step": 0, "total": 0, "progress": 0.0, "created_at": now(),
        }).last_pk

    def job(self, job_id: int) -> dict[str, Any]:
        try:
            return self.db["jobs"].get(job_id)
        except Exception:
            raise NotFoundError(f"no job with id {job_id}; `visrl jobs list` shows the jobs") from None

    def update_job(self, job_id: int, **fields: Any) -> None:
        self.db["jobs"].update(job_id, fields)

    def jobs(self, limit: int = 50, kind: str | None = None,
             status: str | None = None) -> list[dict[str, Any]]:
        where, args = ["1 = 1"], []
        if kind:
            where.append("kind = ?")
            args.append(kind)
        if status:
            where.append("status = ?")
            args.append(status)
        return list(self.db["jobs"].rows_where(" AND ".join(where), args, order_by="id DESC", limit=limit))

    def add_metrics(self, job_id: int, step: int, values: dict[str, float]) -> None:
        stamp = now()
        self.db["metrics"].insert_all(
            [{"job_id": job_id, "step": step, "name": k, "value": float(v), "created_at": stamp}
             for k, v in values.items() if v is not None])

    def metrics(self, job_id: int, names: list[str] | None = None) -> list[dict[str, Any]]:
        where, args = "job_id = ?", [job_id]
        if names:
            where += f" AND name IN ({', '.join('?' for _ in names)})"
            args += names
        return list(self.db["metrics"].rows_where(where, args, order_by="step, id"))

    def jobs_with_metric(self, contains: str) -> set[int]:
        """Ids of the jobs that logged a metric whose name contains ``contains`` (literal)."""
        pattern = "%" + contains.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = self.db.execute("SELECT DISTINCT job_id FROM metrics WHERE name LIKE ? ESCAPE '\\'", [pattern])
        return {row[0] for row in rows.fetchall()}

    # ------------------------------------------------------------------ checkpoints and evaluations

    def add_checkpoint(self, path: str, base: str, stage: str, job_id: int | None = None,
                       pairs: Any = None, config: dict[str, Any] | None = None) -> int:
        row = {"path": path, "base": base, "stage": stage, "job_id": job_id,
               "pairs": json.dumps(pairs), "config": json.dumps(config or {}, default=str),
               "created_at": now()}
        # A path trained again (same output_dir) replaces its record rather than duplicating it.
        existing = list(self.db["checkpoints"].rows_where("path = ?", [row["path"]], limit=1))
        if existing:
            self.db["checkpoints"].update(existing[0]["id"], row)
            return existing[0]["id"]
        return self.db["checkpoints"].insert(row).last_pk

    def checkpoints(self) -> list[dict[str, Any]]:
        return list(self.db["checkpoints"].rows_where(order_by="id"))

    def add_evaluation(self, metrics: dict[str, Any], model: str, adapter: str | None,
                       dataset: str, split: str, n: int, checkpoint_id: int | None = None,
                       job_id: int | None = None) -> int:
        return self.db["evaluations"].insert({
            "checkpoint_id": checkpoint_id, "model": model, "adapter": adapter, "dataset": dataset,
            "split": split, "n": n, "metrics": json.dumps(metrics), "job_id": job_id,
            "created_at": now()}).last_pk

    def evaluations(self) -> list[dict[str, Any]]:
        rows = list(self.db["evaluations"].rows_where(order_by="id"))
        for row in rows:
            row["metrics"] = loads(row["metrics"], {})
        return rows

    # ------------------------------------------------------------------ run leases

    def acquire_lease(self, key: str, job_id: int | None = None) -> Lease:
        """Hold ``key`` (``generate:<run key>``, ``train:<output dir>``) for this process.

        Use as ``with store.acquire_lease(key): ...`` (released on exit, error or not). A lease
        whose owner process is gone (killed, crashed) is taken over; a live owner's lease is a
        :class:`JobError` naming its pid and start. Compare-and-set, with no transaction held
        across statements: of two racing processes exactly one wins. Call it outside a
        transaction (it commits its own write).
        """
        me = _lease_owner()
        for _ in range(5):  # each turn either wins, refuses, or saw the row change under it
            row = self.db.execute("SELECT pid, host, proc_start, started_at FROM leases WHERE key = ?",
                                  [key]).fetchone()
            try:
                with self.db.conn:
                    if row is None:
                        self.db.execute("INSERT INTO leases (key, pid, host, proc_start, started_at, job_id) "
                                        "VALUES (?, ?, ?, ?, ?, ?)", [key, *me, job_id])
                        return Lease(self, key)
                    if _owner_alive(*row[:3]):
                        pid, host, _, since = row
                        where = f"pid {pid}" + ("" if host == me[1] else f" on {host}")
                        raise JobError(f"{key} is already running ({where}, since {since}); wait for it "
                                       "or stop it (`visrl jobs stop`) before starting another")
                    cursor = self.db.execute(
                        "UPDATE leases SET pid = ?, host = ?, proc_start = ?, started_at = ?, job_id = ? "
                        "WHERE key = ? AND pid = ? AND host = ? AND proc_start IS ?",
                        [*me, job_id, key, *row[:3]])
                    if cursor.rowcount:
                        return Lease(self, key)
            except sqlite3.IntegrityError:
                continue  # another process inserted first: read its row
        raise JobError(f"could not take the lease {key}: it keeps changing hands; try again")

    def release_lease(self, key: str) -> None:
        """Give ``key`` up if this process holds it (someone else's lease is left alone)."""
        pid, host, proc_start, _ = _lease_owner()
        with self.db.conn:
            self.db.execute("DELETE FROM leases WHERE key = ? AND pid = ? AND host = ? AND proc_start IS ?",
                            [key, pid, host, proc_start])

    def leases(self) -> list[dict[str, Any]]:
        return list(self.db["leases"].rows_where(order_by="key"))

    # ------------------------------------------------------------------ overview

    def stats(self) -> dict[str, Any]:
        """Counts per dataset and split, rollouts, and pairs per status (for `visrl stats`)."""
        db = self.db
        splits = db.execute(
            "SELECT d.name, i.split, count(*) FROM items i JOIN datasets d ON d.id = i.dataset_id "
            "GROUP BY d.name, i.split ORDER BY d.name, i.split").fetchall()
        pairs = db.execute(
            "SELECT d.name, p.status, count(*) FROM pairs p JOIN datasets d ON d.id = p.dataset_id "
            "GROUP BY d.name, p.status").fetchall()
        rollouts = db.execute(
            "SELECT d.name, count(*) FROM rollouts r JOIN items i ON i.id = r.item_id "
            "JOIN datasets d ON d.id = i.dataset_id GROUP BY d.name").fetchall()
        out: dict[str, Any] = {"workspace": str(self.workspace.root), "datasets": {}}
        for name, split, count in splits:
            ds = out["datasets"].setdefault(name, {"items": {}, "rollouts": 0, "pairs": {}})
            ds["items"][split] = count
        for name, count in rollouts:
            out["datasets"].setdefault(name, {"items": {}, "rollouts": 0, "pairs": {}})["rollouts"] = count
        for name, status, count in pairs:
            out["datasets"].setdefault(name, {"items": {}, "rollouts": 0, "pairs": {}})["pairs"][status] = count
        out["jobs"] = dict(db.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall())
        out["checkpoints"] = db["checkpoints"].count
        return out


class Lease:
    """A held run lease; leaving the ``with`` block releases it (see :meth:`Store.acquire_lease`)."""

    def __init__(self, store: Store, key: str) -> None:
        self.store, self.key = store, key

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.store.release_lease(self.key)


def _lease_owner() -> tuple[int, str, float | None, str]:
    """(pid, host, process start time, now) of this process, as a lease records its owner."""
    import psutil

    try:
        proc_start: float | None = round(psutil.Process().create_time(), 2)
    except psutil.Error:
        proc_start = None
    return os.getpid(), socket.gethostname(), proc_start, now()


def _owner_alive(pid: int, host: str, proc_start: float | None) -> bool:
    """Whether a lease's owner still runs. Another host's process cannot be checked: alive."""
    import psutil

    if host != socket.gethostname():
        return True
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        # A different creation time is another process that got the recycled pid (0.05 s:
        # create_time is read from /proc with 10 ms ticks, stored to 2 decimals).
        return proc_start is None or abs(proc.create_time() - proc_start) < 0.05
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # exists but unreadable (another user's): do not steal its lease
        return True
