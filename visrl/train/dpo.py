"""VisRL stage 1: DPO on the box step (which region to look at), with trl's DPOTrainer.

With LoRA the reference model is the policy with its adapter disabled (``ref_model=None``), so
only one copy of the weights is in memory; with full fine-tuning trl loads a frozen copy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from visrl.train.args import common_args
from visrl.train.config import TrainConfig
from visrl.train.lora import TrainModel, lora_config


def dpo_args(cfg: TrainConfig, output_dir: Path, has_eval: bool) -> Any:
    from trl import DPOConfig

    losses, weights = [cfg.pref_loss], [1.0]
    if cfg.pref_ftx:
        losses, weights = [cfg.pref_loss, "sft"], [1.0, cfg.pref_ftx]
    return DPOConfig(**common_args(cfg, output_dir, has_eval), beta=cfg.pref_beta,
                     loss_type=losses, loss_weights=weights)


def build_dpo_trainer(cfg: TrainConfig, tm: TrainModel, train_ds: Any, eval_ds: Any | None,
                      output_dir: Path, callbacks: list[Any]) -> Any:
    """A plain ``DPOTrainer`` on box-step rows (``images``, ``prompt``, ``chosen``, ``rejected``)."""
    from trl import DPOTrainer

    return DPOTrainer(
        model=tm.model,
        ref_model=None,
        args=dpo_args(cfg, output_dir, eval_ds is not None),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tm.processor,
        peft_config=lora_config(cfg),
        callbacks=callbacks,
    )
