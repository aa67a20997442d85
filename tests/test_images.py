"""visrl.images: untrusted images are size-checked from their header before any pixel is decoded."""

from __future__ import annotations

import io
import time
import tracemalloc
from pathlib import Path

import pytest
from PIL import Image

from visrl.errors import DataError
from visrl.images import MAX_IMAGE_PIXELS, open_bounded, peek_image


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
