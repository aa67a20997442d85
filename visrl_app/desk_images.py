"""The desk's pictures of a pair as files: the displayed image (resized, padded, annotated box
drawn) and both crops, written once per (image, box) and reused.

Handing gradio a file path instead of a PIL image spares a WebP encode per key press (26 ms for
a 640x440 image on this CPU) and the PNG decode of the original (8 ms at 800x600) whenever the
pair was shown before (Undo, Previous, a conflict reload). The files live in gradio's own upload
folder, which the app serves anyway; the folder is kept to ``KEEP_FILES`` files.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gradio.utils import get_upload_folder
from PIL import Image

from visrl import review
from visrl.boxes import Box
from visrl.errors import VisRLError
from visrl.review import pair_boxes
from visrl_app import render
from visrl_app.context import AppContext

KEEP_FILES = 3000  # ~3 files a pair: the last 1,000 pairs shown stay cached (~60 MB at 640x440)
PRUNE_EVERY = 300  # writes between prunes
_writes = 0
_lock = threading.Lock()
# One background worker draws the pair the desk will show next while the reviewer looks at this
# one: a new pair costs ~35 ms to decode, draw and write, paid before the key press, not after.
_prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="visrl-desk-prefetch")


def prefetch(ctx: AppContext, flt: review.PairFilter, sort: str, after: int) -> None:
    """Draw, in the background, the pictures of the pair after ``after`` (what Accept shows next)."""
    def work() -> None:
        try:
            pair = review.next_pair(ctx.store, flt, sort, after=after)
            if pair is not None:
                pair_images(ctx, pair)
        except (VisRLError, OSError):
            pass  # only a cache warm-up: the key press draws it if this failed
    _prefetcher.submit(work)


def folder() -> Path:
    path = Path(get_upload_folder()) / "visrl-desk"
    path.mkdir(parents=True, exist_ok=True)
    return path


def pair_images(ctx: AppContext, pair: dict[str, Any]) -> tuple[str, str | None, str | None, float, int]:
    """(displayed image, chosen crop, rejected crop, display scale, label pad) for ``pair``;
    paths of PNG files. The boxes themselves are not drawn: the annotator draws them."""
    source = ctx.workspace.absolute(pair["image"])
    stamp = f"{source}|{source.stat().st_mtime_ns}"
    boxes = pair_boxes(pair)
    scale, pad = render.display_geometry((pair["width"], pair["height"]))
    original: list[Image.Image] = []

    def load() -> Image.Image:
        if not original:
            original.append(Image.open(source).convert("RGB"))
        return original[0]

    def display() -> Image.Image:
        image = load()
        shown = render.draw_dashed_box(image, boxes["gt"], render.BLUE) if boxes["gt"] else image
        return render.display_image(shown, scale, pad)

    shown_path = _cached(f"{stamp}|{boxes['gt']}|{scale:.6f}|{pad}", display)
    crops = [None if boxes[side] is None else
             _cached(f"{stamp}|crop|{_box_key(boxes[side])}", lambda side=side: render.side_crop(load(), boxes[side]))
             for side in ("chosen", "rejected")]
    return shown_path, crops[0], crops[1], scale, pad


def _box_key(box: Box) -> str:
    return ",".join(f"{v:.2f}" for v in box.as_list())


def _cached(key: str, make: Any) -> str:
    global _writes
    path = folder() / (hashlib.sha1(key.encode()).hexdigest()[:24] + ".png")
    if path.is_file():
        return str(path)
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    make().save(tmp, format="PNG", compress_level=1)  # fast: level 1 is ~5x quicker than 6
    os.replace(tmp, path)
    with _lock:
        _writes += 1
        if _writes % PRUNE_EVERY == 0:
            _prune(path.parent)
    return str(path)


def _prune(where: Path) -> None:
    files = sorted(where.glob("*.png"), key=lambda p: p.stat().st_mtime)
    for old in files[:-KEEP_FILES]:
        old.unlink(missing_ok=True)
