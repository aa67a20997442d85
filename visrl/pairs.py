"""Preference pairs from judged rollouts (the method's filter, DESIGN.md step 2).

An item yields one pair when its rollouts separate clearly: the *chosen* rollout has an answer
score >= ``min_chosen_score`` (0.8) and, when a crop judge scored it, a crop score >=
``min_chosen_crop_score`` (0.8); the *rejected* one has an answer score <= ``max_rejected_score``
(0.2) and, when scored, a crop score <= ``max_rejected_crop_score`` (0.2); and the chosen score is
strictly higher. Among several candidates the best (answer, then crop score, policy samples
first) is chosen and the worst rejected. Rollouts without a box (failed parses) are never used:
the curator could not see them and stage 2 has no crop to answer on; nor are rollouts a judge
model replied to without a score (:data:`UNSCORED`; the seed drops them too, a 0.0 could make
them a rejected side). Pairs are stored pending. Running this again with other thresholds leaves
exactly the pairs they allow: a pending pair that no longer qualifies is removed (or replaced by
the new pick), while a pair a person already reviewed is kept and counted as such.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from visrl.errors import ConfigError
from visrl.review import add_pair, remove_unreviewed_pair, source_pairs
from visrl.store import Store
from visrl.vocabulary import POLICY_ROLLOUT, RANDOM_ROLLOUT

UNSCORED = "unscored"  # key of a rollout's scores JSON: the judges that replied without a score


def is_unscored(rollout: dict[str, Any]) -> bool:
    """True when a judge model replied to this rollout without a usable score."""
    scores = rollout.get("scores")
    if isinstance(scores, str):
        try:
            scores = json.loads(scores)
        except ValueError:
            return False
    return isinstance(scores, dict) and bool(scores.get(UNSCORED))


# Measured on the demo task (3 answers, answer judge alone): of 264 pairs whose chosen side was a
# random box, 8 had it on the named object; of 729 whose chosen side the model sampled, 80% did.
RANDOM_CHOSEN_HELP = (
    "A random box (rollout kind 'random': the 'bad' box drawn off the first sample) may be the chosen "
    "side. Off: it is a rejected candidate only, since its crop shows no object the model picked, an "
    "answer on it is right by chance (a guess among few answers passes the answer judge), and the "
    "pair would teach a box the model never sampled. On: the paper's 'best becomes chosen' over every "
    "rollout, safe with a crop judge beside the answer judge.")


@dataclass
class PairsConfig:
    """Thresholds of the pair filter; answer and crop scores are in [0, 1]."""

    min_chosen_score: float = field(default=0.8, metadata={"help": "Chosen answer score at least this."})
    max_rejected_score: float = field(default=0.2, metadata={"help": "Rejected answer score at most this."})
    min_chosen_crop_score: float = field(default=0.8, metadata={
        "help": "Chosen crop score at least this, when a crop judge scored the rollout."})
    max_rejected_crop_score: float = field(default=0.2, metadata={
        "help": "Rejected crop score at most this, when a crop judge scored the rollout."})
    random_chosen: bool = field(default=False, metadata={"help": RANDOM_CHOSEN_HELP})

    def __post_init__(self) -> None:
        for name in ("min_chosen_score", "max_rejected_score", "min_chosen_crop_score",
                     "max_rejected_crop_score"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must lie in [0, 1], got {value}")


@dataclass
class PairsReport:
    items: int  # items with rollouts considered
    pairs_added: int  # new pairs stored now
    pairs_total: int  # pairs of this source after the call
    skipped: dict[str, int]  # why the other items gave no (new) pair
    pairs_removed: int = 0  # pending pairs these thresholds no longer allow (or replaced by a new pick)
    kept_reviewed: int = 0  # pairs they would not pick, kept because a person reviewed them
    unscored: int = 0  # rollouts dropped: a judge model replied without a score


def select_pair(rollouts: list[dict[str, Any]], cfg: PairsConfig) -> tuple[dict, dict] | str:
    """(chosen, rejected) rollout rows of one item, or the reason there is no pair."""
    usable = [r for r in rollouts if r.get("box") and r.get("answer_score") is not None and not is_unscored(r)]
    if not usable:
        return "no judged rollout with a box"
    scores = [r["answer_score"] for r in usable]
    if max(scores) < cfg.min_chosen_score:
        return "no answer scored high enough"
    if min(scores) > cfg.max_rejected_score:
        return "no answer scored low enough"
    chosen = [r for r in usable if r["answer_score"] >= cfg.min_chosen_score
              and _crop_ok(r, lambda c: c >= cfg.min_chosen_crop_score)]
    if not chosen:
        return "chosen crop scored too low"
    if not cfg.random_chosen:
        chosen = [r for r in chosen if r.get("kind") != RANDOM_ROLLOUT]
        if not chosen:
            return "only a random box scored high enough"
    rejected = [r for r in usable if r["answer_score"] <= cfg.max_rejected_score
                and _crop_ok(r, lambda c: c <= cfg.max_rejected_crop_score)]
    if not rejected:
        return "rejected crop scored too high"
    best = max(chosen, key=lambda r: (r["answer_score"], r.get("crop_score") or 0.0,
                                      r.get("kind") == POLICY_ROLLOUT, -r["id"]))
    worst = min(rejected, key=lambda r: (r["answer_score"], r.get("crop_score") or 0.0, r["id"]))
    if best["answer_score"] <= worst["answer_score"]:
        return "best and worst scores are equal"
    return best, worst


def _crop_ok(rollout: dict[str, Any], test: Any) -> bool:
    crop = rollout.get("crop_score")
    return crop is None or bool(test(crop))


def build_pairs(store: Store, cfg: PairsConfig, run_key: str | None = None,
                dataset: str | None = None, split: str | None = None,
                source: str | None = None) -> PairsReport:
    """Store a pending pair for every item of a run (or of a dataset's rollouts) that passes.

    ``source`` is the pairs' provenance (default: the run key, else ``dataset:<name>``).
    """
    if run_key is None and dataset is None:
        raise ConfigError("build_pairs needs a run_key or a dataset")
    source = source or run_key or f"dataset:{dataset}"
    rollouts = store.rollouts(run_key=run_key)
    if dataset is not None:
        item_ids = {item["id"] for item in store.items(dataset, split)}
        rollouts = [r for r in rollouts if r["item_id"] in item_ids]
    by_item: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for rollout in rollouts:
        by_item[rollout["item_id"]].append(rollout)
    existing: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for pair in source_pairs(store, source, sorted(by_item)):
        existing[pair["item_id"]].append(pair)
    before = _count(store, source)
    skipped: Counter[str] = Counter()
    removed = kept = 0
    with store.atomic():
        for item_id, rows in sorted(by_item.items()):
            picked = select_pair(rows, cfg)
            wanted = None if isinstance(picked, str) else (picked[0]["id"], picked[1]["id"])
            have = existing.get(item_id, [])
            # One pair per item and source: a pair a person reviewed stays whatever the
            # thresholds say; an untouched pending pair stays only if they still pick it.
            keep = [p for p in have if p["reviewed"] or _rollout_ids(p) == wanted]
            for pair in have:
                if pair in keep:
                    continue
                if remove_unreviewed_pair(store, pair["id"]):
                    removed += 1
                else:  # reviewed since source_pairs read it
                    keep.append({**pair, "reviewed": True})
            if any(_rollout_ids(p) == wanted for p in keep):
                skipped["already paired"] += 1
                continue
            if keep:
                kept += len(keep)  # reviewed pairs the new thresholds would not pick
                continue
            if isinstance(picked, str):
                skipped[picked] += 1
                continue
            add_pair(store, item_id, picked[0], picked[1], source=source)
    total = _count(store, source)
    return PairsReport(items=len(by_item), pairs_added=total - before + removed, pairs_total=total,
                       skipped=dict(skipped), pairs_removed=removed, kept_reviewed=kept,
                       unscored=sum(is_unscored(r) for r in rollouts))


def _rollout_ids(pair: dict[str, Any]) -> tuple[int, int]:
    return pair["chosen_rollout_id"], pair["rejected_rollout_id"]


def _count(store: Store, source: str) -> int:
    return store.count_source_pairs(source)
