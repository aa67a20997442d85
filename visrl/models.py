"""Load a vision-language model and its processor from a local folder.

One loader for every place that runs a model (inference, generation, training, merge, the app),
so a real 7B checkpoint and the tiny test model take the same path. The model family (from
``config.json``'s ``model_type``) decides the default box text format (DESIGN.md, "Boxes") and the
processor class. A folder may pin its box format in ``visrl_model.json`` (models trained by VisRL
on Visual-CoT data answer in the Visual-CoT form whatever their family).

Without torchvision the Qwen video processors cannot be built and ``AutoProcessor`` either fails
or silently returns the tokenizer alone (PITFALLS.md); the loader then assembles an image-only
processor of the family from the tokenizer and the PIL image processor.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visrl.errors import ModelError

log = logging.getLogger(__name__)

# transformers 5 renamed gradient_checkpointing; trl 1.16 and peft still use the old names, which
# warn on every load and run. The warning is addressed to those libraries, not to our users.
warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)

MODEL_FILE = "visrl_model.json"  # {"box_format": "viscot"}: how a VisRL-trained folder writes boxes


@dataclass(frozen=True)
class Family:
    box_format: str
    processor_class: str  # the transformers class the image-only processor derives from


FAMILIES: dict[str, Family] = {
    "qwen2_vl": Family("qwen2", "Qwen2VLProcessor"),
    "qwen2_5_vl": Family("qwen2_5", "Qwen2_5_VLProcessor"),
    "qwen3_vl": Family("qwen3", "Qwen3VLProcessor"),
    "qwen3_vl_moe": Family("qwen3", "Qwen3VLProcessor"),
}


@dataclass
class LoadedModel:
    """A model ready for inference (eval mode, on ``device``) and what describes it."""

    model: Any
    processor: Any
    path: str
    adapter: str | None
    family: str
    box_format: str
    device: str
    dtype: str

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """bf16 on GPUs; fp32 on CPUs, where bf16 matmuls are slow and fp16 is unsupported."""
    if dtype in (None, "auto"):
        return "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ModelError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return dtype


def detect_family(path: str | Path) -> str:
    """The ``model_type`` of a model folder, checked against the families VisRL supports."""
    folder = Path(path)
    config_file = folder / "config.json"
    if not folder.is_dir():
        raise ModelError(f"model folder {folder} does not exist")
    if not config_file.is_file():
        hint = " (it is a LoRA adapter: pass it as the adapter of its base)" if (
            folder / "adapter_config.json").is_file() else ""
        raise ModelError(f"{folder} is not a model folder: it has no config.json{hint}")
    try:
        family = json.loads(config_file.read_text(encoding="utf-8")).get("model_type", "")
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {config_file}: {exc}") from exc
    if family not in FAMILIES:
        raise ModelError(f"{folder} is a {family or 'unknown'!r} model; VisRL supports "
                         f"{', '.join(sorted(FAMILIES))}")
    return family


def split_adapter(path: str | Path, adapter: str | Path | None) -> tuple[Path, Path | None]:
    """(base, adapter): a LoRA folder given as the model loads on the base its config names."""
    folder = Path(path)
    config = folder / "adapter_config.json"
    if adapter is None and not (folder / "config.json").is_file() and config.is_file():
        base = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if not base:
            raise ModelError(f"{folder} is a LoRA adapter without base_model_name_or_path; "
                             "pass its base as the model and it as the adapter")
        return Path(base), folder
    return folder, Path(adapter) if adapter else None


def load_model(path: str | Path, adapter: str | Path | None = None, dtype: str = "auto",
               device: str = "auto") -> LoadedModel:
    """Load the model in ``path`` (plus an optional PEFT adapter) for inference."""
    import torch
    from transformers import AutoModelForImageTextToText

    base, adapter_dir = split_adapter(path, adapter)
    family = detect_family(base)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    try:
        model = AutoModelForImageTextToText.from_pretrained(str(base), dtype=getattr(torch, dtype))
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"cannot load the model in {base}: {exc}") from exc
    if adapter_dir is not None:
        model = _with_adapter(model, base, adapter_dir)
    model.to(device).eval()
    processor = load_processor(base, family)
    return LoadedModel(model=model, processor=processor, path=str(base),
                       adapter=str(adapter_dir) if adapter_dir else None, family=family,
                       box_format=box_format_of(base, family, adapter_dir), device=device, dtype=dtype)


def _with_adapter(model: Any, base: Path, adapter_dir: Path) -> Any:
    from peft import PeftModel

    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelError(f"{adapter_dir} is not a LoRA adapter: it has no adapter_config.json")
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir))
    except (ValueError, RuntimeError, KeyError) as exc:  # shape mismatch, missing target modules
        raise ModelError(f"the adapter {adapter_dir} does not fit the model {base}: "
                         f"{str(exc).splitlines()[0][:300]}") from exc


def box_format_of(base: Path, family: str, adapter_dir: Path | None = None) -> str:
    """The adapter's pinned format, else the base folder's, else the family default."""
    for folder in (adapter_dir, base):
        if folder is not None and (folder / MODEL_FILE).is_file():
            pinned = json.loads((folder / MODEL_FILE).read_text(encoding="utf-8")).get("box_format")
            if pinned:
                return pinned
    return FAMILIES[family].box_format


def write_model_info(folder: str | Path, box_format: str) -> None:
    """Pin the box format a folder's model writes (read back by :func:`box_format_of`)."""
    Path(folder, MODEL_FILE).write_text(json.dumps({"box_format": box_format}) + "\n", encoding="utf-8")


def copy_model_info(source: str | Path, dest: str | Path) -> None:
    """Carry a folder's pinned box format over to a folder derived from it (merge, new base)."""
    if Path(source, MODEL_FILE).is_file():
        Path(dest).mkdir(parents=True, exist_ok=True)
        Path(dest, MODEL_FILE).write_text(Path(source, MODEL_FILE).read_text(encoding="utf-8"), encoding="utf-8")


def load_processor(path: str | Path, family: str | None = None) -> Any:
    """The family's processor; image-only when the full one cannot be built (no torchvision)."""
    from transformers import AutoProcessor, AutoTokenizer

    family = family or detect_family(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            processor = AutoProcessor.from_pretrained(str(path))
        if getattr(processor, "image_processor", None) is not None:
            return processor
    except (ImportError, AttributeError, ValueError, TypeError, OSError) as exc:
        log.debug("AutoProcessor failed for %s (%s); building an image-only processor", path, exc)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return image_only_processor(family, tokenizer, pil_image_processor(path))


def pil_image_processor(path: str | Path) -> Any:
    """The Qwen image processor with the PIL backend (the fast one needs torchvision)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil.from_pretrained(str(path))


_IMAGE_ONLY: dict[str, type] = {}


def image_only_processor(family: str, tokenizer: Any, image_processor: Any) -> Any:
    """An instance of the family's processor without its video part."""
    if family not in _IMAGE_ONLY:
        import transformers

        parent = getattr(transformers, FAMILIES[family].processor_class)

        def __init__(self: Any, image_processor: Any = None, tokenizer: Any = None,
                     chat_template: str | None = None, **kwargs: Any) -> None:
            self.video_processor = None
            parent.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

        # ProcessorMixin reads a processor's parts from ``attributes`` and its __init__ signature.
        _IMAGE_ONLY[family] = type(f"ImageOnly{parent.__name__}", (parent,),
                                   {"attributes": ["image_processor", "tokenizer"], "__init__": __init__,
                                    "__module__": __name__})
    return _IMAGE_ONLY[family](image_processor=image_processor, tokenizer=tokenizer,
                               chat_template=tokenizer.chat_template)


def count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def describe(loaded: LoadedModel) -> dict[str, Any]:
    """What ``visrl models info`` prints."""
    image = loaded.processor.image_processor
    return {"path": loaded.path, "adapter": loaded.adapter, "family": loaded.family,
            "box_format": loaded.box_format, "parameters": count_parameters(loaded.model),
            "device": loaded.device, "dtype": loaded.dtype,
            "min_pixels": _pixels(image, "min"), "max_pixels": _pixels(image, "max")}


def _pixels(image_processor: Any, which: str) -> int | None:
    """The processor's min/max pixel budget (``size`` is a dict or a SizeDict by version)."""
    size = getattr(image_processor, "size", None)
    key = "shortest_edge" if which == "min" else "longest_edge"
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return value if value is not None else getattr(image_processor, f"{which}_pixels", None)
