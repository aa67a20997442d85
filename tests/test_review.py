"""Pair review: the desk's queries (filters, keyset navigation, pages, counts) and the review
actions (each one transaction, version-checked, audited, undoable)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from visrl import review
from visrl.boxes import Box
from visrl.errors import ConflictError, DataError, NotFoundError
from visrl.review import PairFilter, count_pairs, next_pair, page_pairs, status_counts
from visrl.store import Store

SIZE = (100, 80)
# (dataset, question, chosen score, rejected score, chosen answer, rejected answer, chosen crop, chosen iou)
SPECS = [
    ("shapes", "What colour is the circle?", 1.0, 0.0, "red", "blue", None, None),    # p1 priority 0.0
    ("shapes", "How many stars?", 0.8, 0.2, "three", "two", None, None),              # p2 priority 0.4
    ("shapes", "Which letter is on the 50%_off sign?", 0.6, 0.4, "K", "X", None, None),       # p3 priority 0.8
    ("shapes", "What colour is the square?", 0.8, 0.2, "green", "Yellow", None, None),  # p4 priority 0.4
    ("other", "What digit is on the door?", 0.9, 0.0, "7", "1", None, None),          # p5 priority 0.1
    # p6: margin 1 but the crop judge (1.0) and the IoU (0.1) disagree: priority 0.0 + 1.0
    ("other", "Which way does the arrow point?", 1.0, 0.0, "left", "right", 1.0, 0.1),
]
PRIORITY_ORDER = [6, 3, 2, 4, 5, 1]  # priority DESC, id ASC (p2 and p4 tie at 0.4)


def make_pairs(store: Store, specs: list[tuple] = SPECS) -> list[int]:
    datasets: dict[str, int] = {}
    ids = []
    for n, (name, question, c_score, r_score, c_answer, r_answer, c_crop, c_iou) in enumerate(specs):
        if name not in datasets:
            datasets[name] = store.add_dataset(name, "test")
        [item_id] = store.add_items(datasets[name], [{
            "split": "train", "source_id": str(n), "image": f"images/{n}.png", "width": SIZE[0],
            "height": SIZE[1], "question": question, "answer": c_answer, "gt_box": Box(10, 10, 40, 40)}])
        chosen = store.add_rollout({"item_id": item_id, "kind": "policy", "box": Box(10, 12, 40, 42),
                                    "answer": c_answer, "answer_score": c_score, "crop_score": c_crop,
                                    "iou": c_iou})
        rejected = store.add_rollout({"item_id": item_id, "kind": "random", "box": Box(60, 40, 90, 70),
                                      "answer": r_answer, "answer_score": r_score, "crop_score": 0.0})
        ids.append(review.add_pair(store, item_id, store.db["rollouts"].get(chosen),
                                   store.db["rollouts"].get(rejected), source="test"))
    return ids


@pytest.fixture
def pairs(store: Store) -> list[int]:
    ids = make_pairs(store)
    assert ids == [1, 2, 3, 4, 5, 6]
    return ids


def walk(store: Store, flt: PairFilter, sort: str = "priority", backwards: bool = False,
         start: int | None = None) -> list[int]:
    """Pair ids met by pressing "next" (or "previous") from ``start`` until the end."""
    seen, current = [], start
    while (pair := next_pair(store, flt, sort, after=current, backwards=backwards)) is not None:
        seen.append(pair["id"])
        current = pair["id"]
        assert len(seen) <= 20, seen
    return seen


def audit(store: Store, pair_id: int) -> list[tuple[str, dict, dict, int | None]]:
    return [(r["action"], json.loads(r["before"]), json.loads(r["after"]), r["undoes"])
            for r in review.reviews(store, pair_id)]


# ---------------------------------------------------------------------- creating and reading pairs

def test_add_pair_values(store: Store, pairs: list[int]) -> None:
    p = review.get_pair(store, 2)
    assert (p["status"], p["version"], p["edited"], p["source"]) == ("pending", 1, 0, "test")
    assert (p["chosen_answer"], p["rejected_answer"]) == ("three", "two")
    assert (p["chosen_score"], p["rejected_score"]) == (0.8, 0.2)
    assert p["margin"] == 0.6 and p["priority"] == 0.4
    assert (p["question"], p["reference"], p["image"], p["width"], p["height"], p["dataset"], p["split"]) == (
        "How many stars?", "three", "images/1.png", 100, 80, "shapes", "train")
    assert review.pair_boxes(p) == {"chosen": Box(10, 12, 40, 42), "rejected": Box(60, 40, 90, 70),
                                    "gt": Box(10, 10, 40, 40)}
    assert [review.get_pair(store, i)["priority"] for i in pairs] == [0.0, 0.4, 0.8, 0.4, 0.1, 1.0]
    with pytest.raises(NotFoundError, match="no pair with id 99"):
        review.get_pair(store, 99)


def test_add_pair_is_idempotent(store: Store, pairs: list[int]) -> None:
    p = review.get_pair(store, 1)
    chosen = store.db["rollouts"].get(p["chosen_rollout_id"])
    rejected = store.db["rollouts"].get(p["rejected_rollout_id"])
    assert review.add_pair(store, p["item_id"], chosen, rejected) == 1
    assert store.db["pairs"].count == 6


@pytest.mark.parametrize("margin, crop, iou, expected", [
    (1.0, None, None, 0.0),
    (0.25, None, None, 0.75),
    (-0.5, None, None, 1.0),  # a negative margin counts as none
    (1.0, 1.0, 0.1, 1.0),  # judge and IoU disagree by 0.9
    (1.0, 0.9, 0.5, 0.0),  # disagree by 0.4: not enough
    (0.5, 0.0, 0.8, 1.5),
])
def test_review_priority(margin: float, crop: float | None, iou: float | None, expected: float) -> None:
    assert review.review_priority(margin, crop, iou) == expected


# ---------------------------------------------------------------------- desk queries

@pytest.mark.parametrize("flt, expected", [
    (PairFilter(), [6, 3, 2, 4, 5, 1]),
    (PairFilter(status=None), [6, 3, 2, 4, 5, 1]),
    (PairFilter(status="accepted"), []),
    (PairFilter(dataset="shapes"), [3, 2, 4, 1]),
    (PairFilter(dataset="other"), [6, 5]),
    (PairFilter(min_margin=0.5), [6, 2, 4, 5, 1]),
    (PairFilter(max_margin=0.6), [3, 2, 4]),  # the boundary counts, float noise or not
    (PairFilter(min_margin=0.6, max_margin=0.6), [2, 4]),
    (PairFilter(min_margin=0.1, max_margin=0.95), [3, 2, 4, 5]),
    (PairFilter(min_chosen_score=0.9), [6, 5, 1]),
    (PairFilter(max_rejected_score=0.0), [6, 5, 1]),
    (PairFilter(search="colour"), [4, 1]),  # the question
    (PairFilter(search="yellow"), [4]),  # the rejected answer, any case
    (PairFilter(search="three"), [2]),  # the chosen answer
    (PairFilter(search="colour", dataset="shapes", min_margin=0.7), [1]),
    (PairFilter(search="nothing like this"), []),
    (PairFilter(search="%_o"), [3]),  # LIKE's wildcards are searched for literally
    (PairFilter(search="_"), [3]),
    (PairFilter(search="5_%"), []),  # as wildcards this would match "50%"
    (PairFilter(search="ye"), [4]),  # shorter than a trigram: LIKE
    (PairFilter(search='"50%'), []),  # a quote is literal text, not FTS syntax
    (PairFilter(search="ARROW point"), [6]),
    (PairFilter(search="olour is the sq"), [4]),
])
def test_filters(store: Store, pairs: list[int], flt: PairFilter, expected: list[int],
                 monkeypatch: pytest.MonkeyPatch) -> None:
    assert [p["id"] for p in page_pairs(store, flt)] == expected
    assert count_pairs(store, flt) == len(expected)
    # The Python check that keeps the desk's count current agrees with the SQL, pair by pair.
    assert [i for i in PRIORITY_ORDER if flt.accepts(review.get_pair(store, i))] == expected
    assert [i for i in PRIORITY_ORDER if review.matches(store, flt, i)] == expected
    assert walk(store, flt) == expected
    assert walk(store, flt, backwards=True) == expected[::-1]
    # A search walks a window of candidates, then asks the full-text index: both ways agree,
    # and so does a search the count marked as rare (it skips the window).
    monkeypatch.setattr(review, "SCAN_CANDIDATES", 1)
    assert walk(store, flt) == expected
    assert walk(store, flt, backwards=True) == expected[::-1]
    monkeypatch.setattr(review, "SCAN_CANDIDATES", 1000)
    monkeypatch.setattr(review, "_MATCH_COUNTS", {flt.search: 0} if flt.search else {})
    assert walk(store, flt) == expected


def test_filter_errors(store: Store, pairs: list[int]) -> None:
    with pytest.raises(DataError, match="unknown status 'done'; use one of pending, accepted, rejected"):
        page_pairs(store, PairFilter(status="done"))
    with pytest.raises(NotFoundError, match="no dataset named 'nope'"):
        count_pairs(store, PairFilter(dataset="nope"))
    with pytest.raises(DataError, match="unknown sort 'best'; use one of priority, oldest, newest"):
        next_pair(store, PairFilter(), sort="best")


@pytest.mark.parametrize("sort, expected", [
    ("priority", PRIORITY_ORDER),
    ("oldest", [1, 2, 3, 4, 5, 6]),
    ("newest", [6, 5, 4, 3, 2, 1]),
])
def test_sorts_and_keyset_walks(store: Store, pairs: list[int], sort: str, expected: list[int]) -> None:
    flt = PairFilter()
    assert [p["id"] for p in page_pairs(store, flt, sort=sort)] == expected
    assert walk(store, flt, sort) == expected
    assert walk(store, flt, sort, backwards=True) == expected[::-1]
    # From the middle, both ways.
    middle = expected[2]
    assert walk(store, flt, sort, start=middle) == expected[3:]
    assert walk(store, flt, sort, backwards=True, start=middle) == expected[:2][::-1]


def test_walk_continues_when_current_pair_leaves_the_filter(store: Store, pairs: list[int]) -> None:
    flt = PairFilter(status="pending")
    pair = review.get_pair(store, 2)  # in priority order: 6, 3, [2], 4, 5, 1
    review.accept(store, 2, pair["version"])
    assert next_pair(store, flt, after=2)["id"] == 4
    assert next_pair(store, flt, after=2, backwards=True)["id"] == 3
    assert 2 not in walk(store, flt)
    # The same for the tie partner: p4 shares p2's priority, so the id breaks the tie.
    review.reject(store, 4, 1)
    assert next_pair(store, flt, after=4)["id"] == 5
    assert next_pair(store, flt, after=4, backwards=True)["id"] == 3
    # At either end there is no further pair.
    assert next_pair(store, flt, after=1) is None
    assert next_pair(store, flt, after=6, backwards=True) is None
    # An id that no longer exists starts from the beginning.
    assert next_pair(store, flt, after=999)["id"] == 6


def test_pages_and_counts(store: Store, pairs: list[int]) -> None:
    flt = PairFilter(status=None)
    assert [p["id"] for p in page_pairs(store, flt, limit=2)] == [6, 3]
    assert [p["id"] for p in page_pairs(store, flt, offset=2, limit=2)] == [2, 4]
    assert [p["id"] for p in page_pairs(store, flt, offset=4, limit=10)] == [5, 1]
    assert page_pairs(store, flt, offset=6) == []
    assert page_pairs(store, flt)[0]["question"] == "Which way does the arrow point?"

    assert status_counts(store) == {"pending": 6, "accepted": 0, "rejected": 0}
    review.accept(store, 1, 1)
    review.accept(store, 5, 1)
    review.reject(store, 3, 1)
    assert status_counts(store) == {"pending": 3, "accepted": 2, "rejected": 1}
    assert status_counts(store, "shapes") == {"pending": 2, "accepted": 1, "rejected": 1}
    assert status_counts(store, "other") == {"pending": 1, "accepted": 1, "rejected": 0}
    assert count_pairs(store, PairFilter(status="accepted")) == 2
    assert count_pairs(store, PairFilter(status="pending", dataset="shapes")) == 2
    assert count_pairs(store, PairFilter(status=None, search="colour")) == 2
    with pytest.raises(NotFoundError, match="no dataset named 'nope'"):
        status_counts(store, "nope")


# ---------------------------------------------------------------------- review actions

@pytest.mark.parametrize("action, status", [
    (review.accept, "accepted"),
    (review.reject, "rejected"),
])
def test_accept_reject(store: Store, pairs: list[int], action: Any, status: str) -> None:
    before = review.get_pair(store, 2)
    after = action(store, 2, 1, reviewer="ana")
    assert (after["status"], after["version"], after["decided_by"]) == (status, 2, "ana")
    assert {k: v for k, v in after.items() if k not in ("status", "version", "updated_at", "decided_by")} == {
        k: v for k, v in before.items() if k not in ("status", "version", "updated_at", "decided_by")}
    [row] = review.reviews(store, 2)
    assert (row["reviewer"], row["action"], row["undoes"]) == ("ana", action.__name__, None)
    assert (json.loads(row["before"]), json.loads(row["after"])) == (
        {"status": "pending", "decided_by": None}, {"status": status, "decided_by": "ana"})
    assert review.reviews(store, 1) == []  # other pairs untouched
    # The same decision again changes nothing: no new version, no audit row.
    assert action(store, 2, 2, reviewer="ana") == after and len(review.reviews(store, 2)) == 1
    back = review.reset(store, 2, 2)
    assert (back["status"], back["version"]) == ("pending", 3)
    assert audit(store, 2)[-1] == ("reset", {"status": status, "decided_by": "ana"},
                                   {"status": "pending", "decided_by": None}, None)


def test_swap_exchanges_every_side_field(store: Store, pairs: list[int]) -> None:
    before = review.get_pair(store, 6)
    after = review.swap(store, 6, 1)
    for field in ("rollout_id", "box", "answer", "score", "crop_score"):
        assert after[f"chosen_{field}"] == before[f"rejected_{field}"], field
        assert after[f"rejected_{field}"] == before[f"chosen_{field}"], field
    assert (after["chosen_answer"], after["rejected_answer"]) == ("right", "left")
    assert (after["chosen_crop_score"], after["rejected_crop_score"]) == (0.0, 1.0)
    assert after["margin"] == -1.0 and after["version"] == 2 and after["status"] == "pending"
    assert len(review.reviews(store, 6)) == 1 and audit(store, 6)[0][0] == "swap"
    again = review.swap(store, 6, 2)
    assert {k: again[k] for k in before if k not in ("version", "updated_at")} == {
        k: before[k] for k in before if k not in ("version", "updated_at")}


@pytest.mark.parametrize("side", ["chosen", "rejected"])
def test_edit_box(store: Store, pairs: list[int], side: str) -> None:
    other = "rejected" if side == "chosen" else "chosen"
    before = review.get_pair(store, 1)
    after = review.edit_box(store, 1, 1, side, Box(5.0, 6.0, 50.5, 70.25))
    assert json.loads(after[f"{side}_box"]) == [5.0, 6.0, 50.5, 70.25]
    assert after[f"{other}_box"] == before[f"{other}_box"]
    assert (after["edited"], after["version"]) == (1, 2)
    # These rollouts carry no judge keys: a crop score cannot be recomputed and is marked stale
    # (pair 1's chosen side had none: nothing goes stale).
    was, now = ({}, {}) if before[f"{side}_crop_score"] is None else (
        {"stale_scores": None}, {"stale_scores": f"{side}_crop_score"})
    assert audit(store, 1) == [(f"edit_{side}_box", {f"{side}_box": before[f"{side}_box"], "edited": 0, **was},
                                {f"{side}_box": after[f"{side}_box"], "edited": 1, **now}, None)]
    # Within a pixel of the edge (a drawn box's rounding) is clamped onto the image.
    edge = review.edit_box(store, 1, 2, side, Box(-0.5, 0.0, 100.4, 80.9))
    assert json.loads(edge[f"{side}_box"]) == [0.0, 0.0, 100.0, 80.0]


@pytest.mark.parametrize("box", [
    Box(50, 50, 10, 10),  # inverted
    Box(10, 10, 10, 40),  # no width
    Box(-20, 10, 30, 40),  # leaves on the left
    Box(10, 10, 130, 40),  # leaves on the right of the 100 px image
    Box(10, 10, 30, 95),  # leaves below the 80 px image
    Box(float("nan"), 10, 30, 40),
])
def test_edit_box_refuses_bad_boxes(store: Store, pairs: list[int], box: Box) -> None:
    before = review.get_pair(store, 1)
    with pytest.raises(DataError, match=r"is empty or leaves the 100x80 image; draw it inside the image"):
        review.edit_box(store, 1, 1, "chosen", box)
    assert review.get_pair(store, 1) == before
    assert review.reviews(store, 1) == []


def test_edit_answer(store: Store, pairs: list[int]) -> None:
    after = review.edit_answer(store, 2, 1, "rejected", "  four \n")
    assert (after["rejected_answer"], after["chosen_answer"], after["edited"], after["version"]) == (
        "four", "three", 1, 2)
    assert audit(store, 2) == [("edit_rejected_answer",
                                {"rejected_answer": "two", "edited": 0, "stale_scores": None},
                                {"rejected_answer": "four", "edited": 1, "stale_scores": "rejected_score"}, None)]
    with pytest.raises(DataError, match="an answer cannot be empty"):
        review.edit_answer(store, 2, 2, "chosen", "   ")
    with pytest.raises(DataError, match="side must be 'chosen' or 'rejected', not 'left'"):
        review.edit_answer(store, 2, 2, "left", "x")  # type: ignore[arg-type]
    assert review.get_pair(store, 2)["version"] == 2 and len(review.reviews(store, 2)) == 1


def test_undo_restores_and_is_audited(store: Store, pairs: list[int]) -> None:
    original = review.get_pair(store, 2)
    review.accept(store, 2, 1, reviewer="bo")
    review.swap(store, 2, 2, reviewer="bo")
    review.edit_answer(store, 2, 3, "chosen", "five", reviewer="bo")
    assert review.get_pair(store, 2)["chosen_answer"] == "five"
    # Only the reviewer who made a change can undo it; the refusal says whose change it is.
    with pytest.raises(ConflictError, match=r"pair 2's latest change is bo's edit chosen answer "
                                            r"\(chosen_answer two -> five\) at .*; only bo can undo it"):
        review.undo(store, 2, 4, reviewer="ana")
    assert review.get_pair(store, 2)["version"] == 4

    p = review.undo(store, 2, 4, reviewer="bo")  # undoes the edit
    assert (p["chosen_answer"], p["rejected_answer"], p["edited"], p["status"], p["version"]) == (
        "two", "three", 0, "accepted", 5)
    rows = review.reviews(store, 2)
    assert len(rows) == 4 and (rows[-1]["action"], rows[-1]["undoes"], rows[-1]["reviewer"]) == (
        "undo", rows[2]["id"], "bo")
    assert json.loads(rows[-1]["after"]) == {"chosen_answer": "two", "edited": 0, "stale_scores": None}
    assert p["chosen_score"] == original["rejected_score"]  # the score the answer had, fresh again

    p = review.undo(store, 2, 5, reviewer="bo")  # undo of undo walks further back: undoes the swap
    assert (p["chosen_answer"], p["rejected_answer"], p["margin"], p["status"], p["version"]) == (
        "three", "two", original["margin"], "accepted", 6)
    assert p["chosen_rollout_id"] == original["chosen_rollout_id"]
    p = review.undo(store, 2, 6, reviewer="bo")  # undoes the accept
    assert {k: p[k] for k in original if k not in ("version", "updated_at")} == {
        k: original[k] for k in original if k not in ("version", "updated_at")}
    assert p["version"] == 7
    assert [a for a, *_ in audit(store, 2)] == ["accept", "swap", "edit_chosen_answer", "undo", "undo", "undo"]
    assert [u for *_, u in audit(store, 2)] == [None, None, None, 3, 2, 1]
    with pytest.raises(DataError, match="pair 2 has nothing to undo"):
        review.undo(store, 2, 7, reviewer="bo")
    assert len(review.reviews(store, 2)) == 6


def test_undo_after_new_action(store: Store, pairs: list[int]) -> None:
    review.accept(store, 3, 1)
    review.undo(store, 3, 2)
    review.reject(store, 3, 3)
    p = review.undo(store, 3, 4)  # the reject, not the accept already undone
    assert (p["status"], p["version"]) == ("pending", 5)
    with pytest.raises(DataError, match="pair 3 has nothing to undo"):
        review.undo(store, 3, 5)  # the accept was undone already
    assert [u for *_, u in audit(store, 3)] == [None, 1, None, 3]


@pytest.mark.parametrize("act", [
    lambda s, v: review.accept(s, 1, v),
    lambda s, v: review.reject(s, 1, v),
    lambda s, v: review.swap(s, 1, v),
    lambda s, v: review.edit_box(s, 1, v, "chosen", Box(1, 1, 20, 20)),
    lambda s, v: review.edit_answer(s, 1, v, "rejected", "purple"),
    lambda s, v: review.undo(s, 1, v),
])
def test_stale_version_conflicts(store: Store, pairs: list[int], act: Any) -> None:
    review.edit_answer(store, 1, 1, "chosen", "crimson")  # another reviewer got there first
    before = review.get_pair(store, 1)
    with pytest.raises(ConflictError, match=r"pair 1 was changed by someone else \(you have version 1, "
                                            r"the store has 2, updated .*\); reload it and redo your change"):
        act(store, 1)
    assert review.get_pair(store, 1) == before
    assert len(review.reviews(store, 1)) == 1
    act(store, 2)  # with the current version it goes through
    assert review.get_pair(store, 1)["version"] == 3 and len(review.reviews(store, 1)) == 2


def test_actions_on_missing_pair(store: Store, pairs: list[int]) -> None:
    with pytest.raises(NotFoundError, match="no pair with id 42"):
        review.accept(store, 42, 1)
    assert store.db["reviews"].count == 0


def test_two_writers_on_200_pairs_lose_nothing(store: Store) -> None:
    """Two reviewers (threads, each with its own connection) act on the same 200 pairs at once:
    per pair exactly one wins, the other always gets ConflictError (never "database is locked"),
    and every winner's change is in the file."""
    import threading

    make_pairs(store, [("shapes", f"Question {n}?", 0.9, 0.1, "a", "b", None, None) for n in range(200)])
    barrier = threading.Barrier(2)
    outcome: dict[str, dict[int, str]] = {"accept": {}, "reject": {}}
    errors: list[BaseException] = []

    def reviewer(action: str) -> None:
        mine = Store(store.workspace)  # its own Store: its own connection, as another process has
        for pair_id in range(1, 201):
            version = review.get_pair(mine, pair_id)["version"]
            barrier.wait(timeout=30)
            try:
                getattr(review, action)(mine, pair_id, version, reviewer=action)
                outcome[action][pair_id] = "won"
            except ConflictError:
                outcome[action][pair_id] = "conflict"
            except BaseException as exc:  # noqa: BLE001 - any other error fails the test below
                errors.append(exc)
                outcome[action][pair_id] = repr(exc)

    threads = [threading.Thread(target=reviewer, args=(a,)) for a in ("accept", "reject")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    for pair_id in range(1, 201):
        results = {outcome["accept"][pair_id], outcome["reject"][pair_id]}
        assert results == {"won", "conflict"}, (pair_id, results)
        winner = "accept" if outcome["accept"][pair_id] == "won" else "reject"
        pair = review.get_pair(store, pair_id)
        assert (pair["status"], pair["version"]) == ({"accept": "accepted", "reject": "rejected"}[winner], 2)
        assert [(r["reviewer"], r["action"]) for r in review.reviews(store, pair_id)] == [(winner, winner)]
    assert status_counts(store)["pending"] == 0
    assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
