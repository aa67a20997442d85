"""What a model folder holds: which weights (a cheap content fingerprint), at which Hub revision,
and which files make up its processor.

An adapter is only valid on the exact weights it was trained on. Names do not pin them: a Hub id
resolves to whatever snapshot ``refs/main`` points at, and a folder can have its weights swapped
under the same name (a re-merge, a copied checkpoint). So VisRL records, with an adapter's base
(:func:`visrl.models.model_identity`), the snapshot revision and a fingerprint of the weights.

The fingerprint must be cheap for a 15 GB model, and it must read content (sizes and mtimes say
nothing: a copy changes the mtime, a re-merge of the same shape keeps every size). It is the
SHA-256 over, for each weight file in name order: the file name and size, the whole safetensors
header (every tensor's name, dtype, shape and byte offsets), and 64 bytes at the start, middle and
end of every tensor's data. Any retrained or merged tensor changes almost every element, so it
changes the sample; a change confined to bytes between the samples goes unseen. A 7B Qwen2.5-VL
(~730 tensors in 5 shards) costs ~2,200 reads of 64 bytes whatever its size: 0.84 s measured for
730 tensors in 5 shards from the page cache on the shared 2-core CPU under load 13 (nice 19).
Files that are not safetensors (``pytorch_model*.bin``) get their size and 64 bytes at 16 evenly
spaced offsets.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path
from typing import BinaryIO

from visrl.errors import ModelError

SAMPLE_BYTES = 64  # per sampled spot
BIN_SPOTS = 16  # sampled spots in a weight file without a tensor table
_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")
_MAX_HEADER = 100 * 2**20  # bytes; safetensors' own limit, so a corrupt length is not read whole


def weight_files(folder: str | Path) -> list[Path]:
    """The weight files of a model folder, safetensors first (what transformers would load)."""
    for pattern in _WEIGHT_GLOBS:
        files = sorted(p for p in Path(folder).glob(pattern) if p.is_file())
        if files:
            return files
    return []


def weights_fingerprint(folder: str | Path) -> str | None:
    """The fingerprint of the weights in ``folder`` (see the module doc); None when it has none."""
    files = weight_files(folder)
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as handle:
            if path.suffix == ".safetensors":
                _sample_safetensors(handle, size, digest)
            else:
                _sample_spots(handle, size, digest)
    return digest.hexdigest()


def _sample_safetensors(handle: BinaryIO, size: int, digest: hashlib._Hash) -> None:
    raw = handle.read(8)
    length = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
    if not 0 < length <= min(_MAX_HEADER, size - 8):  # not a safetensors file: sample it blind
        _sample_spots(handle, size, digest)
        return
    header_bytes = handle.read(length)
    digest.update(header_bytes)
    try:
        header = json.loads(header_bytes)
    except (ValueError, UnicodeDecodeError):
        _sample_spots(handle, size, digest)
        return
    data_start = 8 + length
    for name in sorted(k for k in header if k != "__metadata__"):
        begin, end = header[name].get("data_offsets", (0, 0))
        for offset in sorted({begin, (begin + end) // 2, max(begin, end - SAMPLE_BYTES)}):
            handle.seek(data_start + offset)
            digest.update(handle.read(min(SAMPLE_BYTES, max(0, end - offset))))


def _sample_spots(handle: BinaryIO, size: int, digest: hashlib._Hash) -> None:
    for i in range(BIN_SPOTS):
        handle.seek(size * i // BIN_SPOTS)
        digest.update(handle.read(SAMPLE_BYTES))


def hub_revision(folder: str | Path) -> str | None:
    """The commit hash of a Hugging Face cache snapshot (``.../snapshots/<hash>``), else None."""
    path = Path(folder)
    return path.name if path.parent.name == "snapshots" and path.name else None


def short(value: str | None) -> str:
    """A fingerprint or revision cut to 12 characters for messages ('unknown' for None)."""
    return value[:12] if value else "unknown"


# ---------------------------------------------------------------------- processor files

# The files a Hub model keeps its processor in (image and video processors, tokenizer, chat
# template); processor_class.json marks the tiny Qwen3-VL demo model's processor (tiny_qwen3.py).
PROCESSOR_FILES: tuple[str, ...] = (
    "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "chat_template.json", "chat_template.jinja",
    "processor_class.json",
)


def copy_processor_files(base: str | Path, out: str | Path) -> list[str]:
    """Copy the base model's processor files into the model folder ``out``, byte for byte.

    A model VisRL writes (a merge, a merged base) must load with stock transformers and vLLM as
    its base does. The processor VisRL runs may be its image-only subclass (no torchvision), whose
    ``processor_class`` exists only inside VisRL: saving it makes ``AutoProcessor`` elsewhere
    return a bare tokenizer, silently, and leaves out ``preprocessor_config.json`` (PITFALLS.md).
    A pixel budget a run trained with stays in ``visrl_model.json`` (the contract), not here.
    Processor files in ``out`` that the base lacks (an earlier export's) are removed, so the folder
    holds the base's processor and nothing else. Returns the names copied; raises when the base
    has no image processor config to copy.
    """
    source, dest = Path(base), Path(out)
    copied = [name for name in PROCESSOR_FILES if (source / name).is_file()]
    if not {"preprocessor_config.json", "processor_config.json"} & set(copied):
        raise ModelError(f"{source} has no preprocessor_config.json or processor_config.json: "
                         "no image processor to put beside the exported weights")
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROCESSOR_FILES:
        if name in copied:
            shutil.copyfile(source / name, dest / name)  # follows the Hub cache's blob links
        elif (dest / name).is_file():
            (dest / name).unlink()
    return copied


def folder_chat_template(path: str | Path) -> str | None:
    """The chat template a model folder keeps outside its tokenizer config (``chat_template.jinja``,
    or ``chat_template.json``'s ``chat_template``, as the Hub's Qwen-VL repositories do)."""
    jinja, legacy = Path(path, "chat_template.jinja"), Path(path, "chat_template.json")
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    if legacy.is_file():
        try:
            return json.loads(legacy.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError, AttributeError):
            return None
    return None
