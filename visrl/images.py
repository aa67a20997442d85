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
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

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


def decode_image(image: Image.Image, where: str = "image") -> Image.Image:
    """Decode an image from :func:`peek_image` into upright RGB (:func:`upright`); a truncated or
    corrupt file is a DataError."""
    try:
        image.load()
        return upright(image).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{where}: not a readable image ({_short(exc)})") from None
    finally:
        image.close()


def open_bounded(source: str | Path | bytes | BinaryIO | Image.Image, max_pixels: int = MAX_IMAGE_PIXELS,
                 where: str = "image") -> Image.Image:
    """An untrusted image as upright RGB (:func:`upright`), refused from its header when over
    ``max_pixels`` pixels.

    ``source`` is a file path, the file's bytes or an open binary file; an already decoded PIL
    image (e.g. from a UI component) is size-checked, turned and converted the same way.
    """
    if isinstance(source, Image.Image):
        _check_size(source.width, source.height, max_pixels, where)
        return upright(source).convert("RGB")
    return decode_image(peek_image(source, max_pixels, where), where)


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
