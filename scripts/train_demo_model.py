"""Train the shipped demo model: a small Qwen3-VL, from scratch, on the demo task (pattern detail).

    .venv/bin/python scripts/train_demo_model.py configs/demo/train_demo_model.yaml [--out DIR]
        [--device auto|cpu|cuda] [--workers N] [--max-minutes M] [--set key=value ...]

The recipe is the method's SFT warm-up (Visual-CoT two-step conversations: full image -> box
text, crop of the ground-truth box -> answer; loss on the assistant turns only), plus a share of
direct rows (full image -> answer) so that the direct baseline the card reports is a trained one,
not an untrained prompt. Scenes are drawn fresh for every step (``train`` split indices 0..N), so
the model never sees a scene twice; the ``val`` split is printed along the way; the card's numbers
come from ``evaluate_model`` on the ``test`` split, run once at the end.

It is a plain torch loop rather than ``visrl train``: the whole model (vision tower included) is
trained from a random start. The same code runs on a CPU (fp32, batches built in-process or by
``workers``) and on a CUDA GPU (bf16 autocast, fp32 weights; DataLoader workers render scenes and
run the processor so the GPU is fed). The learning rate follows a cosine over ``steps`` or over
``max_minutes``, whichever ends first, so a time-boxed run still ends at a low learning rate.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from visrl.boxes import Box, crop_box, format_box, iou, parse_box, random_negative_box  # noqa: E402
from visrl.config import load_config  # noqa: E402
from visrl.contract import TwoStepContract, write_contract  # noqa: E402
from visrl.crop_judge import NOTHING, check_messages  # noqa: E402
from visrl.errors import ConfigError  # noqa: E402
from visrl.prompts import apply_layout, box_prompt, direct_prompt, two_step_conversation  # noqa: E402
from visrl.synthetic import SyntheticConfig, render_item  # noqa: E402
from visrl.tiny_qwen3 import TinyQwen3Spec, build_tiny_qwen3, load_processor, save_processor  # noqa: E402


@dataclass
class DemoTrainConfig:
    """The demo model's recipe (configs/demo/train_demo_model.yaml)."""

    output_dir: str = field(default="data/demo-model", metadata={"help": "Where the model is written."})
    init_from: str | None = field(default=None, metadata={
        "help": "Start from this folder's weights, tokenizer and processor (a previous phase, or a "
                "random init written by build_tiny_qwen3) instead of building a random model."})
    seed: int = field(default=0, metadata={"help": "Seed of the initial weights and the batch order."})
    steps: int = field(default=600, metadata={"help": "Optimizer steps (the cosine's length)."})
    max_minutes: float = field(default=15.0, metadata={
        "help": "Training wall time in minutes (val evaluations excluded); the cosine ends here "
                "if this comes before ``steps``."})
    batch_size: int = field(default=16, metadata={"help": "Conversations per step."})
    learning_rate: float = field(default=1.0e-3, metadata={"help": "Peak AdamW learning rate."})
    warmup_steps: int = field(default=30, metadata={"help": "Linear warm-up steps."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    direct_fraction: float = field(default=0.25, metadata={
        "help": "Share of rows that are direct (full image -> answer) instead of two-step."})
    check_fraction: float = field(default=0.0, metadata={
        "help": "Share of crop-naming rows (a crop -> 'Which object does this image show?' -> 'red "
                "circle' or 'nothing'; half the named object's crop, a quarter another object's, a "
                "quarter a box off it): what the model needs to be the crop judge (visrl.crop_judge)."})
    colour_fraction: float = field(default=0.0, metadata={
        "help": "Share of binding rows 'What colour is the object at [box]?' (full image -> colour)."})
    name_fraction: float = field(default=0.0, metadata={
        "help": "Share of short box rows: the full image and only the object's name ('red circle') -> "
                "its box text. The name sits right before the answer, so the row trains matching a "
                "colour word to a visual token without first finding the word in a long question."})
    question_first: bool = field(default=False, metadata={
        "help": "Put each user turn's text before its image (an experiment of issue 17: visual tokens "
                "placed after the question can carry 'am I the named one?'). Real Qwen models and the "
                "product keep image-first; a model trained this way is evaluated the same way."})
    box_fraction: float = field(default=0.0, metadata={
        "help": "Share of box-step rows (full image + question -> the named object's box text, no crop "
                "turn): two-thirds of a two-step row's cost, all of it spent on the step that binds."})
    binding_weight: float = field(default=1.0, metadata={
        "help": "Loss weight of the box text's leading digits (the digit after each '0.'), against 1 "
                "for every other assistant token. With teacher forcing these few tokens are the only "
                "ones that choose *which* object the box is on (the column, then the row); at weight 1 "
                "they are ~2 of ~35 loss tokens, so the choice is learned last, if at all (the card's "
                "'boxes some object, not the named one')."})
    crop_jitter: float = field(default=0.0, metadata={
        "help": "Two-step rows crop a box whose sides are moved by up to this share of its width and "
                "height (the box text stays the annotated one), so the answer step learns to read the "
                "imprecise crops the model's own boxes give (0: the exact annotated crop)."})
    pointer_weight: float = field(default=0.0, metadata={
        "help": "Weight of an auxiliary pointer loss (0: off; needs question_first): a linear head on "
                "each overview visual token's hidden state at ``pointer_layer`` scores 'I am the named "
                "object', trained with a softmax over the image's tokens. It supervises the one hop a "
                "question-first model needs (a visual token matching the colour word before it), which "
                "a plain transformer learns in ~100 steps (bench/binding_capacity.py, readout cells). "
                "The head is training-only: it is kept in the checkpoint, never in the saved model."})
    pointer_layer: int = field(default=2, metadata={
        "help": "Which hidden state the pointer head reads: the output of decoder layer N (1 and up; the "
                "embeddings are not a choice, since Qwen3-VL puts the visual features in after them)."})
    save_every: int = field(default=200, metadata={
        "help": "Save a resumable checkpoint (weights, optimizer, step, history) every this many "
                "steps to <out>/checkpoint; a run started again on the same --out resumes there."})
    data_split: str = field(default="train", metadata={
        "help": "Seeded stream the training scenes come from ('train'; the learning benchmark's "
                "small boxed set uses its own, 'warmup', disjoint from the workspace's items)."})
    boxed_items: int = field(default=0, metadata={
        "help": "0: fresh scenes every step; N: cycle over scenes 0..N-1 of data_split (a small "
                "annotated set, as the method's SFT warm-up assumes)."})
    threads: int = field(default=2, metadata={"help": "torch CPU threads of the main process."})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu or cuda."})
    workers: int = field(default=0, metadata={
        "help": "DataLoader worker processes building batches (0: in the training process)."})
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast on CUDA (weights stay fp32); ignored on CPU."})
    log_every: int = field(default=10, metadata={"help": "Print the loss every this many steps."})
    eval_every: int = field(default=100, metadata={"help": "Print val metrics every this many steps (0: never)."})
    n_eval: int = field(default=100, metadata={"help": "Items of the final evaluation (val checks use <= 50)."})
    eval_batch: int = field(default=25, metadata={"help": "Items per generation batch in evaluations."})
    model: dict[str, Any] = field(default_factory=dict, metadata={"help": "TinyQwen3Spec fields."})
    data: dict[str, Any] = field(default_factory=dict, metadata={"help": "SyntheticConfig fields."})

    def __post_init__(self) -> None:
        shares = {"direct_fraction": self.direct_fraction, "check_fraction": self.check_fraction,
                  "colour_fraction": self.colour_fraction, "box_fraction": self.box_fraction,
                  "name_fraction": self.name_fraction}
        for name, value in shares.items():
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be between 0 and 1, got {value}")
        if sum(shares.values()) > 1.0:
            raise ConfigError(f"direct, check, colour, box and name fractions add up to more than 1: {shares}")
        if self.binding_weight <= 0:
            raise ConfigError(f"binding_weight must be > 0, got {self.binding_weight}")
        if self.pointer_weight < 0 or (self.pointer_weight and not self.question_first):
            raise ConfigError("pointer_weight must be >= 0 and needs question_first: true (image-first visual "
                              f"tokens cannot see the question), got {self.pointer_weight}")
        if not 0.0 <= self.crop_jitter < 0.5:
            raise ConfigError(f"crop_jitter must be in [0, 0.5), got {self.crop_jitter}")
        if self.boxed_items < 0:
            raise ConfigError(f"boxed_items must be >= 0 (0: fresh scenes), got {self.boxed_items}")


ANSWER_TOKENS = 8  # the longest demo answer ("checkered") is 3 tokens, plus <|im_end|> and slack
BOX_TOKENS = 32  # "[0.123, 0.456, 0.789, 0.901]" is 28 tokens


def assistant_labels(ids: list[int], start: list[int], end: int) -> list[int]:
    """Labels that train the assistant turns only: tokens after each ``start`` sequence up to and
    including the turn's ``end`` token; everything else is -100."""
    labels = [-100] * len(ids)
    i, inside = 0, False
    while i < len(ids):
        if not inside and ids[i:i + len(start)] == start:
            i += len(start)
            inside = True
            continue
        if inside:
            labels[i] = ids[i]
            inside = ids[i] != end
        i += 1
    return labels


ROW_KINDS = ("two_step", "direct", "check", "colour", "box", "name")
COLOUR_QUESTION = "What colour is the object at {box}?"


def row_kind(rng: random.Random, cfg: DemoTrainConfig) -> str:
    """Which kind of row a draw gives, by the config's shares (the rest are two-step rows)."""
    r = rng.random()
    for kind, share in (("direct", cfg.direct_fraction), ("check", cfg.check_fraction),
                        ("colour", cfg.colour_fraction), ("box", cfg.box_fraction),
                        ("name", cfg.name_fraction)):
        if r < share:
            return kind
        r -= share
    return "two_step"


def make_row(scene: Any, direct: bool | str, rng: random.Random | None = None,
             crop_jitter: float = 0.0) -> tuple[list[dict], list[Any]]:
    """(messages, images) of one training conversation; ``direct`` is a bool (direct or two-step)
    or one of :data:`ROW_KINDS`; ``crop_jitter``: see :class:`DemoTrainConfig`."""
    kind = direct if isinstance(direct, str) else ("direct" if direct else "two_step")
    if kind == "direct":
        return [*direct_prompt(scene.question), _assistant(scene.answer)], [scene.image]
    if kind == "check":
        return check_row(scene, rng or random.Random(0))
    if kind == "colour":
        obj = scene.objects[(rng or random.Random(0)).randrange(len(scene.objects))]
        question = COLOUR_QUESTION.format(box=format_box(obj.box, "viscot", scene.size))
        return [_user_text(question, images=1), _assistant(obj.colour)], [scene.image]
    box = scene.target_object.box
    text = format_box(box, "viscot", scene.size)
    if kind == "box":
        return [*box_prompt(scene.question), _assistant(text)], [scene.image]
    if kind == "name":
        obj = scene.target_object
        return [_user_text(f"{obj.colour} {obj.shape}", images=1), _assistant(text)], [scene.image]
    crop = jitter_box(box, scene.size, rng or random.Random(0), crop_jitter) if crop_jitter else box
    return two_step_conversation(scene.question, text, scene.answer), [scene.image, crop_box(scene.image, crop)]


def check_row(scene: Any, rng: random.Random) -> tuple[list[dict], list[Any]]:
    """A crop-naming row: half the named object's crop, a quarter another object's, a quarter a
    box of similar size off the named object (the generate step's random boxes); the reply names
    the object the crop holds (IoU > 0.5 with its box) or says there is none."""
    target = scene.target_object.box
    r = rng.random()
    others = [o.box for k, o in enumerate(scene.objects) if k != scene.target]
    if r < 0.5 or (r < 0.75 and not others):
        box = jitter_box(target, scene.size, rng)
    elif r < 0.75:
        box = jitter_box(others[rng.randrange(len(others))], scene.size, rng)
    else:
        box = random_negative_box(target, scene.size, rng)
    return [*check_messages(scene.question), _assistant(crop_name(scene, box))], [crop_box(scene.image, box)]


def crop_name(scene: Any, box: Box) -> str:
    """'red circle' for the object a box holds (IoU > 0.5), else 'nothing'."""
    best = max(scene.objects, key=lambda o: iou(box, o.box))
    return f"{best.colour} {best.shape}" if iou(box, best.box) > 0.5 else NOTHING


def jitter_box(box: Box, size: tuple[int, int], rng: random.Random, share: float = 0.1) -> Box:
    """``box`` with each side moved by up to ``share`` of its width/height (sampled boxes are not
    exact); clamped to the image."""
    dx, dy = box.width * share, box.height * share
    moved = Box(box.x1 + rng.uniform(-dx, dx), box.y1 + rng.uniform(-dy, dy),
                box.x2 + rng.uniform(-dx, dx), box.y2 + rng.uniform(-dy, dy)).clamp(size)
    return moved or box


def _user_text(text: str, images: int) -> dict:
    return {"role": "user", "content": [*({"type": "image"} for _ in range(images)), {"type": "text", "text": text}]}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def lead_digit_weights(ids: list[int], labels: list[int], dot: int, weight: float) -> list[float]:
    """Per-token loss weights: ``weight`` for a trained token right after a trained '.' token (a box
    coordinate's leading digit), 1 for the other trained tokens, 0 where the label is -100."""
    out = [0.0 if lab == -100 else 1.0 for lab in labels]
    for i in range(1, len(ids)):
        if labels[i] != -100 and labels[i - 1] != -100 and ids[i - 1] == dot:
            out[i] = weight
    return out


def layout_of(question_first: bool) -> str:
    """The :data:`visrl.prompts.LAYOUTS` name of the ``question_first`` setting."""
    return "question_first" if question_first else "image_first"


def collate(processor: Any, rows: list[tuple[list[dict], list[Any]]], binding_weight: float = 1.0,
            question_first: bool = False) -> dict[str, Any]:
    import torch

    texts = [processor.apply_chat_template(apply_layout(m, layout_of(question_first)), tokenize=False) for m, _ in rows]
    images = [im for _, ims in rows for im in ims]
    processor.tokenizer.padding_side = "right"
    enc = processor(text=texts, images=images, return_tensors="pt", padding=True)
    tok = processor.tokenizer
    start = tok.encode("<|im_start|>assistant\n")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    labels = [assistant_labels(ids, start, end) for ids in enc["input_ids"].tolist()]
    enc["labels"] = torch.tensor(labels)
    enc["labels"][enc["attention_mask"] == 0] = -100
    if binding_weight != 1.0:
        dot = tok.convert_tokens_to_ids(".")
        enc["loss_weights"] = torch.tensor([lead_digit_weights(ids, lab, dot, binding_weight) for ids, lab
                                            in zip(enc["input_ids"].tolist(), enc["labels"].tolist(), strict=True)])
    return dict(enc)


def weighted_loss(model: Any, batch: dict[str, Any]) -> Any:
    """The model's next-token loss, with per-token weights when the batch carries ``loss_weights``."""
    import torch.nn.functional as F

    weights = batch.pop("loss_weights", None)
    if weights is None:
        return model(**batch).loss
    labels = batch.pop("labels")
    logits = model(**batch).logits[:, :-1].float()
    target, w = labels[:, 1:], weights[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                         reduction="none").view_as(w)
    return (ce * w).sum() / w.sum()


def training_loss(model: Any, batch: dict[str, Any], head: Any = None, weight: float = 0.0,
                  layer: int = 2) -> tuple[Any, Any]:
    """(total loss, pointer loss or None): the weighted next-token loss plus ``weight`` x the
    pointer head's loss on the hidden state after decoder layer ``layer``."""
    counts, targets = batch.pop("pointer_counts", None), batch.pop("pointer_targets", None)
    if head is None or targets is None:
        return weighted_loss(model, batch), None
    captured: dict[str, Any] = {}
    handle = model.model.language_model.layers[layer - 1].register_forward_hook(
        lambda _m, _i, out: captured.setdefault("h", out[0] if isinstance(out, tuple) else out))
    try:
        input_ids = batch["input_ids"]
        lm = weighted_loss(model, batch)
    finally:
        handle.remove()
    ptr = pointer_loss(captured["h"], input_ids, model.config.image_token_id, counts, targets, head)
    return lm + weight * ptr, ptr


def rope_positions(model_config: Any, batch: dict[str, Any]) -> Any:
    """Qwen3-VL's multimodal rotary positions (3, batch, length) of a collated batch, computed on
    the CPU. The model computes them itself when not given, but its loop over rows syncs with
    the GPU a few hundred times per batch; a DataLoader worker does it for free."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

    shim = SimpleNamespace(config=model_config, get_vision_position_ids=(
        lambda *args, **kwargs: Qwen3VLModel.get_vision_position_ids(None, *args, **kwargs)))
    positions, _ = Qwen3VLModel.get_rope_index(
        shim, batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"])
    return positions


class TrainBatches:
    """Map-style dataset whose item ``step`` is the whole collated batch of that step (1-based).

    Every step draws its own scenes (train indices ``(step - 1) * batch_size + j``) and its own
    direct/two-step choices (``random.Random(f"{seed}/{step}")``), so the batches do not depend on
    how many workers build them or in which order.
    """

    def __init__(self, processor: Any, model_config: Any, data: SyntheticConfig, cfg: DemoTrainConfig) -> None:
        self.processor, self.model_config, self.data, self.cfg = processor, model_config, data, cfg

    def __len__(self) -> int:
        return self.cfg.steps

    def _scene_index(self, draw: int) -> int:
        return draw % self.cfg.boxed_items if self.cfg.boxed_items else draw

    def __getitem__(self, index: int) -> dict[str, Any]:
        step = index + 1
        rng = random.Random(f"{self.cfg.seed}/{step}")
        first = index * self.cfg.batch_size
        scenes = [render_item(self.data, self.cfg.data_split, self._scene_index(first + j))
                  for j in range(self.cfg.batch_size)]
        kinds = [row_kind(rng, self.cfg) for _ in scenes]
        rows = [make_row(scene, kind, rng, self.cfg.crop_jitter) for scene, kind in zip(scenes, kinds, strict=True)]
        batch = collate(self.processor, rows, self.cfg.binding_weight, self.cfg.question_first)
        batch["position_ids"] = rope_positions(self.model_config, batch)
        if self.cfg.pointer_weight:
            batch.update(pointer_targets(scenes, kinds, rows, batch["image_grid_thw"]))
        return batch


POINTER_KINDS = ("two_step", "direct", "box", "name")  # rows whose first image is the scene and whose text names the target


def pointer_targets(scenes: list[Any], kinds: list[str], rows: list[tuple[list[dict], list[Any]]],
                    grids: Any, merge: int = 2) -> dict[str, Any]:
    """Per row: how many merged visual tokens its first image has, and which of them (raster order)
    holds the named object's box centre (-1: the row names no object in a full scene)."""
    import torch

    counts, targets, k = [], [], 0
    for scene, kind, (_, images) in zip(scenes, kinds, rows, strict=True):
        _, gh, gw = (int(v) // m for v, m in zip(grids[k].tolist(), (1, merge, merge), strict=True))
        k += len(images)
        counts.append(gh * gw)
        if kind not in POINTER_KINDS:
            targets.append(-1)
            continue
        box, (w, h) = scene.target_object.box, scene.size
        cx, cy = (box.x1 + box.x2) / 2, (box.y1 + box.y2) / 2
        targets.append(min(int(cy / h * gh), gh - 1) * gw + min(int(cx / w * gw), gw - 1))
    return {"pointer_counts": torch.tensor(counts), "pointer_targets": torch.tensor(targets)}


def pointer_loss(hidden: Any, input_ids: Any, image_token_id: int, counts: Any, targets: Any, head: Any) -> Any:
    """Mean cross-entropy of the pointer head's softmax over each row's first-image tokens."""
    import torch
    import torch.nn.functional as F

    losses = []
    for b in range(hidden.shape[0]):
        if targets[b] < 0:
            continue
        positions = (input_ids[b] == image_token_id).nonzero().squeeze(-1)[: int(counts[b])]
        logits = head(hidden[b, positions]).squeeze(-1)
        losses.append(F.cross_entropy(logits[None], targets[b:b + 1]))
    return torch.stack(losses).mean() if losses else hidden.sum() * 0


def _worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)  # each worker is one of many processes sharing the cores


def group_vision_attention() -> None:
    """Run Qwen3-VL's vision attention as one batched call per image size.

    Without flash-attention, transformers loops over the images of a batch (one attention call
    each, ~100 per step here, per layer), which leaves a GPU idle. Images of equal patch count
    are stacked and attended together instead; the result is the same (each image still
    attends only to itself).
    """
    import torch
    import torch.nn.functional as F
    from transformers.models.qwen3_vl import modeling_qwen3_vl as qwen3

    if getattr(qwen3.Qwen3VLVisionAttention, "_visrl_grouped", False):
        return
    original = qwen3.Qwen3VLVisionAttention.forward

    def forward(self: Any, hidden_states: Any, cu_seqlens: Any, position_embeddings: Any = None,
                max_seqlen: Any = None, **kwargs: Any) -> Any:
        if qwen3.is_flash_attention_requested(self.config) or position_embeddings is None:
            return original(self, hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
        seq = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = qwen3.apply_rotary_pos_emb_vision(q, k, *position_embeddings)  # (seq, heads, dim)
        starts, lengths = cu_seqlens[:-1].tolist(), (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        groups: dict[int, list[int]] = {}
        for s, n in zip(starts, lengths, strict=True):
            groups.setdefault(n, []).append(s)
        out = torch.zeros_like(v)
        for n, group_starts in groups.items():
            idx = (torch.tensor(group_starts, device=q.device)[:, None]
                   + torch.arange(n, device=q.device)[None, :]).reshape(-1)

            q_, k_, v_ = (t.index_select(0, idx).view(len(group_starts), n, self.num_heads, -1).transpose(1, 2)
                          for t in (q, k, v))
            o = F.scaled_dot_product_attention(q_, k_, v_, scale=self.scaling)
            out = out.index_copy(0, idx, o.transpose(1, 2).reshape(-1, self.num_heads, o.shape[-1]).to(out.dtype))
        return self.proj(out.reshape(seq, -1))

    qwen3.Qwen3VLVisionAttention.forward = forward
    qwen3.Qwen3VLVisionAttention._visrl_grouped = True


def generate(model: Any, processor: Any, prompts: list[list[dict]], images: list[list[Any]],
             max_new_tokens: int, question_first: bool = False) -> list[str]:
    """Greedy completions of a batch of prompts (left-padded)."""
    import torch

    texts = [processor.apply_chat_template(apply_layout(p, layout_of(question_first)), tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    processor.tokenizer.padding_side = "left"
    enc = processor(text=texts, images=[im for ims in images for im in ims], return_tensors="pt", padding=True)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def evaluate_model(model: Any, processor: Any, data: SyntheticConfig, split: str, n: int,
                   batch: int = 25, question_first: bool = False) -> dict[str, float]:
    """Acc@0.5, mean IoU, box-parse rate, and answer accuracy two-step (predicted crop), with the
    true crop, and direct, on items 0..n-1 of ``split``."""
    was_training = model.training
    model.eval()
    sums = {"acc@0.5": 0.0, "mean_iou": 0.0, "parse_rate": 0.0, "two_step_acc": 0.0,
            "true_crop_acc": 0.0, "direct_acc": 0.0}
    for lo in range(0, n, batch):
        scenes = [render_item(data, split, i) for i in range(lo, min(n, lo + batch))]
        qs = [s.question for s in scenes]
        box_texts = generate(model, processor, [box_prompt(q) for q in qs], [[s.image] for s in scenes], BOX_TOKENS, question_first)
        boxes = [parse_box(t, "viscot", s.size) for t, s in zip(box_texts, scenes, strict=True)]
        # An unparseable box still gets an answer (on the whole image) but scores 0 below.
        crops = [crop_box(s.image, b or Box(0, 0, *s.size)) for s, b in zip(scenes, boxes, strict=True)]
        two = generate(model, processor, [two_step_conversation(q, t, "")[:-1] for q, t in zip(qs, box_texts, strict=True)],
                       [[s.image, c] for s, c in zip(scenes, crops, strict=True)], ANSWER_TOKENS, question_first)
        true_texts = [format_box(s.target_object.box, "viscot", s.size) for s in scenes]
        true = generate(model, processor, [two_step_conversation(q, t, "")[:-1] for q, t in zip(qs, true_texts, strict=True)],
                        [[s.image, crop_box(s.image, s.target_object.box)] for s in scenes], ANSWER_TOKENS, question_first)
        direct = generate(model, processor, [direct_prompt(q) for q in qs], [[s.image] for s in scenes], ANSWER_TOKENS, question_first)
        for k, s in enumerate(scenes):
            score = iou(boxes[k], s.target_object.box)
            sums["acc@0.5"] += score > 0.5  # Visual-CoT: IoU strictly above 0.5
            sums["mean_iou"] += score
            sums["parse_rate"] += boxes[k] is not None
            # An unparseable box is a failed rollout: its answer counts as wrong.
            sums["two_step_acc"] += boxes[k] is not None and two[k].strip() == s.answer
            sums["true_crop_acc"] += true[k].strip() == s.answer
            sums["direct_acc"] += direct[k].strip() == s.answer
    model.train(was_training)
    return {k: round(v / n, 4) for k, v in sums.items()}


def evaluate_checks(model: Any, processor: Any, data: SyntheticConfig, split: str, n: int,
                    batch: int = 25) -> dict[str, float]:
    """The binding skills on items 0..n-1 of ``split`` (greedy): ``check_acc``, the crop judge's
    reading: the object named on the named object's crop and on another object's crop, half
    each; ``colour_acc``, the colour of the object at the named object's box."""
    was_training = model.training
    model.eval()
    right = {"check_acc": 0.0, "colour_acc": 0.0}
    for lo in range(0, n, batch):
        scenes = [render_item(data, split, i) for i in range(lo, min(n, lo + batch))]
        crops, expected = [], []
        for i, s in enumerate(scenes, start=lo):
            others = [o for k, o in enumerate(s.objects) if k != s.target]
            shown = others[i % len(others)] if others and i % 2 == 1 else s.target_object
            crops.append(crop_box(s.image, shown.box))
            expected.append(f"{shown.colour} {shown.shape}")
        checks = generate(model, processor, [check_messages(s.question) for s in scenes], [[c] for c in crops],
                          ANSWER_TOKENS)
        colour_qs = [[_user_text(COLOUR_QUESTION.format(box=format_box(s.target_object.box, "viscot", s.size)), 1)]
                     for s in scenes]
        colours = generate(model, processor, colour_qs, [[s.image] for s in scenes], ANSWER_TOKENS)
        right["check_acc"] += sum(c.strip() == e for c, e in zip(checks, expected, strict=True))
        right["colour_acc"] += sum(c.strip() == s.target_object.colour for c, s in zip(colours, scenes, strict=True))
    model.train(was_training)
    return {k: round(v / n, 4) for k, v in right.items()}


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda asked for, but torch sees no CUDA GPU; use device: cpu")
    return name


def load_start(cfg: DemoTrainConfig, out_dir: Path) -> tuple[Any, Any]:
    """The starting model (fp32) and processor; the processor is written to ``out_dir``."""
    import torch
    from transformers import AutoModelForImageTextToText

    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.init_from:  # a previous phase or a prepared random init: same tokenizer and processor
        source = Path(cfg.init_from)
        processor = load_processor(source)
        save_processor(processor, out_dir)
    else:
        source = build_tiny_qwen3(out_dir, TinyQwen3Spec(**cfg.model), seed=cfg.seed)
        processor = load_processor(source)
    model = AutoModelForImageTextToText.from_pretrained(str(source), dtype=torch.float32)
    return model, processor


def train(cfg: DemoTrainConfig, out_dir: Path) -> tuple[dict[str, Any], Any, Any]:
    import torch

    torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    data = SyntheticConfig(**cfg.data)
    model, processor = load_start(cfg, out_dir)
    group_vision_attention()
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda" and cfg.bf16)
    # The pointer head (training only) is saved in the checkpoint, never with the model.
    if cfg.pointer_weight and not 1 <= cfg.pointer_layer <= model.config.text_config.num_hidden_layers:
        raise ConfigError(f"pointer_layer must be between 1 and the model's {model.config.text_config.num_hidden_layers} "
                          f"decoder layers, got {cfg.pointer_layer}")
    head = torch.nn.Linear(model.config.text_config.hidden_size, 1).to(device) if cfg.pointer_weight else None
    params = [*model.parameters(), *(head.parameters() if head is not None else ())]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=device == "cuda")
    resumed = load_checkpoint(out_dir / "checkpoint", model, opt, head)
    first_step = resumed["step"] + 1 if resumed else 1
    batches = torch.utils.data.DataLoader(
        TrainBatches(processor, model.config, data, cfg), batch_size=None, shuffle=False,
        sampler=range(first_step - 1, cfg.steps),
        num_workers=cfg.workers, worker_init_fn=_worker_init if cfg.workers else None,
        pin_memory=device == "cuda", prefetch_factor=4 if cfg.workers else None,
        persistent_workers=False)
    budget = cfg.max_minutes * 60
    history: list[dict[str, Any]] = resumed["history"] if resumed else []
    losses: list[float] = resumed["losses"] if resumed else []
    # A resumed run keeps its clock: the cosine and the budget continue where they stopped.
    start, eval_seconds, step = time.time() - (resumed["train_seconds"] if resumed else 0.0), 0.0, 0
    if resumed:
        print(f"resumed from {out_dir / 'checkpoint'} at step {resumed['step']}", flush=True)
    print(f"training on {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}), "
          f"{sum(p.numel() for p in model.parameters())} parameters", flush=True)
    for step, batch in enumerate(batches, start=first_step):
        elapsed = time.time() - start - eval_seconds
        progress = max(step / cfg.steps, elapsed / budget)
        lr = cfg.learning_rate * min(1.0, step / cfg.warmup_steps) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast:
            loss, ptr = training_loss(model, batch, head, cfg.pointer_weight, cfg.pointer_layer)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % cfg.log_every == 0:
            losses.append(round(loss.item(), 4))
            pointer = f" pointer {ptr.item():.4f}" if ptr is not None else ""
            print(f"step {step} loss {losses[-1]:.4f}{pointer} lr {lr:.2e} {elapsed:.0f}s", flush=True)
        if cfg.eval_every and step % cfg.eval_every == 0:
            t = time.time()
            metrics = evaluate_model(model, processor, data, "val", min(cfg.n_eval, 50), cfg.eval_batch,
                                     cfg.question_first)
            if cfg.check_fraction or cfg.colour_fraction:
                metrics.update(evaluate_checks(model, processor, data, "val", min(cfg.n_eval, 50), cfg.eval_batch))
            eval_seconds += time.time() - t
            history.append({"step": step, "seconds": round(elapsed), "loss": round(loss.item(), 4), **metrics})
            print("val", json.dumps(history[-1]), flush=True)
        if cfg.save_every and step % cfg.save_every == 0 and progress < 1.0:
            save_checkpoint(out_dir / "checkpoint", model, opt, {
                "step": step, "train_seconds": time.time() - start - eval_seconds,
                "history": history, "losses": losses}, head)
        if progress >= 1.0:
            print(f"schedule done at step {step} ({elapsed:.0f}s of training)", flush=True)
            break
    train_seconds = time.time() - start - eval_seconds
    model.to("cpu").save_pretrained(str(out_dir))
    model.to(device)
    # The contract travels with the weights: every consumer then builds prompts in this layout.
    write_contract(out_dir, TwoStepContract(box_format="viscot", prompt_layout=layout_of(cfg.question_first)))
    return {"steps": step, "train_seconds": round(train_seconds), "val_eval_seconds": round(eval_seconds),
            "scenes_seen": step * cfg.batch_size, "device": device,
            "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "loss_every_log": losses, "val_history": history, "config": asdict(cfg)}, model, processor


def save_checkpoint(folder: Path, model: Any, opt: Any, state: dict[str, Any], head: Any = None) -> None:
    """Weights, optimizer and loop state, written to a temporary folder and renamed into place, so
    a run killed mid-save keeps its previous checkpoint."""
    import shutil

    import torch

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    blob = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    if head is not None:
        blob["pointer_head"] = head.state_dict()
    torch.save(blob, tmp / "state.pt")
    (tmp / "loop.json").write_text(json.dumps(state) + "\n", encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def load_checkpoint(folder: Path, model: Any, opt: Any, head: Any = None) -> dict[str, Any] | None:
    """Restore a checkpoint written by :func:`save_checkpoint`; None when there is none."""
    import torch

    if not (folder / "loop.json").is_file():
        return None
    blob = torch.load(folder / "state.pt", map_location="cpu")
    model.load_state_dict(blob["model"])
    if head is not None:
        head.load_state_dict(blob["pointer_head"])
    opt.load_state_dict(blob["optimizer"])
    return json.loads((folder / "loop.json").read_text(encoding="utf-8"))


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs (values read as YAML; ``model.x`` / ``data.x`` set nested fields)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        parsed = yaml.safe_load(value)
        head, dot, tail = key.partition(".")
        if dot:
            out.setdefault(head, {})[tail] = parsed
        else:
            out[key] = parsed
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--out", default=None, help="Output folder (default: the config's output_dir).")
    parser.add_argument("--eval-split", default="test", help="Split of the final evaluation.")
    parser.add_argument("--device", default=None, help="auto, cpu or cuda (overrides the config).")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (overrides the config).")
    parser.add_argument("--max-minutes", type=float, default=None, help="Training minutes (overrides the config).")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Override a config key (model.x and data.x for nested ones); repeatable.")
    args = parser.parse_args(argv)
    from visrl.config import read_yaml

    base = read_yaml(args.config)
    overrides = parse_overrides(args.set)
    for nested in ("model", "data"):
        if nested in overrides:
            overrides[nested] = {**base.get(nested, {}), **overrides[nested]}
    for key, value in (("device", args.device), ("workers", args.workers), ("max_minutes", args.max_minutes)):
        if value is not None:
            overrides[key] = value
    cfg = load_config(DemoTrainConfig, args.config, overrides)
    out = Path(args.out or cfg.output_dir)
    report, model, processor = train(cfg, out)
    data = SyntheticConfig(**cfg.data)
    t = time.time()
    report["evaluation"] = {"split": args.eval_split, "n": cfg.n_eval,
                            **evaluate_model(model, processor, data, args.eval_split, cfg.n_eval, cfg.eval_batch,
                                              cfg.question_first)}
    report["evaluation_seconds"] = round(time.time() - t)
    # The val split (never the test split) is what picks between runs of different settings.
    n_val = min(cfg.n_eval, 100)
    report["final_val"] = {"split": "val", "n": n_val, **evaluate_model(model, processor, data, "val", n_val, cfg.eval_batch,
                                                                  cfg.question_first)}
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report["evaluation"]), flush=True)


if __name__ == "__main__":
    main()
