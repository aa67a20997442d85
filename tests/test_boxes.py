"""Boxes: every text form round-trips on square, wide and tall images; parsing never raises."""

from __future__ import annotations

import random

import pytest
from PIL import Image

from visrl.boxes import (
    BOX_FORMATS,
    Box,
    crop_box,
    format_box,
    from_viscot,
    iou,
    parse_box,
    parse_pixel_suffix,
    random_negative_box,
    to_viscot,
)

SIZES = {"square": (512, 512), "wide": (640, 480), "tall": (300, 800), "odd_wide": (641, 480)}
# Processor input sizes for qwen2_5 (multiples of 28, as Qwen2.5-VL resizes).
RESIZED = {"square": (504, 504), "wide": (644, 476), "tall": (308, 812), "odd_wide": (644, 476)}
BOXES = {  # a few boxes per image, as fractions of (w, h): small, large, touching the corners
    "small": (0.10, 0.20, 0.18, 0.27),
    "large": (0.05, 0.10, 0.90, 0.95),
    "corner": (0.0, 0.0, 1.0, 1.0),
    "thin": (0.40, 0.02, 0.42, 0.98),
}


def quantum(fmt: str, size: tuple[int, int], resized: tuple[int, int]) -> tuple[float, float]:
    """Largest error (pixels, x and y) a format's text may introduce for a ``size`` image."""
    w, h = size
    if fmt == "viscot":  # 3 decimals of the padded square side
        side = max(w, h)
        return 0.0005 * side + 1e-6, 0.0005 * side + 1e-6
    if fmt == "normalized":  # 3 decimals per axis
        return 0.0005 * w + 1e-6, 0.0005 * h + 1e-6
    if fmt in ("qwen2", "qwen3"):  # integers in [0, 1000); 1000 is written 999
        return w / 1000 + 1e-6, h / 1000 + 1e-6
    rw, rh = resized  # qwen2_5: whole pixels of the resized image
    return 0.5 * w / rw + 1e-6, 0.5 * h / rh + 1e-6


@pytest.mark.parametrize("fmt", BOX_FORMATS)
@pytest.mark.parametrize("shape", list(SIZES))
@pytest.mark.parametrize("which", list(BOXES))
def test_round_trip(fmt: str, shape: str, which: str) -> None:
    size, resized = SIZES[shape], RESIZED[shape]
    w, h = size
    fx1, fy1, fx2, fy2 = BOXES[which]
    box = Box(fx1 * w, fy1 * h, fx2 * w, fy2 * h)
    text = format_box(box, fmt, size, resized)
    back = parse_box(text, fmt, size, resized)
    assert back is not None, text
    qx, qy = quantum(fmt, size, resized)
    assert abs(back.x1 - box.x1) <= qx and abs(back.x2 - box.x2) <= qx, (text, back)
    assert abs(back.y1 - box.y1) <= qy and abs(back.y2 - box.y2) <= qy, (text, back)


@pytest.mark.parametrize("fmt, size, box, text", [
    # Visual-CoT: 640x480 padded to 640x640, y offset (640-480)//2 = 80, divide by 640.
    ("viscot", (640, 480), Box(64, 48, 192, 176), "[0.100, 0.200, 0.300, 0.400]"),
    # tall 480x640: x offset 80.
    ("viscot", (480, 640), Box(80, 64, 240, 128), "[0.250, 0.100, 0.500, 0.200]"),
    # odd difference 641x480: offset (641-480)//2 = 80, side 641.
    ("viscot", (641, 480), Box(0, 0, 641, 480), f"[0.000, {80 / 641:.3f}, 1.000, {560 / 641:.3f}]"),
    ("viscot", (500, 500), Box(50, 100, 250, 400), "[0.100, 0.200, 0.500, 0.800]"),
    ("normalized", (640, 480), Box(64, 96, 192, 192), "[0.100, 0.200, 0.300, 0.400]"),
    ("qwen2", (640, 480), Box(64, 96, 192, 192), "<|box_start|>(100,200),(300,400)<|box_end|>"),
    ("qwen2", (640, 480), Box(0, 0, 640, 480), "<|box_start|>(0,0),(999,999)<|box_end|>"),
    ("qwen3", (640, 480), Box(64, 96, 192, 192), '{"bbox_2d": [100, 200, 300, 400]}'),
])
def test_format_hand_computed(fmt: str, size: tuple[int, int], box: Box, text: str) -> None:
    assert format_box(box, fmt, size) == text


def test_qwen2_5_uses_resized_pixels() -> None:
    # 640x480 original shown to the model as 1280x960: pixels double on the way out, halve back.
    box = Box(64, 96, 192, 192)
    text = format_box(box, "qwen2_5", (640, 480), resized=(1280, 960))
    assert text == '{"bbox_2d": [128, 192, 384, 384]}'
    assert parse_box(text, "qwen2_5", (640, 480), resized=(1280, 960)) == box
    # Without a resized size the numbers are original pixels.
    assert format_box(box, "qwen2_5", (640, 480)) == '{"bbox_2d": [64, 96, 192, 192]}'


def test_viscot_is_not_per_axis() -> None:
    # The same text means different pixels under the two conventions on a non-square image.
    text = "[0.1, 0.2, 0.3, 0.4]"
    assert parse_box(text, "viscot", (640, 480)) == Box(64, 48, 192, 176)
    assert parse_box(text, "normalized", (640, 480)) == Box(64, 96, 192, 192)
    assert to_viscot(Box(64, 48, 192, 176), (640, 480)) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert from_viscot([0.1, 0.2, 0.3, 0.4], (640, 480)) == Box(64, 48, 192, 176)


@pytest.mark.parametrize("entry, path, box", [
    ("cot/flickr30k/1000.jpg###[160, 58, 259, 197]", "cot/flickr30k/1000.jpg", Box(160, 58, 259, 197)),
    ("a/b c.png### [1.5,2,30,40.25]", "a/b c.png", Box(1.5, 2, 30, 40.25)),
    ("plain/path.jpg", "plain/path.jpg", None),
])
def test_parse_pixel_suffix(entry: str, path: str, box: Box | None) -> None:
    assert parse_pixel_suffix(entry) == (path, box)


@pytest.mark.parametrize("entry", ["a.jpg###[1, 2]", "a.jpg###[x, 2, 3, 4]", "a.jpg###[1, 2, 3, 4, 5]"])
def test_parse_pixel_suffix_bad_box_raises(entry: str) -> None:
    with pytest.raises(ValueError, match="cannot read a pixel box"):
        parse_pixel_suffix(entry)


@pytest.mark.parametrize("fmt, text, expected", [
    ("viscot", "The dog is at [0.1, 0.2, 0.3, 0.4] in the image.", Box(64, 48, 192, 176)),
    ("viscot", "[0.1,0.2,0.3,0.4] then [0.5, 0.5, 0.6, 0.6]", Box(64, 48, 192, 176)),  # first wins
    ("viscot", "```json\n[0.1, 0.2, 0.3, 0.4]\n```", Box(64, 48, 192, 176)),
    ("viscot", "[.1, .2, .3, .4]", Box(64, 48, 192, 176)),
    ("normalized", "box: [ 0.1 , 0.2 , 0.3 , 0.4 ]", Box(64, 96, 192, 192)),
    ("qwen2", "Look here <|box_start|>(100,200),(300,400)<|box_end|> please", Box(64, 96, 192, 192)),
    ("qwen2", "(100, 200), (300, 400) and (0,0),(10,10)", Box(64, 96, 192, 192)),
    ("qwen3", '```json\n[{"bbox_2d": [100, 200, 300, 400], "label": "dog"}]\n```', Box(64, 96, 192, 192)),
    ("qwen3", '{"bbox_2d": [100, 200, 300, 400]} {"bbox_2d": [0, 0, 10, 10]}', Box(64, 96, 192, 192)),
    ("qwen3", "the box is [100, 200, 300, 400]", Box(64, 96, 192, 192)),  # bare list accepted
    ("qwen2_5", 'Sure! {"bbox_2d": [64, 96, 192, 192]} done', Box(64, 96, 192, 192)),
    # Corners given in the wrong order are put in order (models sometimes write them so).
    ("normalized", "[0.3, 0.4, 0.1, 0.2]", Box(64, 96, 192, 192)),
    # Partly outside the image: clamped to it.
    ("normalized", "[-0.5, 0.2, 0.3, 1.5]", Box(0, 96, 192, 480)),
])
def test_parse_forgiving(fmt: str, text: str, expected: Box) -> None:
    assert parse_box(text, fmt, (640, 480)) == expected


@pytest.mark.parametrize("text", [
    None, "", "no box here", "[a, b, c, d]", "[0.1, 0.2, 0.3]", "[0.1, 0.2, 0.3, 0.4, 0.5]",
    "[nan, 0.1, 0.2, 0.3]", "[NaN, NaN, NaN, NaN]", "[inf, 0, 1, 1]", "[1e999, 0, 1, 1]",
    "[0.1, 0.1, 0.1, 0.2]",  # zero width
    "[0.2, 0.3, 0.2, 0.3]",  # a point
    "[-0.5, -0.5, -0.1, -0.1]",  # wholly outside the image
    "[1200, 1300, 1400, 1500]",  # wholly outside for every scale
    '{"bbox_2d": null}', '{"bbox_2d": []}', "```json\n```", "\x00\xff" * 50,
])
@pytest.mark.parametrize("fmt", BOX_FORMATS)
def test_parse_no_box_is_none(fmt: str, text: str | None) -> None:
    assert parse_box(text, fmt, (640, 480), resized=(644, 476)) is None


def test_parse_unknown_format_raises() -> None:
    with pytest.raises(ValueError, match="unknown box format 'yolo'"):
        parse_box("[1, 2, 3, 4]", "yolo", (10, 10))
    with pytest.raises(ValueError, match="unknown box format 'yolo'"):
        format_box(Box(1, 2, 3, 4), "yolo", (10, 10))


@pytest.mark.parametrize("a, b, expected", [
    (Box(0, 0, 10, 10), Box(0, 0, 10, 10), 1.0),
    (Box(0, 0, 10, 10), Box(20, 20, 30, 30), 0.0),
    (Box(0, 0, 10, 10), Box(10, 0, 20, 10), 0.0),  # touching edges
    (Box(0, 0, 10, 10), Box(5, 0, 15, 10), 50 / 150),  # half overlap: 50 / (100 + 100 - 50)
    (Box(0, 0, 10, 10), Box(5, 5, 15, 15), 25 / 175),
    (Box(0, 0, 10, 10), Box(2, 2, 4, 4), 4 / 100),  # contained
    (Box(0, 0, 10, 10), None, 0.0),
    (None, None, 0.0),
])
def test_iou(a: Box | None, b: Box | None, expected: float) -> None:
    assert iou(a, b) == pytest.approx(expected)
    assert iou(b, a) == pytest.approx(expected)


def test_box_geometry() -> None:
    box = Box(10, 20, 40, 30)
    assert (box.width, box.height, box.area, box.center) == (30, 10, 300, (25, 25))
    assert Box(5, 5, 1, 1).area == 0.0  # inverted: no area, not negative
    assert Box(1.26, 2.0, 3.0, 4.04).rounded(1) == Box(1.3, 2.0, 3.0, 4.0)
    assert Box.from_list([1, "2", 3.5, 4]) == Box(1.0, 2.0, 3.5, 4.0)
    assert Box(1, 2, 3, 4).as_list() == [1, 2, 3, 4]
    assert Box(1, 2, 3, 4).is_valid()
    assert not Box(3, 2, 1, 4).is_valid() and not Box(1, 2, 1, 4).is_valid()
    assert not Box(float("nan"), 2, 3, 4).is_valid()


@pytest.mark.parametrize("box, expected", [
    (Box(10, 10, 50, 50), Box(10, 10, 50, 50)),
    (Box(-10, -5, 50, 50), Box(0, 0, 50, 50)),
    (Box(90, 40, 130, 70), Box(90, 40, 100, 60)),
    (Box(-10, -10, 200, 200), Box(0, 0, 100, 60)),
    (Box(120, 10, 150, 50), None),  # wholly right of the image
    (Box(10, -30, 50, -1), None),  # wholly above
])
def test_clamp(box: Box, expected: Box | None) -> None:
    assert box.clamp((100, 60)) == expected


def test_inside() -> None:
    assert Box(0, 0, 100, 60).inside((100, 60))
    assert Box(-0.5, 0, 100.5, 60).inside((100, 60))  # 1 px tolerance
    assert not Box(-2, 0, 50, 50).inside((100, 60))
    assert not Box(0, 0, 50, 62).inside((100, 60))


@pytest.fixture
def noise() -> Image.Image:
    """A 120x80 image whose every pixel differs, so a crop's content pins its position."""
    image = Image.new("RGB", (120, 80))
    image.putdata([(x * 2 % 256, y * 3 % 256, (x + y) % 256) for y in range(80) for x in range(120)])
    return image


@pytest.mark.parametrize("box, kwargs, pixels", [
    (Box(10, 20, 50, 60), {}, (10, 20, 50, 60)),
    (Box(10.4, 20.6, 49.2, 59.9), {}, (10, 20, 50, 60)),  # outward to whole pixels
    (Box(10, 20, 50, 60), {"margin": 0.1}, (6, 16, 54, 64)),  # 10% of 40 px each side
    (Box(-20, -10, 30, 40), {}, (0, 0, 30, 40)),  # clamped to the image
    (Box(100, 50, 140, 100), {}, (100, 50, 120, 80)),
    (Box(5, 5, 115, 75), {"margin": 0.5}, (0, 0, 120, 80)),
    # Grown to 8 px around the centre (60.5, 40.5): 56.5..64.5, outward to whole pixels.
    (Box(60, 40, 61, 41), {}, (56, 36, 65, 45)),
    (Box(60, 40, 62, 42), {}, (57, 37, 65, 45)),
    (Box(60, 40, 61, 41), {"min_size": 20}, (50, 30, 71, 51)),
    (Box(0, 0, 2, 2), {}, (0, 0, 8, 8)),  # grown inside the image, not past its edge
    (Box(119, 79, 120, 80), {}, (112, 72, 120, 80)),
    (Box(10, 10, 20, 20), {"min_size": 100}, (0, 0, 100, 80)),  # min size capped by the image
])
def test_crop_box(noise: Image.Image, box: Box, kwargs: dict, pixels: tuple[int, int, int, int]) -> None:
    crop = crop_box(noise, box, **kwargs)
    expected = noise.crop(pixels)
    assert crop.size == expected.size
    assert crop.tobytes() == expected.tobytes()


@pytest.mark.parametrize("shape", list(SIZES))
@pytest.mark.parametrize("seed", range(5))
def test_random_negative_box(shape: str, seed: int) -> None:
    size = SIZES[shape]
    w, h = size
    box = Box(0.2 * w, 0.3 * h, 0.35 * w, 0.45 * h)
    neg = random_negative_box(box, size, random.Random(seed))
    assert iou(neg, box) == 0.0
    assert neg.is_valid()
    assert neg.x1 >= 0 and neg.y1 >= 0 and neg.x2 <= w and neg.y2 <= h
    # Each side within x[0.7, 1.3] of the box's (jitter 0.3): a "similar size" wrong place.
    assert 0.7 * box.width - 1e-9 <= neg.width <= 1.3 * box.width + 1e-9
    assert 0.7 * box.height - 1e-9 <= neg.height <= 1.3 * box.height + 1e-9
    assert 0.49 * box.area - 1e-6 <= neg.area <= 1.69 * box.area + 1e-6
    # Seeded: the same seed gives the same box, another seed another one.
    assert random_negative_box(box, size, random.Random(seed)) == neg
    assert random_negative_box(box, size, random.Random(seed + 100)) != neg


def test_random_negative_box_jitter_zero_keeps_size() -> None:
    box = Box(10, 10, 40, 30)
    neg = random_negative_box(box, (200, 100), random.Random(3), jitter=0.0)
    assert (neg.width, neg.height) == pytest.approx((30, 20)) and iou(neg, box) == 0.0


def test_random_negative_box_without_room() -> None:
    # A box that fills the image leaves no free place: the least-overlapping of the tries comes
    # back (inside the image, still a valid box), not an exception or an endless loop.
    size = (100, 80)
    box = Box(0, 0, 100, 80)
    neg = random_negative_box(box, size, random.Random(0), tries=20)
    assert neg.is_valid() and neg.inside(size, tolerance=0)
    assert 0 < iou(neg, box) <= 1.0
    assert neg.width <= 100 and neg.height <= 80
    assert random_negative_box(box, size, random.Random(0), tries=20) == neg
