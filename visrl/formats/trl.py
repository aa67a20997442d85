"""TRL-ready rows from the store, and their on-disk form.

Rows hold PIL images and messages in the structured form trl 1.16 takes for VLMs: each
``{"type": "image"}`` part takes the next image of the row's image list (never an ``image`` key
inside a part). Conversations come from :mod:`visrl.prompts`, so training sees the turns that
inference uses. Boxes are written from the stored pixel boxes (a reviewer's edit included) and
crops cut by a :class:`visrl.contract.TwoStepContract` (box format, its frame, crop margin), and
both images prepared by it (``full_max_pixels``, ``crop_min_pixels``), exactly as
:class:`visrl.reasoning.Reasoner` does at inference.

``sft``      ``images`` [full, crop], ``messages`` (the two-step conversation) — items with a box.
``dpo`` 1    ``images`` [full], ``prompt`` (box step), ``chosen`` / ``rejected`` (one assistant
             message each: the box texts), ``pair_id``.
``dpo`` 2    stage 1 plus, per side, ``{side}_answer_images`` [full, that side's crop],
             ``{side}_answer_prompt`` (box prompt, that side's box, its crop) and
             ``{side}_answer`` (that side's answer): each answer is conditioned on its own crop.

On disk (:func:`save_dataset`) a folder holds ``images/*.png``, ``metadata.jsonl`` (image lists as
``file_names`` / ``{column}_file_names``, the layout of datasets' imagefolder, so
``datasets.load_dataset(folder)`` yields PIL images), ``dataset_info.json`` and a README.
:func:`load_rows` reads it back into the same rows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image

from visrl.boxes import Box
from visrl.contract import TwoStepContract
from visrl.errors import DataError
from visrl.formats.row_images import IMAGE_COLUMNS, ImageRef, RowImages
from visrl.prompts import answer_prompt, assistant, box_prompt, two_step_conversation
from visrl.review import STATUSES, PairFilter, count_pairs, page_pairs, pair_boxes
from visrl.store import Store, box_from_json
from visrl.workspace import Workspace

Row = dict[str, Any]
Record = dict[str, Any]
METADATA = "metadata.jsonl"


class ImageCache:
    """Item images opened once per call (RGB), by workspace-relative path."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self._cache: dict[str, Image.Image] = {}

    def __call__(self, relative: str) -> Image.Image:
        if relative not in self._cache:
            path = self.ws.absolute(relative)
            if not path.is_file():
                raise DataError(f"image {relative} of the workspace is missing; re-import its dataset")
            with Image.open(path) as image:
                self._cache[relative] = image.convert("RGB")
        return self._cache[relative]


class _Refs:
    """References to item images (:class:`ImageRef`), checked to exist; nothing is decoded."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self._root = ws.root.resolve()
        self._paths: dict[str, str] = {}
        self._sizes: dict[str, tuple[int, int]] = {}

    def full(self, relative: str) -> ImageRef:
        return ImageRef(self._path(relative), "full")

    def crop(self, relative: str, box: Box) -> ImageRef:
        return ImageRef(self._path(relative), "crop", (box.x1, box.y1, box.x2, box.y2))

    def size(self, relative: str) -> tuple[int, int]:
        """The file's (width, height), read from its header (the decoded image's size)."""
        if relative not in self._sizes:
            with Image.open(self._path(relative)) as image:
                self._sizes[relative] = image.size
        return self._sizes[relative]

    def _path(self, relative: str) -> str:
        # Workspace.absolute's check with one realpath per image, not three: 10k pairs spent
        # 11 s of 14 in path resolution before.
        if relative not in self._paths:
            path = Path(os.path.realpath(self._root / relative))
            if not path.is_relative_to(self._root):
                raise DataError(f"{relative} leaves the workspace {self.ws.root}")
            if not path.is_file():
                raise DataError(f"image {relative} of the workspace is missing; re-import its dataset")
            self._paths[relative] = str(path)
        return self._paths[relative]


def _opened(rows: list[Row], lazy: bool, contract: TwoStepContract) -> list[Row]:
    if lazy:
        return rows
    images = RowImages(contract)
    return [images.open_row(row) for row in rows]


# ---------------------------------------------------------------------- records -> rows
# A record is what a row is made from, as read from the store (JSON-able, a few hundred bytes);
# build_row turns one into a row. Eager rows build every record at once; training keeps the
# records (deferred_rows) and builds each row when the Trainer indexes it.

KINDS = ("sft", "dpo1", "dpo2")


def sft_records(store: Store, dataset: str | None = None, split: str | None = "train") -> list[Record]:
    """Items with a ground-truth box and an answer (``split`` None: all), as SFT records."""
    records = []
    for item in store.items(dataset=dataset, split=split, with_box=True):
        box = store.item_box(item)
        if box is None or not (item.get("answer") or "").strip():
            continue  # nothing to teach the answer step
        records.append({"image": item["image"], "question": item["question"], "answer": item["answer"],
                        "box": [box.x1, box.y1, box.x2, box.y2]})
    return records


def pair_records(store: Store, statuses: Iterable[str] = ("accepted",), stage: int = 1,
                 dataset: str | None = None) -> list[Record]:
    """The selected pairs that make rows of ``stage``: stage 2 needs a box on both sides (a crop to
    answer on); either stage needs a box text on both (a side without a box keeps its rollout's
    raw text: a failed rollout is a fine *rejected* box step)."""
    if stage not in (1, 2):
        raise DataError(f"DPO stage must be 1 (box step) or 2 (box + answer), not {stage!r}")
    records = []
    for pair in selected_pairs(store, statuses, dataset):
        boxless = [side for side in ("chosen", "rejected") if pair.get(f"{side}_box") is None]
        if stage == 2 and boxless:
            continue
        raw = {side: _rollout_text(store, pair.get(f"{side}_rollout_id")) for side in boxless}
        if any(text is None for text in raw.values()):
            continue
        records.append({"pair_id": pair["id"], "image": pair["image"], "question": pair["question"],
                        "size": [pair["width"], pair["height"]], "raw_texts": raw,
                        **{key: pair.get(key) for key in ("chosen_box", "rejected_box",
                                                           "chosen_answer", "rejected_answer")}})
    return records


def _rollout_text(store: Store, rollout_id: int | None) -> str | None:
    row = store.rollout(rollout_id)
    return row["box_text"] if row and row["box_text"] else None


def build_row(record: Record, kind: str, contract: TwoStepContract, refs: _Refs) -> Row:
    """The row of ``record`` (see the module doc for each kind's columns), images as references
    (a :class:`RowImages` with the same ``contract`` opens, cuts and prepares them)."""
    if kind == "sft":
        box = Box(*record["box"])
        text = contract.format(box, refs.size(record["image"]))
        return {"images": [refs.full(record["image"]), refs.crop(record["image"], box)],
                "messages": two_step_conversation(record["question"], text, record["answer"],
                                                  contract.prompt_layout)}
    size = tuple(record["size"])
    boxes = {side: box_from_json(record[f"{side}_box"]) for side in ("chosen", "rejected")}
    texts = {side: contract.format(box, size) if box is not None else record["raw_texts"][side]
             for side, box in boxes.items()}
    full = refs.full(record["image"])
    row: Row = {"images": [full], "prompt": box_prompt(record["question"], contract.prompt_layout),
                "chosen": assistant(texts["chosen"]), "rejected": assistant(texts["rejected"]),
                "pair_id": record["pair_id"]}
    if kind == "dpo2":
        for side in ("chosen", "rejected"):
            row[f"{side}_answer_images"] = [full, refs.crop(record["image"], boxes[side])]
            row[f"{side}_answer_prompt"] = answer_prompt(record["question"], texts[side], contract.prompt_layout)
            row[f"{side}_answer"] = assistant(record.get(f"{side}_answer") or "")
    return row


def sft_rows(store: Store, ws: Workspace, dataset: str | None = None, split: str | None = "train",
             contract: TwoStepContract | None = None, lazy: bool = False) -> list[Row]:
    """Two-step SFT rows of the items with a ground-truth box and an answer (``split`` None: all).

    ``lazy``: image lists hold :class:`ImageRef` values, opened by a
    :class:`~visrl.formats.row_images.RowImages` with the same ``contract`` when used."""
    contract = contract or TwoStepContract()
    records = sft_records(store, dataset, split)
    return _opened([build_row(r, "sft", contract, _Refs(ws)) for r in records], lazy, contract)


def selected_pairs(store: Store, statuses: Iterable[str] = ("accepted",),
                   dataset: str | None = None) -> list[dict[str, Any]]:
    """Pairs (joined with their item, as :func:`visrl.review.get_pair`) with these statuses, by id."""
    pairs: list[dict[str, Any]] = []
    for status in dict.fromkeys(statuses):
        if status not in STATUSES:
            raise DataError(f"unknown pair status {status!r}; use one of {', '.join(STATUSES)}")
        flt = PairFilter(status=status, dataset=dataset)
        pairs += page_pairs(store, flt, sort="oldest", limit=max(count_pairs(store, flt), 1))
    return sorted(pairs, key=lambda p: p["id"])


def side_texts(store: Store, pair: dict[str, Any], contract: TwoStepContract) -> dict[str, str | None]:
    """Each side's box text: the stored box written by ``contract``; a side without a box keeps
    its rollout's raw text (a failed rollout is a fine *rejected* box step), else None."""
    size = (pair["width"], pair["height"])
    boxes = pair_boxes(pair)
    return {side: contract.format(boxes[side], size) if boxes[side] is not None
            else _rollout_text(store, pair.get(f"{side}_rollout_id")) for side in ("chosen", "rejected")}


def dpo_rows(store: Store, ws: Workspace, statuses: Iterable[str] = ("accepted",), stage: int = 1,
             dataset: str | None = None, contract: TwoStepContract | None = None,
             lazy: bool = False) -> list[Row]:
    """DPO rows of the selected pairs (see module doc and :func:`pair_records` for which pairs).
    ``lazy``: as for :func:`sft_rows`."""
    contract = contract or TwoStepContract()
    records = pair_records(store, statuses, stage, dataset)
    refs = _Refs(ws)
    return _opened([build_row(r, f"dpo{stage}", contract, refs) for r in records], lazy, contract)


class DeferredRows:
    """``Dataset.with_transform`` hook: records -> rows -> opened images, per indexed batch.

    Picklable (DataLoader workers get a copy); settings are the row kind, the contract (as its
    dict) and the workspace root, so a worker needs nothing else.
    """

    def __init__(self, kind: str, contract: dict[str, Any], root: str) -> None:
        if kind not in KINDS:
            raise DataError(f"unknown row kind {kind!r}; use one of {', '.join(KINDS)}")
        self.kind, self.contract, self.root = kind, TwoStepContract.from_dict(contract), root
        self._refs: _Refs | None = None
        self._images = RowImages(self.contract)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_refs": None}  # its path caches are rebuilt in the worker

    def rows(self, records: list[Record]) -> list[Row]:
        if self._refs is None:
            self._refs = _Refs(Workspace(Path(self.root)))
        return [self._images.open_row(build_row(r, self.kind, self.contract, self._refs)) for r in records]

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        rows = self.rows([json.loads(text) for text in batch["record"]])
        return {key: [row[key] for row in rows] for key in rows[0]} if rows else {}


def deferred_rows(records: list[Record], kind: str, contract: TwoStepContract, ws: Workspace) -> list[Row]:
    """Training rows that are still records (``record``: JSON, ``pair_id``); :func:`to_dataset`
    makes a dataset that builds and opens each row when it is indexed. Every record's image is
    checked to exist now (one stat each), so a missing file stops the run before the model loads,
    not at the step that reaches it."""
    missing = [r["image"] for r in records if not os.path.isfile(os.path.join(ws.root, r["image"]))]
    if missing:
        raise DataError(f"{len(missing)} image(s) of the selection are missing from the workspace, e.g. "
                        f"{missing[0]}; re-import their dataset")
    spec = json.dumps([kind, contract.to_dict(), str(ws.root)])
    return [{"pair_id": r.get("pair_id"), "record": json.dumps(r), "row_spec": spec} for r in records]


# ---------------------------------------------------------------------- datasets and disk

def to_dataset(rows: list[Row], images: RowImages | None = None) -> Any:
    """A ``datasets.Dataset`` of the rows. Opened images become ``List(Image())`` columns;
    reference rows (``lazy=True``) stay references, opened by ``images`` when indexed."""
    from datasets import Dataset

    from visrl.formats.row_images import has_refs, lazy_dataset

    if rows and "row_spec" in rows[0]:  # deferred rows: only the records go into Arrow
        build = DeferredRows(*json.loads(rows[0]["row_spec"]))
        return Dataset.from_list([{"record": row["record"]} for row in rows]).with_transform(build)
    if has_refs(rows):
        return lazy_dataset(rows, images or RowImages(TwoStepContract()))
    return Dataset.from_list(rows)


def save_dataset(rows: list[Row], out_dir: str | Path, description: str = "") -> Path:
    """Write rows as images + ``metadata.jsonl`` (+ ``dataset_info.json``, README); returns the folder.

    The folder must not exist yet or be empty: an export never mixes with older files.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} is not empty; export into a new folder")
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    saved: dict[int, str] = {}  # id(image) -> file: the full image shared by a row's lists is written once
    for i, row in enumerate(rows):
        record = {}
        for key, value in row.items():
            if key in IMAGE_COLUMNS:
                names = []
                for k, image in enumerate(value):
                    if id(image) not in saved:
                        saved[id(image)] = f"images/{i:06d}_{key}_{k}.png"
                        image.save(out / saved[id(image)], format="PNG")
                    names.append(saved[id(image)])
                record["file_names" if key == "images" else f"{key}_file_names"] = names
            else:
                record[key] = value
        lines.append(json.dumps(record, ensure_ascii=False))
    (out / METADATA).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    columns = list(rows[0]) if rows else []
    info = {"rows": len(rows), "columns": columns, "layout": "imagefolder metadata.jsonl",
            "description": description}
    (out / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(_readme(len(rows), columns, description), encoding="utf-8")
    return out


def load_rows(folder: str | Path, lazy: bool = False) -> list[Row]:
    """Rows saved by :func:`save_dataset`, images opened as RGB PIL images (``lazy``: as
    :class:`ImageRef` values of kind ``file``, checked to exist, opened when used)."""
    folder = Path(folder)
    path = folder / METADATA
    if not path.is_file():
        raise DataError(f"{folder} holds no {METADATA}; export it with `visrl export --format trl-sft` "
                        "or `--format trl-dpo`")
    rows = []
    opened: dict[str, Any] = {}  # file name -> its image (or reference): shared within the folder
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {n} is not JSON ({exc.msg})") from None
        row = {}
        for key, value in record.items():
            if key == "file_names" or key.endswith("_file_names"):
                column = "images" if key == "file_names" else key[: -len("_file_names")]
                for name in value:
                    if name not in opened:
                        file = _checked(folder, name, path, n)
                        opened[name] = ImageRef(str(file), "file") if lazy else _open(file)
                row[column] = [opened[name] for name in value]
            else:
                row[key] = value
        rows.append(row)
    return rows


def _checked(folder: Path, name: str, path: Path, line: int) -> Path:
    file = (folder / name).resolve()
    if not file.is_relative_to(folder.resolve()) or not file.is_file():
        raise DataError(f"{path}: line {line} names image {name!r}, which is not a file of {folder}")
    return file


def _open(file: Path) -> Image.Image:
    with Image.open(file) as image:
        return image.convert("RGB")


def _readme(n: int, columns: list[str], description: str) -> str:
    return (
        "# VisRL export\n\n"
        f"{description or 'Rows for trl (VLM SFT or DPO).'}\n\n"
        f"{n} rows; columns: {', '.join(columns) or 'none'}.\n\n"
        "Images are PNG files under `images/`; `metadata.jsonl` lists each row with its image lists as\n"
        "`file_names` (the `images` column) and `<column>_file_names`. Load with\n\n"
        "```python\n"
        "from datasets import load_dataset\n"
        "ds = load_dataset(\"imagefolder\", data_dir=\"THIS_FOLDER\", split=\"train\")\n"
        "# or: from visrl.formats.trl import load_rows, to_dataset; ds = to_dataset(load_rows(\"THIS_FOLDER\"))\n"
        "```\n\n"
        "Messages use trl's structured form: each `{\"type\": \"image\"}` part takes the next image of\n"
        "the row's list.\n"
    )
