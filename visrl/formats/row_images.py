"""Images of training rows as references, opened only when a row is used.

A row of 30k pairs built eagerly holds every decoded image and crop (a 1000x750 photo is 2.25 MB
decoded; a stage-2 row has it plus two crops), and ``Dataset.from_list`` then PNG-encodes all of
them: measured 10.5 s for 20 rows of 1024x768 images, i.e. hours and ~66 GiB per process for 30k
(issue 11). Rows therefore hold :class:`ImageRef` values (a file, what to cut from it, as the
two-step method cuts), and :class:`RowImages` opens them: per row when a row is materialised
(:meth:`RowImages.open_row`, the eager rows of an export), or per batch as the Trainer indexes
the dataset (:meth:`RowImages.transform`, given to ``datasets.Dataset.with_transform``), so RAM
stays flat in the number of pairs and the first step starts after reading the store, not after
decoding every image.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from visrl.boxes import Box
from visrl.contract import TwoStepContract

Row = dict[str, Any]
IMAGE_COLUMNS = ("images", "chosen_answer_images", "rejected_answer_images")
KINDS = ("full", "crop", "file")


@dataclass(frozen=True)
class ImageRef:
    """One image of a row, not opened yet.

    ``path`` is an absolute file. ``kind``: ``full`` (an item's image as the box step sees it),
    ``crop`` (``box``, pixels of that original image, cut as the answer step's crop is), ``file``
    (an exported image, used as it is). How a full image is prepared and a crop cut is the
    contract's (:class:`RowImages`).
    """

    path: str
    kind: str = "full"
    box: tuple[float, float, float, float] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS or (self.kind == "crop") != (self.box is not None):
            raise ValueError(f"bad image reference {self!r}: a crop needs a box, other kinds none")

    def to_json(self) -> str:
        return json.dumps([self.path, self.kind, list(self.box) if self.box else None])

    @classmethod
    def from_json(cls, text: str) -> ImageRef:
        path, kind, box = json.loads(text)
        return cls(path, kind, tuple(box) if box else None)


class RowImages:
    """Opens :class:`ImageRef` values as ``contract`` says (the Reasoner's crop and preparation):
    a full image is ``contract.prepare_full(original)``, a crop
    ``contract.prepare_crop(contract.crop(original, box))``, a file the file (RGB).

    Decoded originals, with their prepared full image, are kept in a small LRU of ``keep`` files
    (a row's full image serves its two crops and appears in up to three of its image lists), so a
    row opens each file once and shares one full-image object; nothing else is kept.
    """

    def __init__(self, contract: TwoStepContract, keep: int = 4) -> None:
        self.contract = contract
        self.keep = max(1, keep)
        self.opened = 0  # files decoded so far (tests and benchmarks read it)
        self._originals: OrderedDict[str, tuple[Image.Image, Image.Image]] = OrderedDict()

    def original(self, path: str) -> tuple[Image.Image, Image.Image]:
        """(the decoded file, its prepared full image)."""
        entry = self._originals.pop(path, None)
        if entry is None:
            with Image.open(path) as file:
                image = file.convert("RGB")
            entry = (image, self.contract.prepare_full(image))
            self.opened += 1
        self._originals[path] = entry
        while len(self._originals) > self.keep:
            self._originals.popitem(last=False)
        return entry

    def __call__(self, ref: ImageRef) -> Image.Image:
        image, full = self.original(ref.path)
        if ref.kind == "crop":
            return self.contract.prepare_crop(self.contract.crop(image, Box(*ref.box)))
        return full if ref.kind == "full" else image

    def open_row(self, row: Row) -> Row:
        """``row`` with every reference of its image columns opened (other values as they are)."""
        return {key: [self(v) if isinstance(v, ImageRef) else v for v in value] if key in IMAGE_COLUMNS
                else value for key, value in row.items()}

    def transform(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        """``Dataset.with_transform`` hook: the batch's encoded references become images."""
        out = dict(batch)
        for key in IMAGE_COLUMNS:
            if key in batch:
                out[key] = [[self(ImageRef.from_json(ref)) for ref in refs] for refs in batch[key]]
        return out


def has_refs(rows: Sequence[Row]) -> bool:
    """Whether ``rows`` hold references (lazy rows) rather than opened images."""
    return bool(rows) and any(isinstance(v, ImageRef) for key in IMAGE_COLUMNS for v in rows[0].get(key, ()))


def lazy_dataset(rows: Sequence[Row], images: RowImages) -> Any:
    """A ``datasets.Dataset`` of reference rows that opens a row's images when it is indexed.

    The Arrow table holds only text (references as JSON strings): nothing is decoded or
    PNG-encoded up front, whatever the number of rows.
    """
    from datasets import Dataset

    encoded = [{key: [v.to_json() for v in value] if key in IMAGE_COLUMNS else value
                for key, value in row.items()} for row in rows]
    return Dataset.from_list(encoded).with_transform(images.transform)
