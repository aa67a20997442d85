"""Online RL on the box step with trl's GRPOTrainer (what Ground-R1 and VLM-R1 do).

For each question the policy samples ``num_generations`` box steps from :func:`box_prompt`;
each is scored by reward functions and the group's rewards become advantages:

Completions are parsed by the run's :class:`visrl.contract.TwoStepContract` (its box format in
the frame of the processor being trained, crops with its margin), as inference parses them.

``iou``     (``grpo_iou_reward: true``, the default) IoU of the parsed box with the item's
            annotated box (0 when nothing parses), 0-1;
``format``  1 when the completion holds a box in ``box_format``, else 0;
``answer``  (``grpo_answer_reward: true``) the rule-judge score (0-1) of the answer a greedy
            second step gives on the sampled box's crop, asked of the policy being trained —
            the two-step inference of :class:`visrl.reasoning.Reasoner`. None (skipped by trl)
            for items without a reference answer.

With ``grpo_iou_reward: false`` and ``grpo_answer_reward: true`` the answer is the only judge
(with the format reward): no annotated box is read, as in VisRL's self-evolution, and items
without a box are rows too.

Rows (:func:`grpo_rows`) are the store's items — with a gt box when the IoU reward is on —
``images`` [full], ``prompt`` (the box step), ``gt_box`` (pixels of the full image; only with the
IoU reward), ``question``, ``references`` — or an exported sft folder, whose assistant box turn
gives the gt box back. trl hands every extra column to the reward functions as a keyword
argument, one value per completion.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from visrl.boxes import Box, iou
from visrl.contract import TwoStepContract
from visrl.errors import DataError
from visrl.judges import JudgeInput, JudgeOptions, RuleAnswerJudge, references
from visrl.prompts import BOX_PROMPT, box_prompt
from visrl.store import Store
from visrl.train.args import common_args
from visrl.train.config import TrainConfig, resolve_path
from visrl.train.lora import TrainModel, lora_config
from visrl.workspace import Workspace

Row = dict[str, Any]
Parse = Callable[[str, Image.Image], Box | None]  # (completion text, full image) -> pixel box


# ---------------------------------------------------------------------- rows

def grpo_rows(cfg: TrainConfig, store: Store, ws: Workspace, contract: TwoStepContract | None = None) -> list[Row]:
    """Box-step prompts (see module doc), with their gt boxes when ``cfg.grpo_iou_reward``; none is
    a DataError that says why. An export's box turns are read by ``contract`` (default: the
    config's box format)."""
    contract = contract or TwoStepContract(box_format=cfg.box_format, crop_margin=cfg.crop_margin)
    folder = _exported_folder(ws, cfg.dataset)
    rows = (_rows_from_export(folder, contract, cfg.grpo_iou_reward) if folder
            else _rows_from_store(cfg, store, ws, contract))
    if not rows:
        where = f"dataset {cfg.dataset!r}" if cfg.dataset else "the workspace"
        if cfg.grpo_iou_reward:
            raise DataError(f"no items with a ground-truth box in split {cfg.split!r} of {where}: grpo "
                            "rewards boxes by IoU with the gt box (import Visual-CoT data or set split/dataset, "
                            "or reward answers alone: grpo_iou_reward: false, grpo_answer_reward: true)")
        raise DataError(f"no items with a reference answer in split {cfg.split!r} of {where}: the answer "
                        "reward judges answers against it (import VQA data or set split/dataset)")
    return rows


def _rows_from_store(cfg: TrainConfig, store: Store, ws: Workspace, contract: TwoStepContract) -> list[Row]:
    from visrl.formats.trl import ImageCache  # the same cached RGB opening as the sft rows

    images = ImageCache(ws)
    rows = []
    with_box = True if cfg.grpo_iou_reward else None  # the answer reward alone reads no box
    for item in store.items(dataset=cfg.dataset or None, split=cfg.split, with_box=with_box):
        box = store.item_box(item) if cfg.grpo_iou_reward else None
        refs = references(item)
        if box is None if cfg.grpo_iou_reward else not any(refs):
            continue  # nothing its reward could score: IoU needs a box, the answer a reference
        rows.append(_row(contract, images(item["image"]), item["question"], box, refs))
    return rows


def _exported_folder(ws: Workspace, dataset: str) -> Path | None:
    """As :mod:`visrl.train.data`: a dataset with a path separator or a dot names a folder."""
    if not dataset or not any(sep in dataset for sep in ("/", "\\", ".")):
        return None
    path = Path(resolve_path(ws.root, dataset) or dataset)
    return path if path.is_dir() else None


def _rows_from_export(folder: Path, contract: TwoStepContract, with_box: bool = True) -> list[Row]:
    """Rows from an sft export: the first assistant turn is the gt box written by ``contract``
    (read only ``with_box``: for the answer reward alone, an answer is all a row needs)."""
    from visrl.formats.trl import load_rows

    rows = []
    for n, sft in enumerate(load_rows(folder), start=1):
        if "messages" not in sft or not sft.get("images"):
            raise DataError(f"{folder} is not an sft export (row {n} has no messages/images); "
                            "export it with `visrl export --format trl-sft`")
        messages, full = sft["messages"], sft["images"][0]
        box = contract.parse(message_text(messages[1]) if len(messages) > 1 else "", full.size) if with_box else None
        answer = message_text(messages[3]) if len(messages) > 3 else ""
        if box is None if with_box else not answer:
            continue
        question = re.sub(rf"\s*{re.escape(BOX_PROMPT)}\s*$", "", message_text(messages[0]))
        rows.append(_row(contract, full, question, box, [answer]))
    return rows


def _row(contract: TwoStepContract, original: Image.Image, question: str, box: Box | None,
         references: list[str]) -> Row:
    """The row holds the full image as the model is given it (``full_max_pixels``); the gt box is
    scaled into it, so rewards parse completions against the row's own image. Without a box
    (the answer reward alone) the row has no ``gt_box`` column."""
    full = contract.prepare_full(original)
    row = {"images": [full], "prompt": box_prompt(question, contract.prompt_layout), "question": question, "references": references}
    if box is not None:
        sx, sy = full.width / original.width, full.height / original.height
        row["gt_box"] = Box(box.x1 * sx, box.y1 * sy, box.x2 * sx, box.y2 * sy).as_list()
    return row


def message_text(message: Any) -> str:
    """The text of a message (content a string or a list of parts), or of a trl completion
    (a list holding one assistant message) or a plain string."""
    if isinstance(message, str):
        return message
    if isinstance(message, list):
        return "".join(message_text(m) for m in message)
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content or ""


# ---------------------------------------------------------------------- rewards

def default_parse(contract: TwoStepContract) -> Parse:
    """``contract.parse`` against the full image's size (the row's image: pixels of the image the
    gt box is in)."""
    return lambda text, image: contract.parse(text, image.size)


class IoUReward:
    """IoU of each completion's box with its row's ``gt_box`` (0.0 for no box)."""

    __name__ = "iou"  # trl names the logged metric after it: rewards/iou/mean

    def __init__(self, parse: Parse) -> None:
        self.parse = parse

    def __call__(self, completions: list[Any], gt_box: list[list[float]], images: list[list[Image.Image]],
                 **_: Any) -> list[float]:
        return [iou(self.parse(message_text(c), imgs[0]), Box.from_list(gt))
                for c, gt, imgs in zip(completions, gt_box, images, strict=True)]


class FormatReward:
    """1.0 when the completion holds a parseable box, else 0.0."""

    __name__ = "format"

    def __init__(self, parse: Parse) -> None:
        self.parse = parse

    def __call__(self, completions: list[Any], images: list[list[Image.Image]], **_: Any) -> list[float]:
        return [float(self.parse(message_text(c), imgs[0]) is not None)
                for c, imgs in zip(completions, images, strict=True)]


@dataclass
class TrainingPolicy:
    """What :class:`visrl.reasoning.Reasoner` reads of a ``LoadedModel``, for the model in training
    (the Trainer moves it to its device after this is built, hence the property)."""

    model: Any
    processor: Any
    contract: TwoStepContract

    @property
    def box_format(self) -> str:
        return self.contract.box_format

    @property
    def device(self) -> str:
        return str(self.model.device)


class AnswerReward:
    """The rule-judge score of a greedy answer step on each sampled box's crop (0.0 for no box)."""

    __name__ = "answer"

    def __init__(self, reasoner: Any, parse: Parse, max_new_tokens: int, judge: Any = None) -> None:
        self.reasoner, self.parse = reasoner, parse
        self.max_new_tokens = max_new_tokens
        self.judge = judge or RuleAnswerJudge("auto", JudgeOptions())

    def __call__(self, completions: list[Any], images: list[list[Image.Image]], question: list[str],
                 references: list[list[str]], **_: Any) -> list[float | None]:
        from visrl.reasoning import Sampling

        texts = [message_text(c) for c in completions]
        fulls = [imgs[0] for imgs in images]
        boxes = [self.parse(t, full) for t, full in zip(texts, fulls, strict=True)]
        todo = [i for i, box in enumerate(boxes) if box is not None and any(references[i])]
        answers: dict[int, str] = {}
        if todo:
            with _generating(self.reasoner.model):
                out = self.reasoner.answer([fulls[i] for i in todo], [question[i] for i in todo],
                                           [texts[i] for i in todo],
                                           [self.reasoner.crop(fulls[i], boxes[i]) for i in todo],
                                           Sampling(temperature=0.0, max_new_tokens=self.max_new_tokens))
            answers = {i: group[0] for i, group in zip(todo, out, strict=True)}
        scores: list[float | None] = []
        for i, refs in enumerate(references):
            if not any(refs):
                scores.append(None)  # nothing to judge against: trl leaves it out of the mean
            elif i not in answers:
                scores.append(0.0)  # no box, no crop: the two-step answer fails
            else:
                judged = self.judge(JudgeInput(question=question[i], references=list(refs), answer=answers[i]))
                scores.append(judged.score if judged else 0.0)
        return scores


@contextlib.contextmanager
def _generating(model: Any) -> Iterator[None]:
    """Eval mode (no dropout) and a KV cache for the answer step; training state restored after.
    ``load_train_model`` turns the cache off, which would make each new token re-read the prompt."""
    config = getattr(model, "config", None)
    was_training, cache = model.training, getattr(config, "use_cache", None)
    model.eval()
    if config is not None:
        config.use_cache = True
    try:
        yield
    finally:
        if config is not None:
            config.use_cache = cache
        model.train(was_training)


# ---------------------------------------------------------------------- trainer

def grpo_args(cfg: TrainConfig, output_dir: Path, has_eval: bool) -> Any:
    from trl import GRPOConfig

    args = common_args(cfg, output_dir, has_eval)
    args.pop("max_length")  # GRPOConfig has none: prompts are never cut, completions are capped
    # trl requires whole groups in an eval batch too.
    args["per_device_eval_batch_size"] = cfg.num_generations
    return GRPOConfig(**args, num_generations=cfg.num_generations,
                      max_completion_length=cfg.max_completion_length, temperature=cfg.temperature,
                      beta=cfg.grpo_beta, use_vllm=False)


def build_grpo_trainer(cfg: TrainConfig, tm: TrainModel, train_ds: Any, eval_ds: Any | None,
                       output_dir: Path, callbacks: list[Any]) -> Any:
    """A ``GRPOTrainer`` on box-step prompts with the (iou +) format (+ answer) rewards."""
    from trl import GRPOTrainer

    from visrl.reasoning import Reasoner

    # The answer reward must ask the model being trained, so its Reasoner is bound after the
    # trainer wraps the model with LoRA; parsing needs only the processor (qwen2_5's resize).
    policy = TrainingPolicy(tm.model, tm.processor, tm.contract)
    reasoner = Reasoner(policy)
    parse = default_parse(reasoner.contract)
    rewards: list[Any] = [IoUReward(parse)] if cfg.grpo_iou_reward else []
    rewards.append(FormatReward(parse))
    answer = AnswerReward(reasoner, parse, cfg.max_completion_length) if cfg.grpo_answer_reward else None
    if answer is not None:
        rewards.append(answer)
    trainer = GRPOTrainer(
        model=tm.model,
        reward_funcs=rewards,
        args=grpo_args(cfg, output_dir, eval_ds is not None),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tm.processor,  # the processor, never its tokenizer (shared/PITFALLS.md)
        peft_config=lora_config(cfg),
        callbacks=callbacks,
    )
    policy.model = reasoner.model = trainer.model  # the LoRA-wrapped policy
    return trainer
