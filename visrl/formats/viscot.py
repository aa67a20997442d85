"""Import of Visual-CoT JSON: the training files and the benchmark's four-turn records.

A record (as written by Visual-CoT's tools/convert_data_to_llava_format.py, and by
:func:`visrl.synthetic.viscot_record` for the demo)::

    {"dataset": "flickr30k", "split": "train", "question_id": 0,
     "image": ["f/1.jpg", "f/1.jpg###[94, 0, 321, 313]"],
     "conversations": [
        {"from": "human", "value": "<image>\\n{question} Please provide the bounding box ..."},
        {"from": "gpt", "value": "[0.19, 0.0, 0.642, 0.626]"},     # square-padded normalized
        {"from": "human", "value": "<image>"},
        {"from": "gpt", "value": "{answer}"}],
     "width": 500, "height": 333}                                  # benchmark files only

The ground-truth box is the ``###`` pixel box when an image entry carries one (exact pixels),
else the second turn's normalized box, converted with the square padding (never per axis).
A two-turn record (question, answer) is an item without a box. Boxes and ``width``/``height``
are of the upright image, as a viewer shows it (a phone photo's EXIF orientation applied, as
annotation tools do; :mod:`visrl.formats.images`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from visrl.boxes import parse_pixel_suffix
from visrl.formats import (
    ImageSource,
    check_declared_size,
    check_keys,
    commit_import,
    question_text,
    record_error,
    start_import,
    strict_box,
)
from visrl.store import Store

REQUIRED = ("image", "conversations")
OPTIONAL = ("dataset", "split", "question_id", "id", "width", "height")


def import_viscot(store: Store, path: str | Path, dataset: str, split: str | None = None,
                  image_root: str | Path | None = None) -> dict[str, Any]:
    """Import a Visual-CoT JSON/JSONL file as items of ``dataset`` (all or nothing)."""
    records, plan = start_import(store, path, dataset, "viscot", image_root)
    path, images = plan.path, plan.images
    plan.items = [viscot_item(path, i, record, images, split) for i, record in enumerate(records)]
    return commit_import(store, plan)


def viscot_item(path: Path, index: int, record: dict[str, Any], images: ImageSource,
                split: str | None) -> dict[str, Any]:
    """One record as a row of ``items`` (gt_box a Box in pixels, or None)."""
    check_keys(path, index, record, REQUIRED, OPTIONAL)
    entry, pixel_box_value = _image_entry(path, index, record["image"])
    placed = images.get(entry, index, "image")
    size = placed.size
    check_declared_size(path, index, record, placed, repr(entry))
    question, box_text, answer = _turns(path, index, record["conversations"])
    gt_box = None
    if pixel_box_value is not None:
        gt_box = strict_box(pixel_box_value, "pixels", size, f"{path.name}: record {index}, field 'image'")
    elif box_text is not None:
        gt_box = strict_box(box_text, "viscot", size,
                            f"{path.name}: record {index}, field 'conversations[1]'")
    source_id = record.get("question_id", record.get("id", index))
    meta = {key: record[key] for key in ("dataset",) if key in record}
    if box_text is not None:
        meta["viscot_box"] = box_text
    return {"split": split or str(record.get("split") or "train"), "source_id": str(source_id),
            "image": placed.relative, "width": size[0], "height": size[1], "question": question,
            "answer": answer, "gt_box": gt_box, "meta": meta}


def _image_entry(path: Path, index: int, value: Any) -> tuple[str, Any]:
    """(image path, pixel box values or None) from the ``image`` field (a string or a list)."""
    entries = value if isinstance(value, list) else [value]
    if not entries or not all(isinstance(e, str) for e in entries):
        raise record_error(path, index, "image", f"must be a path or a list of paths, got {value!r}")
    first, box_values = None, None
    for entry in entries:
        try:
            image_path, box = parse_pixel_suffix(entry)
        except ValueError as exc:
            raise record_error(path, index, "image", f"{exc}; write path###[x1, y1, x2, y2]") from None
        if first is None:
            first = image_path
        elif image_path != first:
            raise record_error(path, index, "image", f"entries name different images ({first!r}, "
                               f"{image_path!r}); a record holds one image")
        if box is not None and box_values is None:
            box_values = _suffix_values(entry)
    assert first is not None
    return first, box_values


def _suffix_values(entry: str) -> Any:
    # Re-read the numbers verbatim (parse_pixel_suffix takes the first 4 it finds) so that
    # strict_box rejects an inverted box or a fifth number instead of silently accepting it.
    text = entry.rsplit("###", 1)[1]
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _turns(path: Path, index: int, turns: Any) -> tuple[str, str | None, str | None]:
    """(question, box text or None, answer or None) from 2 or 4 alternating turns."""
    if not isinstance(turns, list) or len(turns) not in (2, 4):
        raise record_error(path, index, "conversations", "must be a list of 4 turns (question, box, "
                           "<image>, answer) or 2 turns (question, answer)")
    values = []
    for k, turn in enumerate(turns):
        role = "human" if k % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != role or not isinstance(turn.get("value"), str):
            raise record_error(path, index, f"conversations[{k}]",
                               f'must be {{"from": "{role}", "value": "..."}}, got {turn!r}')
        values.append(turn["value"])
    question = question_text(values[0])
    if not question:
        raise record_error(path, index, "conversations[0]", "holds no question")
    if len(values) == 2:
        return question, None, values[1].strip() or None
    return question, values[1].strip(), values[3].strip() or None
