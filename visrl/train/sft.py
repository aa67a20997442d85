"""SFT warm-up: two-step conversations (full image, box, crop, answer) with trl's SFTTrainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from visrl.train.args import common_args
from visrl.train.config import TrainConfig
from visrl.train.lora import TrainModel, lora_config


def build_sft_trainer(cfg: TrainConfig, tm: TrainModel, train_ds: Any, eval_ds: Any | None,
                      output_dir: Path, callbacks: list[Any]) -> Any:
    """An ``SFTTrainer`` on ``images`` + ``messages`` rows (each image part takes the next image)."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**common_args(cfg, output_dir, eval_ds is not None),
                     assistant_only_loss=cfg.assistant_only_loss)
    return SFTTrainer(
        model=tm.model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        # Always the processor: given the tokenizer (what AutoProcessor returns for a custom
        # processor class) trl decides the model is text-only (shared/PITFALLS.md).
        processing_class=tm.processor,
        peft_config=lora_config(cfg),
        callbacks=callbacks,
    )
