"""bench/crop_reading.py's crops: grown and shrunk boxes, and the object the question does not name."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import load_script

from visrl.boxes import Box
from visrl.demo import demo_data
from visrl.synthetic import SyntheticConfig, render_item


@pytest.fixture(scope="module")
def bench() -> Any:
    return load_script("bench/crop_reading.py", "crop_reading_bench")


@pytest.mark.parametrize("share, expected", [
    (0.1, Box(90, 40, 210, 160)),     # 10% of a 100 x 100 box: 10 px out on each side
    (-0.1, Box(110, 60, 190, 140)),
    (0.5, Box(50, 0, 250, 200)),      # clamped at the top (y1 -50 -> 0)
])
def test_grown_moves_every_side_by_a_share_of_the_box(bench: Any, share: float, expected: Box) -> None:
    assert bench.grown(Box(100, 50, 200, 150), share, (448, 336)) == expected


def test_other_object_is_never_the_named_one_and_answers_otherwise(bench: Any) -> None:
    data = SyntheticConfig(**demo_data())
    for i in range(20):
        scene = render_item(data, "val", i)
        other = bench.other_object(scene)
        assert other is not scene.target_object
        assert other.detail_answer != scene.answer  # distinct details: a wrong crop answers wrong
