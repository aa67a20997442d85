"""The workspace database schema, as ordered migrations (``sqlite_utils.Migrations``).

Never change a migration that has shipped: add a new one. Boxes are stored as JSON text
``[x1, y1, x2, y2]`` in absolute pixels of the item's original image.
"""

from __future__ import annotations

from sqlite_utils import Database, Migrations

migrations = Migrations("visrl")


@migrations()
def m001_initial(db: Database) -> None:
    db["datasets"].create(
        {"id": int, "name": str, "format": str, "source": str, "created_at": str},
        pk="id", not_null={"name"},
    )
    db["datasets"].create_index(["name"], unique=True)

    db["items"].create(
        {
            "id": int, "dataset_id": int, "split": str, "source_id": str,
            "image": str,  # workspace-relative path
            "width": int, "height": int, "question": str, "answer": str,
            "gt_box": str,  # JSON pixel box or NULL
            "meta": str, "created_at": str,
        },
        pk="id", foreign_keys=[("dataset_id", "datasets", "id")],
        not_null={"dataset_id", "split", "image", "width", "height", "question"},
    )
    db["items"].create_index(["dataset_id", "split"])
    db["items"].create_index(["dataset_id", "split", "source_id"], unique=True)

    db["rollouts"].create(
        {
            "id": int, "item_id": int, "job_id": int,
            "run_key": str,  # identifies one generation run: resume key with item, attempt, kind
            "model": str, "attempt": int,
            "kind": str,  # policy | negative | random | import
            "box_text": str, "box": str, "crop": str, "answer": str,
            "answer_score": float, "crop_score": float, "iou": float,
            "scores": str,  # JSON {judge: score}
            "created_at": str,
        },
        pk="id", foreign_keys=[("item_id", "items", "id")], not_null={"item_id"},
    )
    db["rollouts"].create_index(["item_id"])
    db["rollouts"].create_index(["run_key", "item_id", "attempt", "kind"], unique=True)

    db["judgements"].create(
        {"rollout_id": int, "judge": str, "score": float, "detail": str, "created_at": str},
        pk=("rollout_id", "judge"), foreign_keys=[("rollout_id", "rollouts", "id")],
    )

    db["pairs"].create(
        {
            "id": int, "item_id": int, "dataset_id": int,
            "chosen_rollout_id": int, "rejected_rollout_id": int,
            "chosen_box": str, "chosen_answer": str, "chosen_score": float, "chosen_crop_score": float,
            "rejected_box": str, "rejected_answer": str, "rejected_score": float,
            "rejected_crop_score": float,
            "margin": float,  # chosen_score - rejected_score
            "priority": float,  # higher = more worth a human's time
            "status": str, "version": int, "edited": int, "source": str,
            "created_at": str, "updated_at": str,
        },
        pk="id",
        foreign_keys=[("item_id", "items", "id"), ("dataset_id", "datasets", "id")],
        not_null={"item_id", "status", "version"},
        defaults={"status": "pending", "version": 1, "edited": 0},
    )
    db["pairs"].create_index(["status", "priority"])
    db["pairs"].create_index(["dataset_id", "status", "priority"])
    db["pairs"].create_index(["item_id"])
    db["pairs"].create_index(["item_id", "chosen_rollout_id", "rejected_rollout_id"], unique=True)

    db["reviews"].create(
        {
            "id": int, "pair_id": int, "reviewer": str, "action": str,
            "before": str, "after": str,  # JSON of the changed pair fields
            "undoes": int,  # for action "undo": the review it reverts
            "created_at": str,
        },
        pk="id", foreign_keys=[("pair_id", "pairs", "id")],
    )
    db["reviews"].create_index(["pair_id", "id"])
    db["reviews"].create_index(["undoes"])

    db["jobs"].create(
        {
            "id": int, "kind": str, "name": str, "config": str, "config_path": str,
            "command": str,  # JSON argument list
            "status": str,  # queued | running | stopping | succeeded | failed | stopped
            "pid": int, "log_path": str, "step": int, "total": int, "progress": float,
            "eta_s": float, "message": str, "exit_code": int,
            "created_at": str, "started_at": str, "ended_at": str, "heartbeat_at": str,
        },
        pk="id", not_null={"kind", "status"},
    )
    db["jobs"].create_index(["status"])

    db["metrics"].create(
        {"id": int, "job_id": int, "step": int, "name": str, "value": float, "created_at": str},
        pk="id", foreign_keys=[("job_id", "jobs", "id")],
    )
    db["metrics"].create_index(["job_id", "name", "step"])

    db["checkpoints"].create(
        {
            "id": int, "path": str, "base": str, "stage": str, "job_id": int,
            "pairs": str,  # JSON: which pairs (ids) or data trained it
            "config": str, "created_at": str,
        },
        pk="id",
    )
    db["checkpoints"].create_index(["path"], unique=True)

    db["evaluations"].create(
        {
            "id": int, "checkpoint_id": int, "model": str, "adapter": str, "dataset": str,
            "split": str, "n": int, "metrics": str, "job_id": int, "created_at": str,
        },
        pk="id",
    )
    db["evaluations"].create_index(["checkpoint_id"])


@migrations()
def m002_pair_desk_indexes(db: Database) -> None:
    # The review desk walks pairs by (priority DESC, id); indexes in that exact order let SQLite
    # read the next pair, counts and pages straight from the index at 100,000 pairs, with no sort
    # (bench/bench_store.py).
    from sqlite_utils.db import DescIndex

    db["pairs"].create_index(["status", DescIndex("priority"), "id"], index_name="idx_pairs_desk_status")
    db["pairs"].create_index(["dataset_id", "status", DescIndex("priority"), "id"],
                             index_name="idx_pairs_desk_dataset")
    db["pairs"].create_index([DescIndex("priority"), "id"], index_name="idx_pairs_desk_all")


@migrations()
def m004_run_leases(db: Database) -> None:
    # One holder per run key (generate) or output folder (train): the second run is refused
    # instead of interleaving its rollouts or checkpoints with the first. The owner is a process
    # (pid, host, process start time, to tell a recycled pid from the owner); a lease whose owner
    # is gone is taken over (visrl.store.Store.acquire_lease).
    db["leases"].create(
        {"key": str, "pid": int, "host": str,
         "proc_start": float,  # the owner's process creation time, seconds since the epoch
         "started_at": str, "job_id": int},
        pk="key", not_null={"pid", "host", "started_at"},
    )
