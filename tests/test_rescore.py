"""Scores follow a reviewer's edits: re-scored by the pair's rule judges, else marked stale."""

from __future__ import annotations

from typing import Any

import pytest

from visrl import rescore, review
from visrl.boxes import Box
from visrl.store import Store

GT = Box(10, 10, 40, 40)


def judged_pair(store: Store, answer_key: str | None, crop_key: str | None) -> dict[str, Any]:
    """One pair on a 100x80 image whose rollouts were scored by the judges named by ``*_key``
    (None: a judge model, whose key cannot be re-run here)."""
    dataset = store.add_dataset("d", "test")
    [item_id] = store.add_items(dataset, [{"split": "train", "source_id": "0", "image": "images/0.png",
                                           "width": 100, "height": 80, "question": "What colour?",
                                           "answer": "red", "gt_box": GT}])
    def rollout(box: Box, answer: str, score: float, crop: float) -> dict[str, Any]:
        scores = {answer_key or "answer:model:judge": score, crop_key or "crop:model:judge": crop}
        rid = store.add_rollout({"item_id": item_id, "kind": "policy", "box": box, "answer": answer,
                                 "answer_score": score, "crop_score": crop, "scores": scores})
        return store.db["rollouts"].get(rid)
    pair_id = review.add_pair(store, item_id, rollout(GT, "red", 1.0, 1.0), rollout(Box(60, 40, 90, 70), "blue", 0.0, 0.0))
    return review.get_pair(store, pair_id)


@pytest.mark.parametrize("crop_key, expected", [("crop:iou", 0.0), ("crop:iou>=0.5", 0.0)])
def test_a_box_dragged_onto_background_is_rescored(store: Store, crop_key: str, expected: float) -> None:
    """Issue 19: a box dragged onto background kept "crop score 1.00, margin 1.00"."""
    pair = judged_pair(store, "answer:auto@0.5,0.05", crop_key)
    after = review.edit_box(store, pair["id"], 1, "chosen", Box(60, 5, 95, 30))
    assert (after["chosen_crop_score"], after["stale_scores"]) == (expected, None)
    back = review.edit_box(store, pair["id"], 2, "chosen", Box(11, 10, 40, 40))
    assert back["chosen_crop_score"] == (pytest.approx(0.9667, abs=1e-4) if crop_key == "crop:iou" else 1.0)


def test_an_edited_answer_is_rescored_with_the_margin(store: Store) -> None:
    pair = judged_pair(store, "answer:exact", "crop:iou")
    after = review.edit_answer(store, pair["id"], 1, "chosen", "green")
    assert (after["chosen_score"], after["margin"], after["stale_scores"]) == (0.0, 0.0, None)
    after = review.edit_answer(store, pair["id"], 2, "rejected", "Red.")
    assert (after["rejected_score"], after["margin"]) == (1.0, -1.0)


def test_what_cannot_be_rescored_here_is_marked_stale_and_follows_swap_and_undo(store: Store) -> None:
    pair = judged_pair(store, None, None)  # judge models: a server call, not a key press
    after = review.edit_box(store, pair["id"], 1, "chosen", Box(60, 5, 95, 30))
    assert after["chosen_crop_score"] == 1.0 and rescore.stale_set(after) == {"chosen_crop_score"}
    after = review.edit_answer(store, pair["id"], 2, "rejected", "crimson")
    assert rescore.stale_set(after) == {"chosen_crop_score", "rejected_score"}
    swapped = review.swap(store, pair["id"], 3)
    assert rescore.stale_set(swapped) == {"rejected_crop_score", "chosen_score"}
    undone = review.undo(store, pair["id"], 4)
    undone = review.undo(store, pair["id"], undone["version"])
    assert rescore.stale_set(undone) == {"chosen_crop_score"}
    assert rescore.count_stale([undone, pair]) == 1
