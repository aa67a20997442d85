"""The conversations of the method, shared by inference, export and training.

Training and inference must see the same turns, so they are built here only. Following
Visual-CoT, the conversation is two steps over two images (images are given in order; each
``{"type": "image"}`` part takes the next one, as trl and the HF chat templates expect):

    user:      [full image] "{question} Please provide the bounding box ... better."
    assistant: "{box text}"                                   <- step 1 (the box)
    user:      [crop image]                                   <- the crop of that box
    assistant: "{answer}"                                     <- step 2 (the answer)

Direct mode (the baseline without a box step) asks the question with the full image only.
Messages are in the structured form of trl and ``processor.apply_chat_template``.

Layout. Real Qwen-VL models are trained image first (above). A model may instead be trained with
the question's text before its image (``question_first``, a field of the checkpoint's
:class:`visrl.contract.TwoStepContract`): in a causal decoder the visual tokens then see the
question and can mark the object it names, where image-first needs a two-hop lookup at the box
step (issue 17, ``bench/binding_capacity.py``: 0.80 vs 0.29 of cells bound with the same features).
"""

from __future__ import annotations

from typing import Any

from visrl.vocabulary import PROMPT_LAYOUTS

BOX_PROMPT = (
    "Please provide the bounding box coordinate of the region that can help you answer the "
    "question better."
)
DIRECT_SUFFIX = "Answer the question using a single word or phrase."

Message = dict[str, Any]
LAYOUTS = PROMPT_LAYOUTS  # the name callers of this module know


def _user(*parts: Message) -> Message:
    return {"role": "user", "content": list(parts)}


def _assistant(text: str) -> Message:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def _text(text: str) -> Message:
    return {"type": "text", "text": text}


IMAGE: Message = {"type": "image"}


def apply_layout(messages: list[Message], layout: str = "image_first") -> list[Message]:
    """``messages`` in ``layout``: ``question_first`` moves each user turn's text parts before its
    images (the images keep their order); ``image_first`` leaves them as built."""
    if layout == "image_first":
        return messages
    if layout != "question_first":
        raise ValueError(f"unknown prompt layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    out = []
    for m in messages:
        if m["role"] == "user":
            parts = m["content"]
            m = {**m, "content": [p for p in parts if p["type"] == "text"] + [p for p in parts if p["type"] != "text"]}
        out.append(m)
    return out


def box_prompt(question: str, layout: str = "image_first") -> list[Message]:
    """Step 1 prompt: full image + question + the box request (one image)."""
    return apply_layout([_user(dict(IMAGE), _text(f"{question.strip()} {BOX_PROMPT}"))], layout)


def answer_prompt(question: str, box_text: str, layout: str = "image_first") -> list[Message]:
    """Step 2 prompt: step 1 with its box answer, then the crop (two images: full, crop)."""
    return [*box_prompt(question, layout), _assistant(box_text), _user(dict(IMAGE))]


def direct_prompt(question: str, layout: str = "image_first") -> list[Message]:
    """The baseline: the full image and the question, no box step (one image)."""
    return apply_layout([_user(dict(IMAGE), _text(f"{question.strip()} {DIRECT_SUFFIX}"))], layout)


def two_step_conversation(question: str, box_text: str, answer: str, layout: str = "image_first") -> list[Message]:
    """The whole SFT conversation (two images: full, crop)."""
    return [*answer_prompt(question, box_text, layout), _assistant(answer)]


def assistant(text: str) -> list[Message]:
    """A completion as trl's DPO expects it: a list with one assistant message."""
    return [_assistant(text)]


def to_sharegpt(messages: list[Message]) -> list[dict[str, str]]:
    """Structured messages as LLaMA-Factory sharegpt turns (``<image>`` marks each image)."""
    turns = []
    for message in messages:
        text = "".join("<image>" if part.get("type") == "image" else part.get("text", "")
                       for part in message["content"])
        turns.append({"from": "human" if message["role"] == "user" else "gpt", "value": text})
    return turns
