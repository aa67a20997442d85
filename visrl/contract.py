"""The two-step contract: how a model's box text maps to pixels, which crop it answers on, and
which pixel budgets its images get. One frozen object owns all of it.

Generation, evaluation, training rows, export, GRPO rewards, the remote backend and the chat tab
must agree on these, or a model is trained on one crop and evaluated on another (or stores boxes
read in a frame it never saw). So every one of them calls a :class:`TwoStepContract`; none calls
:func:`visrl.boxes.parse_box`, :func:`visrl.boxes.format_box` or :func:`visrl.boxes.crop_box`
itself.

Frames. A :class:`visrl.boxes.Box` is pixels of the ORIGINAL image. ``qwen2_5`` box text is pixels
of the image the model was given: the original, shrunk to ``full_max_pixels`` (if set), then
resized by the processor's ``smart_resize`` (sides multiples of ``resize_factor`` = patch size x
merge size, 28 for Qwen2/2.5-VL, area within [``image_min_pixels``, ``image_max_pixels``]).
:meth:`TwoStepContract.input_size` computes that frame; every other format ignores it.

Budgets. ``image_min_pixels`` / ``image_max_pixels`` are the processor's own budget (every image
the model sees, full and crop); :meth:`apply_budget` sets them on a transformers 5 processor
(``size`` is a ``SizeDict`` of ``shortest_edge`` / ``longest_edge`` pixels there).
``full_max_pixels`` shrinks the full image and ``crop_min_pixels`` enlarges the crop before the
processor, so the crop can show a region in more detail than the full image does. ``None`` means
"the processor's own" (Qwen2.5-VL's shipped budget when no processor is at hand).

Persistence. A checkpoint carries its contract in ``visrl_model.json`` (written at training and
merge, read at load: :func:`read_contract`); a config key only overrides a field
(:meth:`TwoStepContract.override`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from PIL import Image

from visrl.boxes import (
    QWEN2_5_MAX_PIXELS,
    QWEN2_5_MIN_PIXELS,
    Box,
    Size,
    crop_box,
    crop_rect,
    format_box,
    parse_box,
)
from visrl.errors import ConfigError
from visrl.vocabulary import BOX_FORMATS, PROMPT_LAYOUTS

CONTRACT_FILE = "visrl_model.json"  # beside a model's config.json or an adapter's adapter_config.json
QWEN_RESIZE_FACTOR = 28  # Qwen2/2.5-VL: 14 px patches, 2x2 merged into one visual token
MIN_CROP_SIZE = 8  # px per side: a degenerate box still gives an image the processor takes
MAX_CROP_MARGIN = 10.0  # box widths per side: beyond it the "crop" is the whole image anyway


@dataclass(frozen=True)
class TwoStepContract:
    """What a two-step model means by a box and what it is shown (see the module doc)."""

    box_format: str = "viscot"
    crop_margin: float = 0.0  # fraction of the box's width/height added on each side (0.1 = 10%)
    crop_min_size: int = MIN_CROP_SIZE  # px, each side of a crop
    image_min_pixels: int | None = None  # processor budget, area in px; None = the processor's
    image_max_pixels: int | None = None
    full_max_pixels: int | None = None  # the full image shrunk to this area first; None = as is
    crop_min_pixels: int | None = None  # the crop enlarged to this area first; None = as is
    resize_factor: int = QWEN_RESIZE_FACTOR  # px: patch size x merge size of the processor
    prompt_layout: str = "image_first"  # or question_first: the question's text before its image

    def __post_init__(self) -> None:
        if self.box_format not in BOX_FORMATS:
            raise ConfigError(f"box_format {self.box_format!r} unknown; use one of {', '.join(BOX_FORMATS)}")
        # per side, in box widths; NaN compares false and fails too
        if not (isinstance(self.crop_margin, (int, float)) and 0 <= self.crop_margin <= MAX_CROP_MARGIN):
            raise ConfigError(f"crop_margin must be in [0.0, {MAX_CROP_MARGIN:.1f}], got {self.crop_margin!r}")
        if self.prompt_layout not in PROMPT_LAYOUTS:
            raise ConfigError(f"prompt_layout {self.prompt_layout!r} unknown; use one of {', '.join(PROMPT_LAYOUTS)}")
        if self.crop_min_size < 1 or self.resize_factor < 1:
            raise ConfigError(f"crop_min_size and resize_factor must be >= 1, got {self.crop_min_size} "
                              f"and {self.resize_factor}")
        for name in ("image_min_pixels", "image_max_pixels", "full_max_pixels", "crop_min_pixels"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be at least 1 pixel or null, got {value!r}")
        low, high = self.image_min_pixels, self.image_max_pixels
        if low is not None and high is not None and low > high:
            raise ConfigError(f"image_min_pixels ({low}) must not exceed image_max_pixels ({high})")

    # ------------------------------------------------------------------ boxes <-> text

    def input_size(self, size: Size) -> Size:
        """(width, height) of the image the model is given for an original ``size`` image: the
        frame ``qwen2_5`` boxes are written in."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        width, height = fit_size(size, max_pixels=self.full_max_pixels)
        low, high = self.processor_budget()
        try:
            height, width = smart_resize(height, width, factor=self.resize_factor, min_pixels=low, max_pixels=high)
        except ValueError:  # aspect ratio over 200: the processor refuses it too; keep the frame
            pass
        return width, height

    def processor_budget(self) -> tuple[int, int]:
        """(min, max) pixels the processor resizes into (Qwen2.5-VL's shipped ones when unset)."""
        low = self.image_min_pixels or QWEN2_5_MIN_PIXELS
        return min(low, self.image_max_pixels or QWEN2_5_MAX_PIXELS), self.image_max_pixels or QWEN2_5_MAX_PIXELS

    def _frame(self, size: Size) -> Size | None:
        return self.input_size(size) if self.box_format == "qwen2_5" else None

    def parse(self, text: str | None, size: Size) -> Box | None:
        """The first box of a model's ``text`` in pixels of the original ``size`` image; None for
        no box (nothing parseable, non-finite, nothing left inside the image). Never raises on text."""
        return parse_box(text, self.box_format, size, resized=self._frame(size))

    def format(self, box: Box, size: Size) -> str:
        """``box`` (pixels of the original ``size`` image) as the text this model writes."""
        return format_box(box, self.box_format, size, resized=self._frame(size))

    # ------------------------------------------------------------------ the crop

    def crop_region(self, box: Box | None, size: Size) -> Box:
        """The pixel rectangle of the original image the answer step sees: ``box`` widened by
        ``crop_margin``, clamped to the image, at least ``crop_min_size`` per side; the whole image
        when ``box`` is None."""
        if box is None:
            return Box(0, 0, *size)
        return Box(*crop_rect(size, box, self.crop_min_size, self.crop_margin))

    def crop(self, image: Image.Image, box: Box | None) -> Image.Image:
        """The crop of ``image`` (the original) the answer step sees (see :meth:`crop_region`)."""
        if box is None:
            return image
        return crop_box(image, box, min_size=self.crop_min_size, margin=self.crop_margin)

    # ------------------------------------------------------------------ images the model sees

    def prepare_full(self, image: Image.Image) -> Image.Image:
        """The full image as the model is given it (RGB, shrunk to ``full_max_pixels``)."""
        return fit_pixels(_rgb(image), max_pixels=self.full_max_pixels)

    def prepare_crop(self, crop: Image.Image) -> Image.Image:
        """The crop as the model is given it (RGB, enlarged to ``crop_min_pixels``)."""
        return fit_pixels(_rgb(crop), min_pixels=self.crop_min_pixels)

    def apply_budget(self, processor: Any) -> None:
        """Set ``image_min_pixels`` / ``image_max_pixels`` on ``processor``'s image processor (a
        ``SizeDict`` in transformers 5: ``shortest_edge`` / ``longest_edge`` are pixel areas).
        Nothing happens when neither is set."""
        image_processor = getattr(processor, "image_processor", processor)
        if (self.image_min_pixels is None and self.image_max_pixels is None) or image_processor is None:
            return
        low, high = processor_pixels(image_processor)
        high = self.image_max_pixels or high
        low = self.image_min_pixels or low
        if high is not None and low is not None:
            low = min(low, high)
        size = getattr(image_processor, "size", None)
        values = {k: v for k, v in _as_dict(size).items() if v is not None}
        values.update(shortest_edge=low, longest_edge=high)
        try:
            from transformers.image_utils import SizeDict

            image_processor.size = SizeDict(**values) if not isinstance(size, dict) else values
        except ImportError:  # pragma: no cover - transformers is a dependency
            image_processor.size = values
        for name, value in (("min_pixels", low), ("max_pixels", high)):  # transformers 4.x attributes
            if hasattr(image_processor, name):
                setattr(image_processor, name, value)

    def bound_to(self, processor: Any) -> TwoStepContract:
        """This contract with the processor's effective budget and resize factor filled in (call
        after :meth:`apply_budget`): the frame computed here is then the processor's exactly."""
        image_processor = getattr(processor, "image_processor", processor)
        if image_processor is None:
            return self
        low, high = processor_pixels(image_processor)
        patch, merge = getattr(image_processor, "patch_size", None), getattr(image_processor, "merge_size", None)
        factor = patch * merge if isinstance(patch, int) and isinstance(merge, int) else self.resize_factor
        return replace(self, image_min_pixels=low or self.image_min_pixels,
                       image_max_pixels=high or self.image_max_pixels, resize_factor=factor)

    # ------------------------------------------------------------------ overrides and records

    def override(self, **values: Any) -> TwoStepContract:
        """A copy with the given fields replaced; ``None`` values leave a field as it is (a config
        key that is not set does not override the checkpoint's contract)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown contract field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        given = {k: v for k, v in values.items() if v is not None}
        return replace(self, **given) if given else self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any], default_box_format: str = "viscot") -> TwoStepContract:
        """The contract of a ``visrl_model.json`` record; other keys (``base``, ``model_id``) are
        ignored, missing fields take their defaults."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in record.items() if k in known and v is not None}
        values.setdefault("box_format", default_box_format)
        return cls(**values)


# ---------------------------------------------------------------------- pixels

def fit_size(size: Size, min_pixels: int | None = None, max_pixels: int | None = None) -> Size:
    """``size`` scaled (aspect kept) so its area lies in [min_pixels, max_pixels]."""
    width, height = size
    area = width * height
    scale = 1.0
    if max_pixels and area > max_pixels:
        scale = math.sqrt(max_pixels / area)
    elif min_pixels and area < min_pixels:
        scale = math.sqrt(min_pixels / area)
    if scale == 1.0:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def fit_pixels(image: Image.Image, min_pixels: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """``image`` scaled (aspect kept, bicubic) so its area lies in [min_pixels, max_pixels]."""
    size = fit_size(image.size, min_pixels, max_pixels)
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)


def _rgb(image: Image.Image) -> Image.Image:
    """``image`` itself when it is RGB already (no copy: rows share one full image), else RGB."""
    return image if image.mode == "RGB" else image.convert("RGB")


def processor_pixels(image_processor: Any) -> tuple[int | None, int | None]:
    """(min, max) pixel budget of an image processor: ``size`` is a dict or a ``SizeDict``
    (``shortest_edge`` / ``longest_edge``) by version, else ``min_pixels`` / ``max_pixels``."""
    size = _as_dict(getattr(image_processor, "size", None))
    low = size.get("shortest_edge") or getattr(image_processor, "min_pixels", None)
    high = size.get("longest_edge") or getattr(image_processor, "max_pixels", None)
    return low, high


def _as_dict(size: Any) -> dict[str, Any]:
    if isinstance(size, dict):
        return dict(size)
    if size is None:
        return {}
    return {k: getattr(size, k) for k in ("height", "width", "shortest_edge", "longest_edge",
                                          "max_height", "max_width") if getattr(size, k, None) is not None}


# ---------------------------------------------------------------------- checkpoints

def read_record(folder: str | Path | None) -> dict[str, Any]:
    """The ``visrl_model.json`` record of a folder, or {} when it has none or it is unreadable."""
    if folder is None:
        return {}
    path = Path(folder, CONTRACT_FILE)
    try:
        record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def read_contract(base: str | Path, adapter: str | Path | None = None,
                  default_box_format: str = "viscot") -> TwoStepContract:
    """The contract a model (plus adapter) was trained with: the adapter's record over the base
    folder's, field by field, over the family's ``default_box_format``."""
    record = {**read_record(base), **read_record(adapter)}
    return TwoStepContract.from_dict(record, default_box_format)


def write_contract(folder: str | Path, contract: TwoStepContract, **extra: Any) -> None:
    """Write ``contract`` (plus ``extra`` keys, e.g. the base an adapter belongs to) into
    ``folder``'s ``visrl_model.json``, keeping keys of an existing record that are not given."""
    record = {**read_record(folder), **contract.to_dict(), **extra}
    Path(folder).mkdir(parents=True, exist_ok=True)
    Path(folder, CONTRACT_FILE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
