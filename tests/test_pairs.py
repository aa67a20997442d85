from __future__ import annotations

import random
from typing import Any

import pytest

from visrl.errors import ConfigError
from visrl.pairs import PairsConfig, build_pairs, select_pair
from visrl.review import PairFilter, get_pair, page_pairs
from visrl.store import Store

BOX = "[1, 1, 5, 5]"


def rollout(rid: int, answer: float | None, crop: float | None = None, box: str | None = BOX,
            kind: str = "policy") -> dict[str, Any]:
    return {"id": rid, "answer_score": answer, "crop_score": crop, "box": box, "kind": kind,
            "answer": f"a{rid}"}


@pytest.mark.parametrize("rows, expected", [
    ([rollout(1, 1.0), rollout(2, 0.0)], (1, 2)),
    ([rollout(1, 0.9, 0.9), rollout(2, 1.0, 0.5), rollout(3, 0.1, 0.1)], (1, 3)),  # crop gate on chosen
    ([rollout(1, 1.0, 1.0), rollout(2, 0.0, 0.9), rollout(3, 0.2, 0.0)], (1, 3)),  # crop gate on rejected
    ([rollout(1, 1.0, 0.8, kind="random"), rollout(2, 1.0, 0.8), rollout(3, 0.0)], (2, 3)),  # policy first
    ([rollout(1, 1.0), rollout(2, 0.0, box=None), rollout(3, 0.5)], "no answer scored low enough"),
    ([rollout(1, 0.7), rollout(2, 0.0)], "no answer scored high enough"),
    ([rollout(1, 1.0, 0.1), rollout(2, 0.0, 0.0)], "chosen crop scored too low"),
    ([rollout(1, 1.0, 1.0), rollout(2, 0.0, 0.5)], "rejected crop scored too high"),
    ([rollout(1, None), rollout(2, None)], "no judged rollout with a box"),
    # A judge model replied without a score: dropped (the seed's rule), never a 0.0 rejected side.
    ([rollout(1, 1.0), {**rollout(2, None), "scores": '{"unscored": ["answer:model:j"]}'}],
     "no answer scored low enough"),
    ([rollout(1, 1.0), {**rollout(2, 0.0, 0.0), "scores": {"unscored": ["crop:model:j"]}}],
     "no answer scored low enough"),
])
def test_select_pair(rows: list[dict[str, Any]], expected: Any) -> None:
    picked = select_pair(rows, PairsConfig())
    if isinstance(expected, str):
        assert picked == expected
    else:
        assert (picked[0]["id"], picked[1]["id"]) == expected


def test_a_random_box_is_chosen_only_when_the_config_allows_it() -> None:
    # The policy's own box answered wrong, the random 'bad' box answered right: with the answer
    # judge alone that is a lucky guess, so by default there is no pair; the paper's rule pairs it.
    rows = [rollout(1, 0.0), rollout(2, 1.0, kind="random")]
    assert select_pair(rows, PairsConfig()) == "only a random box scored high enough"
    picked = select_pair(rows, PairsConfig(random_chosen=True))
    assert (picked[0]["id"], picked[1]["id"]) == (2, 1)
    # A random box stays a rejected candidate either way.
    picked = select_pair([rollout(3, 1.0), rollout(4, 0.0, kind="random")], PairsConfig())
    assert (picked[0]["id"], picked[1]["id"]) == (3, 4)


def test_equal_scores_never_pair() -> None:
    cfg = PairsConfig(min_chosen_score=0.5, max_rejected_score=0.5)
    assert select_pair([rollout(1, 0.5), rollout(2, 0.5)], cfg) == "best and worst scores are equal"


def test_config_validates() -> None:
    with pytest.raises(ConfigError, match=r"min_chosen_score must lie in \[0, 1\], got 1.5"):
        PairsConfig(min_chosen_score=1.5)
    with pytest.raises(ConfigError, match="run_key or a dataset"):
        build_pairs(None, PairsConfig())  # type: ignore[arg-type]


def _random_run(store: Store, n_items: int, seed: int) -> None:
    """Items with 6 rollouts each, random scores (some missing crops, some failed boxes)."""
    rng = random.Random(seed)
    dataset_id = store.add_dataset("prop", "test")
    ids = store.add_items(dataset_id, [
        {"split": "train", "source_id": str(i), "image": f"images/{i}.png", "width": 10, "height": 10,
         "question": "q?", "answer": "a"} for i in range(n_items)])
    for item_id in ids:
        with_crop = rng.random() < 0.7
        for attempt in range(3):
            for kind in ("policy", "random"):
                failed = rng.random() < 0.1
                store.add_rollout({
                    "run_key": "run", "item_id": item_id, "attempt": attempt, "kind": kind,
                    "box": None if failed else BOX, "answer": f"{attempt}{kind}",
                    "answer_score": 0.0 if failed else rng.choice([0.0, 0.1, 0.2, 0.5, 0.8, 0.9, 1.0]),
                    "crop_score": rng.random() if with_crop else None})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_stored_pair_satisfies_thresholds(store: Store, seed: int) -> None:
    _random_run(store, 40, seed)
    cfg = PairsConfig()
    report = build_pairs(store, cfg, run_key="run")
    pairs = page_pairs(store, PairFilter(status=None), limit=1000)
    assert report.items == 40 and report.pairs_added == len(pairs) == report.pairs_total > 0
    assert report.pairs_added + sum(report.skipped.values()) == 40
    assert len({p["item_id"] for p in pairs}) == len(pairs)  # one pair per item
    for pair in pairs:
        assert pair["status"] == "pending" and pair["source"] == "run"
        assert pair["chosen_score"] >= 0.8 and pair["rejected_score"] <= 0.2
        assert pair["chosen_score"] > pair["rejected_score"]
        assert pair["chosen_box"] == BOX and pair["rejected_box"] == BOX
        if pair["chosen_crop_score"] is not None:
            assert pair["chosen_crop_score"] >= 0.8
        if pair["rejected_crop_score"] is not None:
            assert pair["rejected_crop_score"] <= 0.2
    again = build_pairs(store, cfg, run_key="run")
    assert again.pairs_added == 0 and again.pairs_total == len(pairs)
    assert again.skipped["already paired"] == len(pairs)


def test_pairs_by_dataset_and_thresholds(store: Store) -> None:
    _random_run(store, 30, 5)
    strict = build_pairs(store, PairsConfig(),
                         dataset="prop", source="strict")
    loose = build_pairs(store, PairsConfig(min_chosen_score=0.5, max_rejected_score=0.5,
                                           min_chosen_crop_score=0.0, max_rejected_crop_score=1.0),
                        dataset="prop", source="loose")
    assert 0 < strict.pairs_added < loose.pairs_added
    pair = get_pair(store, page_pairs(store, PairFilter(status=None), limit=1)[0]["id"])
    assert pair["margin"] == pytest.approx(pair["chosen_score"] - pair["rejected_score"])


LOOSE = PairsConfig(min_chosen_score=0.5, max_rejected_score=0.5, min_chosen_crop_score=0.0,
                    max_rejected_crop_score=1.0)


def _pending(store: Store, source: str) -> dict[int, tuple[int, int]]:
    return {p["item_id"]: (p["chosen_rollout_id"], p["rejected_rollout_id"])
            for p in page_pairs(store, PairFilter(status="pending"), limit=1000) if p["source"] == source}


def test_rebuilding_with_new_thresholds_keeps_exactly_their_pairs_and_reviewed_ones(store: Store) -> None:
    from visrl.review import accept, edit_answer, reject

    _random_run(store, 60, 7)
    loose = build_pairs(store, LOOSE, run_key="run")
    by_item: dict[int, list[dict[str, Any]]] = {}
    for row in store.rollouts(run_key="run"):
        by_item.setdefault(row["item_id"], []).append(row)
    picks = {i: select_pair(rows, PairsConfig()) for i, rows in by_item.items()}
    strict_picks = {i: (p[0]["id"], p[1]["id"]) for i, p in picks.items() if not isinstance(p, str)}
    assert 0 < len(strict_picks) < loose.pairs_total
    # A person reviews three loose pairs that the strict thresholds would not pick.
    doomed = [p for p in page_pairs(store, PairFilter(status="pending"), limit=1000)
              if p["source"] == "run" and strict_picks.get(p["item_id"]) !=
              (p["chosen_rollout_id"], p["rejected_rollout_id"])]
    assert len(doomed) >= 4
    accept(store, doomed[0]["id"], doomed[0]["version"])
    reject(store, doomed[1]["id"], doomed[1]["version"])
    edit_answer(store, doomed[2]["id"], doomed[2]["version"], "chosen", "fixed by hand")
    reviewed = {p["item_id"] for p in doomed[:3]}

    strict = build_pairs(store, PairsConfig(), run_key="run")
    assert strict.kept_reviewed == 3
    assert strict.pairs_removed == len(doomed) - 3  # every untouched pair strict would not pick
    pending = _pending(store, "run")
    # Exactly the strict picks, except where a reviewed pair holds the item's place.
    assert pending == {i: ids for i, ids in strict_picks.items() if i not in reviewed} | (
        {doomed[2]["item_id"]: (doomed[2]["chosen_rollout_id"], doomed[2]["rejected_rollout_id"])})
    statuses = {p["item_id"]: p["status"] for p in page_pairs(store, PairFilter(status=None), limit=1000)
                if p["source"] == "run"}
    assert (statuses[doomed[0]["item_id"]], statuses[doomed[1]["item_id"]]) == ("accepted", "rejected")
    # Loose again: the removed pairs come back, the reviewed ones are untouched.
    again = build_pairs(store, LOOSE, run_key="run")
    loose_picks = {i: select_pair(rows, LOOSE) for i, rows in by_item.items()}
    assert _pending(store, "run") == {i: (p[0]["id"], p[1]["id"]) for i, p in loose_picks.items()
                                      if not isinstance(p, str) and i not in reviewed} | (
        {doomed[2]["item_id"]: (doomed[2]["chosen_rollout_id"], doomed[2]["rejected_rollout_id"])})
    assert again.pairs_total == loose.pairs_total and again.kept_reviewed == 0
