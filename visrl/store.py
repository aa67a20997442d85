"""The workspace store: one SQLite file (``visrl.db``) through sqlite-utils, in WAL mode.

Every write that belongs together is one transaction (``with store.atomic():``, or
``store.write()`` for read-check-write). A process (the app's request threads, a training job,
the CLI) opens its own :class:`Store`; connections are per thread, so gradio's worker threads
never share one.

The store layer owns every table: each SQL statement of the package is a method here or in the
modules :class:`Store` joins (``store_items``, ``store_pairs``, ``store_jobs``, on the connection
of ``store_connection``), and the schema is :mod:`visrl.schema`'s migrations. A new column is a
migration there plus the method that reads or writes it; callers never hold SQL
(``tests/test_sql_owner.py``). The rules that use the tables live with their callers: review
actions in :mod:`visrl.review`, jobs in :mod:`visrl.jobs`.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from visrl.schema import migrations
from visrl.store_connection import box_from_json, box_to_json, loads, now
from visrl.store_jobs import JobTables, Lease
from visrl.store_pairs import PairTables
from visrl.workspace import Workspace

__all__ = ["Lease", "Store", "box_from_json", "box_to_json", "loads", "now"]

_MIGRATED: set[str] = set()  # db paths migrated in this process (migrating is idempotent but not free)
_MIGRATE_LOCK = threading.Lock()


class Store(PairTables, JobTables):
    """Typed access to one workspace database. Cheap to create; migrates on first open."""

    def __init__(self, workspace: Workspace) -> None:
        super().__init__(workspace)
        key = str(self.path)
        with _MIGRATE_LOCK:
            # A file deleted since it was migrated (a rebuilt workspace) is a new, empty database.
            if key not in _MIGRATED or not self.path.exists():
                self.migrate()
                _MIGRATED.add(key)

    @classmethod
    def open(cls, workspace: str | Path | Workspace | None = None, create: bool = True) -> Store:
        ws = workspace if isinstance(workspace, Workspace) else Workspace.open(workspace, create=create)
        return cls(ws)

    def migrate(self) -> None:
        """WAL mode and every migration not yet applied (idempotent)."""
        db = self.db
        db.enable_wal()
        migrations.apply(db)

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
