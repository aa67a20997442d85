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
are alive at a time (peak memory about that of the longer step, not of both). A frozen vision
tower encodes each distinct image once per step (:class:`VisionCache`), not once per sequence
and model pass.
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


class VisionCache:
    """Per-image memo of a frozen vision tower's outputs, for the length of one training step.

    One stage-2 step shows the vision tower each pair's full image 8 times (box step: chosen and
    rejected rows; answer step: chosen and rejected rows; each for the policy and the reference)
    and each crop twice. When the tower has no trainable weight and no adapter (the default
    ``lora_target``), all of those give the same output, so each distinct image is encoded once
    per step. It wraps the inner model's ``get_image_features`` (the Qwen-VL families' hook for
    pixels -> embeddings; ``pooler_output`` per image, plus Qwen3-VL's ``deepstack_features``),
    splits the batch's ``pixel_values`` per image by ``image_grid_thw``, encodes only images not
    seen this step (compared by exact tensor equality), and reassembles the output in order.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.original = inner.get_image_features
        self.entries: list[tuple[tuple[int, ...], torch.Tensor, torch.Tensor, list[torch.Tensor] | None]] = []
        self.encoded = self.reused = 0  # images, over the cache's life (tests and benchmarks read them)
        self.output_type: type = object  # the hook's output class, known after its first call

    @classmethod
    def install(cls, model: Any) -> VisionCache | None:
        """Wrap ``model``'s vision hook; None (nothing changed) when the tower trains or is unknown."""
        inner = next((m for m in model.modules() if "visual" in m._modules
                      and callable(getattr(m, "get_image_features", None))), None)
        if inner is None or any(p.requires_grad for p in inner.visual.parameters()):
            return None
        cache = cls(inner)
        inner.get_image_features = cache
        return cache

    def remove(self) -> None:
        self.clear()
        if self.inner.__dict__.get("get_image_features") is self:
            del self.inner.get_image_features

    def clear(self) -> None:
        self.entries.clear()

    def _find(self, grid: tuple[int, ...], pixels: torch.Tensor) -> int | None:
        for i, (key, seen, _, _) in enumerate(self.entries):
            if key == grid and seen.shape == pixels.shape and torch.equal(seen, pixels):
                return i
        return None

    def __call__(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                 **kwargs: Any) -> Any:
        if image_grid_thw is None or pixel_values.shape[0] != int(image_grid_thw.prod(-1).sum()):
            return self.original(pixel_values, image_grid_thw, **kwargs)  # not the layout we know
        grids = [tuple(g) for g in image_grid_thw.tolist()]
        chunks = list(torch.split(pixel_values, [t * h * w for t, h, w in grids]))
        slots = [self._find(g, c) for g, c in zip(grids, chunks, strict=True)]
        missing = [i for i, slot in enumerate(slots) if slot is None]
        new: list[int] = []  # an image repeated inside this batch is encoded once too
        for i in missing:
            if not any(grids[j] == grids[i] and torch.equal(chunks[j], chunks[i]) for j in new):
                new.append(i)
        if new:
            out = self.original(torch.cat([chunks[i] for i in new]), image_grid_thw[new], **kwargs)
            self.output_type = type(out)
            deep = getattr(out, "deepstack_features", None)
            # Detached: the tower has nothing to train, but with gradient checkpointing transformers
            # makes its embeddings require grad, and a cached output tied to one pass's graph
            # would be backpropagated again (and through the frozen tower) by the next pass.
            for k, i in enumerate(new):
                layers = [feat[k].detach() for feat in deep] if deep is not None else None
                self.entries.append((grids[i], chunks[i], out.pooler_output[k].detach(), layers))
            self.encoded += len(new)
        self.reused += len(grids) - len(new)
        rows = [self.entries[self._find(g, c)] for g, c in zip(grids, chunks, strict=True)]
        return self._output(rows)

    def _output(self, rows: list[Any]) -> Any:
        """An output of the hook's own type holding ``rows``' per-image results, in order."""
        result = self.output_type()
        result.pooler_output = tuple(row[2] for row in rows)
        if rows[0][3] is not None:  # Qwen3-VL: features of intermediate layers, per image too
            result.deepstack_features = [tuple(row[3][layer] for row in rows) for layer in range(len(rows[0][3]))]
        return result


class VisRLTrainer(DPOTrainer):
    """``DPOTrainer`` whose batch holds two preference steps, weighted and logged apart."""

    def __init__(self, *args: Any, box_weight: float = 0.5, answer_weight: float = 0.5,
                 reuse_vision: bool = True, **kwargs: Any) -> None:
        self.step_weights = {"box": box_weight, "answer": answer_weight}
        self._only_step: str | None = None
        super().__init__(*args, **kwargs)
        self.vision_cache = VisionCache.install(self.model) if reuse_vision else None

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        # Why: the batch is {"box": ..., "answer": ...}; each is an ordinary trl DPO batch.
        if "box" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self._only_step is None:  # a whole step (eval, DeepSpeed): its images are new
            self._clear_vision()
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
        self._clear_vision()
        total = None
        try:
            for step in STEPS:
                if self.step_weights[step] == 0:
                    continue
                self._only_step = step
                try:
                    loss = super().training_step(model, inputs, num_items_in_batch)
                finally:
                    self._only_step = None
                total = loss if total is None else total + loss
        finally:
            self._clear_vision()  # the next step shows other images: free these now
        return total

    def _clear_vision(self) -> None:
        if self.vision_cache is not None:
            self.vision_cache.clear()


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
