"""Workspace layout and resolution, the store's schema and migrations, and its plain records."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from visrl.boxes import Box
from visrl.errors import DataError, NotFoundError, WorkspaceError
from visrl.schema import migrations
from visrl.store import Store, box_from_json, box_to_json, loads
from visrl.workspace import Workspace, resolve_root


def test_workspace_layout(tmp_path: Path) -> None:
    ws = Workspace.open(tmp_path / "new" / "ws")
    Store(ws)
    root = (tmp_path / "new" / "ws").resolve()
    assert ws.root == root
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["exports", "images", "models", "runs"]
    assert ws.db_path == root / "visrl.db" and ws.db_path.is_file()
    assert (ws.images_dir, ws.runs_dir, ws.exports_dir, ws.models_dir) == (
        root / "images", root / "runs", root / "exports", root / "models")
    assert ws.run_dir(7) == root / "runs" / "7" and (root / "runs" / "7").is_dir()


def test_resolve_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The autouse fixture sets VISRL_WORKSPACE; an explicit folder wins over it.
    assert resolve_root() == (tmp_path / "workspace").resolve()
    assert resolve_root(tmp_path / "explicit") == (tmp_path / "explicit").resolve()
    assert resolve_root(str(tmp_path / "explicit")) == (tmp_path / "explicit").resolve()
    monkeypatch.delenv("VISRL_WORKSPACE")
    assert resolve_root() == (tmp_path / "visrl-home" / "demo").resolve()  # VISRL_HOME/demo
    assert Store.open().workspace.root == (tmp_path / "visrl-home" / "demo").resolve()


def test_cli_workspace_option_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from visrl.cli import _register, cli

    _register()
    for name, root in (("by_option", tmp_path / "a"), ("by_env", tmp_path / "b")):
        store = Store.open(root)
        store.add_items(store.add_dataset(name, "test"), _items(1))
        store.close()
    monkeypatch.setenv("VISRL_WORKSPACE", str(tmp_path / "b"))
    runner = CliRunner()
    by_option = runner.invoke(cli, ["stats", "--workspace", str(tmp_path / "a"), "--json"])
    by_env = runner.invoke(cli, ["stats", "--json"])
    assert by_option.exit_code == 0 and by_env.exit_code == 0, (by_option.output, by_env.output)
    assert list(json.loads(by_option.output)["datasets"]) == ["by_option"]
    assert list(json.loads(by_env.output)["datasets"]) == ["by_env"]
    assert json.loads(by_option.output)["workspace"] == str((tmp_path / "a").resolve())
    assert json.loads(by_env.output)["workspace"] == str((tmp_path / "b").resolve())


def test_open_without_create(tmp_path: Path) -> None:
    with pytest.raises(WorkspaceError, match=r"no workspace at .*missing \(no visrl.db\); create one"):
        Store.open(tmp_path / "missing", create=False)
    assert not (tmp_path / "missing").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(WorkspaceError, match="exists but is not a folder"):
        Workspace.open(tmp_path / "file")
    Store.open(tmp_path / "made")
    assert Store.open(tmp_path / "made", create=False).path == (tmp_path / "made" / "visrl.db").resolve()


def test_workspace_paths(tmp_path: Path) -> None:
    ws = Workspace.open(tmp_path / "ws")
    assert ws.relative(ws.root / "images" / "a.png") == "images/a.png"
    assert ws.absolute("images/a.png") == ws.root / "images" / "a.png"
    assert ws.contains(ws.root / "images") and not ws.contains(tmp_path)
    with pytest.raises(DataError, match="is outside the workspace"):
        ws.relative(tmp_path / "elsewhere.png")
    with pytest.raises(DataError, match="leaves the workspace"):
        ws.absolute("../../etc/passwd")
    (ws.root / "images" / "link").symlink_to(tmp_path)
    assert not ws.contains(ws.root / "images" / "link" / "x.png")  # symlinks are followed


def test_wal_and_migrations(store: Store) -> None:
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    applied = store.db.execute(
        "SELECT migration_set, name FROM _sqlite_migrations ORDER BY rowid").fetchall()
    assert applied == [("visrl", "m001_initial"), ("visrl", "m002_pair_desk_indexes"),
                       ("visrl", "m003_desk_counts_search_team"), ("visrl", "m004_run_leases"),
                       ("visrl", "m005_generate_runs"), ("visrl", "m006_pair_decisions_and_stale_scores"),
                       ("visrl", "m007_job_start_step")]
    # Applying again (another process opening the file) changes nothing and records nothing.
    migrations.apply(store.db)
    assert store.db.execute("SELECT count(*) FROM _sqlite_migrations").fetchone()[0] == 7
    assert migrations.pending(store.db) == []
    # A second Store on the same file sees the same database.
    assert Store(store.workspace).db.execute("SELECT count(*) FROM _sqlite_migrations").fetchone()[0] == 7


def test_schema_tables_and_columns(store: Store) -> None:
    db = store.db
    assert set(db.table_names()) >= {"datasets", "items", "rollouts", "judgements", "pairs", "reviews",
                                      "jobs", "metrics", "checkpoints", "evaluations", "_sqlite_migrations"}
    assert db["pairs"].columns_dict == {
        "id": int, "item_id": int, "dataset_id": int, "chosen_rollout_id": int, "rejected_rollout_id": int,
        "chosen_box": str, "chosen_answer": str, "chosen_score": float, "chosen_crop_score": float,
        "rejected_box": str, "rejected_answer": str, "rejected_score": float, "rejected_crop_score": float,
        "margin": float, "priority": float, "status": str, "version": int, "edited": int, "source": str,
        "created_at": str, "updated_at": str, "decided_by": str, "stale_scores": str}
    assert db["decision_counts"].pks == ["reviewer", "status"]
    assert list(db["generate_runs"].columns_dict) == ["run_key", "lineage", "model", "identity", "created_at",
                                                      "updated_at"]
    assert list(db["reviews"].columns_dict) == [
        "id", "pair_id", "reviewer", "action", "before", "after", "undoes", "created_at", "batch"]
    assert db["pair_counts"].pks == ["dataset_id", "status"] and db["review_counts"].pks == ["reviewer", "action"]
    assert db["pair_claims"].columns_dict == {"pair_id": int, "reviewer": str, "expires_at": float}
    assert {"items_fts", "pairs_fts"} <= set(db.table_names())
    indexes = {tuple(i.columns) for i in db["pairs"].indexes}
    assert ("status", "priority", "id") in indexes and ("dataset_id", "status", "priority", "id") in indexes
    assert {tuple(i.columns) for i in db["rollouts"].indexes if i.unique} == {
        ("run_key", "item_id", "attempt", "kind")}


def test_connections_are_per_thread(store: Store) -> None:
    seen: list[object] = []
    thread = threading.Thread(target=lambda: seen.append(store.db.conn))
    thread.start()
    thread.join()
    assert seen and seen[0] is not store.db.conn
    assert store.db is store.db  # reused within a thread


def test_box_json() -> None:
    assert box_to_json(Box(1.234, 2.0, 3.456, 4.0)) == "[1.23, 2.0, 3.46, 4.0]"
    assert box_from_json("[1.23, 2.0, 3.46, 4.0]") == Box(1.23, 2.0, 3.46, 4.0)
    assert box_to_json(None) is None and box_from_json(None) is None and box_from_json("") is None
    assert loads(None, {}) == {} and loads("", []) == [] and loads('{"a": 1}') == {"a": 1}


def _items(n: int, split: str = "train", box: bool = True) -> list[dict]:
    return [{"split": split, "source_id": f"{split}{i}", "image": f"images/{i}.png", "width": 64,
             "height": 48, "question": f"q{i}?", "answer": f"a{i}",
             "gt_box": Box(1, 2, 30, 40) if box and i % 2 == 0 else None, "meta": {"i": i}}
            for i in range(n)]


def test_datasets_and_items(store: Store) -> None:
    ds = store.add_dataset("shapes", "viscot", source="/data/x.json")
    assert store.dataset("shapes")["id"] == ds and store.dataset("shapes")["source"] == "/data/x.json"
    with pytest.raises(DataError, match="a dataset named 'shapes' already exists"):
        store.add_dataset("shapes", "vqa")
    with pytest.raises(NotFoundError, match=r"no dataset named 'nope' \(datasets: shapes\)"):
        store.dataset("nope")
    other = store.add_dataset("other", "vqa")
    assert [d["name"] for d in store.datasets()] == ["shapes", "other"]

    train = store.add_items(ds, _items(4))
    test = store.add_items(ds, _items(2, "test"))
    store.add_items(other, _items(1))
    item = store.item(train[0])
    assert json.loads(item["gt_box"]) == [1, 2, 30, 40] and json.loads(item["meta"]) == {"i": 0}
    assert store.item_box(item) == Box(1, 2, 30, 40) and store.item_box(store.item(train[1])) is None
    assert [i["id"] for i in store.items("shapes")] == train + test
    assert [i["id"] for i in store.items("shapes", split="test")] == test
    assert [i["id"] for i in store.items("shapes", with_box=True)] == [train[0], train[2], test[0]]
    assert [i["id"] for i in store.items("shapes", with_box=False)] == [train[1], train[3], test[1]]
    assert len(store.items()) == 7 and len(store.items(limit=3)) == 3
    with pytest.raises(NotFoundError, match="no item with id 999"):
        store.item(999)


def test_duplicate_source_id_in_a_split_is_refused(store: Store) -> None:
    ds = store.add_dataset("d", "vqa")
    store.add_items(ds, _items(1))
    with pytest.raises(Exception, match="UNIQUE"):
        store.add_items(ds, _items(1))
    assert len(store.items("d")) == 1


def test_rollouts_idempotent_per_run_key(store: Store) -> None:
    item_id = store.add_items(store.add_dataset("d", "vqa"), _items(1))[0]
    row = {"run_key": "run1", "item_id": item_id, "attempt": 0, "kind": "policy", "box": Box(1, 2, 3, 4),
           "answer": "a", "scores": {"exact": 1.0}}
    first = store.add_rollout(row)
    again = store.add_rollout({**row, "answer": "b"})
    assert again == first
    assert [r["answer"] for r in store.rollouts(item_id)] == ["a"]  # the first is kept
    other = [store.add_rollout({**row, "attempt": 1}), store.add_rollout({**row, "kind": "random"}),
             store.add_rollout({**row, "run_key": "run2"})]
    assert len(set(other) | {first}) == 4
    assert store.done_attempts("run1") == {(item_id, 0, "policy"), (item_id, 1, "policy"),
                                           (item_id, 0, "random")}
    stored = store.db["rollouts"].get(first)
    assert json.loads(stored["box"]) == [1, 2, 3, 4] and json.loads(stored["scores"]) == {"exact": 1.0}
    # Without a run key (imports) each call adds a row.
    plain = {"item_id": item_id, "attempt": 0, "kind": "import", "answer": "x"}
    assert store.add_rollout(plain) != store.add_rollout(plain)
    assert len(store.rollouts(item_id)) == 6 and len(store.rollouts(run_key="run1")) == 3

    store.update_rollout(first, answer_score=0.5, scores={"exact": 0.5})
    stored = store.db["rollouts"].get(first)
    assert stored["answer_score"] == 0.5 and json.loads(stored["scores"]) == {"exact": 0.5}


def test_judgements_cache(store: Store) -> None:
    item_id = store.add_items(store.add_dataset("d", "vqa"), _items(1))[0]
    rid = store.add_rollout({"item_id": item_id, "kind": "policy"})
    assert store.cached_judgement(rid, "exact") is None
    store.save_judgement(rid, "exact", 1.0, "matched")
    store.save_judgement(rid, "exact", 0.0, "re-judged")  # upsert, not a second row
    store.save_judgement(rid, "llm", 0.5)
    assert store.cached_judgement(rid, "exact") == 0.0 and store.cached_judgement(rid, "llm") == 0.5
    assert store.db["judgements"].count == 2


def test_jobs(store: Store) -> None:
    a = store.create_job("train", {"lr": 1e-4, "out": Path("/x")}, "configs/t.yaml", command=["visrl", "train"])
    b = store.create_job("generate", {}, name="gen")
    job = store.job(a)
    assert (job["kind"], job["name"], job["status"], job["step"], job["progress"]) == ("train", "train", "queued", 0, 0.0)
    assert json.loads(job["config"]) == {"lr": 1e-4, "out": "/x"} and json.loads(job["command"]) == ["visrl", "train"]
    assert job["config_path"] == "configs/t.yaml" and store.job(b)["name"] == "gen"
    store.update_job(a, status="running", pid=123, step=5, total=10, progress=0.5)
    job = store.job(a)
    assert (job["status"], job["pid"], job["step"], job["total"], job["progress"]) == ("running", 123, 5, 10, 0.5)
    assert [j["id"] for j in store.jobs()] == [b, a]  # newest first
    assert [j["id"] for j in store.jobs(kind="train")] == [a]
    assert [j["id"] for j in store.jobs(status="queued")] == [b]
    assert [j["id"] for j in store.jobs(limit=1)] == [b]
    with pytest.raises(NotFoundError, match="no job with id 99"):
        store.job(99)


def test_metrics(store: Store) -> None:
    job = store.create_job("train", {})
    store.add_metrics(job, 2, {"loss": 0.5, "lr": 1e-4, "skipped": None})
    store.add_metrics(job, 1, {"loss": 0.9})
    rows = store.metrics(job)
    assert [(r["step"], r["name"], r["value"]) for r in rows] == [(1, "loss", 0.9), (2, "loss", 0.5), (2, "lr", 1e-4)]
    assert [(r["step"], r["value"]) for r in store.metrics(job, ["loss"])] == [(1, 0.9), (2, 0.5)]
    assert store.metrics(job, ["nothing"]) == [] and store.metrics(job + 1) == []


def test_checkpoints_and_evaluations(store: Store) -> None:
    job = store.create_job("train", {})
    first = store.add_checkpoint("models/a", "base", "sft", job_id=job, pairs=[1, 2], config={"lr": 1})
    again = store.add_checkpoint("models/a", "base", "dpo1", job_id=job, pairs={"status": "accepted"})
    other = store.add_checkpoint("models/b", "models/a", "dpo2")
    assert again == first and other != first
    rows = store.checkpoints()
    assert [(r["path"], r["stage"]) for r in rows] == [("models/a", "dpo1"), ("models/b", "dpo2")]
    assert json.loads(rows[0]["pairs"]) == {"status": "accepted"} and json.loads(rows[1]["config"]) == {}
    ev = store.add_evaluation({"accuracy": 0.75, "iou": 0.4}, "models/a", None, "shapes", "test", 8,
                              checkpoint_id=first, job_id=job)
    [row] = store.evaluations()
    assert row["id"] == ev and row["metrics"] == {"accuracy": 0.75, "iou": 0.4}
    assert (row["model"], row["adapter"], row["dataset"], row["split"], row["n"], row["checkpoint_id"]) == (
        "models/a", None, "shapes", "test", 8, first)


def test_stats(store: Store) -> None:
    from visrl import review

    assert store.stats() == {"workspace": str(store.workspace.root), "datasets": {}, "jobs": {}, "checkpoints": 0}
    ds = store.add_dataset("shapes", "test")
    store.add_dataset("empty", "test")
    ids = store.add_items(ds, _items(3) + _items(2, "test"))
    for item_id in ids[:3]:
        good = store.add_rollout({"item_id": item_id, "kind": "policy", "answer_score": 1.0, "answer": "a"})
        bad = store.add_rollout({"item_id": item_id, "kind": "random", "answer_score": 0.0, "answer": "b"})
        review.add_pair(store, item_id, store.db["rollouts"].get(good), store.db["rollouts"].get(bad))
    first = review.get_pair(store, 1)
    review.accept(store, first["id"], first["version"])
    store.create_job("train", {})
    store.update_job(store.create_job("eval", {}), status="succeeded")
    store.add_checkpoint("models/a", "base", "sft")
    assert store.stats() == {
        "workspace": str(store.workspace.root),
        "datasets": {"shapes": {"items": {"test": 2, "train": 3}, "rollouts": 6,
                                "pairs": {"accepted": 1, "pending": 2}}},
        "jobs": {"queued": 1, "succeeded": 1},
        "checkpoints": 1,
    }


def test_rebuilt_workspace_is_migrated_again(tmp_path: Path) -> None:
    # The store migrates each file once per process; a workspace deleted and re-created at the
    # same path in that process (`visrl demo --force`, the app) must still get its tables.
    import shutil

    store = Store.open(tmp_path / "ws")
    store.add_dataset("a", "test")
    store.close()
    shutil.rmtree(tmp_path / "ws")
    store = Store.open(tmp_path / "ws")
    assert store.add_dataset("b", "test") == 1
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_jobs_with_metric_matches_the_name_literally(store: Store) -> None:
    trained = store.create_job("train", {}, name="sft")
    store.add_metrics(trained, 1, {"loss": 1.0, "eval_loss": 1.2})
    tuned = store.create_job("train", {}, name="lr")
    store.add_metrics(tuned, 1, {"learning_rate": 1e-4})
    assert store.jobs_with_metric("loss") == {trained}
    assert store.jobs_with_metric("_") == {trained, tuned}  # '_' is a character here, not a wildcard
    assert store.jobs_with_metric("%") == set()
