"""Scores that follow a reviewer's edit of a pair's box or answer.

A pair's scores were given by judges to the *rollout's* box and answer. After an edit they
describe something no longer on the pair, so each edit either re-scores the side with the judge
that scored its rollout, when that judge is a rule that runs in microseconds here (the rule
answer judges: exact, f1, anls, number, auto; the IoU crop judges, when the item has an
annotated box), or names the score in ``pairs.stale_scores`` ("edited — not re-scored"): judge
models and the policy crop judge need a server or a model load, far too slow for a key press.

Which judge scored a rollout is read from its ``scores`` JSON keys (:attr:`visrl.judges.Judge.key`,
e.g. ``answer:auto@0.5,0.05``, ``crop:iou>=0.5``), so the options are the ones generation used.

Export and training never read scores: a pair trains (or is exported) by its status, with the box
and answer as the reviewer left them. Stale scores matter only to the desk and its score filters,
and the export summary counts the exported pairs that carry them (:func:`count_stale`).
"""

from __future__ import annotations

import re
from typing import Any

from visrl.boxes import Box
from visrl.judges import IoUCropJudge, JudgeInput, JudgeOptions, RuleAnswerJudge, references
from visrl.store import Store, box_from_json, loads
from visrl.vocabulary import RULE_ANSWER_JUDGES

STALE_LABEL = "edited — not re-scored"
_RULE_ANSWER = re.compile(rf"^answer:({'|'.join(RULE_ANSWER_JUDGES)})(?:@([\d.]+)(?:,([\d.]+))?)?$")
_IOU_CROP = re.compile(r"^crop:iou(?:>=([\d.]+))?$")


def stale_set(pair: dict[str, Any]) -> set[str]:
    return set((pair.get("stale_scores") or "").split())


def stale_text(fields: set[str]) -> str | None:
    return " ".join(sorted(fields)) or None


def after_edit(store: Store, pair: dict[str, Any], side: str, box: Box | None = None,
               answer: str | None = None) -> dict[str, Any]:
    """The pair columns to store with an edit of ``side``'s box (pixels) or answer: the new
    score (and margin) when the side's judge re-scores it here, else the score named stale."""
    judges = loads(_rollout_scores(store, pair.get(f"{side}_rollout_id")), {})
    stale = stale_set(pair)
    column = f"{side}_crop_score" if box is not None else f"{side}_score"
    score = _crop_score(judges, box, box_from_json(pair.get("gt_box"))) if box is not None \
        else _answer_score(judges, answer, _references(store, pair["item_id"]))
    out: dict[str, Any] = {}
    if score is None:
        if pair.get(column) is not None:  # no score before (no crop judge): nothing goes stale
            stale.add(column)
    else:
        stale.discard(column)
        out[column] = score
        if box is None:
            other = "rejected" if side == "chosen" else "chosen"
            scores = {side: score, other: pair.get(f"{other}_score") or 0.0}
            out["margin"] = round(scores["chosen"] - scores["rejected"], 6)
    if stale != stale_set(pair):
        out["stale_scores"] = stale_text(stale)
    return out


def swapped(pair: dict[str, Any]) -> str | None:
    """``stale_scores`` after exchanging the sides."""
    turn = {"chosen": "rejected", "rejected": "chosen"}
    return stale_text({turn[f.split("_", 1)[0]] + "_" + f.split("_", 1)[1] for f in stale_set(pair)})


def count_stale(pairs: list[dict[str, Any]]) -> int:
    return sum(1 for pair in pairs if stale_set(pair))


def _rollout_scores(store: Store, rollout_id: int | None) -> str | None:
    row = store.rollout(rollout_id)
    return row["scores"] if row else None


def _references(store: Store, item_id: int) -> list[str]:
    return references(store.item(item_id))


def _answer_score(judges: dict[str, Any], answer: str | None, refs: list[str]) -> float | None:
    for key in judges:
        found = _RULE_ANSWER.match(key)
        if found:
            name, first, second = found.groups()
            opts = JudgeOptions()
            if name in ("anls", "auto") and first:
                opts.anls_threshold = float(first)
            if name == "number" and first:
                opts.number_rel_tol = float(first)
            if name == "auto" and second:
                opts.number_rel_tol = float(second)
            judged = RuleAnswerJudge(name, opts)(JudgeInput(question="", references=refs, answer=answer))
            return None if judged is None else judged.score
    return None


def _crop_score(judges: dict[str, Any], box: Box, gt: Box | None) -> float | None:
    if gt is None:
        return None
    for key in judges:
        found = _IOU_CROP.match(key)
        if found:
            threshold = float(found.group(1)) if found.group(1) else None
            judged = IoUCropJudge(threshold)(JudgeInput(question="", references=[], answer=None, box=box, gt_box=gt))
            return None if judged is None else judged.score
    return None
