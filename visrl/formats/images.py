"""Images of an import: resolved inside the images root, checked, and placed by content.

Each image is checked when a record first names it: its size from the header against
:data:`MAX_IMAGE_PIXELS` (a pixel bomb is refused before any decoding), then a full decode (a
truncated file is refused with its record, not later in every generate run). It is placed at
``images/<dataset>/<stem>-<sha256[:16]><ext>``: copied, never hard-linked (an edit of the source
must not edit the workspace), and named by content (two datasets' ``a.png`` of the same byte size
but other pixels never share a file).

A photo whose EXIF Orientation tag is not 1 (phones store the sensor's pixels and the tag says how
to turn them) is stored upright instead of copied: decoded, turned by :func:`visrl.images.upright`,
encoded again (see :func:`upright_file`) without the tag, and named by the sha256 of those bytes.
Its size in the store is the upright size, and every box of its record (Visual-CoT ``###`` pixel
boxes, square-padded normalized boxes, VQA boxes) is read against the upright image, as a browser
or an annotation tool shows the photo. An image without orientation is copied byte for byte.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import unicodedata
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import ExifTags, Image, JpegImagePlugin, UnidentifiedImageError

from visrl.errors import DataError
from visrl.formats.records import os_reason, record_error, short_path, short_value
from visrl.images import (
    ACCEPTED_IMAGE_FORMATS,
    FILE_MAX_PIXELS,
    check_decode_work,
    orientation,
    upright,
)
from visrl.store import Store

# A pixel budget per image, read from the header before any decoding (64 M pixels; see there).
MAX_IMAGE_PIXELS = FILE_MAX_PIXELS
# The encoded file is read once to hash and decode it: 256 MB bounds that read.
MAX_IMAGE_BYTES = 256 * 1024 * 1024
_DATASET_NAME = re.compile(r"[^\W_][\w.\-]{0,99}")  # starts with a letter or digit: never "." or ".."
_SUFFIX = re.compile(r"\.[a-z0-9]{1,8}")


def check_dataset_name(name: str) -> str:
    """``name`` if it can name a dataset (and its folder ``images/<name>/``), else a DataError."""
    if not isinstance(name, str) or not _DATASET_NAME.fullmatch(name):
        raise DataError(f"dataset name {short_value(name)} may only hold letters, digits, '_', '-' and '.', "
                        "must start with a letter or digit and have at most 100 characters; "
                        "pass another --dataset")
    return name


# Never written into a stored file name (each becomes "_"): controls (Cc: newline, tab, ESC),
# format characters (Cf: the bidi overrides U+202A-202E and isolates U+2066-2069 that make
# "x\u202egnp.exe" display as "xexe.png", zero-width characters), line and paragraph separators,
# surrogates, private-use and unassigned code points.
_UNSAFE_NAME_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def safe_stem(stem: str, limit: int = 80) -> str:
    """``stem`` (a source file's name without suffix) as it may appear in a stored name: unsafe
    characters (see ``_UNSAFE_NAME_CATEGORIES``) replaced by ``_``, no leading dot (a hidden file)
    or space, at most ``limit`` characters; ``image`` when nothing is left."""
    cleaned = "".join("_" if unicodedata.category(ch) in _UNSAFE_NAME_CATEGORIES else ch for ch in stem)
    return cleaned.lstrip(". ")[:limit].rstrip(" ") or "image"


# Modes PNG stores as they are; another mode (CMYK, YCbCr, ...) is converted to RGB(A) first.
_PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})
# Re-encoding quality of a turned JPEG; see upright_file.
JPEG_QUALITY = 95


@dataclass
class PlacedImage:
    source: Path
    relative: str  # workspace-relative destination, POSIX: images/<dataset>/<stem>-<sha256[:16]><ext>
    size: tuple[int, int]  # upright (width, height): as a viewer shows it; boxes refer to it
    sha256: str  # of the stored bytes; placing verifies what it writes against it
    source_sha256: str  # of the source file as checked (== sha256 when copied as is)
    orientation: int = 1  # the source's EXIF Orientation; not 1: stored re-encoded upright


class ImageSource:
    """Resolves image entries of a file to checked files under ``root`` and their destinations.

    ``root`` is the images root (``--images-root``, default: the JSON file's folder); an entry
    that leaves it (``../x.png``, an absolute path elsewhere) is refused. Each image is checked
    when first named: its size from the header against :data:`MAX_IMAGE_PIXELS`, then decoded
    in full (a truncated file is refused with its record). Its destination is named by its
    content hash, so two datasets' ``a.png`` of the same size but other pixels never meet. A photo
    with an EXIF orientation is checked and named as the upright file it will be stored as.
    """

    def __init__(self, store: Store, root: Path, dataset: str, json_path: Path) -> None:
        self.dataset = check_dataset_name(dataset)
        self.json_path = json_path
        self.workspace = store.workspace
        self._seen: dict[str, PlacedImage] = {}
        self._by_source: dict[Path, PlacedImage] = {}
        try:
            self.root = root.resolve()
            is_dir = self.root.is_dir()
        except (OSError, ValueError, RuntimeError) as exc:
            raise DataError(f"images root {short_path(root)} cannot be used ({os_reason(exc)}); pass "
                            "--images-root DIR") from None
        if not is_dir:
            raise DataError(f"images root {root} is not a folder; pass --images-root DIR")

    def get(self, entry: Any, index: int, field_name: str) -> PlacedImage:
        if not isinstance(entry, str) or not entry.strip():
            raise record_error(self.json_path, index, field_name, f"an image path must be a non-empty string, got {short_value(entry)}")
        if entry in self._seen:
            return self._seen[entry]
        source = self._resolve(entry, index, field_name)
        placed = self._by_source.get(source)
        if placed is None:
            size, digest, fmt, source_digest, turn = self._inspect(source, entry, index, field_name)
            suffix = source.suffix.lower() if _SUFFIX.fullmatch(source.suffix.lower()) else f".{fmt.lower()}"
            if turn != 1 and fmt == "PNG":
                suffix = ".png"  # upright_file wrote every non-JPEG source as PNG
            # The stem keeps names readable; 80 characters + hash stays below NAME_MAX (255 bytes).
            name = f"{safe_stem(source.stem)}-{digest[:16]}{suffix}"
            placed = PlacedImage(source, f"images/{self.dataset}/{name}", size, digest, source_digest, turn)
            self._by_source[source] = placed
        self._seen[entry] = placed
        return placed

    def _resolve(self, entry: str, index: int, field_name: str) -> Path:
        """The entry's file, inside the images root; any path problem is a record error."""
        def fail(problem: str) -> DataError:
            return record_error(self.json_path, index, field_name, f"{short_value(entry, 80)} {problem}")

        try:
            source = (self.root / entry).resolve()
            inside = source.is_relative_to(self.root)
            is_file = inside and source.is_file()
        except RuntimeError:  # Python 3.11 reports a symlink loop this way
            raise fail("is a symlink loop; point it at a real image") from None
        except (OSError, ValueError) as exc:  # NUL byte, name too long, ...
            raise fail(f"is not a usable path ({os_reason(exc)}); fix the path") from None
        if not inside:
            raise fail(f"leaves the images root {self.root}; keep images under it or pass another "
                       "--images-root")
        if not is_file:
            raise record_error(self.json_path, index, field_name,
                               f"image {short_value(entry, 80)} not found under {self.root}; fix the path or pass --images-root")
        return source

    def _inspect(self, source: Path, entry: str, index: int,
                 field_name: str) -> tuple[tuple[int, int], str, str, str, int]:
        """(size, sha256, format, source sha256, orientation) of the file as it will be stored,
        after a full decode within the budgets: for a turned photo the upright size, the sha256 of
        :func:`upright_file`'s bytes and their format; else the file's own."""
        def fail(problem: str) -> DataError:
            return record_error(self.json_path, index, field_name, f"{short_value(entry, 80)} {problem}")

        try:
            if source.stat().st_size > MAX_IMAGE_BYTES:
                raise fail(f"is larger than {MAX_IMAGE_BYTES // 2**20} MB; shrink the image")
            data = source.read_bytes()
        except OSError as exc:
            raise fail(f"cannot be read ({os_reason(exc)})") from None
        try:
            with warnings.catch_warnings():
                # PIL warns from 89 M pixels; our own budget below decides, with the record named.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data), formats=ACCEPTED_IMAGE_FORMATS)  # serve's list
            with image:
                size, fmt = image.size, image.format or "png"
                if size[0] * size[1] > MAX_IMAGE_PIXELS:
                    raise fail(f"is {size[0]}x{size[1]} pixels, over the limit of {MAX_IMAGE_PIXELS:,}; "
                               "downscale it before importing")
                try:  # a progressive JPEG's scans bound its decode work, which the header does not
                    check_decode_work(image, "its markers", MAX_IMAGE_PIXELS)
                except DataError as exc:
                    raise fail(f"is refused before decoding ({exc})") from None
                image.load()  # the full decode: truncated or corrupt data fails here, not in a run
                turn = orientation(image)
                stored = upright_file(image) if turn != 1 else None
        except DataError:
            raise
        except Image.DecompressionBombError as exc:  # PIL's own bomb check, before our size check
            raise fail(f"is too large to decode ({exc}); downscale it before importing") from None
        except UnidentifiedImageError:
            other = _other_format(data)
            if other is None:
                raise fail("is not a readable image (unknown format)") from None
            raise fail(f"is a {other} image, a format VisRL does not take; convert it to one of "
                       f"{', '.join(ACCEPTED_IMAGE_FORMATS)} (what serve and the app accept)") from None
        except Exception as exc:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError, struct.error...
            raise fail(f"is not a readable image ({os_reason(exc)}); re-export or remove it") from None
        source_digest = hashlib.sha256(data).hexdigest()
        if stored is None:
            return size, source_digest, fmt, source_digest, 1
        encoded, size, fmt = stored
        return size, hashlib.sha256(encoded).hexdigest(), fmt, source_digest, turn

    def place_all(self, created: list[Path]) -> None:
        """Copy every image into the workspace, appending each file and folder made to ``created``
        (the caller undoes them on failure, also when this raises part way).

        An existing destination is reused only when its bytes hash the same; a copy whose bytes
        differ from what was checked (the source changed meanwhile) is refused. A turned photo is
        decoded and encoded again here rather than held in memory since the check (an import of
        10,000 phone photos would hold ~30 GB); the encoders are deterministic, and the result is
        verified against the sha256 its name carries.
        """
        for placed in {p.relative: p for p in self._seen.values()}.values():
            dest = self.workspace.root / placed.relative
            if dest.exists():
                if _sha256_file(dest) != placed.sha256:
                    raise DataError(f"{placed.relative} already exists in the workspace with other "
                                    "content; import under another --dataset name")
                continue
            try:
                dest.parent.mkdir(parents=True)
                created.append(dest.parent)
            except FileExistsError:
                pass
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
            created.append(tmp)
            if placed.orientation != 1:
                _write_upright(placed, tmp)
            elif _copy_hashed(placed.source, tmp) != placed.sha256:
                raise DataError(f"{placed.source} changed while it was imported; import again")
            os.replace(tmp, dest)  # a reader never sees a half-written image
            created[-1] = dest

    def missing(self) -> list[str]:
        """Destinations that are gone (another import's undo removed a file this one reused)."""
        return [p.relative for p in self._seen.values() if not (self.workspace.root / p.relative).is_file()]


def upright_file(image: Image.Image) -> tuple[bytes, tuple[int, int], str]:
    """A decoded photo whose EXIF orientation is not 1, turned upright and encoded again:
    (bytes, upright size, format written: ``JPEG`` or ``PNG``).

    A JPEG (or MPO: a phone's JPEG with extra frames) stays JPEG, at quality 95 with the source's
    chroma subsampling: PIL cannot turn JPEG blocks losslessly, and PNG would be 3.1-7.5x the
    source's bytes (measured on three 0.2-0.3 MP photos), while q95 came back within 0.7-1.7
    levels (of 255, mean per channel) of the source's pixels at 0.9-1.8x its size -- far below what
    the VLM's resize to ~1 M pixels loses. Any other format is written as lossless PNG. The EXIF
    block is kept without its Orientation tag (so no viewer turns the upright pixels again), and
    so is the ICC profile (phone photos are often Display P3: dropping it shifts colours).
    """
    turned = upright(image)
    exif = turned.getexif()
    exif.pop(ExifTags.Base.Orientation, None)  # exif_transpose removed it already; be sure
    options: dict[str, Any] = {"exif": exif.tobytes()}
    if image.info.get("icc_profile"):
        options["icc_profile"] = image.info["icc_profile"]
    buffer = io.BytesIO()
    if image.format in ("JPEG", "MPO") and turned.mode in ("L", "RGB", "CMYK"):
        sampling = JpegImagePlugin.get_sampling(image)  # -1: unknown, the encoder's default (4:2:0)
        if sampling != -1:
            options["subsampling"] = sampling
        turned.save(buffer, "JPEG", quality=JPEG_QUALITY, **options)
        return buffer.getvalue(), turned.size, "JPEG"
    if turned.mode not in _PNG_MODES:
        turned = turned.convert("RGBA" if "A" in turned.getbands() else "RGB")
    turned.save(buffer, "PNG", **options)
    return buffer.getvalue(), turned.size, "PNG"


def _write_upright(placed: PlacedImage, dest: Path) -> None:
    """Write ``placed``'s upright file to ``dest`` (a new file, durable on return), from the
    source read again; a source that changed since it was checked is refused."""
    with placed.source.open("rb") as f:
        data = f.read(MAX_IMAGE_BYTES + 1)
    if hashlib.sha256(data).hexdigest() != placed.source_sha256:
        raise DataError(f"{placed.source} changed while it was imported; import again")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked against our budget
        with Image.open(io.BytesIO(data)) as image:
            encoded, _, _ = upright_file(image)
    if hashlib.sha256(encoded).hexdigest() != placed.sha256:
        raise DataError(f"{placed.source} was encoded upright differently than when it was checked; "
                        "import again")
    with dest.open("xb") as out:
        out.write(encoded)
        out.flush()
        os.fsync(out.fileno())


def _other_format(data: bytes) -> str | None:
    """The name of PIL's format for ``data`` when :data:`ACCEPTED_IMAGE_FORMATS` left it out (e.g.
    ``TIFF``), else None. For the error message only: reads the header, decodes nothing."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                return image.format
    except Exception:  # noqa: BLE001 - any failure to identify means: no format PIL knows
        return None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _copy_hashed(source: Path, dest: Path) -> str:
    """Copy ``source`` to ``dest`` (a new file, durable on return); the sha256 of what was copied."""
    digest = hashlib.sha256()
    with source.open("rb") as src, dest.open("xb") as out:
        for block in iter(lambda: src.read(1 << 20), b""):
            digest.update(block)
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def remove_files(paths: list[Path], keep: Callable[[Path], bool] = lambda path: False) -> None:
    """Undo what :meth:`ImageSource.place_all` created: files (unless ``keep(file)``), then
    folders left empty, newest first."""
    for path in reversed(paths):
        if path.is_dir():
            with contextlib.suppress(OSError):
                path.rmdir()
        elif not keep(path):
            path.unlink(missing_ok=True)
