"""Training stages (sft, dpo = VisRL stage 1, visrl = stage 2, grpo) and LoRA merging.

Importing this package is cheap (no torch); the heavy modules load when a run starts.
Library entry points: :func:`train` (``visrl train``) and :func:`merge` (``visrl merge``).
"""

from __future__ import annotations

from typing import Any

from visrl.train.config import TrainConfig, load_train_config

__all__ = ["TrainConfig", "load_train_config", "train", "merge"]


def train(*args: Any, **kwargs: Any) -> Any:
    """See :func:`visrl.train.run.train`."""
    from visrl.train.run import train as run_train

    return run_train(*args, **kwargs)


def merge(*args: Any, **kwargs: Any) -> Any:
    """See :func:`visrl.train.merge.merge_lora`."""
    from visrl.train.merge import merge_lora

    return merge_lora(*args, **kwargs)
