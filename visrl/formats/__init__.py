"""Import and export of data: Visual-CoT, plain VQA, LLaMA-Factory sharegpt, TRL datasets.

Every importer follows one contract, implemented here:

1. read and check every record first (:func:`read_records`, :class:`ImageSource`,
   :func:`strict_box`); the first bad one stops the import with a :class:`DataError` that names
   the file, the record (0-based index) and the field, and says what to fix;
2. place the images inside the workspace by content: ``images/<dataset>/<stem>-<sha256[:16]><ext>``,
   copied (never hard-linked: editing a source image must not edit the workspace), each one
   size-checked from its header and decoded in full first, so a pixel bomb or a truncated file
   is refused here with its record instead of breaking every later run. The store only ever
   holds workspace-relative paths and the app never serves a file from outside the workspace;
3. write everything in ONE transaction (:func:`commit_import`). If it fails, the images placed in
   step 2 are removed again: the store and the images folder are as before.

Boxes are converted at this edge into the internal convention (pixels of the original image).
Unlike model output, input data is parsed strictly: an inverted box, a NaN, or a box outside the
image is an error, not "no box".
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from visrl.boxes import Box, from_viscot
from visrl.errors import DataError
from visrl.prompts import BOX_PROMPT
from visrl.store import Store

FORMATS: tuple[str, ...] = ("viscot", "vqa", "sharegpt")
# Box formats an input file may declare. "pixels" is absolute pixels of the original image;
# qwen2_5 is missing on purpose: its pixels refer to a processor's resized image, unknown here.
INPUT_BOX_FORMATS: tuple[str, ...] = ("pixels", "viscot", "normalized", "qwen2", "qwen3")
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_QWEN2 = re.compile(rf"^\s*<\|box_start\|>\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,?\s*"
                    rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*<\|box_end\|>\s*$")
_IMAGE_TAG = re.compile(r"<image>\s*")


# ---------------------------------------------------------------------- reading records

# Input files are small structured records: 32 levels is ~8x the deepest real record (a
# conversation turn inside a list inside a record) and far below Python's recursion limit.
MAX_DEPTH = 32
_INT64 = 2**63  # SQLite stores integers in 64 bits; a larger one cannot be written
_SURROGATE = re.compile("[\ud800-\udfff]")
_BOMS = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32", b"\xff\xfe": "UTF-16",
         b"\xfe\xff": "UTF-16"}


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON file (a list of objects) or a JSONL file (one object per line).

    The file must be UTF-8 (a BOM is allowed); every value is checked to be storable (no lone
    surrogates, integers within 64 bits, nesting within :data:`MAX_DEPTH`) before any is used.
    """
    path = Path(path)
    try:
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        data = path.read_bytes()
    except (OSError, ValueError) as exc:  # NUL in the name, name too long, a symlink loop
        raise DataError(f"{_shown(path)}: cannot read the file ({_reason(exc)}); fix the path") from None
    text = _decode(path, data)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        if path.suffix.lower() != ".jsonl" and not text.lstrip().startswith("{"):
            raise DataError(f"{path}: not JSON ({exc.msg} at line {exc.lineno}); a JSON file must hold "
                            "a list of records, a .jsonl file one record per line") from None
        records = _read_lines(path, text)
    except RecursionError:
        raise _too_deep(path) from None
    if isinstance(records, dict) and path.suffix.lower() == ".jsonl":
        records = [records]  # a JSONL file of one line
    if not isinstance(records, list):
        raise DataError(f"{path}: the top level must be a list of records, not {type(records).__name__}")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{path}: record {i} is a {type(record).__name__}, not an object")
        check_values(path, i, record)
    return records


def _decode(path: Path, data: bytes) -> str:
    for bom, name in _BOMS.items():
        if data.startswith(bom):
            raise DataError(f"{path}: the file is {name}, not UTF-8; save it as UTF-8 "
                            f"(e.g. iconv -f {name} -t UTF-8)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}: not UTF-8 (byte 0x{data[exc.start]:02x} at line {line}); save the "
                        "file as UTF-8 (e.g. iconv -f LATIN1 -t UTF-8)") from None


def _too_deep(path: Path, where: str = "") -> DataError:
    return DataError(f"{path}: {where or 'the file'} is nested deeper than {MAX_DEPTH} levels; a record "
                     "holds flat fields, lists of turns or boxes")


def check_values(path: Path, index: int, record: dict[str, Any]) -> None:
    """Every value of ``record`` can be stored: text without lone surrogates, 64-bit integers,
    nesting within :data:`MAX_DEPTH`. Walks iteratively (a deep record must not overflow the stack)."""
    stack: list[tuple[Any, str, int]] = [(record, "(record)", 0)]
    while stack:
        value, top, depth = stack.pop()  # top: the record's field the value sits in
        if depth > MAX_DEPTH:
            raise record_error(path, index, top, f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise record_error(path, index, top, "holds a lone UTF-16 surrogate (\\ud800-\\udfff), "
                                   "which is not text; fix that escape in the file")
        elif isinstance(value, int) and not isinstance(value, bool):
            if not -_INT64 <= value < _INT64:
                raise record_error(path, index, top, f"the number {_short(value)} is too large; "
                                   "numbers must fit in 64 bits")
        elif isinstance(value, dict):
            for key, child in value.items():
                if _SURROGATE.search(key):
                    raise record_error(path, index, top, "a key holds a lone UTF-16 surrogate; fix that "
                                       "escape in the file")
                stack.append((child, key if depth == 0 else top, depth + 1))
        elif isinstance(value, list):
            stack.extend((child, top, depth + 1) for child in value)


def _short(value: Any, limit: int = 40) -> str:
    """A value for an error message, never echoed in full (a 10^400 number, a huge string)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _shown(path: Path) -> str:
    return _short(str(path), 120)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _read_lines(path: Path, text: str) -> list[Any]:
    records = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {n} is not JSON ({exc.msg}); fix or remove that line") from None
        except RecursionError:
            raise _too_deep(path, f"line {n}") from None
    return records


def record_error(path: Path, index: int, field_name: str, problem: str) -> DataError:
    return DataError(f"{path.name}: record {index}, field {field_name!r}: {problem}")


def check_declared_size(path: Path, index: int, record: dict[str, Any], size: tuple[int, int],
                        what: str = "the image") -> None:
    """A record's ``width``/``height``, when given, must be the image's real size."""
    if "width" in record or "height" in record:
        declared = (record.get("width"), record.get("height"))
        if declared != size:
            raise record_error(path, index, "width", f"the record says {declared[0]}x{declared[1]} "
                               f"but {what} is {size[0]}x{size[1]}; fix the size or the image")


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


# ---------------------------------------------------------------------- images

# A pixel budget per image, read from the header before any decoding: 64 M pixels (8192 x 8192)
# decodes to 192 MB of RGB, above any photo a VLM sees (they are resized to ~1 M pixels) and far
# below a decompression bomb (a 20000 x 20000 PNG of a few KB decodes to 1.2 GB).
MAX_IMAGE_PIXELS = 64_000_000
# The encoded file is read once to hash and decode it: 256 MB bounds that read.
MAX_IMAGE_BYTES = 256 * 1024 * 1024
_DATASET_NAME = re.compile(r"[^\W_][\w.\-]{0,99}")  # starts with a letter or digit: never "." or ".."
_SUFFIX = re.compile(r"\.[a-z0-9]{1,8}")


def check_dataset_name(name: str) -> str:
    """``name`` if it can name a dataset (and its folder ``images/<name>/``), else a DataError."""
    if not isinstance(name, str) or not _DATASET_NAME.fullmatch(name):
        raise DataError(f"dataset name {_short(name)} may only hold letters, digits, '_', '-' and '.', "
                        "must start with a letter or digit and have at most 100 characters; "
                        "pass another --dataset")
    return name


@dataclass
class PlacedImage:
    source: Path
    relative: str  # workspace-relative destination, POSIX: images/<dataset>/<stem>-<sha256[:16]><ext>
    size: tuple[int, int]
    sha256: str  # of the file's bytes as checked; placing verifies the copy against it


class ImageSource:
    """Resolves image entries of a file to checked files under ``root`` and their destinations.

    ``root`` is the images root (``--images-root``, default: the JSON file's folder); an entry
    that leaves it (``../x.png``, an absolute path elsewhere) is refused. Each image is checked
    when first named: its size from the header against :data:`MAX_IMAGE_PIXELS`, then decoded
    in full (a truncated file is refused with its record). Its destination is named by its
    content hash, so two datasets' ``a.png`` of the same size but other pixels never meet.
    """

    def __init__(self, store: Store, root: Path, dataset: str, json_path: Path) -> None:
        self.dataset = check_dataset_name(dataset)
        self.json_path = json_path
        self.workspace = store.workspace
        self._seen: dict[str, PlacedImage] = {}
        self._by_source: dict[Path, PlacedImage] = {}
        try:
            self.root = root.resolve()
            is_dir = self.root.is_dir()
        except (OSError, ValueError, RuntimeError) as exc:
            raise DataError(f"images root {_shown(root)} cannot be used ({_reason(exc)}); pass "
                            "--images-root DIR") from None
        if not is_dir:
            raise DataError(f"images root {root} is not a folder; pass --images-root DIR")

    def get(self, entry: Any, index: int, field_name: str) -> PlacedImage:
        if not isinstance(entry, str) or not entry.strip():
            raise record_error(self.json_path, index, field_name, f"an image path must be a non-empty string, got {_short(entry)}")
        if entry in self._seen:
            return self._seen[entry]
        source = self._resolve(entry, index, field_name)
        placed = self._by_source.get(source)
        if placed is None:
            size, digest, fmt = self._inspect(source, entry, index, field_name)
            suffix = source.suffix.lower() if _SUFFIX.fullmatch(source.suffix.lower()) else f".{fmt.lower()}"
            # The stem keeps names readable; 80 characters + hash stays below NAME_MAX (255 bytes).
            name = f"{source.stem[:80]}-{digest[:16]}{suffix}"
            placed = PlacedImage(source, f"images/{self.dataset}/{name}", size, digest)
            self._by_source[source] = placed
        self._seen[entry] = placed
        return placed

    def _resolve(self, entry: str, index: int, field_name: str) -> Path:
        """The entry's file, inside the images root; any path problem is a record error."""
        def fail(problem: str) -> DataError:
            return record_error(self.json_path, index, field_name, f"{_short(entry, 80)} {problem}")

        try:
            source = (self.root / entry).resolve()
            inside = source.is_relative_to(self.root)
            is_file = inside and source.is_file()
        except RuntimeError:  # Python 3.11 reports a symlink loop this way
            raise fail("is a symlink loop; point it at a real image") from None
        except (OSError, ValueError) as exc:  # NUL byte, name too long, ...
            raise fail(f"is not a usable path ({_reason(exc)}); fix the path") from None
        if not inside:
            raise fail(f"leaves the images root {self.root}; keep images under it or pass another "
                       "--images-root")
        if not is_file:
            raise record_error(self.json_path, index, field_name,
                               f"image {_short(entry, 80)} not found under {self.root}; fix the path or pass --images-root")
        return source

    def _inspect(self, source: Path, entry: str, index: int, field_name: str) -> tuple[tuple[int, int], str, str]:
        """(size, sha256, PIL format) of an image file, after a full decode within the budgets."""
        def fail(problem: str) -> DataError:
            return record_error(self.json_path, index, field_name, f"{_short(entry, 80)} {problem}")

        try:
            if source.stat().st_size > MAX_IMAGE_BYTES:
                raise fail(f"is larger than {MAX_IMAGE_BYTES // 2**20} MB; shrink the image")
            data = source.read_bytes()
        except OSError as exc:
            raise fail(f"cannot be read ({_reason(exc)})") from None
        try:
            with Image.open(io.BytesIO(data)) as image:
                size, fmt = image.size, image.format or "png"
                if size[0] * size[1] > MAX_IMAGE_PIXELS:
                    raise fail(f"is {size[0]}x{size[1]} pixels, over the limit of {MAX_IMAGE_PIXELS:,}; "
                               "downscale it before importing")
                image.load()  # the full decode: truncated or corrupt data fails here, not in a run
        except DataError:
            raise
        except Image.DecompressionBombError as exc:  # PIL's own bomb check, before our size check
            raise fail(f"is too large to decode ({exc}); downscale it before importing") from None
        except UnidentifiedImageError:
            raise fail("is not a readable image (unknown format)") from None
        except Exception as exc:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError, struct.error...
            raise fail(f"is not a readable image ({_reason(exc)}); re-export or remove it") from None
        return size, hashlib.sha256(data).hexdigest(), fmt

    def place_all(self) -> list[Path]:
        """Copy every image into the workspace; returns the files and folders created (for undo).

        An existing destination is reused only when its bytes hash the same; a copy whose bytes
        differ from what was checked (the source changed meanwhile) is refused.
        """
        created: list[Path] = []
        try:
            for placed in {p.relative: p for p in self._seen.values()}.values():
                dest = self.workspace.root / placed.relative
                if dest.exists():
                    if _sha256_file(dest) != placed.sha256:
                        raise DataError(f"{placed.relative} already exists in the workspace with other "
                                        "content; import under another --dataset name")
                    continue
                if not dest.parent.exists():
                    dest.parent.mkdir(parents=True)
                    created.append(dest.parent)
                tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
                created.append(tmp)
                if _copy_hashed(placed.source, tmp) != placed.sha256:
                    raise DataError(f"{placed.source} changed while it was imported; import again")
                os.replace(tmp, dest)  # a reader never sees a half-written image
                created[-1] = dest
        except BaseException:
            remove_files(created)
            raise
        return created


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _copy_hashed(source: Path, dest: Path) -> str:
    """Copy ``source`` to ``dest`` (a new file, durable on return); the sha256 of what was copied."""
    digest = hashlib.sha256()
    with source.open("rb") as src, dest.open("xb") as out:
        for block in iter(lambda: src.read(1 << 20), b""):
            digest.update(block)
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def remove_files(paths: list[Path]) -> None:
    """Undo what :meth:`ImageSource.place_all` created: files, then (empty) folders, newest first."""
    for path in reversed(paths):
        if path.is_dir():
            with contextlib.suppress(OSError):
                path.rmdir()
        else:
            path.unlink(missing_ok=True)


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
    """Place the images and write dataset, items (and rollouts, pairs) in one transaction."""
    if not plan.items:
        raise DataError(f"{plan.path.name}: no records to import")
    _check_new_source_ids(store, plan)
    created = plan.images.place_all()
    try:
        with store.atomic() as db:
            rows = db.execute("SELECT id, format FROM datasets WHERE name = ?", [plan.dataset]).fetchall()
            dataset_id = rows[0][0] if rows else store.add_dataset(plan.dataset, plan.format, str(plan.path))
            ids = store.add_items(dataset_id, plan.items)
            extra = plan.after_items(store, ids) if plan.after_items else {}
    except BaseException:
        remove_files(created)
        raise
    splits: dict[str, int] = {}
    for item in plan.items:
        splits[item["split"]] = splits.get(item["split"], 0) + 1
    return {"dataset": plan.dataset, "format": plan.format, "path": str(plan.path),
            "items": len(ids), "splits": splits, "images": sum(p.is_file() for p in created), **extra}


def _check_new_source_ids(store: Store, plan: ImportPlan) -> None:
    seen: dict[tuple[str, str], int] = {}
    for index, item in enumerate(plan.items):
        key = (item["split"], item["source_id"])
        if key in seen:
            raise DataError(f"{plan.path.name}: records {seen[key]} and {index} share the id "
                            f"{key[1]!r} in split {key[0]!r}; ids must be unique")
        seen[key] = index
    rows = store.db.execute("SELECT id FROM datasets WHERE name = ?", [plan.dataset]).fetchall()
    if not rows:
        return
    existing = {tuple(r) for r in store.db.execute(
        "SELECT split, source_id FROM items WHERE dataset_id = ?", [rows[0][0]]).fetchall()}
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
