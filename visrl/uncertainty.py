"""How sure an evaluation's numbers are: 95% intervals, and when a difference is one.

Every metric the evaluator writes is a share or a mean of per-item scores in [0, 1]
(Acc@0.5, box parse rate, answer accuracy, mean IoU). Its interval is the **Wilson score
interval** on the metric's own item count ``n`` (``n_box`` for the box metrics, the scored answers
for the accuracies; :func:`metric_n`). For a 0/1 share that is the textbook interval; for a mean
of graded scores (mean IoU, F1/ANLS judges) it is conservative, because a mean ``m`` of values in
[0, 1] has a variance of at most ``m (1 - m)`` (Bhatia-Davis), the binomial one Wilson assumes.

Where a result is a mean over training seeds (the learning benchmark stores ``METRIC_std`` and
``seeds``), the seeds' spread is a second, independent source of noise (every seed was scored on
the same items, so the spread says nothing about the item sample): the interval is the Wilson
one widened by the seed term ``t(seeds-1) * std / sqrt(seeds)``, the two half-widths added in
quadrature. A spread without a seed count is taken as one run's (``1.96 * std``).

**The rule** (:func:`verdict`): a difference is "better" or "worse" only when the two 95%
intervals do not overlap; otherwise it is "within noise". Non-overlap is stricter than a
two-proportion z-test at 95% (for two equal intervals it is a test at about 99.4%): a real but
small gain can read "within noise", but noise never reads "better". Results on different item
sets (another dataset or split, or another ``n``) are still compared, and flagged
(:func:`same_items`): their intervals hold, but a harder item set moves the number too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

Z95 = 1.959964  # two-sided 95% normal quantile
# Two-sided 95% Student-t quantiles by degrees of freedom (seeds - 1); above 30, Z95 is close enough.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
       10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
       18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060,
       26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}

# The metrics with an interval, each with how its own n is read from the metrics (see metric_n).
SHARES = ("acc50", "mean_iou", "parse_rate", "answer_acc", "direct_answer_acc", "true_crop_answer_acc")
BETTER, WORSE, NOISE = "better", "worse", "within noise"


@dataclass(frozen=True)
class Interval:
    """A metric's value, its 95% interval ``[low, high]`` and the items ``n`` behind it."""

    value: float
    low: float
    high: float
    n: int
    method: str  # "wilson", or "wilson+seeds" when a seed spread widened it

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "low": round(self.low, 4), "high": round(self.high, 4), "method": self.method}

    def text(self, digits: int = 3) -> str:
        """``0.275 [0.160, 0.430], n=40``."""
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}], n={self.n}"


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``successes`` out of ``n`` (``successes`` may be a sum of
    graded scores in [0, 1]). ``n`` = 0 says nothing: ``(0.0, 1.0)``."""
    if n <= 0:
        return 0.0, 1.0
    p = min(1.0, max(0.0, successes / n))
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def seed_half_width(std: float, seeds: int | None) -> float:
    """95% half-width of a mean over ``seeds`` runs with spread ``std``; one run's when the count
    is unknown or 1 (a single run's spread is then all there is to go on)."""
    if not seeds or seeds < 2:
        return Z95 * std
    return T95.get(seeds - 1, Z95) * std / math.sqrt(seeds)


def metric_n(metrics: dict[str, Any], name: str, n: int) -> int:
    """The items ``name`` is a share of: boxed items for the box metrics, scored answers for the
    accuracies (visrl.evaluate leaves unscored ones out), else all ``n``."""
    def count(key: str) -> int | None:
        value = metrics.get(key)
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    if name in ("acc50", "mean_iou"):
        boxed = count("n_box")
        return boxed if boxed is not None else n
    if name in ("answer_acc", "direct_answer_acc"):
        unscored = count("unscored" if name == "answer_acc" else "direct_unscored") or 0
        return max(0, n - unscored)
    return n


def interval(metrics: dict[str, Any], name: str, n: int) -> Interval | None:
    """``name``'s 95% interval from an evaluation's ``metrics`` over ``n`` items; None for a metric
    that is not a share (seconds, items/s, pairs) or has no value."""
    value = metrics.get(name)
    if name not in SHARES or not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    own_n = metric_n(metrics, name, n)
    low, high = wilson(float(value) * own_n, own_n)
    std, seeds = metrics.get(name + "_std"), metrics.get("seeds")
    if not isinstance(std, (int, float)) or std <= 0:
        return Interval(float(value), low, high, own_n, "wilson")
    extra = seed_half_width(float(std), int(seeds) if isinstance(seeds, (int, float)) else None)
    low = float(value) - math.hypot(float(value) - low, extra)
    high = float(value) + math.hypot(high - float(value), extra)
    return Interval(float(value), max(0.0, low), min(1.0, high), own_n, "wilson+seeds")


def intervals(metrics: dict[str, Any], n: int) -> dict[str, dict[str, Any]]:
    """Every share's interval, as ``metrics.json`` records them (``{"acc50": {"n", "low", "high",
    "method"}, ...}``)."""
    out = {}
    for name in SHARES:
        found = interval(metrics, name, n)
        if found is not None:
            out[name] = found.to_dict()
    return out


def verdict(candidate: Interval | None, baseline: Interval | None) -> str:
    """"better" / "worse" when the 95% intervals do not overlap, else "within noise" (module doc).
    Without an interval on either side nothing can be said: "within noise"."""
    if candidate is None or baseline is None:
        return NOISE
    if candidate.low > baseline.high:
        return BETTER
    if candidate.high < baseline.low:
        return WORSE
    return NOISE


def same_items(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two stored evaluations scored the same items: same dataset, split and n (an eval
    takes a split's first n items, so these pin the set down)."""
    return (a.get("dataset"), a.get("split"), a.get("n")) == (b.get("dataset"), b.get("split"), b.get("n"))
