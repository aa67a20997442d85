"""The store's data tables: ``datasets``, ``items``, ``rollouts``, ``judgements``, ``generate_runs``.

Boxes are stored as JSON text ``[x1, y1, x2, y2]`` in absolute pixels of the item's original
image (:func:`~visrl.store_connection.box_to_json`).
"""

from __future__ import annotations

import json
from typing import Any

from visrl.boxes import Box
from visrl.errors import DataError, NotFoundError
from visrl.store_connection import StoreConnection, box_from_json, box_to_json, loads, now

PARAMS_PER_QUERY = 500  # ids per ``IN (...)`` list: SQLite allowed 999 bound parameters before 3.32


class ItemTables(StoreConnection):
    """Datasets, their items, and the rollouts and judgements generated on them."""

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

    def dataset_id(self, name: str) -> int | None:
        """The id of dataset ``name``, or None when there is none (no error)."""
        row = self.db.execute("SELECT id FROM datasets WHERE name = ?", [name]).fetchone()
        return None if row is None else row[0]

    def datasets(self) -> list[dict[str, Any]]:
        return list(self.db["datasets"].rows_where(order_by="id"))

    def dataset_summaries(self) -> list[dict[str, Any]]:
        """Every dataset (oldest first) as name, format, source and its number of ``items``."""
        return self._dicts(
            "SELECT d.name, d.format, d.source, count(i.id) AS items FROM datasets d "
            "LEFT JOIN items i ON i.dataset_id = d.id GROUP BY d.id ORDER BY d.id")

    def set_dataset_source(self, name: str, source: str) -> None:
        self.db["datasets"].update(self.dataset(name)["id"], {"source": source})

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

    def splits(self) -> list[str]:
        """The split names any item has, sorted."""
        return [r[0] for r in self.db.execute("SELECT DISTINCT split FROM items ORDER BY split").fetchall()]

    def source_ids(self, dataset_id: int) -> set[tuple[str, str]]:
        """(split, source id) of every item of the dataset: what a new import must not repeat."""
        return {(split, source_id) for split, source_id in self.db.execute(
            "SELECT split, source_id FROM items WHERE dataset_id = ?", [dataset_id]).fetchall()}

    def images_in_use(self, images: list[str]) -> set[str]:
        """Those of ``images`` (workspace-relative paths) that an item uses."""
        used: set[str] = set()
        for start in range(0, len(images), PARAMS_PER_QUERY):
            chunk = images[start:start + PARAMS_PER_QUERY]
            used.update(r[0] for r in self.db.execute(
                f"SELECT image FROM items WHERE image IN ({', '.join('?' for _ in chunk)})", chunk))
        return used

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

    def rollout(self, rollout_id: int | None) -> dict[str, Any] | None:
        """The rollout row (``scores`` as stored JSON text), or None when there is none."""
        if rollout_id is None:
            return None
        rows = self._dicts("SELECT * FROM rollouts WHERE id = ?", [rollout_id])
        return rows[0] if rows else None

    def rollouts(self, item_id: int | None = None, run_key: str | None = None,
                 item_ids: list[int] | None = None) -> list[dict[str, Any]]:
        """Rollouts in id order, of one item, one run, and/or the items ``item_ids``."""
        where, args = ["1 = 1"], []
        if item_id is not None:
            where.append("item_id = ?")
            args.append(item_id)
        if run_key is not None:
            where.append("run_key = ?")
            args.append(run_key)
        if item_ids is not None:
            where.append(f"item_id IN ({', '.join('?' for _ in item_ids)})")
            args += item_ids
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
