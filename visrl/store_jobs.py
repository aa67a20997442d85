"""The store's job tables: ``jobs``, their ``metrics``, and the run ``leases``.

The rules of a job's life (who writes which status when, what a dead process becomes) live in
:mod:`visrl.jobs`; this module holds their statements. A conditional update
(:meth:`JobTables.update_job_if`) is how a status moves when another process may have moved it
first: it changes the row only while the status is still one of those expected.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
from collections.abc import Sequence
from typing import Any

from visrl.errors import JobError, NotFoundError
from visrl.store_connection import StoreConnection, now


class JobTables(StoreConnection):
    """Jobs, their metrics, and the leases that keep two runs from writing one output."""

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

    def job_details(self, job_id: int) -> dict[str, Any]:
        """The job row with ``command``/``config`` decoded (None when empty; left as text when
        not JSON) and ``metrics``: name -> its latest ``{"step", "value"}``."""
        job = dict(self.job(job_id))
        for key in ("command", "config"):
            with contextlib.suppress(TypeError, ValueError):
                job[key] = json.loads(job[key]) if job[key] else None
        job["metrics"] = {row["name"]: {"step": row["step"], "value": row["value"]}
                          for row in self.metrics(job_id)}
        return job

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

    def jobs_with_status(self, statuses: Sequence[str]) -> list[dict[str, Any]]:
        """Every job in one of ``statuses``, oldest first."""
        return self._dicts(f"SELECT * FROM jobs WHERE status IN ({', '.join('?' for _ in statuses)}) "
                           "ORDER BY id", statuses)

    def update_job_if(self, job_id: int, statuses: Sequence[str], **fields: Any) -> bool:
        """Set ``fields`` on job ``job_id`` if its status is one of ``statuses``; whether it was."""
        columns = ", ".join(f"{name} = ?" for name in fields)
        with self.atomic() as db:
            cursor = db.execute(
                f"UPDATE jobs SET {columns} WHERE id = ? AND status IN ({', '.join('?' for _ in statuses)})",
                [*fields.values(), job_id, *statuses])
        return cursor.rowcount > 0

    def fail_unstarted_jobs(self, created_before: str, message: str) -> int:
        """Mark ``failed`` the queued jobs created before ``created_before`` that never got a
        process (no pid); returns how many."""
        with self.atomic() as db:
            cursor = db.execute(
                "UPDATE jobs SET status = 'failed', exit_code = -1, ended_at = ?, message = ? "
                "WHERE status = 'queued' AND pid IS NULL AND created_at < ?", [now(), message, created_before])
        return cursor.rowcount

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



class Lease:
    """A held run lease; leaving the ``with`` block releases it (see :meth:`Store.acquire_lease`)."""

    def __init__(self, store: JobTables, key: str) -> None:
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
