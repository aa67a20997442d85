"""visrl.uncertainty: Wilson intervals, seed spreads, and the better / worse / within-noise rule."""

from __future__ import annotations

import pytest

from visrl.uncertainty import (
    Interval,
    interval,
    intervals,
    metric_n,
    same_items,
    seed_half_width,
    verdict,
    wilson,
)


@pytest.mark.parametrize(("successes", "n", "low", "high"), [
    (20, 40, 0.3520, 0.6480),
    (0, 40, 0.0, 0.0876),   # no success still leaves room above 0
    (40, 40, 0.9124, 1.0),
    (51, 200, 0.1996, 0.3196),  # the demo model's Acc@0.5 (0.255 on 200 items)
    (11, 40, 0.1611, 0.4283),
    (1, 1, 0.2065, 1.0),
    (0, 0, 0.0, 1.0),  # no items: no information
])
def test_wilson_values(successes: int, n: int, low: float, high: float) -> None:
    got = wilson(successes, n)
    assert got == pytest.approx((low, high), abs=5e-5)


def test_interval_uses_each_metrics_own_n() -> None:
    metrics = {"acc50": 0.5, "answer_acc": 0.5, "parse_rate": 0.5, "n_box": 20, "unscored": 4, "seconds": 3.0}
    assert metric_n(metrics, "acc50", 40) == 20  # boxed items only
    assert metric_n(metrics, "answer_acc", 40) == 36  # unscored answers are out of the accuracy
    assert metric_n(metrics, "parse_rate", 40) == 40
    got = interval(metrics, "parse_rate", 40)
    assert got is not None and (got.n, round(got.low, 3), round(got.high, 3)) == (40, 0.352, 0.648)
    assert interval(metrics, "seconds", 40) is None  # not a share: no interval, no verdict
    assert interval({"acc50": None}, "acc50", 40) is None
    assert intervals(metrics, 40)["acc50"] == {"n": 20, "low": 0.2993, "high": 0.7007, "method": "wilson"}
    assert set(intervals(metrics, 40)) == {"acc50", "answer_acc", "parse_rate"}


def test_seed_spread_widens_the_interval() -> None:
    assert seed_half_width(0.03, 3) == pytest.approx(4.303 * 0.03 / 3 ** 0.5)
    assert seed_half_width(0.03, None) == pytest.approx(1.959964 * 0.03)  # count unknown: one run's spread
    items_only = interval({"acc50": 0.26}, "acc50", 200)
    seeded = interval({"acc50": 0.26, "acc50_std": 0.03, "seeds": 3}, "acc50", 200)
    assert items_only is not None and seeded is not None
    assert (round(items_only.low, 3), round(items_only.high, 3)) == (0.204, 0.325)
    # Wilson's half-widths and the seed term 0.0745 add in quadrature.
    assert (round(seeded.low, 3), round(seeded.high, 3), seeded.method) == (0.167, 0.359, "wilson+seeds")
    zero = interval({"acc50": 0.26, "acc50_std": 0.0, "seeds": 1}, "acc50", 200)  # the demo's 1 seed
    assert zero == items_only


def share(value: float, n: int) -> Interval:
    found = interval({"acc50": value}, "acc50", n)
    assert found is not None
    return found


@pytest.mark.parametrize(("candidate", "baseline", "expected"), [
    # The cases: +0.020 on 40 items against 200, and +0.005 on 200 against 200.
    (share(0.275, 40), share(0.255, 200), "within noise"),
    (share(0.260, 200), share(0.255, 200), "within noise"),
    (share(0.215, 200), share(0.255, 200), "within noise"),  # the control's -0.040: still noise
    (share(0.60, 200), share(0.255, 200), "better"),
    (share(0.10, 200), share(0.255, 200), "worse"),
    (share(0.40, 40), share(0.255, 200), "within noise"),  # +0.145, but 40 items cannot tell
    (None, share(0.255, 200), "within noise"),
])
def test_verdict_calls_a_difference_only_when_intervals_do_not_overlap(
        candidate: Interval | None, baseline: Interval, expected: str) -> None:
    assert verdict(candidate, baseline) == expected


def test_same_items_needs_dataset_split_and_n() -> None:
    base = {"dataset": "demo", "split": "test", "n": 200}
    assert same_items(base, dict(base))
    assert not same_items(base, {**base, "n": 40})
    assert not same_items(base, {**base, "split": "test (model card)"})
    assert not same_items(base, {**base, "dataset": "shapes"})
