"""The desk's key press (action + next pair + claim + progress), claims, bulk actions and the
counts and search index that triggers keep current."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.test_review import PRIORITY_ORDER, make_pairs
from visrl import desk, review
from visrl.errors import ConflictError, DataError
from visrl.review import PairFilter, count_pairs, next_pair, status_counts
from visrl.store import Store


@pytest.fixture
def pairs(store: Store) -> list[int]:
    return make_pairs(store)


def true_counts(store: Store) -> dict[tuple[int, str], int]:
    rows = store.db.execute("SELECT dataset_id, status, count(*) FROM pairs GROUP BY 1, 2").fetchall()
    return {(d, s): n for d, s, n in rows}


def kept_counts(store: Store) -> dict[tuple[int, str], int]:
    rows = store.db.execute("SELECT dataset_id, status, n FROM pair_counts WHERE n != 0").fetchall()
    return {(d, s): n for d, s, n in rows}


def test_counts_follow_every_kind_of_change(store: Store, pairs: list[int]) -> None:
    assert kept_counts(store) == true_counts(store) == {(1, "pending"): 4, (2, "pending"): 2}
    review.accept(store, 1, 1)
    review.reject(store, 5, 1)
    review.swap(store, 2, 1)  # no status change
    review.undo(store, 5, 2)
    desk.bulk_apply(store, PairFilter(dataset="shapes"), "reject", "ana", expect=3)
    store.db.execute("UPDATE pairs SET status = 'accepted' WHERE id = 6")  # outside the review layer too
    store.db.execute("DELETE FROM reviews WHERE pair_id = 3")
    store.db.execute("DELETE FROM pairs WHERE id = 3")
    assert kept_counts(store) == true_counts(store) == {
        (1, "accepted"): 1, (1, "rejected"): 2, (2, "pending"): 1, (2, "accepted"): 1}
    assert status_counts(store) == {"pending": 1, "accepted": 2, "rejected": 2}
    assert status_counts(store, "other", "accepted") == {"accepted": 1}
    assert count_pairs(store, PairFilter(status="rejected", dataset="shapes")) == 2


def test_search_index_follows_edits_and_swaps(store: Store, pairs: list[int]) -> None:
    assert count_pairs(store, PairFilter(search="crimson")) == 0
    review.edit_answer(store, 1, 1, "chosen", "Crimson red")
    assert [p["id"] for p in review.page_pairs(store, PairFilter(search="crimson"))] == [1]
    review.swap(store, 1, 2)  # the answer moves to the rejected side: still found
    assert review.matches(store, PairFilter(search="CRIMSON"), 1)
    review.edit_answer(store, 1, 3, "rejected", "maroon")
    assert count_pairs(store, PairFilter(search="crimson")) == 0
    store.db.execute("UPDATE items SET question = 'Where is the okapi?' WHERE id = 2")
    assert [p["id"] for p in review.page_pairs(store, PairFilter(search="okapi"))] == [2]


def test_key_press_acts_advances_claims_and_counts(store: Store, pairs: list[int]) -> None:
    flt = PairFilter(viewer="ana")
    first = next_pair(store, flt)
    assert first["id"] == PRIORITY_ORDER[0]
    step = desk.act(store, "accept", first["id"], 1, flt, "priority", "ana", matching=6)
    assert (step.acted["id"], step.acted["status"]) == (6, "accepted")
    assert step.shown["id"] == PRIORITY_ORDER[1]
    assert step.progress.matching == 5 == count_pairs(store, PairFilter())  # moved by one, no recount
    assert step.progress.counts == {"pending": 5, "accepted": 1, "rejected": 0}
    assert step.progress.mine == {"accepted": 1}
    assert "ana: 1 accepted, 0 rejected" in step.progress.line("ana") and "Reviewed 1 / 6" in step.progress.line("ana")
    # The pair now on ana's screen is claimed: bo is served the one after it.
    assert next_pair(store, PairFilter(viewer="bo"))["id"] == PRIORITY_ORDER[2]
    assert next_pair(store, PairFilter(viewer="ana"))["id"] == PRIORITY_ORDER[1]
    # Undo says what it reverts.
    undo = desk.act(store, "undo", 6, 2, flt, "priority", "ana", matching=5)
    assert undo.note.startswith("Undone: ana's accept (status pending -> accepted) at ")
    assert undo.note.endswith("; pair 6 is pending again")
    assert undo.shown["id"] == 6 and undo.progress.matching == 6 and undo.progress.mine == {}
    with pytest.raises(DataError, match="unknown action 'eat'"):
        desk.act(store, "eat", 6, 3, flt, "priority", "ana")


def test_matching_count_follows_the_filter(store: Store, pairs: list[int]) -> None:
    flt = PairFilter(search="colour")  # pairs 4 and 1
    step = desk.act(store, "reject", 4, 1, flt, "priority", "ana", matching=2)
    assert step.progress.matching == 1 == count_pairs(store, flt)
    step = desk.act(store, "swap", 2, 1, flt, "priority", "ana", matching=1)  # not a match: no change
    assert step.progress.matching == 1
    assert desk.progress(store, flt, "ana").matching == 1  # counted afresh, same number


def test_claims_expire_and_move(store: Store, pairs: list[int]) -> None:
    assert desk.claim(store, 6, "ana") is None
    assert desk.claim(store, 6, "bo") == "ana"  # held: not taken over
    assert next_pair(store, PairFilter(viewer="bo"))["id"] == 3
    assert desk.claim(store, 3, "ana") is None  # ana moved on: 6 is free again
    assert next_pair(store, PairFilter(viewer="bo"))["id"] == 6
    assert desk.claim(store, 2, "bo", ttl_s=-1) is None  # an expired claim hides nothing
    assert next_pair(store, PairFilter(viewer="ana"), after=3)["id"] == 2
    desk.release(store, "ana")
    assert store.db.execute("SELECT count(*) FROM pair_claims WHERE reviewer = 'ana'").fetchone()[0] == 0
    assert store.db.execute("SELECT expires_at FROM pair_claims").fetchone()[0] < time.time()


def test_bulk_confirmed_and_undone_as_one_unit(store: Store, pairs: list[int]) -> None:
    flt = PairFilter(dataset="shapes")
    assert desk.bulk_preview(store, flt, "accept") == 4
    with pytest.raises(ConflictError, match="nothing changed: the filters match 4 pairs to accept now, but 3 "
                                            "were expected; the set of matching pairs is not the one counted"):
        desk.bulk_apply(store, flt, "accept", "ana", expect=3)
    assert status_counts(store)["accepted"] == 0
    batch, n = desk.bulk_apply(store, flt, "accept", "ana", expect=4)
    assert n == 4 and status_counts(store) == {"pending": 2, "accepted": 4, "rejected": 0}
    rows = [r for r in store.db["reviews"].rows if r["batch"] == batch]
    assert sorted(r["pair_id"] for r in rows) == [1, 2, 3, 4]
    assert {(r["reviewer"], r["action"], r["before"], r["after"]) for r in rows} == {
        ("ana", "accept", json.dumps({"status": "pending", "decided_by": None}),
         json.dumps({"status": "accepted", "decided_by": "ana"}))}
    assert review.get_pair(store, 1)["version"] == 2
    assert desk.bulk_preview(store, PairFilter(status=None, dataset="shapes"), "accept") == 0
    assert desk.last_batch(store, "ana") == batch and desk.last_batch(store, "bo") is None
    # Pair 2 is changed again after the batch: undoing the batch keeps that change.
    review.reject(store, 2, 2, reviewer="bo")
    with pytest.raises(ConflictError, match=f"bulk action {batch} was made by ana; only they can undo it"):
        desk.undo_batch(store, batch, "bo")
    assert desk.undo_batch(store, batch, "ana") == (3, 1)
    assert [review.get_pair(store, i)["status"] for i in (1, 2, 3, 4)] == ["pending", "rejected", "pending",
                                                                           "pending"]
    assert review.get_pair(store, 1)["version"] == 3
    assert desk.last_batch(store, "ana") is None
    with pytest.raises(DataError, match=f"no bulk action '{batch}' left to undo"):
        desk.undo_batch(store, batch, "ana")
    with pytest.raises(DataError, match="bulk action must be one of accept, reject, reset, not 'swap'"):
        desk.bulk_preview(store, flt, "swap")


def test_team_progress(store: Store, pairs: list[int]) -> None:
    review.accept(store, 1, 1, reviewer="ana")
    review.reject(store, 2, 1, reviewer="bo")
    review.undo(store, 2, 2, reviewer="bo")
    desk.bulk_apply(store, PairFilter(dataset="other"), "reject", "ana", expect=2)
    # Standing decisions, not audit rows: bo's undone reject counts for nobody.
    assert desk.team_progress(store) == {"ana": {"accepted": 1, "rejected": 2}}
    assert desk.reviewer_counts(store, "carl") == {}


def test_existing_workspace_is_upgraded(tmp_path: Path) -> None:
    """A workspace made before m003 gets its counts, search index and review counts filled."""
    from sqlite_utils import Database

    from visrl.schema import migrations
    from visrl.workspace import Workspace

    ws = Workspace.open(tmp_path / "old")
    db = Database(ws.db_path)
    migrations.apply(db, stop_before="m003_desk_counts_search_team")
    db["datasets"].insert({"id": 1, "name": "old", "format": "vqa", "source": "", "created_at": "t"})
    db["items"].insert_all([{"id": i, "dataset_id": 1, "split": "train", "source_id": str(i), "image": f"{i}.png",
                             "width": 10, "height": 10, "question": q, "created_at": "t"}
                            for i, q in ((1, "Where is the okapi?"), (2, "What colour?"))])
    db["pairs"].insert_all([{"id": i, "item_id": i, "dataset_id": 1, "chosen_answer": a, "rejected_answer": "no",
                             "margin": 0.5, "priority": 0.5, "status": s, "version": 1, "edited": 0}
                            for i, a, s in ((1, "left", "accepted"), (2, "crimson", "pending"))])
    db["reviews"].insert({"pair_id": 1, "reviewer": "ana", "action": "accept", "before": "{}", "after": "{}",
                          "created_at": "t"})
    db.close()
    store = Store(ws)
    assert status_counts(store) == {"pending": 1, "accepted": 1, "rejected": 0}
    assert [p["id"] for p in review.page_pairs(store, PairFilter(status=None, search="okapi"))] == [1]
    assert [p["id"] for p in review.page_pairs(store, PairFilter(status=None, search="CRIMSON"))] == [2]
    assert desk.team_progress(store) == {"ana": {"accepted": 1}}  # m005: the decider from the audit


def test_progress_is_a_recount_of_the_pairs_current_state(store: Store, pairs: list[int]) -> None:
    """Two reviewers with undo, reset, bulk, bulk undo and an overruled decision: per-reviewer and
    team progress equal a recount of who set each pair's current status (issue 19: the header
    counted audit rows, "ana: 19 accept … 13 undo · Team: bo 12 accepted" for 1 accepted)."""
    flt = PairFilter(status=None)
    def version(pair_id: int) -> int:
        return review.get_pair(store, pair_id)["version"]
    desk.act(store, "accept", 1, 1, flt, "priority", "bo")
    desk.act(store, "reject", 2, 1, flt, "priority", "bo")
    desk.act(store, "undo", 2, 2, flt, "priority", "bo")  # bo's reject is gone
    desk.act(store, "accept", 3, 1, flt, "priority", "ana")
    desk.act(store, "reset", 3, 2, flt, "priority", "ana")  # and so is ana's accept
    desk.act(store, "reject", 1, version(1), flt, "priority", "ana")  # ana overrules bo on pair 1
    batch, _ = desk.bulk_apply(store, PairFilter(dataset="other"), "accept", "bo", expect=2)
    desk.bulk_apply(store, PairFilter(dataset="shapes", status="pending"), "reject", "ana", expect=3)
    desk.undo_batch(store, desk.last_batch(store, "ana") or "", "ana")
    review.swap(store, 5, version(5), reviewer="ana")  # not a decision
    assert desk.team_progress(store) == desk.recount_decisions(store) == {
        "ana": {"rejected": 1}, "bo": {"accepted": 2}}
    step = desk.act(store, "accept", 2, version(2), flt, "priority", "bo")
    assert step.progress.mine == {"accepted": 3} and "bo: 3 accepted, 0 rejected" in step.progress.line("bo")
    assert desk.reviewer_counts(store, "ana") == {"rejected": 1}
    assert desk.undo_batch(store, batch, "bo") == (1, 1)  # pair 5 was swapped since: kept
    assert desk.team_progress(store) == desk.recount_decisions(store) == {
        "ana": {"rejected": 1}, "bo": {"accepted": 2}}


def test_a_decision_never_leaves_the_decided_pair_on_screen(store: Store, pairs: list[int]) -> None:
    """The last pending pair accepted: nothing is shown (all done), not that pair again (where a
    second A or R would decide it again); pairs skipped earlier come round first."""
    flt = PairFilter(viewer="ana")
    *others, last = PRIORITY_ORDER
    desk.bulk_apply(store, PairFilter(), "accept", "bo", expect=6)
    desk.undo_batch(store, desk.last_batch(store, "bo") or "", "bo")
    for pair_id in others[1:]:
        review.accept(store, pair_id, review.get_pair(store, pair_id)["version"], reviewer="bo")
    step = desk.act(store, "accept", last, review.get_pair(store, last)["version"], flt, "priority", "ana")
    assert step.shown is not None and step.shown["id"] == others[0]  # skipped earlier: wraps to it
    step = desk.act(store, "accept", others[0], step.shown["version"], flt, "priority", "ana")
    assert step.shown is None and step.progress.counts["pending"] == 0
