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
def m003_desk_counts_search_team(db: Database) -> None:
    """Counts kept as pairs change, a full-text index for the desk's search, and the team tables.

    Measured before (bench/bench_store.py): recounting the pairs on every key press cost 41-63 ms
    at 100,000 pairs and 316-385 ms at 1,000,000, and a ``LIKE`` search over the join up to 1 s and
    8-14 s. Triggers keep ``pair_counts`` exact in the same transaction as any change of a pair
    (review actions, imports, generation alike), so the progress line reads a handful of rows.
    """
    db["pair_counts"].create({"dataset_id": int, "status": str, "n": int}, pk=("dataset_id", "status"),
                             not_null={"n"})
    db.execute("INSERT INTO pair_counts (dataset_id, status, n) "
               "SELECT dataset_id, status, count(*) FROM pairs GROUP BY dataset_id, status")
    db.executescript("""
        CREATE TRIGGER pairs_count_insert AFTER INSERT ON pairs BEGIN
          INSERT INTO pair_counts (dataset_id, status, n) VALUES (new.dataset_id, new.status, 1)
            ON CONFLICT (dataset_id, status) DO UPDATE SET n = n + 1;
        END;
        CREATE TRIGGER pairs_count_delete AFTER DELETE ON pairs BEGIN
          UPDATE pair_counts SET n = n - 1 WHERE dataset_id IS old.dataset_id AND status IS old.status;
        END;
        CREATE TRIGGER pairs_count_update AFTER UPDATE OF status, dataset_id ON pairs
          WHEN old.status IS NOT new.status OR old.dataset_id IS NOT new.dataset_id BEGIN
          UPDATE pair_counts SET n = n - 1 WHERE dataset_id IS old.dataset_id AND status IS old.status;
          INSERT INTO pair_counts (dataset_id, status, n) VALUES (new.dataset_id, new.status, 1)
            ON CONFLICT (dataset_id, status) DO UPDATE SET n = n + 1;
        END;
    """)

    # Literal substring search: the trigram tokenizer matches any run of >= 3 characters, case
    # folded, so '"50%_off"' finds exactly what LIKE '%50\%\_off%' did. The question lives on
    # items, the answers on pairs: one index each, kept current by sqlite-utils' triggers.
    db["items"].enable_fts(["question"], create_triggers=True, tokenize="trigram")
    db["pairs"].enable_fts(["chosen_answer", "rejected_answer"], create_triggers=True, tokenize="trigram")
    # sqlite-utils re-indexes a row on ANY update; an accept changes no text, so narrow it.
    db.executescript("""
        DROP TRIGGER pairs_au;
        CREATE TRIGGER pairs_au AFTER UPDATE OF chosen_answer, rejected_answer ON pairs BEGIN
          INSERT INTO pairs_fts (pairs_fts, rowid, chosen_answer, rejected_answer)
            VALUES ('delete', old.rowid, old.chosen_answer, old.rejected_answer);
          INSERT INTO pairs_fts (rowid, chosen_answer, rejected_answer)
            VALUES (new.rowid, new.chosen_answer, new.rejected_answer);
        END;
        DROP TRIGGER items_au;
        CREATE TRIGGER items_au AFTER UPDATE OF question ON items BEGIN
          INSERT INTO items_fts (items_fts, rowid, question) VALUES ('delete', old.rowid, old.question);
          INSERT INTO items_fts (rowid, question) VALUES (new.rowid, new.question);
        END;
    """)

    # A team: every audit row names its reviewer already; a bulk action's rows share a batch so
    # undo reverts them as one unit; per-reviewer decisions are counted like the statuses.
    db["reviews"].add_column("batch", str)
    db["reviews"].create_index(["batch"])
    db["review_counts"].create({"reviewer": str, "action": str, "n": int}, pk=("reviewer", "action"),
                               not_null={"n"})
    db.execute("INSERT INTO review_counts (reviewer, action, n) "
               "SELECT coalesce(reviewer, 'local'), action, count(*) FROM reviews GROUP BY 1, 2")
    db.executescript("""
        CREATE TRIGGER reviews_count_insert AFTER INSERT ON reviews BEGIN
          INSERT INTO review_counts (reviewer, action, n) VALUES (coalesce(new.reviewer, 'local'), new.action, 1)
            ON CONFLICT (reviewer, action) DO UPDATE SET n = n + 1;
        END;
    """)
    # The pair on a reviewer's screen: not served to anyone else until it expires (unix seconds).
    db["pair_claims"].create({"pair_id": int, "reviewer": str, "expires_at": float}, pk="pair_id",
                             not_null={"reviewer", "expires_at"})
    db["pair_claims"].create_index(["reviewer"])


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


@migrations()
def m005_generate_runs(db: Database) -> None:
    # What each generation run sampled from: the policy's identity (weights fingerprints, or the
    # remote name and URL) and its lineage (the run's settings without the identity), so a run
    # whose model changed is told apart from one whose settings did, and a named run_key cannot
    # take rollouts from another model.
    db["generate_runs"].create(
        {"run_key": str, "lineage": str, "model": str,
         "identity": str,  # JSON: visrl.run_identity.policy_identity
         "created_at": str, "updated_at": str},
        pk="run_key", not_null={"lineage", "identity", "created_at"},
    )
    db["generate_runs"].create_index(["lineage"])


@migrations()
def m006_pair_decisions_and_stale_scores(db: Database) -> None:
    """Who made each pair's current decision, per-reviewer counts of those, and stale scores.

    Progress counted review rows per action before, so an accept later undone or reset still
    counted ("ana: 19 accept … 13 undo"). ``pairs.decided_by`` is the reviewer whose action set
    the pair's current status (NULL while pending or when set outside the review layer); undo
    restores it with the status. ``decision_counts`` is kept by triggers, like ``pair_counts``, so
    it always equals ``SELECT decided_by, status, count(*) FROM pairs GROUP BY 1, 2``.

    ``pairs.stale_scores``: the score columns (space separated, e.g. "chosen_crop_score") that
    describe a side as it was before a reviewer's edit and could not be recomputed cheaply.
    """
    db["pairs"].add_column("decided_by", str)
    db["pairs"].add_column("stale_scores", str)
    # Existing decisions: the latest accept (reject) of an accepted (rejected) pair; bulk rows
    # carry the same action names.
    db.execute("""
        UPDATE pairs SET decided_by = (
          SELECT coalesce(r.reviewer, 'local') FROM reviews r WHERE r.pair_id = pairs.id
            AND r.action = CASE pairs.status WHEN 'accepted' THEN 'accept' ELSE 'reject' END
          ORDER BY r.id DESC LIMIT 1)
        WHERE status IN ('accepted', 'rejected')""")
    db["decision_counts"].create({"reviewer": str, "status": str, "n": int}, pk=("reviewer", "status"),
                                 not_null={"n"})
    db.execute("INSERT INTO decision_counts (reviewer, status, n) SELECT decided_by, status, count(*) "
               "FROM pairs WHERE decided_by IS NOT NULL GROUP BY 1, 2")
    db.executescript("""
        CREATE TRIGGER pairs_decision_insert AFTER INSERT ON pairs WHEN new.decided_by IS NOT NULL BEGIN
          INSERT INTO decision_counts (reviewer, status, n) VALUES (new.decided_by, new.status, 1)
            ON CONFLICT (reviewer, status) DO UPDATE SET n = n + 1;
        END;
        CREATE TRIGGER pairs_decision_delete AFTER DELETE ON pairs WHEN old.decided_by IS NOT NULL BEGIN
          UPDATE decision_counts SET n = n - 1 WHERE reviewer = old.decided_by AND status = old.status;
        END;
        CREATE TRIGGER pairs_decision_update AFTER UPDATE OF status, decided_by ON pairs
          WHEN old.status IS NOT new.status OR old.decided_by IS NOT new.decided_by BEGIN
          UPDATE decision_counts SET n = n - 1 WHERE reviewer = old.decided_by AND status = old.status;
          INSERT INTO decision_counts (reviewer, status, n)
            SELECT new.decided_by, new.status, 1 WHERE new.decided_by IS NOT NULL
            ON CONFLICT (reviewer, status) DO UPDATE SET n = n + 1;
        END;
    """)


@migrations()
def m007_job_start_step(db: Database) -> None:
    # The step a job's run started at: 0 from scratch, N when it resumed from checkpoint-N. A
    # resumed job logs from N on; its curve is the run it continues up to N, then its own points.
    # Guessing from the first logged step failed when the resumed part logged no point at all
    # (an 8-step run stopped at 6 and resumed logs nothing before its end: no curve shown).
    db["jobs"].add_column("start_step", int)
