"""LLaMA-Factory sharegpt files with VisRL's ranking columns: import (and the record layout).

One record is one preference pair of the method, in the layout VisRL's original LLaMA-Factory
fork trains on (``ranking: true``; stage 1 maps chosen/rejected to the ``*_step`` columns, stage 2
uses both)::

    {"conversations": [{"from": "human", "value": "<image>{question} Please provide the bounding box ..."}],
     "chosen_step":   {"from": "gpt", "value": "[0.12, 0.30, 0.31, 0.52]"},   # chosen box text
     "rejected_step": {"from": "gpt", "value": "[0.60, 0.10, 0.80, 0.33]"},   # rejected box text
     "chosen":        {"from": "gpt", "value": "7"},       # answer on the chosen crop (optional)
     "rejected":      {"from": "gpt", "value": "3"},       # answer on the rejected crop (optional)
     "images": ["images/demo/train_0-5c377ab0e97537c4.png"],
     "answer": "7",                                        # reference answer (optional)
     "bbox": "[0.11, 0.29, 0.32, 0.53]"}                   # annotated box text (optional)

Boxes are texts in ``box_format`` (default ``viscot``), of the upright image as a viewer shows it
(a phone photo's EXIF orientation applied; :mod:`visrl.formats.images`). Importing makes one item per distinct
(image, question), two rollouts (kind ``import``) per record and one pending pair.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from visrl.boxes import parse_pixel_suffix
from visrl.formats import (
    ImageSource,
    check_keys,
    commit_import,
    question_text,
    record_error,
    start_import,
    strict_box,
)
from visrl.review import add_pair
from visrl.store import Store, box_to_json

REQUIRED = ("conversations", "chosen_step", "rejected_step", "images")
OPTIONAL = ("chosen", "rejected", "answer", "bbox", "id")
SIDES = ("chosen", "rejected")


def import_sharegpt(store: Store, path: str | Path, dataset: str, split: str | None = None,
                    image_root: str | Path | None = None, box_format: str = "viscot") -> dict[str, Any]:
    """Import ranking records as items, rollouts and pending pairs of ``dataset`` (all or nothing)."""
    records, plan = start_import(store, path, dataset, "sharegpt", image_root)
    path, images = plan.path, plan.images
    item_index: dict[tuple[str, str], int] = {}  # (image, question) -> index in plan.items
    sides: list[tuple[int, int, dict[str, Any], dict[str, Any]]] = []  # (record, item, chosen, rejected)
    for i, record in enumerate(records):
        item, chosen, rejected = _parse(path, i, record, images, split or "train", box_format)
        key = (item["image"], item["question"])
        if key not in item_index:
            item_index[key] = len(plan.items)
            plan.items.append(item)
        sides.append((i, item_index[key], chosen, rejected))

    def add_pairs(store: Store, item_ids: list[int]) -> dict[str, int]:
        run_key = f"import:{dataset}:{path.name}"
        for i, k, chosen, rejected in sides:
            rows = []
            for attempt, side in enumerate((chosen, rejected)):
                row = {**side, "item_id": item_ids[k], "run_key": run_key, "attempt": 2 * i + attempt,
                       "kind": "import", "model": "import"}
                rows.append({**row, "id": store.add_rollout(row)})
            add_pair(store, item_ids[k], rows[0], rows[1], source=run_key)
        return {"rollouts": 2 * len(sides), "pairs": len(sides)}

    plan.after_items = add_pairs
    return commit_import(store, plan)


def _parse(path: Path, index: int, record: dict[str, Any], images: ImageSource, split: str,
           box_format: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(item row, chosen rollout, rejected rollout) of one record."""
    check_keys(path, index, record, REQUIRED, OPTIONAL)
    entries = record["images"]
    if not isinstance(entries, list) or len(entries) != 1:
        raise record_error(path, index, "images", "must be a list with the one full image "
                           "(crops are made from the boxes)")
    try:
        entry, pixel_box = parse_pixel_suffix(entries[0]) if isinstance(entries[0], str) else (entries[0], None)
    except ValueError as exc:
        raise record_error(path, index, "images", str(exc)) from None
    placed = images.get(entry, index, "images")
    size = placed.size
    question = _question(path, index, record["conversations"])
    where = f"{path.name}: record {index}, field"
    gt_box = None
    if record.get("bbox") is not None:
        gt_box = strict_box(record["bbox"], box_format, size, f"{where} 'bbox'")
    elif pixel_box is not None:
        gt_box = strict_box(pixel_box.as_list(), "pixels", size, f"{where} 'images'")
    reference = record.get("answer")
    if reference is not None and not isinstance(reference, str):
        raise record_error(path, index, "answer", "must be a string")
    rollouts = []
    for side in SIDES:
        box_text = _turn_text(path, index, record, f"{side}_step")
        box = strict_box(box_text, box_format, size, f"{where} '{side}_step'")
        answer = _turn_text(path, index, record, side, allow_empty=True) if side in record else None
        rollouts.append({"box_text": box_text, "box": box_to_json(box), "answer": answer})
    item = {"split": split, "source_id": str(record.get("id", index)), "image": placed.relative,
            "width": size[0], "height": size[1], "question": question, "answer": reference,
            "gt_box": gt_box, "meta": {}}
    return item, rollouts[0], rollouts[1]


def _question(path: Path, index: int, turns: Any) -> str:
    if (not isinstance(turns, list) or len(turns) != 1 or not isinstance(turns[0], dict)
            or turns[0].get("from") != "human" or not isinstance(turns[0].get("value"), str)):
        raise record_error(path, index, "conversations", 'must be one human turn [{"from": "human", '
                           '"value": "<image>question ..."}] (the box-step prompt)')
    question = question_text(turns[0]["value"])
    if not question:
        raise record_error(path, index, "conversations", "holds no question")
    return question


def _turn_text(path: Path, index: int, record: dict[str, Any], key: str,
               allow_empty: bool = False) -> str:
    value = record[key]
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        if value.get("from") != "gpt":
            raise record_error(path, index, key, f'must be a gpt turn {{"from": "gpt", "value": ...}}, got {value!r}')
        value = value.get("value")
    if not isinstance(value, str) or not (allow_empty or value.strip()):
        raise record_error(path, index, key, f"must be a non-empty text, got {value!r}")
    return value.strip()


def sharegpt_record(pair: dict[str, Any], image: str, chosen_text: str, rejected_text: str,
                    bbox_text: str | None) -> dict[str, Any]:
    """A pair (as :func:`visrl.review.get_pair` returns it) as a ranking record; see module doc."""
    from visrl.prompts import box_prompt, to_sharegpt

    record: dict[str, Any] = {
        "conversations": to_sharegpt(box_prompt(pair["question"])),
        "chosen_step": {"from": "gpt", "value": chosen_text},
        "rejected_step": {"from": "gpt", "value": rejected_text},
        "chosen": {"from": "gpt", "value": pair.get("chosen_answer") or ""},
        "rejected": {"from": "gpt", "value": pair.get("rejected_answer") or ""},
        "images": [image],
    }
    if pair.get("reference"):
        record["answer"] = pair["reference"]
    if bbox_text:
        record["bbox"] = bbox_text
    return record
