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
"""

from __future__ import annotations

from typing import Any

BOX_PROMPT = (
    "Please provide the bounding box coordinate of the region that can help you answer the "
    "question better."
)
DIRECT_SUFFIX = "Answer the question using a single word or phrase."

Message = dict[str, Any]


def _user(*parts: Message) -> Message:
    return {"role": "user", "content": list(parts)}


def _assistant(text: str) -> Message:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def _text(text: str) -> Message:
    return {"type": "text", "text": text}


IMAGE: Message = {"type": "image"}


def box_prompt(question: str) -> list[Message]:
    """Step 1 prompt: full image + question + the box request (one image)."""
    return [_user(dict(IMAGE), _text(f"{question.strip()} {BOX_PROMPT}"))]


def answer_prompt(question: str, box_text: str) -> list[Message]:
    """Step 2 prompt: step 1 with its box answer, then the crop (two images: full, crop)."""
    return [*box_prompt(question), _assistant(box_text), _user(dict(IMAGE))]


def direct_prompt(question: str) -> list[Message]:
    """The baseline: the full image and the question, no box step (one image)."""
    return [_user(dict(IMAGE), _text(f"{question.strip()} {DIRECT_SUFFIX}"))]


def two_step_conversation(question: str, box_text: str, answer: str) -> list[Message]:
    """The whole SFT conversation (two images: full, crop)."""
    return [*answer_prompt(question, box_text), _assistant(answer)]


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
