"""Opening images that come from outside (an HTTP request, a browser upload) within a pixel budget.

A compressed image says nothing about its decoded size: a 160 KB PNG of 13000x13000 pixels
decodes to 13000 * 13000 * 3 bytes = 507 MB as RGB (3.5 GB peak through PIL's intermediate
buffers). So the size is read from the image header (PIL opens lazily) and checked *before* any
pixel is decoded. Every entry point -- ``visrl serve``, ``visrl infer --image`` and the app's Chat
tab -- calls these functions, so the same limits hold everywhere.

Images are returned upright, as a browser or an annotation tool shows them: a phone photo stores
its pixels as the sensor read them and an EXIF Orientation tag (2..8) says how to turn them.
:func:`upright` applies that tag; the import (:mod:`visrl.formats.images`) uses the same function,
so sizes and boxes always refer to the upright image.

The header bounds pixels, not decode work: a progressive JPEG may repeat its scans, and each scan
is a pass over every pixel (a 132 KB 4096x4096 JPEG with 1,000 scans takes ~19 s). So
:func:`decode_image` counts a JPEG's scans before decoding (:data:`MAX_JPEG_SCANS`) and decodes
under a deadline (:data:`DECODE_TIMEOUT_S`), checked each time the decoder reads more data.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any, BinaryIO

from PIL import ExifTags, Image, ImageOps

from visrl.errors import DataError

# 4096 x 4096 = 16.8 M pixels = 50 MB as RGB: above the largest input of the supported models
# (Qwen2/2.5-VL resize to at most 12.8 M pixels), far below what stalls a host.
MAX_IMAGE_PIXELS = 4096 * 4096
# Formats a browser or an OpenAI client sends; PIL's others (e.g. multi-page TIFF, ICNS, PSD)
# only widen what an attacker can reach. The one list: serve, infer, Chat and the import use it.
ACCEPTED_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
FORMATS = ACCEPTED_IMAGE_FORMATS  # the older name
# A file the user names (an import, ``visrl infer --image``) is trusted more than a request: 64 M
# pixels (8192 x 8192) decodes to 192 MB of RGB, above any photo a VLM sees (they are resized to
# ~1 M pixels) and far below a decompression bomb (a 20000 x 20000 PNG of a few KB decodes to 1.2 GB).
FILE_MAX_PIXELS = 64_000_000
MAX_SIDE = 65_535  # wider than any real photo; guards against 1 x 10^9 strips that pass a pixel count


def peek_image(source: str | Path | bytes | BinaryIO, max_pixels: int = MAX_IMAGE_PIXELS,
               where: str = "image") -> Image.Image:
    """The image opened lazily (header read, no pixel decoded) after its size passed the budget.

    Raises :class:`DataError` naming ``where`` when it is not an image in :data:`FORMATS` or has
    more than ``max_pixels`` pixels (or a side over :data:`MAX_SIDE`).
    """
    stream: str | Path | BinaryIO = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        # PIL itself warns over Image.MAX_IMAGE_PIXELS and refuses over twice that at open time;
        # the budget below is the stricter, explicit check.
        image = Image.open(stream, formats=FORMATS)
    except Image.DecompressionBombError:  # over twice Image.MAX_IMAGE_PIXELS (visrl serve lowers it)
        guard = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise DataError(f"{where}: the image has over {guard:,} pixels; the limit is {max_pixels:,} pixels "
                        f"(e.g. {_side(max_pixels)}x{_side(max_pixels)}): downscale it first") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{where}: not a readable image ({_short(exc)}); send PNG, JPEG, WebP, GIF or BMP") from None
    try:
        _check_size(image.width, image.height, max_pixels, where)
    except DataError:
        image.close()
        raise
    return image


def orientation(image: Image.Image) -> int:
    """The image's EXIF Orientation (1..8; 1 = stored upright). A missing, unreadable or
    out-of-range tag is 1: browsers ignore such a tag too, so the stored pixels are what a viewer shows.
    """
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # noqa: BLE001 - a corrupt EXIF block raises struct.error, SyntaxError, ValueError...
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright(image: Image.Image) -> Image.Image:
    """``image`` as a viewer shows it: turned/mirrored by its EXIF Orientation, the tag removed
    (from its EXIF and XMP, so nothing turns it twice); ``image`` itself when it is already upright.

    The one place orientation is handled: the import, ``visrl infer``, ``visrl serve`` and the Chat
    tab all call it, so a box drawn on the photo in an annotation tool matches the model's view.
    """
    image.load()  # decodes; a PNG's eXIf chunk may follow its pixel data
    if orientation(image) == 1:
        return image
    turned = ImageOps.exif_transpose(image)
    return turned if turned is not None else image


def decode_image(image: Image.Image, where: str = "image", deadline: float | None = None,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image from :func:`peek_image` into upright RGB (:func:`upright`). A DataError for
    a truncated or corrupt file, a decode whose work its header does not bound
    (:func:`check_decode_work`, against ``max_pixels``) or one still running at ``deadline``
    (``time.monotonic()``; default: :data:`DECODE_TIMEOUT_S` from now)."""
    deadline = time.monotonic() + DECODE_TIMEOUT_S if deadline is None else deadline
    try:
        check_decode_work(image, where, max_pixels)
        if image.fp is not None:  # None once loaded: nothing left to read
            image.fp = _DeadlineFile(image.fp, deadline)
        image.load()
        return upright(image).convert("RGB")
    except DecodeTimeout as exc:
        raise DataError(f"{where}: {exc}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{where}: not a readable image ({_short(exc)})") from None
    finally:
        image.close()


def open_bounded(source: str | Path | bytes | BinaryIO | Image.Image, max_pixels: int = MAX_IMAGE_PIXELS,
                 where: str = "image", deadline: float | None = None) -> Image.Image:
    """An untrusted image as upright RGB (:func:`upright`), refused from its header when over
    ``max_pixels`` pixels, and refused when its decode work is unbounded (:func:`decode_image`).

    ``source`` is a file path, the file's bytes or an open binary file; an already decoded PIL
    image (e.g. from a UI component) is size-checked, turned and converted the same way.
    """
    if isinstance(source, Image.Image):
        _check_size(source.width, source.height, max_pixels, where)
        return upright(source).convert("RGB")  # already decoded: no decode work left to bound
    return decode_image(peek_image(source, max_pixels, where), where, deadline, max_pixels)


def _check_size(width: int, height: int, max_pixels: int, where: str) -> None:
    if width * height > max_pixels or max(width, height) > MAX_SIDE:
        raise DataError(f"{where}: the image is {width}x{height} = {width * height:,} pixels; the limit is "
                        f"{max_pixels:,} pixels (e.g. {_side(max_pixels)}x{_side(max_pixels)}): "
                        "downscale it first")


def _side(pixels: int) -> int:
    return int(pixels ** 0.5)


def _short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------- decode work

# Scans of a progressive JPEG: libjpeg's default script writes 10 (6 for grayscale) and optimizers
# rarely go past 20. Every scan is another pass over the image's blocks: ~40-85 ms a scan for
# 4096x4096 on this 2-core machine under load, so 1,000 repeated scans took 18.7-43 s.
MAX_JPEG_SCANS = 64
# ...and scans x pixels within this many full-size passes of the caller's pixel budget: a 4096x4096
# JPEG may have 16 scans (~1.3 s under load), a 1024x1024 one the 64 above.
MAX_JPEG_PASSES = 16
# Seconds one decode may take: a 4096x4096 PNG or JPEG decodes in ~0.5 s on 2 loaded cores.
DECODE_TIMEOUT_S = 10.0
_SOS, _EOI = 0xDA, 0xD9
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0..7: markers without a length
_SCAN_CHUNK = 1 << 20


def check_decode_work(image: Image.Image, where: str = "image", max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Refuse an opened, not yet decoded image whose decode work its header does not bound: a JPEG
    of more than :data:`MAX_JPEG_SCANS` scans, or whose scans x pixels exceed
    :data:`MAX_JPEG_PASSES` x ``max_pixels`` (scans counted from its markers, nothing decoded).

    The import calls it on each file it opens; :func:`decode_image` on every other image."""
    fp = getattr(image, "fp", None)
    if image.format not in ("JPEG", "MPO") or fp is None:
        return
    scans = jpeg_scans(fp)
    passes = min(MAX_JPEG_SCANS, MAX_JPEG_PASSES * max_pixels // max(1, image.width * image.height))
    if scans > passes:
        raise DataError(f"{where}: the JPEG has {scans:,} scans; at most {passes} are decoded for its "
                        f"{image.width}x{image.height} pixels (a progressive JPEG has ~10): save it again "
                        "as a baseline or standard progressive JPEG")


def jpeg_scans(fp: BinaryIO) -> int:
    """The scans (SOS markers) of the JPEG in ``fp``; its position is restored. 0 when the header
    cannot be walked (the decoder then names the damage).

    The header's segments are skipped by their lengths (an EXIF thumbnail's scans are not counted);
    after the first scan every ``FF DA`` is counted: inside entropy-coded data a 0xFF byte is always
    followed by 0x00 or a restart marker, so each is a scan marker or, at worst, an extra count.
    """
    start = fp.tell()
    try:
        fp.seek(0)
        if fp.read(2) != b"\xff\xd8" or not _skip_to_first_scan(fp):
            return 0
        scans, tail = 1, b""
        while chunk := fp.read(_SCAN_CHUNK):
            block = tail + chunk  # the last byte of the previous block: a marker split between reads
            scans += block.count(b"\xff\xda")
            tail = block[-1:]
            if scans > MAX_JPEG_SCANS:
                break  # enough to refuse; the rest need not be read
        return scans
    finally:
        fp.seek(start)


def _skip_to_first_scan(fp: BinaryIO) -> bool:
    """Move ``fp`` past the first SOS segment's header; False at EOI, a bad marker or the end."""
    while True:
        head = fp.read(2)
        if len(head) < 2 or head[0] != 0xFF:
            return False
        marker = head[1]
        if marker == 0xFF:  # a fill byte before the marker
            fp.seek(-1, io.SEEK_CUR)
            continue
        if marker in _STANDALONE:
            continue
        if marker == _EOI:
            return False
        size = fp.read(2)
        if len(size) < 2 or int.from_bytes(size, "big") < 2:
            return False
        fp.seek(int.from_bytes(size, "big") - 2, io.SEEK_CUR)
        if marker == _SOS:
            return True


class DecodeTimeout(OSError):
    """A decode ran past its deadline (an OSError: PIL's loaders pass it through as a read error)."""


class _DeadlineFile:
    """The image's file as its decoder reads it: a read after ``deadline`` raises, so a decode that
    runs long stops at its next read (every ~64 KB of input) instead of holding a CPU to the end."""

    def __init__(self, fp: Any, deadline: float) -> None:
        self._fp, self._deadline = fp, deadline
        self._budget_s = max(0.0, deadline - time.monotonic())

    def read(self, *args: Any) -> bytes:
        if time.monotonic() > self._deadline:
            raise DecodeTimeout(f"decoding took over {self._budget_s:.1f} s, the time left for it; "
                                "send a smaller or simpler image")
        return self._fp.read(*args)

    def __getattr__(self, name: str) -> Any:  # seek, tell, close, ... as the file's own
        return getattr(self._fp, name)
