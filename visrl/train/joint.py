"""VisRL stage 2: DPO on the box step and the answer step together.

    loss = box_weight · DPO(box step) + answer_weight · DPO(answer step)      (0.5 / 0.5 in the paper)

The box step is stage 1's batch (full image, question -> chosen box vs rejected box). In the
answer step each side is its own conversation: the chosen answer follows the chosen box and
sees the chosen crop; the rejected answer follows the rejected box and sees the rejected crop.
trl's vision collator shares one prompt (and its images) between chosen and rejected, so
:class:`StepwisePreferenceCollator` builds the answer step itself, with trl's own helpers, in the
exact layout trl's loss expects (``[chosen rows; rejected rows]``, ``completion_mask``).

:class:`VisRLTrainer` is a thin ``DPOTrainer``: each step's loss is trl's own loss computation
(reference by adapter-disabling, every ``loss_type``), its metrics are logged under ``box/`` and
``answer/``, and the two steps run backward one after the other so only one step's activations
are alive at a time (peak memory about that of the longer step, not of both).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from transformers.data.data_collator import DataCollatorMixin
from trl import DPOTrainer
from trl.data_utils import apply_chat_template, prepare_multimodal_messages
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference
from trl.trainer.utils import flush_left

STEPS = ("box", "answer")
BOX_KEYS = ("images", "prompt", "chosen", "rejected")


@dataclass
class StepwisePreferenceCollator(DataCollatorMixin):
    """Collates stage-2 rows into ``{"box": batch, "answer": batch}`` (trl's batch layout each)."""

    processor: Any
    max_length: int | None = None
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        box_collator = DataCollatorForVisionPreference(self.processor, max_length=self.max_length)
        box = box_collator([{key: example[key] for key in BOX_KEYS} for example in examples])
        sides = [(example[f"{side}_answer_prompt"], example[f"{side}_answer_images"],
                  example[f"{side}_answer"]) for side in ("chosen", "rejected") for example in examples]
        return {"box": box, "answer": collate_completions(self.processor, sides, self.max_length)}


def collate_completions(processor: Any, rows: list[tuple[list, list, list]],
                        max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Tokenize (prompt messages, images, completion messages) rows, each with its own images.

    The output matches ``DataCollatorForVisionPreference``: prompts left-padded, completions
    right-padded, then flushed left; ``completion_mask`` marks the completion tokens.
    """
    prompts, completions, images = [], [], []
    for prompt, row_images, completion in rows:
        example = {"prompt": prepare_multimodal_messages(prompt, images=list(row_images)),
                   "completion": prepare_multimodal_messages(completion)}
        text = apply_chat_template(example, processor)
        prompts.append(text["prompt"])
        completions.append(text["completion"])
        images.append(list(row_images))
    # add_special_tokens=False: the chat template already holds them (no double BOS).
    processed = processor(images=images, text=prompts, padding=True, padding_side="left",
                          return_tensors="pt", add_special_tokens=False)
    done = processor(text=completions, padding=True, padding_side="right", return_tensors="pt",
                     add_special_tokens=False)
    prompt_mask = processed["attention_mask"]
    input_ids = torch.cat((processed["input_ids"], done["input_ids"]), dim=1)
    attention_mask = torch.cat((prompt_mask, done["attention_mask"]), dim=1)
    completion_mask = torch.cat((torch.zeros_like(prompt_mask), done["attention_mask"]), dim=1)
    extra = []
    if "mm_token_type_ids" in processed:  # Qwen-VL's image-token marks; completions have none
        extra.append(torch.cat((processed["mm_token_type_ids"], torch.zeros_like(done["input_ids"])), 1))
    attention_mask, input_ids, completion_mask, *extra = flush_left(
        attention_mask, input_ids, completion_mask, *extra)
    if max_length is not None:
        input_ids, attention_mask, completion_mask = (
            t[:, :max_length] for t in (input_ids, attention_mask, completion_mask))
        extra = [t[:, :max_length] for t in extra]
    processed["input_ids"], processed["attention_mask"] = input_ids, attention_mask
    processed["completion_mask"] = completion_mask
    if extra:
        processed["mm_token_type_ids"] = extra[0]
    return processed


class VisRLTrainer(DPOTrainer):
    """``DPOTrainer`` whose batch holds two preference steps, weighted and logged apart."""

    def __init__(self, *args: Any, box_weight: float = 0.5, answer_weight: float = 0.5,
                 **kwargs: Any) -> None:
        self.step_weights = {"box": box_weight, "answer": answer_weight}
        self._only_step: str | None = None
        super().__init__(*args, **kwargs)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        # Why: the batch is {"box": ..., "answer": ...}; each is an ordinary trl DPO batch.
        if "box" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        steps = [self._only_step] if self._only_step else list(STEPS)
        total = None
        for step in steps:
            weight = self.step_weights[step]
            if weight == 0:
                continue
            loss = weight * self._step_loss(model, step, inputs[step])
            total = loss if total is None else total + loss
        if return_outputs:
            return total, None
        return total

    def _step_loss(self, model: Any, step: str, batch: dict[str, Any]) -> torch.Tensor:
        """trl's DPO loss on one step; its metrics are moved under ``step/``."""
        mode = "train" if self.model.training else "eval"
        logged = self._metrics[mode]
        self._metrics[mode] = defaultdict(list)
        try:
            loss = super().compute_loss(model, batch)
        finally:
            step_metrics, self._metrics[mode] = self._metrics[mode], logged
        for key, values in step_metrics.items():
            if key == "num_tokens":  # a running total across both steps, not a per-step value
                logged[key] = values
            else:
                logged[f"{step}/{key}"].extend(values)
        logged[f"{step}/loss"].append(loss.detach().float().item())
        return loss

    def training_step(self, model: Any, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:
        # Why: one backward per step frees the box step's activations before the answer step's
        # forward. Gradients add up to those of the summed loss. DeepSpeed counts backward calls
        # as micro-batches, so under it the summed loss takes one backward.
        if "box" not in inputs or self.is_deepspeed_enabled:
            return super().training_step(model, inputs, num_items_in_batch)
        total = None
        for step in STEPS:
            if self.step_weights[step] == 0:
                continue
            self._only_step = step
            try:
                loss = super().training_step(model, inputs, num_items_in_batch)
            finally:
                self._only_step = None
            total = loss if total is None else total + loss
        return total


def build_visrl_trainer(cfg: Any, tm: Any, train_ds: Any, eval_ds: Any | None, output_dir: Any,
                        callbacks: list[Any]) -> VisRLTrainer:
    """A :class:`VisRLTrainer` on stage-2 rows (see :func:`visrl.formats.trl.dpo_rows`)."""
    from visrl.train.dpo import dpo_args
    from visrl.train.lora import lora_config

    return VisRLTrainer(
        model=tm.model,
        ref_model=None,
        args=dpo_args(cfg, output_dir, eval_ds is not None),
        data_collator=StepwisePreferenceCollator(tm.processor, max_length=cfg.max_length),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tm.processor,
        peft_config=lora_config(cfg),
        callbacks=callbacks,
        box_weight=cfg.box_weight,
        answer_weight=cfg.answer_weight,
    )
