"""The ``TrainingArguments`` every stage shares, from a :class:`TrainConfig`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from visrl.train.config import TrainConfig
from visrl.train.lora import has_gpu


def common_args(cfg: TrainConfig, output_dir: Path, has_eval: bool) -> dict[str, Any]:
    """Keyword arguments for ``SFTConfig``/``DPOConfig`` (both subclass TrainingArguments)."""
    gpu = has_gpu()
    return {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": cfg.per_device_train_batch_size,
        "per_device_eval_batch_size": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "learning_rate": cfg.learning_rate,
        "num_train_epochs": cfg.num_train_epochs,
        "max_steps": cfg.max_steps,
        "lr_scheduler_type": cfg.lr_scheduler_type,
        # transformers 5 folds warmup_ratio into warmup_steps: a float in [0, 1) is a ratio.
        "warmup_steps": float(cfg.warmup_ratio),
        "weight_decay": cfg.weight_decay,
        "logging_steps": cfg.logging_steps,
        "save_strategy": "steps",
        "save_steps": cfg.save_steps,
        "save_total_limit": cfg.save_total_limit,
        "eval_strategy": "steps" if has_eval else "no",
        "eval_steps": cfg.save_steps if has_eval else None,
        # Without a GPU both only cost time: CPU bf16 matmuls are slow and checkpointing
        # recomputes every forward, while host memory is plentiful (shared/PITFALLS.md).
        "bf16": cfg.bf16 and gpu,
        "gradient_checkpointing": cfg.gradient_checkpointing and gpu,
        "seed": cfg.seed,
        "report_to": cfg.report_to,
        "dataloader_num_workers": cfg.dataloader_num_workers,
        "dataloader_pin_memory": gpu,  # pinned memory only helps copies to a GPU
        "deepspeed": cfg.deepspeed,
        "max_length": cfg.max_length,
        # The vision collators need the raw columns (images, messages, prompts): keep them all.
        "remove_unused_columns": False,
        "disable_tqdm": True,  # visrl.progress draws the one progress bar
    }
