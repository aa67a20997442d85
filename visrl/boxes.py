"""Boxes: one internal convention, explicit conversions at the edges.

Internally a :class:`Box` is absolute pixels ``(x1, y1, x2, y2)`` of the ORIGINAL image, floats,
``x1 < x2`` and ``y1 < y2``. Text forms (see shared DESIGN.md) are converted here and nowhere else:

``viscot``      ``[0.631, 0.729, 0.695, 0.779]`` normalized to the image padded to a square
                (LLaVA's expand2square: side L = max(w, h), short side offset by (L - short)//2).
``qwen2``       ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``, integers in [0, 1000) per axis.
``qwen2_5``     ``{"bbox_2d": [x1, y1, x2, y2]}`` in pixels of the processor's RESIZED image.
``qwen3``       ``{"bbox_2d": [x1, y1, x2, y2]}`` integers in [0, 1000) per axis.
``normalized``  ``[x1, y1, x2, y2]`` per-axis normalized to [0, 1].

Parsing model output is forgiving (extra words, code fences, several boxes: the first wins) and
returns ``None`` for "no box"; it never raises on text.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass

from PIL import Image

from visrl.vocabulary import BOX_FORMATS  # noqa: F401  (re-exported: BOX_FORMATS lived here)

Size = tuple[int, int]  # (width, height) in pixels
# The pixel budget of Qwen2.5-VL's shipped processor (preprocessor_config.json), which servers such
# as vLLM resize images into unless told otherwise: ``qwen2_5`` boxes are pixels of that resize.
QWEN2_5_MIN_PIXELS = 3136
QWEN2_5_MAX_PIXELS = 12845056

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_LIST4 = re.compile(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]")
_QWEN2 = re.compile(rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,?\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)")
_BBOX2D = re.compile(r'"?bbox_2d"?\s*:\s*(\[[^\]]*\])')
_PIXEL_SUFFIX = re.compile(r"^(.*)###\s*(\[.*\])\s*$", re.S)


@dataclass(frozen=True)
class Box:
    """Absolute pixel box of the original image; ``x1 < x2`` and ``y1 < y2``."""

    x1: float
    y1: float
    x2: float
    y2: float

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    @property
    def area(self) -> float:
        return max(0.0, self.width) * max(0.0, self.height)

    @property
    def center(self) -> tuple[float, float]:
        return (self.x1 + self.x2) / 2, (self.y1 + self.y2) / 2

    def as_list(self) -> list[float]:
        return [self.x1, self.y1, self.x2, self.y2]

    def rounded(self, ndigits: int = 1) -> Box:
        return Box(*(round(v, ndigits) for v in self.as_list()))

    def is_valid(self) -> bool:
        values = self.as_list()
        return all(math.isfinite(v) for v in values) and self.x1 < self.x2 and self.y1 < self.y2

    def clamp(self, size: Size) -> Box | None:
        """The part of the box inside a ``size`` image, or None when nothing is left."""
        w, h = size
        box = Box(min(max(self.x1, 0.0), w), min(max(self.y1, 0.0), h),
                  min(max(self.x2, 0.0), w), min(max(self.y2, 0.0), h))
        return box if box.is_valid() else None

    def inside(self, size: Size, tolerance: float = 1.0) -> bool:
        """True when the box lies within a ``size`` image (``tolerance`` pixels of slack)."""
        w, h = size
        return (self.x1 >= -tolerance and self.y1 >= -tolerance
                and self.x2 <= w + tolerance and self.y2 <= h + tolerance)

    @classmethod
    def from_list(cls, values: list[float] | tuple[float, ...]) -> Box:
        x1, y1, x2, y2 = (float(v) for v in values)
        return cls(x1, y1, x2, y2)


def iou(a: Box | None, b: Box | None) -> float:
    """Intersection over union of two pixel boxes; 0.0 when either is missing."""
    if a is None or b is None:
        return 0.0
    ix = max(0.0, min(a.x2, b.x2) - max(a.x1, b.x1))
    iy = max(0.0, min(a.y2, b.y2) - max(a.y1, b.y1))
    inter = ix * iy
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


# ---------------------------------------------------------------- square padding (Visual-CoT)

def _square_offsets(size: Size) -> tuple[int, int, int]:
    """(side, x offset, y offset) of the image inside its expand2square padding."""
    w, h = size
    side = max(w, h)
    return side, (side - w) // 2, (side - h) // 2


def to_viscot(box: Box, size: Size) -> list[float]:
    side, ox, oy = _square_offsets(size)
    return [(box.x1 + ox) / side, (box.y1 + oy) / side, (box.x2 + ox) / side, (box.y2 + oy) / side]


def from_viscot(values: list[float], size: Size) -> Box:
    side, ox, oy = _square_offsets(size)
    x1, y1, x2, y2 = values
    return Box(x1 * side - ox, y1 * side - oy, x2 * side - ox, y2 * side - oy)


# ---------------------------------------------------------------- parse / format

def parse_box(text: str | None, fmt: str, size: Size, resized: Size | None = None) -> Box | None:
    """The first box in ``text`` written in ``fmt``, as pixels of the original ``size`` image.

    ``resized`` is the processor's input size, needed only for ``qwen2_5``. Returns None for
    "no box": nothing box-like, non-finite numbers, or nothing left after clamping to the image.
    Reversed corners are put in order (models sometimes emit them so).
    """
    if not text:
        return None
    values = _find_values(text, fmt)
    if values is None or not all(math.isfinite(v) for v in values):
        return None
    w, h = size
    x1, y1, x2, y2 = values
    if fmt == "viscot":
        box = from_viscot(values, size)
    elif fmt == "normalized":
        box = Box(x1 * w, y1 * h, x2 * w, y2 * h)
    elif fmt in ("qwen2", "qwen3"):
        box = Box(x1 / 1000 * w, y1 / 1000 * h, x2 / 1000 * w, y2 / 1000 * h)
    elif fmt == "qwen2_5":
        rw, rh = resized or size
        box = Box(x1 * w / rw, y1 * h / rh, x2 * w / rw, y2 * h / rh)
    else:
        raise ValueError(f"unknown box format {fmt!r}; use one of {', '.join(BOX_FORMATS)}")
    box = Box(min(box.x1, box.x2), min(box.y1, box.y2), max(box.x1, box.x2), max(box.y1, box.y2))
    return box.clamp(size)


def format_box(box: Box, fmt: str, size: Size, resized: Size | None = None) -> str:
    """``box`` (pixels of the original ``size`` image) written as ``fmt`` text."""
    w, h = size
    if fmt == "viscot":
        return "[" + ", ".join(f"{v:.3f}" for v in to_viscot(box, size)) + "]"
    if fmt == "normalized":
        return "[" + ", ".join(f"{v:.3f}" for v in (box.x1 / w, box.y1 / h, box.x2 / w, box.y2 / h)) + "]"
    if fmt in ("qwen2", "qwen3"):
        q = [_to_thousand(box.x1, w), _to_thousand(box.y1, h), _to_thousand(box.x2, w), _to_thousand(box.y2, h)]
        if fmt == "qwen2":
            return f"<|box_start|>({q[0]},{q[1]}),({q[2]},{q[3]})<|box_end|>"
        return json.dumps({"bbox_2d": q})
    if fmt == "qwen2_5":
        rw, rh = resized or size
        px = [round(box.x1 * rw / w), round(box.y1 * rh / h), round(box.x2 * rw / w), round(box.y2 * rh / h)]
        return json.dumps({"bbox_2d": px})
    raise ValueError(f"unknown box format {fmt!r}; use one of {', '.join(BOX_FORMATS)}")


def parse_pixel_suffix(entry: str) -> tuple[str, Box | None]:
    """Split a Visual-CoT image entry ``path###[x1, y1, x2, y2]`` into path and pixel box.

    An entry without ``###`` is just a path (box None). A malformed box after ``###`` raises
    ValueError so importers can name the record.
    """
    match = _PIXEL_SUFFIX.match(entry)
    if not match:
        return entry, None
    values = _first_list(match.group(2))
    if values is None:
        raise ValueError(f"cannot read a pixel box from {match.group(2)!r}")
    return match.group(1), Box.from_list(values)


def _to_thousand(value: float, extent: float) -> int:
    return int(min(999, max(0, round(value / extent * 1000))))


def _find_values(text: str, fmt: str) -> list[float] | None:
    if fmt == "qwen2":
        m = _QWEN2.search(text)
        if m:
            return [float(g) for g in m.groups()]
        return _first_list(text)
    if fmt in ("qwen2_5", "qwen3"):
        m = _BBOX2D.search(text)
        if m:
            values = _first_list(m.group(1))
            if values is not None:
                return values
        return _first_list(text)
    return _first_list(text)


def _first_list(text: str) -> list[float] | None:
    m = _LIST4.search(text)
    if not m:
        return None
    try:
        return [float(g) for g in m.groups()]
    except ValueError:
        return None


# ---------------------------------------------------------------- crops and negatives

def crop_box(image: Image.Image, box: Box, min_size: int = 8, margin: float = 0.0) -> Image.Image:
    """Crop ``box`` out of ``image`` (pixels of that image), clamped to it (see :func:`crop_rect`)."""
    return image.crop(crop_rect(image.size, box, min_size, margin))


def crop_rect(size: Size, box: Box, min_size: int = 8, margin: float = 0.0) -> tuple[int, int, int, int]:
    """The integer rectangle (left, top, right, bottom) :func:`crop_box` cuts from a ``size`` image.

    ``margin`` widens each side by that fraction of the box's size (0.1 = 10%). The crop is at
    least ``min_size`` pixels on each side (grown around the box centre, within the image), so a
    degenerate box still gives a usable image.
    """
    w, h = size
    mx, my = box.width * margin, box.height * margin
    x1, y1, x2, y2 = box.x1 - mx, box.y1 - my, box.x2 + mx, box.y2 + my
    x1, x2 = _grow_span(x1, x2, min(min_size, w), w)
    y1, y2 = _grow_span(y1, y2, min(min_size, h), h)
    return int(math.floor(x1)), int(math.floor(y1)), int(math.ceil(x2)), int(math.ceil(y2))


def _grow_span(lo: float, hi: float, minimum: float, extent: float) -> tuple[float, float]:
    """Clamp [lo, hi] into [0, extent] and widen it to at least ``minimum``, staying inside."""
    lo, hi = max(0.0, min(lo, extent)), max(0.0, min(hi, extent))
    if hi - lo < minimum:
        centre = (lo + hi) / 2
        lo = min(max(0.0, centre - minimum / 2), extent - minimum)
        hi = lo + minimum
    return lo, hi


def random_negative_box(box: Box, size: Size, rng: random.Random, jitter: float = 0.3,
                        tries: int = 100) -> Box:
    """A random box of similar size (each side x[1-jitter, 1+jitter]) that does not overlap ``box``.

    The method's fallback "bad" box. When no non-overlapping placement exists (the box fills the
    image), the placement with the smallest IoU among ``tries`` is returned.
    """
    w, h = size
    best: tuple[float, Box] | None = None
    for _ in range(tries):
        bw = min(w, max(1.0, box.width * rng.uniform(1 - jitter, 1 + jitter)))
        bh = min(h, max(1.0, box.height * rng.uniform(1 - jitter, 1 + jitter)))
        x1 = rng.uniform(0, w - bw)
        y1 = rng.uniform(0, h - bh)
        cand = Box(x1, y1, x1 + bw, y1 + bh)
        overlap = iou(cand, box)
        if overlap == 0.0:
            return cand
        if best is None or overlap < best[0]:
            best = (overlap, cand)
    assert best is not None
    return best[1]
