"""Loading the model to train, LoRA settings, and folding a previous stage's adapter in.

trl's ``DPOTrainer`` refuses a ``PeftModel`` together with a new ``peft_config``, so an adapter
from the previous stage is merged into the base first (``merge_and_unload``). The new adapter is
then relative to that merged base, which is why :func:`save_merged_base` writes it beside the
result: a checkpoint must load with ``load_model(base, adapter=checkpoint)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visrl.models import copy_model_info
from visrl.train.config import TrainConfig


@dataclass
class TrainModel:
    """The model to train, its processor, and the base path a saved adapter applies to."""

    model: Any
    processor: Any
    base_path: str
    merged_adapter: str | None = None


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def load_train_model(cfg: TrainConfig, model_path: str, adapter_path: str | None) -> TrainModel:
    """Load base (+ previous adapter, merged) on the CPU; the Trainer places it on devices.

    Loaded in float32 on CPUs (bf16 matmuls are slow there) and in bfloat16 on GPUs, where the
    trainer's bf16 autocast expects it; LoRA weights stay float32 either way (peft upcasts them).
    """
    from visrl.models import load_model

    dtype = "bfloat16" if (cfg.bf16 and has_gpu()) else "float32"
    loaded = load_model(model_path, adapter=adapter_path, dtype=dtype, device="cpu")
    model = loaded.model
    if _is_peft(model):
        model = model.merge_and_unload()
    if cfg.finetuning_type == "full":
        _freeze(model, cfg.frozen_modules())
    model.config.use_cache = False  # a KV cache is wasted memory while training
    return TrainModel(model, loaded.processor, model_path, adapter_path)


def _freeze(model: Any, pattern: str | None) -> None:
    """Stop gradients of every parameter whose name fully matches ``pattern`` (the vision side)."""
    if pattern:
        import re

        frozen = re.compile(pattern)
        for name, param in model.named_parameters():
            if frozen.fullmatch(name):
                param.requires_grad_(False)


def _is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def lora_config(cfg: TrainConfig) -> Any:
    """The ``peft.LoraConfig`` of a LoRA run, or None for full fine-tuning."""
    if cfg.finetuning_type != "lora":
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.lora_rank,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_targets(),
        exclude_modules=cfg.lora_exclude(),  # the frozen vision side (LLaMA-Factory's meaning of `all`)
        task_type="CAUSAL_LM",
        bias="none",
    )


def limit_image_pixels(processor: Any, max_pixels: int | None) -> None:
    """Cap the pixels per image (Qwen-VL processors resize to at most this many)."""
    if not max_pixels:
        return
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        return
    if hasattr(image_processor, "max_pixels"):
        image_processor.max_pixels = max_pixels
    size = getattr(image_processor, "size", None)
    if isinstance(size, dict) and "longest_edge" in size:
        image_processor.size = {**size, "longest_edge": max_pixels}
        min_pixels = size.get("shortest_edge")
        if min_pixels and min_pixels > max_pixels:
            image_processor.size["shortest_edge"] = max_pixels


def save_merged_base(train_model: TrainModel, out_dir: Path) -> None:
    """Write the merged base (base + previous adapter), before any new LoRA wraps it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    train_model.model.save_pretrained(out_dir)
    train_model.processor.save_pretrained(out_dir)
    copy_model_info(train_model.base_path, out_dir)
    train_model.base_path = str(out_dir)
