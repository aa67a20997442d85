"""The two steps over any backend: ask for the box, crop it, answer on the full image and the crop.

:class:`TwoStep` builds the prompts (:mod:`visrl.prompts`, the ones training uses) and parses, crops
and prepares images through one :class:`visrl.contract.TwoStepContract`; a backend implements
:meth:`TwoStep.generate` alone: :class:`visrl.reasoning.Reasoner` (a local model),
:class:`visrl.remote.RemoteReasoner` (an OpenAI-compatible server), a test's scripted fake. Both
backends import this module and neither imports the other.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from visrl.boxes import Box
from visrl.contract import TwoStepContract
from visrl.prompts import answer_prompt, box_prompt, direct_prompt

Conversation = list[dict[str, Any]]


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; temperature 0 is greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    n: int = 1

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def single(self) -> Sampling:
        return Sampling(self.temperature, self.top_p, self.max_new_tokens, 1)


@dataclass
class TwoStepResult:
    """One sample of the two steps for one item. ``box`` is None when no box could be parsed;
    the answer is then given on the full image (``crop`` is the whole image)."""

    question: str
    box_text: str | None
    box: Box | None
    crop: Image.Image | None
    answer: str | None
    timings: dict[str, float] = field(default_factory=dict)


def with_images(messages: Conversation, images: list[Image.Image]) -> Conversation:
    """Copies of ``messages`` whose ``{"type": "image"}`` placeholders carry ``images`` in order."""
    queue = list(images)
    out = []
    for message in messages:
        if isinstance(message["content"], str):
            out.append(message)
            continue
        parts = []
        for part in message["content"]:
            if part.get("type") == "image":
                if not queue:
                    raise ValueError("more image placeholders than images")
                part = {"type": "image", "image": queue.pop(0)}
            parts.append(part)
        out.append({**message, "content": parts})
    if queue:
        raise ValueError(f"{len(queue)} image(s) left over after filling the placeholders")
    return out


def split_images(conversation: Conversation) -> tuple[Conversation, list[Image.Image]]:
    """(conversation with bare image placeholders, its images in order)."""
    images: list[Image.Image] = []
    out = []
    for message in conversation:
        content = message["content"]
        if isinstance(content, str):
            out.append(message)
            continue
        parts = []
        for part in content:
            if part.get("type") == "image":
                if part.get("image") is not None:
                    images.append(part["image"])
                parts.append({"type": "image"})
            else:
                parts.append(part)
        out.append({**message, "content": parts})
    return out, images


class TwoStep:
    """The method's two steps over any backend that implements :meth:`generate`.

    :class:`Reasoner` runs a local model; :class:`visrl.remote.RemoteReasoner` a server; a test
    subclass scripts :meth:`generate` alone. All build the same prompts (:mod:`visrl.prompts`) and
    parse, crop and prepare images through one :class:`TwoStepContract` (``self.contract``).
    """

    contract: TwoStepContract = TwoStepContract()

    @property
    def box_format(self) -> str:
        return self.contract.box_format

    def generate(self, conversations: list[Conversation], sampling: Sampling,
                 progress: bool = False) -> list[list[str]]:
        raise NotImplementedError

    def prepare_full(self, image: Image.Image) -> Image.Image:
        """The full image as the model is given it (the contract's ``full_max_pixels``)."""
        return self.contract.prepare_full(image)

    def prepare_crop(self, crop: Image.Image) -> Image.Image:
        """The crop as the model is given it (the contract's ``crop_min_pixels``)."""
        return self.contract.prepare_crop(crop)

    def parse(self, text: str | None, image: Image.Image) -> Box | None:
        """The box of a step-1 text in pixels of ``image`` (the original); None when there is none."""
        return self.contract.parse(text, image.size)

    def crop(self, image: Image.Image, box: Box | None) -> Image.Image:
        """The crop step 2 sees: the box (with the contract's margin), or the whole image."""
        return self.contract.crop(image, box)

    def propose_boxes(self, images: list[Image.Image], questions: list[str], sampling: Sampling,
                      progress: bool = False) -> list[list[str]]:
        """Step 1: ``sampling.n`` box texts per item."""
        conversations = [with_images(box_prompt(q, self.contract.prompt_layout), [self.prepare_full(im)])
                         for im, q in zip(images, questions, strict=True)]
        return self.generate(conversations, sampling, progress=progress)

    def answer(self, images: list[Image.Image], questions: list[str], box_texts: list[str],
               crops: list[Image.Image], sampling: Sampling, progress: bool = False) -> list[list[str]]:
        """Step 2: answers given the full image, the step-1 box text and its crop."""
        conversations = [with_images(answer_prompt(q, t, self.contract.prompt_layout), [self.prepare_full(im), self.prepare_crop(c)])
                         for im, q, t, c in zip(images, questions, box_texts, crops, strict=True)]
        return self.generate(conversations, sampling, progress=progress)

    def direct(self, images: list[Image.Image], questions: list[str], sampling: Sampling,
               progress: bool = False) -> list[list[str]]:
        """The baseline: answer from the full image, without the box step."""
        conversations = [with_images(direct_prompt(q, self.contract.prompt_layout), [self.prepare_full(im)])
                         for im, q in zip(images, questions, strict=True)]
        return self.generate(conversations, sampling, progress=progress)

    def two_step(self, images: list[Image.Image], questions: list[str], sampling: Sampling,
                 progress: bool = False) -> list[list[TwoStepResult]]:
        """``sampling.n`` box samples per item, each cropped and answered once (greedily when the
        box step is greedy, else with the same temperature)."""
        started = time.perf_counter()
        texts = self.propose_boxes(images, questions, sampling, progress=progress)
        box_seconds = (time.perf_counter() - started) / max(1, len(images))
        flat = [(i, text) for i, samples in enumerate(texts) for text in samples]
        boxes = [self.parse(text, images[i]) for i, text in flat]
        crops = [self.crop(images[i], box) for (i, _), box in zip(flat, boxes, strict=True)]
        started = time.perf_counter()
        answers = self.answer([images[i] for i, _ in flat], [questions[i] for i, _ in flat],
                              [t for _, t in flat], crops, sampling.single(), progress=progress)
        answer_seconds = (time.perf_counter() - started) / max(1, len(flat))
        results: list[list[TwoStepResult]] = [[] for _ in images]
        for (i, text), box, crop, answer in zip(flat, boxes, crops, answers, strict=True):
            results[i].append(TwoStepResult(questions[i], text, box, crop, answer[0],
                                            {"box_s": round(box_seconds, 4), "answer_s": round(answer_seconds, 4)}))
        return results

    def stream_two_step(self, image: Image.Image, question: str, sampling: Sampling) -> Iterator[dict[str, Any]]:
        """Chat: the box event, then the answer (one event here; :class:`Reasoner` streams tokens)."""
        one = sampling.single()
        image = image.convert("RGB")
        box_text = self.propose_boxes([image], [question], one)[0][0]
        box = self.parse(box_text, image)
        crop = self.crop(image, box)
        yield {"kind": "box", "box_text": box_text, "box": box, "crop": crop}
        yield {"kind": "answer", "answer": self.answer([image], [question], [box_text], [crop], one)[0][0]}
