"""Loading the model to train, LoRA settings, and folding a previous stage's adapter in.

trl's ``DPOTrainer`` refuses a ``PeftModel`` together with a new ``peft_config``, so an adapter
from the previous stage is merged into the base first (``merge_and_unload``). The new adapter is
then relative to that merged base, which is why :func:`save_merged_base` writes it beside the
result: a checkpoint must load with ``load_model(base, adapter=checkpoint)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visrl.contract import TwoStepContract, read_contract
from visrl.errors import ModelError
from visrl.model_files import copy_processor_files
from visrl.models import (
    FAMILIES,
    ModelSource,
    copy_model_info,
    detect_family,
    locate_model,
    pil_image_processor,
)
from visrl.train.config import TrainConfig


@dataclass
class TrainModel:
    """The model to train, its processor, and the base path a saved adapter applies to."""

    model: Any
    processor: Any
    base_path: str
    merged_adapter: str | None = None
    contract: TwoStepContract = field(default_factory=TwoStepContract)  # what this training teaches


def training_contract(cfg: TrainConfig, base: ModelSource, adapter_path: str | None = None) -> TwoStepContract:
    """The contract a run teaches: the checkpoint's (adapter over base) with the config's contract
    keys on top (:meth:`ContractFields.over`), bound to the base's image processor (its resize
    factor and effective pixel budget: the frame of ``qwen2_5`` boxes). Reads processor files
    only, so rows can be built before the model loads."""
    family = detect_family(base.path)
    contract = cfg.over(read_contract(base.path, adapter_path, FAMILIES[family].box_format))
    if contract.box_format != "qwen2_5":
        # Only qwen2_5 text depends on the processor's resize; the rest is bound when the model
        # loads (load_train_model), so a bad selection is reported before any model file is read.
        return contract
    try:
        image_processor = pil_image_processor(base.path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the image processor of {base.label} (its preprocessor_config.json): "
                         f"{str(exc).splitlines()[0][:300]}") from exc
    contract.apply_budget(image_processor)
    return contract.bound_to(image_processor)


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def load_train_model(cfg: TrainConfig, model_path: str, adapter_path: str | None,
                     contract: TwoStepContract | None = None) -> TrainModel:
    """Load base (+ previous adapter, merged) on the CPU; the Trainer places it on devices.

    Loaded in float32 on CPUs (bf16 matmuls are slow there) and in bfloat16 on GPUs, where the
    trainer's bf16 autocast expects it; LoRA weights stay float32 either way (peft upcasts them).
    The processor gets ``contract``'s pixel budget (default: the config's, over the checkpoint's).
    """
    from visrl.models import load_model

    if contract is None:
        contract = training_contract(cfg, locate_model(model_path), adapter_path)
    dtype = "bfloat16" if (cfg.bf16 and has_gpu()) else "float32"
    loaded = load_model(model_path, adapter=adapter_path, dtype=dtype, device="cpu", overrides=contract.to_dict())
    model = loaded.model
    if _is_peft(model):
        model = model.merge_and_unload()
    if cfg.finetuning_type == "full":
        _freeze(model, cfg.frozen_modules())
    model.config.use_cache = False  # a KV cache is wasted memory while training
    return TrainModel(model, loaded.processor, model_path, adapter_path, loaded.contract)


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


def save_merged_base(train_model: TrainModel, out_dir: Path, write: bool = True) -> None:
    """Write the merged base (base + previous adapter), before any new LoRA wraps it; the
    result's base is ``out_dir`` either way (``write=False``: another rank writes it)."""
    if not write:
        train_model.base_path = str(out_dir)
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    train_model.model.save_pretrained(out_dir)
    # The base's own processor files: a stock folder, never VisRL's image-only class (PITFALLS.md).
    copy_processor_files(locate_model(train_model.base_path).path, out_dir)
    copy_model_info(train_model.base_path, out_dir, contract=train_model.contract)
    train_model.base_path = str(out_dir)
