"""Two-step reasoning with a local model: :class:`Reasoner`, the in-process backend of
:class:`visrl.two_step.TwoStep` (which holds the steps, the prompts and the shared types, and is
re-exported here).

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
from collections.abc import Iterator
from typing import Any

from PIL import Image

from visrl.contract import TwoStepContract, fit_pixels  # noqa: F401  (fit_pixels: re-exported)
from visrl.prompts import answer_prompt
from visrl.two_step import (  # noqa: F401  (re-exported: they lived here)
    Conversation,
    Sampling,
    TwoStep,
    TwoStepResult,
    split_images,
    with_images,
)


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
