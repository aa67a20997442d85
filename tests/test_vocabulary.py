"""Each shared vocabulary is defined once, in visrl/vocabulary.py; a copy anywhere else fails.

A copy is a tuple, list or set literal in visrl/ or visrl_app/ holding two or more names of one
vocabulary (the app's Generate tab listed the crop judges without ``policy``). Dict keys are
dispatch tables, not lists of choices, and a literal on the right of ``in`` tests a subset the
code treats alike (``fmt in ("qwen2", "qwen3")``): neither counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from visrl import vocabulary
from visrl.vocabulary import (
    ANSWER_JUDGES,
    BOX_FORMATS,
    CROP_JUDGES,
    JOB_STATUSES,
    PAIR_STATUSES,
    PROMPT_LAYOUTS,
)

REPO = Path(__file__).resolve().parents[1]
DEFINING = REPO / "visrl" / "vocabulary.py"
VOCABULARIES = {"box formats": BOX_FORMATS, "prompt layouts": PROMPT_LAYOUTS, "answer judges": ANSWER_JUDGES,
                "crop judges": CROP_JUDGES, "pair statuses": PAIR_STATUSES, "job statuses": JOB_STATUSES}

def _membership_tests(tree: ast.AST) -> set[int]:
    """ids of the literals on the right of ``in`` / ``not in``."""
    return {id(right) for node in ast.walk(tree) if isinstance(node, ast.Compare)
            for op, right in zip(node.ops, node.comparators, strict=True) if isinstance(op, ast.In | ast.NotIn)}


def copies(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, vocabulary, names) of each literal in ``path`` that copies part of a vocabulary."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _membership_tests(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Tuple | ast.List | ast.Set) or id(node) in skip:
            continue
        names = {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
        for vocabulary_name, words in VOCABULARIES.items():
            shared = sorted(names & set(words))
            if len(shared) >= 2:
                found.append((node.lineno, vocabulary_name, shared))
    return found


def test_no_copy_of_a_vocabulary_outside_its_module() -> None:
    found = []
    for path in sorted([*(REPO / "visrl").rglob("*.py"), *(REPO / "visrl_app").rglob("*.py")]):
        if path == DEFINING:
            continue
        relative = path.relative_to(REPO).as_posix()
        found += [f"{relative}:{line} copies the {name} {shared}" for line, name, shared in copies(path)]
    assert found == [], "import these from visrl.vocabulary instead:\n" + "\n".join(found)


@pytest.mark.parametrize("source, expected", [
    ('CHOICES = ["pending", "accepted", "any"]', [(1, "pair statuses", ["accepted", "pending"])]),
    ('JUDGES = ("iou", "iou_threshold", "model", "none")', [(1, "crop judges", ["iou", "iou_threshold", "model", "none"])]),
    ('if fmt in ("qwen2", "qwen3"):\n    pass', []),  # a subset treated alike
    ('LIMIT = {"viscot": 1.0, "normalized": 1.0}', []),  # a dispatch table
    ('ONE = ("model", "float32")', []),
])
def test_copies_finds_list_literals(tmp_path: Path, source: str, expected: list[tuple[int, str, list[str]]]) -> None:
    path = tmp_path / "module.py"
    path.write_text(source + "\n")
    assert copies(path) == expected


def test_derived_names_come_from_the_vocabularies() -> None:
    assert vocabulary.DECIDED_PAIR_STATUSES == ("accepted", "rejected")
    assert vocabulary.ACTIVE_JOB_STATUSES == ("queued", "running", "stopping")
    assert vocabulary.FINAL_JOB_STATUSES == ("succeeded", "failed", "stopped")
    assert vocabulary.RULE_ANSWER_JUDGES == ("auto", "exact", "f1", "anls", "number")
    assert "policy" in CROP_JUDGES and ANSWER_JUDGES[-1] == "model"


def test_the_old_names_are_the_same_objects() -> None:
    """Modules that exported a vocabulary before keep the name, bound to the one definition."""
    from visrl import boxes, desk, jobs, judges, prompts, review
    from visrl.formats import INPUT_BOX_FORMATS

    assert boxes.BOX_FORMATS is BOX_FORMATS and prompts.LAYOUTS is PROMPT_LAYOUTS
    assert judges.ANSWER_JUDGES is ANSWER_JUDGES and judges.CROP_JUDGES is CROP_JUDGES
    assert review.STATUSES is PAIR_STATUSES and desk.DECIDED is vocabulary.DECIDED_PAIR_STATUSES
    assert jobs.ACTIVE is vocabulary.ACTIVE_JOB_STATUSES
    assert INPUT_BOX_FORMATS == ("pixels", "viscot", "qwen2", "qwen3", "normalized")  # no qwen2_5: its frame is unknown
