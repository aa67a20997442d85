"""What a model folder holds: which weights (a cheap content fingerprint), at which Hub revision,
and which files make up its processor.

An adapter is only valid on the exact weights it was trained on. Names do not pin them: a Hub id
resolves to whatever snapshot ``refs/main`` points at, and a folder can have its weights swapped
under the same name (a re-merge, a copied checkpoint). So VisRL records, with an adapter's base
(:func:`visrl.models.model_identity`), the snapshot revision and a fingerprint of the weights.

The fingerprint is :func:`visrl.fingerprint.folder_fingerprint`'s, the one a generate run is
keyed by: content, not names or times, and cheap for a 15 GB model (every safetensors header and
both ends of every tensor).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from visrl.errors import ModelError
from visrl.fingerprint import folder_fingerprint

ADAPTER_CONFIG = "adapter_config.json"  # peft's; its presence makes a folder a LoRA adapter


def is_adapter(folder: str | Path) -> bool:
    """A LoRA adapter folder: it loads only on its base, and a full fine-tune's folder is not one."""
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def weights_fingerprint(folder: str | Path) -> str | None:
    """The SHA-256 (hex) of the weights in ``folder`` (:mod:`visrl.fingerprint`); None when it has none."""
    fingerprint = folder_fingerprint(folder)
    return fingerprint["sha256"] if fingerprint else None


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
