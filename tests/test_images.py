"""visrl.images: untrusted images are size-checked from their header before any pixel is decoded."""

from __future__ import annotations

import base64
import io
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from visrl.errors import DataError
from visrl.images import MAX_IMAGE_PIXELS, open_bounded, orientation, peek_image, upright
from visrl.serve_request import decode_data_url


def _png(size: tuple[int, int], mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


def test_over_budget_refused_from_the_header_without_decoding() -> None:
    raw = _png((6000, 3000))  # 18 M pixels: over 4096^2 = 16.8 M; a few KB compressed
    tracemalloc.start()
    start = time.monotonic()
    with pytest.raises(DataError) as caught:
        open_bounded(raw, where="upload")
    took, peak = time.monotonic() - start, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert str(caught.value) == ("upload: the image is 6000x3000 = 18,000,000 pixels; the limit is 16,777,216 "
                                 "pixels (e.g. 4096x4096): downscale it first")
    assert took < 0.5 and peak < 2**20  # decoding would take 54 MB as RGB
    assert MAX_IMAGE_PIXELS == 4096 * 4096


def test_within_budget_decodes_to_rgb(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(_png((40, 30), "RGBA"))
    for source in (path, str(path), path.read_bytes(), path.open("rb"), Image.open(path)):
        image = open_bounded(source, max_pixels=1200)
        assert image.mode == "RGB" and image.size == (40, 30)
    assert peek_image(path.read_bytes()).size == (40, 30)
    with pytest.raises(DataError, match=r"^x: the image is 40x30 = 1,200 pixels; the limit is 1,199"):
        open_bounded(Image.open(path), max_pixels=1199, where="x")


def test_pil_guard_gives_the_same_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    # visrl serve sets Image.MAX_IMAGE_PIXELS to its per-image limit; PIL then refuses images over
    # twice that itself, at open time, before our check runs.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match=r"^x: the image has over 2,000 pixels; the limit is 1,000 pixels \(e.g. 31x31\)"):
        open_bounded(_png((100, 100)), max_pixels=1000, where="x")


def test_extreme_aspect_refused() -> None:
    with pytest.raises(DataError, match="the image is 70000x1"):
        open_bounded(_png((70_000, 1)))  # 70 K pixels, but a side over 65535


@pytest.mark.parametrize("raw, message", [
    (b"not an image at all", "image: not a readable image"),
    (b"II*\0" + b"\0" * 100, "send PNG, JPEG, WebP, GIF or BMP"),  # TIFF is not among the formats we open
    (_png((300, 300))[:-30], "image: not a readable image"),  # cut before its end
])
def test_unreadable_images(raw: bytes, message: str) -> None:
    with pytest.raises(DataError, match=message):
        open_bounded(raw)


def _phone_jpeg(turn: int) -> bytes:
    """A 64x48 photo (red top-left quarter on blue) stored as a phone does for EXIF orientation
    ``turn``: the pixels turned back by the inverse of what a viewer applies."""
    upright = Image.new("RGB", (64, 48), (20, 40, 220))
    upright.paste((230, 20, 20), (0, 0, 32, 24))
    inverse = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270,
               5: Image.Transpose.TRANSPOSE}[turn]
    exif = Image.Exif()
    exif[0x0112] = turn
    buffer = io.BytesIO()
    upright.transpose(inverse).save(buffer, "JPEG", quality=95, exif=exif)
    return buffer.getvalue()


def _red_top_left(image: Image.Image) -> bool:
    red, blue = image.getpixel((8, 8)), image.getpixel((56, 40))
    return red[0] > 200 > red[2] + 150 and blue[2] > 200 > blue[0] + 150


@pytest.mark.parametrize("turn", [3, 5, 6, 8])
def test_a_phone_photo_is_opened_upright(tmp_path: Path, turn: int) -> None:
    """infer, serve and the Chat tab see the photo as a viewer shows it, not its stored pixels."""
    raw = _phone_jpeg(turn)
    path = tmp_path / "p.jpg"
    path.write_bytes(raw)
    for source in (path, raw, io.BytesIO(raw), Image.open(path)):
        image = open_bounded(source, max_pixels=64 * 48)
        assert image.size == (64, 48) and _red_top_left(image)
        assert orientation(image) == 1  # the tag is gone: turning it again changes nothing
        assert upright(image).size == (64, 48) and _red_top_left(upright(image))
    served = decode_data_url("data:image/jpeg;base64," + base64.b64encode(raw).decode())  # visrl serve
    assert served.size == (64, 48) and _red_top_left(served)


@pytest.mark.parametrize("tag", [1, 0, 9, 65535])
def test_an_upright_or_meaningless_orientation_leaves_the_image_as_stored(tag: Any) -> None:
    exif = Image.Exif()
    exif[0x0112] = tag
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48)).save(buffer, "JPEG", exif=exif)
    image = Image.open(buffer)
    assert orientation(image) == 1 and upright(image) is image and open_bounded(buffer).size == (64, 48)
