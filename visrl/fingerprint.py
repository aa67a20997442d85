"""A content fingerprint of a model folder's weights, cheap enough for a 15 GB checkpoint.

A generation run is keyed by the weights it sampled from, not by the folder's name: re-merging
other weights into ``models/x-merged`` must start a new run, two workspaces whose ``models/x``
hold different weights must not share a run key, and the same weights (a copy, another
workspace, a re-merge of the same adapter) give the same key, so a stopped run resumes.

What is hashed, per weight file (``*.safetensors``, ``pytorch_model*.bin``, ``adapter_model.bin``)
plus ``config.json`` / ``adapter_config.json``, always with the file's name and size:

* files up to :data:`WHOLE_FILE_BYTES` (configs, adapters, tiny models): every byte;
* a larger ``.safetensors`` file: its header (every tensor's name, dtype, shape and offsets) and
  the first and last :data:`SAMPLE_BYTES` of every tensor's data. A LoRA merge or any fine-tune
  rewrites whole tensors, so each changed tensor changes the fingerprint; a 7B checkpoint
  (~730 tensors) costs ~1,500 reads of 4 KiB, ~6 MB, not 15 GB;
* another large file: :data:`SPREAD_SAMPLES` samples spread evenly over it.

A change confined to the inside of one large tensor (a hand edit of a few values) can escape the
samples; anything VisRL or a trainer writes cannot. Fingerprints are memoized per process by
(path, inode, size, mtime, ctime): a run that asks several times reads the files once, and any
write to a file (even one that restores its mtime) changes its ctime.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

WHOLE_FILE_BYTES = 64 * 1024 * 1024  # up to 64 MiB a file is hashed whole (~0.1 s)
SAMPLE_BYTES = 4096  # bytes read at each end of a tensor, or at each spread sample
SPREAD_SAMPLES = 256  # samples of a large file that is not safetensors
CONFIG_FILES = ("config.json", "adapter_config.json")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors caps its JSON header at 100 MB

_memo: dict[tuple[str, int, int, int, int], str] = {}


def weight_files(folder: str | Path) -> list[Path]:
    """The files of ``folder`` whose content decides what the model computes, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    files = [p for p in folder.iterdir() if p.is_file() and _is_weight(p.name)]
    return sorted(files, key=lambda p: p.name)


def _is_weight(name: str) -> bool:
    return (name.endswith(".safetensors") or name in CONFIG_FILES or name == "adapter_model.bin"
            or (name.startswith("pytorch_model") and name.endswith(".bin")))


def folder_fingerprint(folder: str | Path) -> dict[str, Any] | None:
    """``{"sha256": hex, "files": n, "bytes": total}`` of ``folder``'s weights; None when it
    holds no weight file (not a model folder, or not here)."""
    files = weight_files(folder)
    if not any(p.name not in CONFIG_FILES for p in files):
        return None
    digest = hashlib.sha256()
    total = 0
    for path in files:
        size = path.stat().st_size
        total += size
        digest.update(f"{path.name}\0{size}\0{file_fingerprint(path)}\n".encode())
    return {"sha256": digest.hexdigest(), "files": len(files), "bytes": total}


def file_fingerprint(path: str | Path) -> str:
    """The SHA-256 (hex) of one file's content as the module doc describes."""
    path = Path(path)
    stat = path.stat()
    memo_key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if memo_key not in _memo:
        _memo[memo_key] = _fingerprint(path, stat.st_size)
    return _memo[memo_key]


def _fingerprint(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= WHOLE_FILE_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
            return digest.hexdigest()
        ranges = _safetensors_ranges(f, size) if path.suffix == ".safetensors" else None
        if ranges is None:  # not safetensors, or a header we cannot read: spread samples
            step = max(1, (size - SAMPLE_BYTES) // (SPREAD_SAMPLES - 1))
            ranges = [(min(i * step, size - SAMPLE_BYTES), SAMPLE_BYTES) for i in range(SPREAD_SAMPLES)]
        for start, length in ranges:
            f.seek(start)
            digest.update(f.read(length))
    return digest.hexdigest()


def _safetensors_ranges(f: Any, size: int) -> list[tuple[int, int]] | None:
    """Byte ranges to hash: the header, then both ends of every tensor (whole when small)."""
    head = f.read(8)
    if len(head) < 8:
        return None
    (n,) = struct.unpack("<Q", head)
    if not 0 < n <= min(_MAX_HEADER, size - 8):
        return None
    try:
        header = json.loads(f.read(n))
    except ValueError:
        return None
    ranges = [(0, 8 + n)]
    for name in sorted(k for k in header if k != "__metadata__"):
        offsets = header[name].get("data_offsets") if isinstance(header[name], dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            return None
        start, end = 8 + n + int(offsets[0]), 8 + n + int(offsets[1])
        if end - start <= 2 * SAMPLE_BYTES:
            ranges.append((start, end - start))
        else:
            ranges += [(start, SAMPLE_BYTES), (end - SAMPLE_BYTES, SAMPLE_BYTES)]
    return ranges
