"""A ``TrainerCallback`` between the Trainer and :class:`visrl.progress.Progress`.

It forwards the step, the total and every numeric log value (loss, learning rate, the
``box/...`` and ``answer/...`` rewards of stage 2) to the progress, which writes them to the
store's ``jobs`` and ``metrics`` tables for the app. A stop request (SIGTERM to the job) ends
training after the current optimizer step *with a save*, so a stopped run leaves a checkpoint
that loads and that ``resume_from_checkpoint: auto`` continues from.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from visrl.progress import Progress

# Logged by transformers once at the end; not a training curve.
SKIP_KEYS = {"total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second"}


class ProgressCallback(TrainerCallback):
    """Reports to ``progress``; ``stopped`` tells afterwards whether a stop cut the run short."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.stopped = False

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, **kwargs: Any) -> None:
        self.progress.set_total(state.max_steps)
        self.progress.begin_at(state.global_step,  # > 0: resumed from that step's checkpoint
                               message=f"resumed at step {state.global_step}" if state.global_step else None)

    def on_step_end(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, **kwargs: Any) -> None:
        self.progress.update(step=state.global_step)
        if self.progress.stop_requested and state.global_step < state.max_steps:
            self.stopped = True
            control.should_training_stop = True
            control.should_save = True  # the Trainer saves right after this callback

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        metrics = {key: float(value) for key, value in (logs or {}).items()
                   if key not in SKIP_KEYS and isinstance(value, int | float)
                   and not isinstance(value, bool) and math.isfinite(value)}
        if metrics:
            self.progress.update(step=state.global_step, metrics=metrics)
