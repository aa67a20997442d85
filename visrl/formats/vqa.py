"""Import of plain VQA data: JSON (a list) or JSONL (one record per line).

    {"image": "imgs/1.jpg", "question": "What is written on the sign?", "answer": "stop",
     "answers": ["stop", "stop sign"],          # optional alternatives (VQAv2-style)
     "box": [12, 30, 88, 64], "box_format": "pixels",   # optional ground-truth region
     "split": "train", "id": "q1"}              # optional

``answer`` or ``answers`` (or both) must be present; with only ``answers`` the first is the
reference, the rest are alternatives that the answer judge also accepts (stored in the item's
meta). ``box_format`` is one of ``pixels`` (default; absolute pixels of the image), ``viscot``,
``normalized``, ``qwen2``, ``qwen3`` (see :mod:`visrl.boxes`). Boxes and ``width``/``height`` are
of the upright image, as a viewer shows it (a phone photo's EXIF orientation applied, as
annotation tools do; :mod:`visrl.formats.images`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from visrl.formats import (
    INPUT_BOX_FORMATS,
    ImageSource,
    check_declared_size,
    check_keys,
    commit_import,
    record_error,
    start_import,
    strict_box,
)
from visrl.store import Store

REQUIRED = ("image", "question")
OPTIONAL = ("answer", "answers", "box", "box_format", "split", "id", "question_id", "width", "height")


def import_vqa(store: Store, path: str | Path, dataset: str, split: str | None = None,
               image_root: str | Path | None = None, box_format: str = "pixels") -> dict[str, Any]:
    """Import a plain VQA JSON/JSONL file as items of ``dataset`` (all or nothing)."""
    records, plan = start_import(store, path, dataset, "vqa", image_root)
    path, images = plan.path, plan.images
    plan.items = [vqa_item(path, i, r, images, split, box_format) for i, r in enumerate(records)]
    return commit_import(store, plan)


def vqa_item(path: Path, index: int, record: dict[str, Any], images: ImageSource,
             split: str | None, box_format: str) -> dict[str, Any]:
    check_keys(path, index, record, REQUIRED, OPTIONAL)
    placed = images.get(record["image"], index, "image")
    size = placed.size
    check_declared_size(path, index, record, placed)
    question = record["question"]
    if not isinstance(question, str) or not question.strip():
        raise record_error(path, index, "question", "must be a non-empty string")
    answer, alternatives = _answers(path, index, record)
    gt_box = None
    if record.get("box") is not None:
        fmt = record.get("box_format", box_format)
        if fmt not in INPUT_BOX_FORMATS:
            raise record_error(path, index, "box_format",
                               f"{fmt!r} is not one of {', '.join(INPUT_BOX_FORMATS)}")
        gt_box = strict_box(record["box"], fmt, size, f"{path.name}: record {index}, field 'box'")
    meta = {"answers": alternatives} if alternatives else {}
    source_id = record.get("id", record.get("question_id", index))
    return {"split": split or str(record.get("split") or "train"), "source_id": str(source_id),
            "image": placed.relative, "width": size[0], "height": size[1],
            "question": question.strip(), "answer": answer, "gt_box": gt_box, "meta": meta}


def _answers(path: Path, index: int, record: dict[str, Any]) -> tuple[str, list[str]]:
    """(reference answer, alternatives) from ``answer`` and/or ``answers``."""
    answers = record.get("answers")
    if answers is not None:
        # VQAv2 writes [{"answer": "..."}, ...]; plain lists of strings are accepted too.
        if not isinstance(answers, list) or not answers:
            raise record_error(path, index, "answers", "must be a non-empty list of strings")
        answers = [a.get("answer") if isinstance(a, dict) else a for a in answers]
        if not all(_is_answer(a) for a in answers):
            raise record_error(path, index, "answers", "must be a list of strings")
        answers = [str(a).strip() for a in answers]
    answer = record.get("answer")
    if answer is None:
        if not answers:
            raise record_error(path, index, "answer", "missing: give 'answer' or 'answers'")
        answer = answers[0]
    if not _is_answer(answer) or not str(answer).strip():
        raise record_error(path, index, "answer", f"must be a non-empty string, got {answer!r}")
    answer = str(answer).strip()
    alternatives = list(dict.fromkeys(a for a in answers or [] if a and a != answer))
    return answer, alternatives


def _is_answer(value: Any) -> bool:
    """Text, or a number written as text ("7"); never a bool, NaN or infinity ("nan" is no answer)."""
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, str | int) and not isinstance(value, bool)
