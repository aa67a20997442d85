"""Two-step reasoning: ask for the box, crop it, answer looking at the full image and the crop.

The prompts are :mod:`visrl.prompts`' (the ones training uses). Everything is batched: many
conversations go through ``model.generate`` at once with left padding, which is what makes
generation runs and evaluation fast (bench/bench_inference.py measures it).

Box text, the crop and the images' pixel budgets follow the reasoner's
:class:`visrl.contract.TwoStepContract` (a loaded checkpoint's own, with config overrides): the
full image may be shrunk to ``full_max_pixels`` and the crop enlarged to ``crop_min_pixels``
before the processor sees them, so the crop shows the region in more detail than the full image.

:class:`RemoteReasoner` (in :mod:`visrl.remote`) offers the same methods against an
OpenAI-compatible server such as vLLM.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from visrl.boxes import Box
from visrl.contract import TwoStepContract, fit_pixels  # noqa: F401  (fit_pixels: re-exported)
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


class Reasoner(TwoStep):
    """Two-step inference with a loaded local model (:func:`visrl.models.load_model`)."""

    def __init__(self, loaded: Any, contract: TwoStepContract | None = None, batch_size: int = 16,
                 **overrides: Any) -> None:
        """``contract`` defaults to the loaded checkpoint's; ``overrides`` are contract fields
        (``box_format=``, ``crop_margin=``, ...; None leaves the field as it is). A pixel budget
        is set on the processor, so the frame of ``qwen2_5`` boxes is the processor's."""
        self.loaded = loaded
        self.model, self.processor = loaded.model, loaded.processor
        contract = (contract or getattr(loaded, "contract", None) or TwoStepContract()).override(**overrides)
        contract.apply_budget(self.processor)
        self.contract = contract.bound_to(self.processor)
        self.batch_size = max(1, int(batch_size))
        self._lock = threading.Lock()  # one model, many callers (the app, the server)

    # ------------------------------------------------------------------ generation

    def generate(self, conversations: list[Conversation], sampling: Sampling,
                 progress: bool = False) -> list[list[str]]:
        """``sampling.n`` completions of each conversation (image parts carry PIL images)."""
        out: list[list[str]] = []
        starts = range(0, len(conversations), self.batch_size)
        if progress and len(conversations) > self.batch_size:
            from tqdm import tqdm

            starts = tqdm(starts, desc="generating", unit="batch")
        for start in starts:
            out += self._generate_batch(conversations[start:start + self.batch_size], sampling)
        return out

    def _inputs(self, conversations: list[Conversation]) -> Any:
        texts, images = [], []
        for conversation in conversations:
            bare, found = split_images(conversation)
            texts.append(self.processor.apply_chat_template(bare, tokenize=False, add_generation_prompt=True))
            images += found
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"  # generation continues every row from its last token
        enc = self.processor(text=texts, images=images or None, return_tensors="pt", padding=True)
        enc = enc.to(self.loaded.device)
        if "pixel_values" in enc:
            enc["pixel_values"] = enc["pixel_values"].to(self.model.dtype)
        return enc

    def _generate_kwargs(self, sampling: Sampling, n: int) -> dict[str, Any]:
        tokenizer = self.processor.tokenizer
        kwargs: dict[str, Any] = {"max_new_tokens": sampling.max_new_tokens, "num_return_sequences": n,
                                  "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        return kwargs

    def _generate_batch(self, conversations: list[Conversation], sampling: Sampling) -> list[list[str]]:
        import torch

        # Greedy decoding gives one text however often it is asked: decode once and repeat it.
        n = 1 if sampling.greedy else sampling.n
        with self._lock, torch.inference_mode():
            enc = self._inputs(conversations)
            output = self.model.generate(**enc, **self._generate_kwargs(sampling, n))
        texts = self.processor.batch_decode(output[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        texts = [t.strip() for t in texts]
        grouped = [texts[i * n:(i + 1) * n] for i in range(len(conversations))]
        return [g * sampling.n if n == 1 else g for g in grouped]

    # ------------------------------------------------------------------ the two steps

    def input_size(self, image: Image.Image) -> tuple[int, int]:
        """The (width, height) the processor resizes ``image`` to (Qwen2.5-VL boxes are in it)."""
        return self.contract.input_size(image.size)

    def stream_two_step(self, image: Image.Image, question: str, sampling: Sampling) -> Iterator[dict[str, Any]]:
        """Chat: the box step, then the answer as it is generated."""
        from transformers import TextIteratorStreamer

        image = image.convert("RGB")
        box_text = self.propose_boxes([image], [question], sampling.single())[0][0]
        box = self.parse(box_text, image)
        crop = self.crop(image, box)
        yield {"kind": "box", "box_text": box_text, "box": box, "crop": crop}
        conversation = with_images(answer_prompt(question, box_text, self.contract.prompt_layout),
                                    [self.prepare_full(image), self.prepare_crop(crop)])
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                        timeout=300)
        errors: list[BaseException] = []

        def run() -> None:
            import torch

            try:
                with self._lock, torch.inference_mode():
                    enc = self._inputs([conversation])
                    self.model.generate(**enc, **self._generate_kwargs(sampling.single(), 1), streamer=streamer)
            except BaseException as exc:  # surfaced below, in the caller's thread
                errors.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        answer = ""
        for piece in streamer:
            answer += piece
            yield {"kind": "answer", "answer": answer.strip()}
        worker.join()
        if errors:
            raise errors[0]
        if not answer.strip():
            yield {"kind": "answer", "answer": ""}


def __getattr__(name: str) -> Any:
    # RemoteReasoner lives with the HTTP client; importing it lazily keeps httpx out of local runs.
    if name == "RemoteReasoner":
        from visrl.remote import RemoteReasoner

        return RemoteReasoner
    raise AttributeError(name)
