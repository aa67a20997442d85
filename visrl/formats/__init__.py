"""Import and export of data: Visual-CoT, plain VQA, LLaMA-Factory sharegpt, TRL datasets.

Every importer follows one contract, implemented here:

1. read and check every record first (:func:`~visrl.formats.records.read_records`,
   :class:`~visrl.formats.images.ImageSource`, :func:`strict_box`); the first bad one stops the import with a :class:`DataError` that names
   the file, the record (0-based index) and the field, and says what to fix;
2. place the images inside the workspace by content (``images/<dataset>/<stem>-<sha256[:16]><ext>``,
   copied, checked from the header and decoded in full first: :mod:`visrl.formats.images`), so
   the store only ever holds workspace-relative paths and the app never serves a file from
   outside the workspace;
3. write everything in ONE transaction (:func:`commit_import`). If it fails, the images placed in
   step 2 are removed again: the store and the images folder are as before.

Boxes are converted at this edge into the internal convention (pixels of the original image).
The image is the upright one, as a browser or an annotation tool shows it: a phone photo's EXIF
orientation is applied when it is placed, so its size and every box of its record (pixel,
normalized, square-padded Visual-CoT) are read against the turned photo, not its stored pixels.
Unlike model output, input data is parsed strictly: an inverted box, a NaN, or a box outside the
image is an error, not "no box".
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visrl.boxes import Box, from_viscot
from visrl.errors import DataError
from visrl.formats.images import (  # noqa: F401  (re-exported: the importers' one entry point)
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    ImageSource,
    PlacedImage,
    check_dataset_name,
    remove_files,
)
from visrl.formats.records import (  # noqa: F401  (re-exported)
    MAX_DEPTH,
    check_values,
    read_records,
    record_error,
)
from visrl.prompts import BOX_PROMPT
from visrl.store import Store
from visrl.vocabulary import BOX_FORMATS

FORMATS: tuple[str, ...] = ("viscot", "vqa", "sharegpt")
# Box formats an input file may declare. "pixels" is absolute pixels of the original image;
# qwen2_5 is missing on purpose: its pixels refer to a processor's resized image, unknown here.
INPUT_BOX_FORMATS: tuple[str, ...] = ("pixels", *(f for f in BOX_FORMATS if f != "qwen2_5"))
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_QWEN2 = re.compile(rf"^\s*<\|box_start\|>\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,?\s*"
                    rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*<\|box_end\|>\s*$")
_IMAGE_TAG = re.compile(r"<image>\s*")


def check_declared_size(path: Path, index: int, record: dict[str, Any], placed: PlacedImage,
                        what: str = "the image") -> None:
    """A record's ``width``/``height``, when given, must be the image's upright size (as a viewer
    shows it; for a photo with an EXIF orientation, not the size of its stored pixels)."""
    if "width" in record or "height" in record:
        declared, size = (record.get("width"), record.get("height")), placed.size
        if declared != size:
            turned = (f" upright (its EXIF orientation {placed.orientation} turns the stored pixels; sizes "
                      "and boxes refer to the photo as a viewer shows it)" if placed.orientation != 1 else "")
            raise record_error(path, index, "width", f"the record says {declared[0]}x{declared[1]} "
                               f"but {what} is {size[0]}x{size[1]}{turned}; fix the size or the image")


def check_keys(path: Path, index: int, record: dict[str, Any], required: tuple[str, ...],
               optional: tuple[str, ...]) -> None:
    """Unknown or missing keys are errors: silently dropping a column loses data."""
    missing = [k for k in required if k not in record]
    if missing:
        raise record_error(path, index, missing[0], "missing; every record needs "
                           + ", ".join(required))
    unknown = sorted(set(record) - set(required) - set(optional))
    if unknown:
        raise record_error(path, index, unknown[0], "unknown field; known fields are "
                           + ", ".join(required + optional))


def question_text(value: str) -> str:
    """A prompt turn without its ``<image>`` tags and without Visual-CoT's box request."""
    text = _IMAGE_TAG.sub("", value).strip()
    if text.endswith(BOX_PROMPT):
        text = text[: -len(BOX_PROMPT)].strip()
    return text


# ---------------------------------------------------------------------- boxes, strictly

def strict_box(value: Any, fmt: str, size: tuple[int, int], where: str) -> Box:
    """An input box in ``fmt`` as pixels of the original ``size`` image; bad boxes raise.

    ``value`` is a list of 4 numbers or a string (JSON list, Qwen2 ``<|box_start|>`` text or
    Qwen3 ``{"bbox_2d": [...]}``). ``where`` names the record and field in the error.
    """
    if fmt not in INPUT_BOX_FORMATS:
        raise DataError(f"{where}: unknown box format {fmt!r}; use one of {', '.join(INPUT_BOX_FORMATS)}")
    values = _box_values(value, fmt, where)
    if not all(math.isfinite(v) for v in values):
        raise DataError(f"{where}: box {value!r} holds a NaN or infinite number")
    x1, y1, x2, y2 = values
    if x1 >= x2 or y1 >= y2:
        raise DataError(f"{where}: box {value!r} is empty or inverted; write it as [x1, y1, x2, y2] "
                        "with x1 < x2 and y1 < y2")
    w, h = size
    limit = {"viscot": 1.0, "normalized": 1.0, "qwen2": 1000.0, "qwen3": 1000.0}.get(fmt)
    if limit is not None and (min(values) < -0.002 * limit or max(values) > 1.002 * limit):
        raise DataError(f"{where}: box {value!r} has values outside [0, {limit:g}] of format {fmt!r}")
    if fmt == "pixels":
        box = Box(x1, y1, x2, y2)
    elif fmt == "viscot":
        box = from_viscot(values, size)
    elif fmt == "normalized":
        box = Box(x1 * w, y1 * h, x2 * w, y2 * h)
    else:
        box = Box(x1 / 1000 * w, y1 / 1000 * h, x2 / 1000 * w, y2 / 1000 * h)
    # Slack: 1 px, plus the rounding of 3-decimal normalized text (0.0005 of the padded side).
    slack = 1.0 + (0.001 * max(w, h) if fmt != "pixels" else 0.0)
    clamped = box.clamp(size)
    if not box.inside(size, tolerance=slack) or clamped is None:
        raise DataError(f"{where}: box {value!r} ({fmt}) lies outside the {w}x{h} image")
    return clamped


def _box_values(value: Any, fmt: str, where: str) -> list[float]:
    if isinstance(value, str):
        text = value.strip()
        match = _QWEN2.match(text) if fmt == "qwen2" else None
        if match:
            return [float(g) for g in match.groups()]
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            raise DataError(f"{where}: cannot read a box from {value!r}; write [x1, y1, x2, y2]") from None
        if isinstance(parsed, dict) and "bbox_2d" in parsed:
            parsed = parsed["bbox_2d"]
        value = parsed
    if (not isinstance(value, list | tuple) or len(value) != 4
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)):
        raise DataError(f"{where}: a box must be 4 numbers [x1, y1, x2, y2], got {value!r}")
    return [float(v) for v in value]


# ---------------------------------------------------------------------- committing

@dataclass
class ImportPlan:
    """Everything an import writes, checked before anything is written."""

    path: Path
    dataset: str
    format: str
    images: ImageSource
    items: list[dict[str, Any]] = field(default_factory=list)  # rows of ``items`` (gt_box a Box)
    # Called inside the transaction with the new item ids (same order as ``items``): adds
    # rollouts and pairs; returns extra counts for the summary.
    after_items: Callable[[Store, list[int]], dict[str, int]] | None = None


def commit_import(store: Store, plan: ImportPlan) -> dict[str, Any]:
    """Place the images and write dataset, items (and rollouts, pairs) in one transaction.

    The transaction takes SQLite's write lock first (``store.write()``): a concurrent import
    waits for it (busy timeout) instead of failing on a lock upgrade, then sees what the first
    one wrote and reports a duplicate as a DataError. Placed images are undone under that lock,
    and never a file that a committed item uses (another import may have reused it).
    """
    if not plan.items:
        raise DataError(f"{plan.path.name}: no records to import")
    _check_new_source_ids(store, plan)  # before copying anything; checked again under the lock
    created: list[Path] = []
    try:
        plan.images.place_all(created)
    except BaseException:
        with store.write():
            _undo_images(store, created)
        raise
    with store.write():
        try:
            with store.atomic():  # a savepoint: undone on error while the lock stays held
                missing = plan.images.missing()
                if missing:
                    raise DataError(f"{missing[0]} was removed by another import that failed at the "
                                    "same time; run this import again")
                _check_new_source_ids(store, plan)
                dataset_id = store.dataset_id(plan.dataset)
                if dataset_id is None:
                    dataset_id = store.add_dataset(plan.dataset, plan.format, str(plan.path))
                ids = store.add_items(dataset_id, plan.items)
                extra = plan.after_items(store, ids) if plan.after_items else {}
        except BaseException:
            _undo_images(store, created)
            raise
    splits: dict[str, int] = {}
    for item in plan.items:
        splits[item["split"]] = splits.get(item["split"], 0) + 1
    return {"dataset": plan.dataset, "format": plan.format, "path": str(plan.path),
            "items": len(ids), "splits": splits, "images": sum(p.is_file() for p in created), **extra}


def _undo_images(store: Store, created: list[Path]) -> None:
    """Remove what this import placed, except files that committed items use (call under the lock)."""
    root = store.workspace.root
    used = store.images_in_use([p.relative_to(root).as_posix() for p in created])
    remove_files(created, keep=lambda path: path.relative_to(root).as_posix() in used)


def _check_new_source_ids(store: Store, plan: ImportPlan) -> None:
    seen: dict[tuple[str, str], int] = {}
    for index, item in enumerate(plan.items):
        key = (item["split"], item["source_id"])
        if key in seen:
            raise DataError(f"{plan.path.name}: records {seen[key]} and {index} share the id "
                            f"{key[1]!r} in split {key[0]!r}; ids must be unique")
        seen[key] = index
    dataset_id = store.dataset_id(plan.dataset)
    if dataset_id is None:
        return
    existing = store.source_ids(dataset_id)
    for index, item in enumerate(plan.items):
        if (item["split"], item["source_id"]) in existing:
            raise DataError(f"{plan.path.name}: record {index} (id {item['source_id']!r}) is already in "
                            f"dataset {plan.dataset!r}, split {item['split']!r}; it was imported before "
                            "(use another --dataset or --split)")


# ---------------------------------------------------------------------- dispatch

def detect_format(path: str | Path) -> str:
    """Guess the format from the first record's fields."""
    records = read_records(path)
    if not records:
        raise DataError(f"{path}: no records")
    keys = set(records[0])
    if "chosen_step" in keys or "rejected_step" in keys:
        return "sharegpt"
    if "conversations" in keys:
        return "viscot"
    if "question" in keys:
        return "vqa"
    raise DataError(f"{path}: cannot tell the format from fields {sorted(keys)}; pass --format "
                    f"({', '.join(FORMATS)})")


def import_file(store: Store, path: str | Path, fmt: str = "auto", dataset: str | None = None,
                split: str | None = None, image_root: str | Path | None = None,
                box_format: str | None = None) -> dict[str, Any]:
    """Import one file into the store (all or nothing); returns a summary dict.

    ``dataset`` defaults to the file name's stem; ``split`` overrides the records' own split;
    ``image_root`` defaults to the file's folder; ``box_format`` is the format of boxes the file
    does not declare (vqa: ``pixels``, sharegpt: ``viscot``).
    """
    path = Path(path)
    name = check_dataset_name(dataset if dataset is not None else re.sub(r"[^\w.\-]", "_", path.stem))
    fmt = detect_format(path) if fmt == "auto" else fmt
    kwargs = {"dataset": name, "split": split, "image_root": image_root}
    if fmt == "viscot":
        from visrl.formats.viscot import import_viscot

        return import_viscot(store, path, **kwargs)
    if fmt == "vqa":
        from visrl.formats.vqa import import_vqa

        return import_vqa(store, path, box_format=box_format or "pixels", **kwargs)
    if fmt == "sharegpt":
        from visrl.formats.sharegpt import import_sharegpt

        return import_sharegpt(store, path, box_format=box_format or "viscot", **kwargs)
    raise DataError(f"unknown import format {fmt!r}; use auto or one of {', '.join(FORMATS)}")


def start_import(store: Store, path: str | Path, dataset: str, fmt: str,
                 image_root: str | Path | None) -> tuple[list[dict[str, Any]], ImportPlan]:
    """The file's records and an empty plan; images resolve against ``image_root`` or the file's folder."""
    path = Path(path)
    records = read_records(path)
    images = ImageSource(store, Path(image_root) if image_root else path.parent, dataset, path)
    return records, ImportPlan(path, dataset, fmt, images)
