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
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image

from visrl.boxes import Box
from visrl.contract import TwoStepContract
from visrl.errors import DataError
from visrl.prompts import answer_prompt, assistant, box_prompt, two_step_conversation
from visrl.review import STATUSES, PairFilter, count_pairs, page_pairs, pair_boxes
from visrl.store import Store
from visrl.workspace import Workspace

Row = dict[str, Any]
METADATA = "metadata.jsonl"
IMAGE_COLUMNS = ("images", "chosen_answer_images", "rejected_answer_images")


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


def sft_rows(store: Store, ws: Workspace, dataset: str | None = None, split: str | None = "train",
             contract: TwoStepContract | None = None) -> list[Row]:
    """Two-step SFT rows of the items with a ground-truth box and an answer (``split`` None: all)."""
    contract = contract or TwoStepContract()
    images = ImageCache(ws)
    rows = []
    for item in store.items(dataset=dataset, split=split, with_box=True):
        box = store.item_box(item)
        if box is None or not (item.get("answer") or "").strip():
            continue  # nothing to teach the answer step
        full = images(item["image"])
        text = contract.format(box, full.size)
        rows.append({"images": [contract.prepare_full(full), contract.prepare_crop(contract.crop(full, box))],
                     "messages": two_step_conversation(item["question"], text, item["answer"])})
    return rows


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
    out: dict[str, str | None] = {}
    for side in ("chosen", "rejected"):
        box = boxes[side]
        if box is not None:
            out[side] = contract.format(box, size)
            continue
        rollout_id = pair.get(f"{side}_rollout_id")
        row = store.db.execute("SELECT box_text FROM rollouts WHERE id = ?", [rollout_id]).fetchone()
        out[side] = row[0] if row and row[0] else None
    return out


def dpo_rows(store: Store, ws: Workspace, statuses: Iterable[str] = ("accepted",), stage: int = 1,
             dataset: str | None = None, contract: TwoStepContract | None = None) -> list[Row]:
    """DPO rows of the selected pairs (see module doc). Stage 2 skips pairs where a side has no
    box (no crop to answer on); either stage skips pairs with no usable chosen box text."""
    contract = contract or TwoStepContract()
    if stage not in (1, 2):
        raise DataError(f"DPO stage must be 1 (box step) or 2 (box + answer), not {stage!r}")
    images = ImageCache(ws)
    rows = []
    for pair in selected_pairs(store, statuses, dataset):
        texts = side_texts(store, pair, contract)
        if texts["chosen"] is None or texts["rejected"] is None:
            continue
        original = images(pair["image"])
        full = contract.prepare_full(original)
        row: Row = {"images": [full], "prompt": box_prompt(pair["question"]),
                    "chosen": assistant(texts["chosen"]), "rejected": assistant(texts["rejected"]),
                    "pair_id": pair["id"]}
        if stage == 2:
            boxes = pair_boxes(pair)
            if boxes["chosen"] is None or boxes["rejected"] is None:
                continue
            for side in ("chosen", "rejected"):
                row.update(_answer_step(pair, side, original, full, boxes[side], texts[side], contract))
        rows.append(row)
    return rows


def _answer_step(pair: dict[str, Any], side: str, original: Image.Image, full: Image.Image, box: Box,
                 text: str, contract: TwoStepContract) -> Row:
    """``full`` is ``original`` as prepared for the model; the crop is cut from the original."""
    return {f"{side}_answer_images": [full, contract.prepare_crop(contract.crop(original, box))],
            f"{side}_answer_prompt": answer_prompt(pair["question"], text),
            f"{side}_answer": assistant(pair.get(f"{side}_answer") or "")}


# ---------------------------------------------------------------------- datasets and disk

def to_dataset(rows: list[Row]) -> Any:
    """A ``datasets.Dataset`` of the rows (image lists become ``List(Image())`` columns)."""
    from datasets import Dataset

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


def load_rows(folder: str | Path) -> list[Row]:
    """Rows saved by :func:`save_dataset`, images opened as RGB PIL images."""
    folder = Path(folder)
    path = folder / METADATA
    if not path.is_file():
        raise DataError(f"{folder} holds no {METADATA}; export it with `visrl export --format trl-sft` "
                        "or `--format trl-dpo`")
    rows = []
    opened: dict[str, Image.Image] = {}
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
                        opened[name] = _open(folder, name, path, n)
                row[column] = [opened[name] for name in value]
            else:
                row[key] = value
        rows.append(row)
    return rows


def _open(folder: Path, name: str, path: Path, line: int) -> Image.Image:
    file = (folder / name).resolve()
    if not file.is_relative_to(folder.resolve()) or not file.is_file():
        raise DataError(f"{path}: line {line} names image {name!r}, which is not a file of {folder}")
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
