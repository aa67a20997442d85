"""What one request may cost ``visrl serve``: body bytes, image pixels, prompt tokens, a queue place.

Every limit is checked before the expensive step it guards: the body is counted as it is read
(not by its Content-Length header, which a chunked upload does not send); image sizes come from
their headers before any pixel is decoded (:mod:`visrl.images`); the prompt's length is measured
against the model's context before it reaches the model; and :class:`Admission` refuses a request
with 503 when the server already holds as many requests, or as much request memory, as allowed.
"""

from __future__ import annotations

import threading
from typing import Any

from starlette.requests import ClientDisconnect, Request

# A token of the supported tokenizers averages ~4 characters of text and very few exceed 16, so a
# prompt over 16 characters per context token cannot fit; it is refused before tokenization
# (tokenizing 64 MB of text would itself take seconds and hundreds of MB).
CHARS_PER_TOKEN_CAP = 16
# Admitted bodies are charged 3x their size while parsed: the raw bytes, the JSON string and the
# base64-decoded image bytes are alive at once.
BODY_COPIES = 3
RGB_BYTES = 3  # a decoded image is held as 8-bit RGB


class BadRequest(Exception):
    """A request the server refuses; becomes an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code


def busy(message: str) -> BadRequest:
    """503: the server is full right now; clients (e.g. visrl.remote) retry after a pause."""
    return BadRequest(f"server busy: {message}; retry in a moment", status=503, kind="server_error",
                      code="server_busy")


class Admission:
    """Requests in flight (body being read, parsed, queued or generating) and the memory they hold.

    ``max_requests`` bounds the queue. ``max_bytes`` bounds the memory all admitted requests hold
    at once: each request's body while it is read and parsed (x :data:`BODY_COPIES`), then its
    decoded images (:data:`RGB_BYTES` a pixel). Either limit answers 503 (:func:`busy`).
    Thread-safe: parsing runs in worker threads.
    """

    def __init__(self, max_requests: int, max_bytes: int) -> None:
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self.requests = 0
        self.held = 0
        self._lock = threading.Lock()

    def enter(self) -> Ticket:
        with self._lock:
            if self.requests >= self.max_requests:
                raise busy(f"{self.requests} requests are already queued or running (limit {self.max_requests})")
            self.requests += 1
        return Ticket(self)


class Ticket:
    """One admitted request's place; :meth:`hold` sets how many bytes it holds, :meth:`leave` frees all."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.bytes = 0
        self.left = False

    def hold(self, n_bytes: int) -> None:
        """Hold ``n_bytes`` in all (more or less than before); 503 if that overdraws the budget."""
        gate = self.admission
        with gate._lock:
            if n_bytes > self.bytes and gate.held - self.bytes + n_bytes > gate.max_bytes:
                raise busy(f"admitted requests hold {gate.held // 2**20} MB, this one needs "
                           f"{(n_bytes - self.bytes) // 2**20 + 1} MB more (limit {gate.max_bytes // 2**20} MB)")
            gate.held += n_bytes - self.bytes
            self.bytes = n_bytes

    def leave(self) -> None:
        gate = self.admission
        with gate._lock:
            if not self.left:
                gate.held -= self.bytes
                gate.requests -= 1
                self.bytes, self.left = 0, True


async def read_body(request: Request, max_bytes: int, ticket: Ticket) -> bytes:
    """The request body, refused with 413 as soon as more than ``max_bytes`` arrived.

    The Content-Length header is checked first (an honest large upload is refused before it is
    sent), but only the bytes actually read count: a chunked body has no such header.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("the Content-Length header is not a number")
        if int(declared) > max_bytes:
            raise too_large(max_bytes)
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise too_large(max_bytes)
            ticket.hold(BODY_COPIES * len(body))
    except ClientDisconnect:
        raise BadRequest("the client went away before sending the whole body", status=400) from None
    return bytes(body)


def too_large(max_bytes: int) -> BadRequest:
    return BadRequest(f"request body over {max_bytes / 2**20:g} MB; send fewer or smaller images "
                      "(or raise max_body_mb in the serve config)", status=413, code="request_too_large")


def text_chars(conversation: list[dict[str, Any]]) -> int:
    return sum(len(p["text"]) for m in conversation for p in m["content"] if p["type"] == "text")


def check_prompt(conversation: list[dict[str, Any]], max_new_tokens: int, context: int | None,
                 counter: Any) -> int | None:
    """The prompt's token count (None without a ``counter``), refused when the prompt plus
    ``max_new_tokens`` does not fit the model's ``context`` tokens (None: no limit known)."""
    if context is not None and text_chars(conversation) > CHARS_PER_TOKEN_CAP * context:
        raise BadRequest(f"the prompt has {text_chars(conversation):,} characters; this model's context is "
                         f"{context:,} tokens, so at most {CHARS_PER_TOKEN_CAP * context:,} characters can fit",
                         "messages", code="context_length_exceeded")
    if counter is None:
        return None
    tokens = counter.prompt(conversation)
    if context is not None and tokens + max_new_tokens > context:
        raise BadRequest(f"the prompt is {tokens:,} tokens (images included) and max_tokens is {max_new_tokens:,}: "
                         f"together over this model's context of {context:,} tokens; shorten the prompt, "
                         "send smaller images or ask for fewer tokens", "messages", code="context_length_exceeded")
    return tokens


class TokenCounter:
    """Token counts for ``usage`` and the context check: the prompt as the model sees it."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def prompt(self, conversation: list[dict[str, Any]]) -> int:
        """Tokens of the templated prompt, each image counted as the tokens it expands to."""
        text = self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        images = [p["image"] for m in conversation for p in m["content"] if p["type"] == "image"]
        if images and hasattr(self.processor, "_get_num_multimodal_tokens"):
            # The Qwen-VL processors count an image's tokens from its size alone (what vLLM calls);
            # processing it for real takes ~1 s and ~0.5 GB of float32 copies for a 4096x4096 image.
            sizes = [(image.height, image.width) for image in images]
            counts = self.processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
            # The template holds one placeholder token per image; the processor expands it.
            return len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]) + sum(counts) - len(counts)
        encoded = self.processor(text=[text], images=images or None)
        return len(encoded["input_ids"][0])

    def completion(self, text: str) -> int:
        return len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])


def model_context(reasoner: Any) -> int | None:
    """The served model's context length in tokens (its text model's max_position_embeddings)."""
    config = getattr(getattr(reasoner, "model", None), "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None
