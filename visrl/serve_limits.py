"""What one request may cost ``visrl serve``: body bytes and time, JSON values, image pixels,
prompt tokens, a queue place.

Every limit is checked before the expensive step it guards: the body is counted as it is read
(not by its Content-Length header, which a chunked upload does not send) and must arrive at a
minimum rate (:class:`BodyPace`); its JSON values are counted before it is parsed; image sizes
come from their headers before any pixel is decoded (:mod:`visrl.images`); the prompt is checked
as the chat template and processor will check it, and measured against the model's context,
before it reaches the model; and :class:`Admission` refuses a request with 503 when the server
already holds as many requests, or as much request memory, as allowed. A request takes its queue
place only once its body is complete, so clients that trickle their bodies hold no place; one
client address may send only a few slow bodies at once (:class:`ClientBodies`).
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

# A token of the supported tokenizers averages ~4 characters of text and very few exceed 16, so a
# prompt over 16 characters per context token cannot fit; it is refused before tokenization
# (tokenizing 64 MB of text would itself take seconds and hundreds of MB).
CHARS_PER_TOKEN_CAP = 16
# Admitted bodies are charged 3x their size while parsed: the raw bytes, the JSON string and the
# base64-decoded image bytes are alive at once.
BODY_COPIES = 3
RGB_BYTES = 3  # a decoded image is held as 8-bit RGB
# A body's JSON values ('{', '[' and ',' counted in its bytes before parsing): a message with a few
# parts has ~10, a 32 K-character prompt a few thousand commas. 1.55 M empty text parts (38 MB)
# took 29 s and +1,000 MB to parse and walk, holding the GIL (so /health waited too).
MAX_JSON_VALUES = 200_000
# Python objects parsed from one such value cost ~650 bytes (measured on the 1.55 M parts body).
JSON_VALUE_BYTES = 650
# A body over the limit is still read (and dropped) up to this many times the limit, so the client,
# still sending, can read the 413 instead of a connection reset; beyond it the connection is closed.
DRAIN_FACTOR = 4
# A body still arriving after this long needs one of its client address's ClientBodies places.
SLOW_BODY_S = 0.5


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
    """Requests in flight (parsed, queued or generating) and the memory all requests hold.

    ``max_requests`` bounds the queue: a request takes a place once its body is complete
    (:meth:`Ticket.take_place`). ``max_bytes`` bounds the memory all requests hold at once: each
    body while it is read and parsed (x :data:`BODY_COPIES`, plus :data:`JSON_VALUE_BYTES` a JSON
    value), then its decoded images (:data:`RGB_BYTES` a pixel). Either limit answers 503
    (:func:`busy`). Thread-safe: parsing runs in worker threads.
    """

    def __init__(self, max_requests: int, max_bytes: int) -> None:
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self.requests = 0
        self.held = 0
        self._lock = threading.Lock()

    def enter(self) -> Ticket:
        """A ticket with a queue place (503 when the queue is full)."""
        ticket = self.ticket()
        ticket.take_place()
        return ticket

    def ticket(self) -> Ticket:
        """A ticket that holds memory but no queue place yet (a body being read)."""
        return Ticket(self)


class Ticket:
    """One request's memory (:meth:`hold`) and queue place (:meth:`take_place`); :meth:`leave` frees both."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.bytes = 0
        self.placed = False
        self.left = False

    def take_place(self) -> None:
        """Count this request toward the queue; 503 when ``max_requests`` are already there."""
        gate = self.admission
        with gate._lock:
            if not self.placed:
                if gate.requests >= gate.max_requests:
                    raise busy(f"{gate.requests} requests are already queued or running (limit {gate.max_requests})")
                gate.requests += 1
                self.placed = True

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
                gate.requests -= int(self.placed)
                self.bytes, self.placed, self.left = 0, False, True


@dataclass(frozen=True)
class BodyPace:
    """How long a body may take to arrive: ``grace_s`` plus its size at ``min_rate`` bytes a second,
    never more than ``max_s``. A 100 KB body trickled at a byte every 3 s is cut off after ~5 s,
    not after the whole ``max_s``; a 64 MB upload at 256 KB/s still has its 120 s."""

    grace_s: float = 5.0
    min_rate: float = 256 * 1024
    max_s: float = 120.0

    def allowed_s(self, n_bytes: int) -> float:
        return round(min(self.max_s, self.grace_s + n_bytes / self.min_rate), 1)


class ClientBodies:
    """Bodies each client address is sending slowly (still arriving after :data:`SLOW_BODY_S`): at
    most ``max_per_client`` at once (429 beyond), so one address cannot hold every connection the
    server takes (uvicorn's ``limit_concurrency``) with trickled bodies. A normal request's body
    arrives with its headers and never needs a place. Used on the event loop only: no lock."""

    def __init__(self, max_per_client: int) -> None:
        self.max_per_client = max_per_client
        self.sending: Counter[str] = Counter()

    def take(self, client: str) -> None:
        if self.sending[client] >= self.max_per_client:
            raise BadRequest(f"this address is already sending {self.sending[client]} request bodies slowly "
                             f"(limit {self.max_per_client}); send bodies faster or fewer at once", status=429,
                             kind="rate_limit_error", code="too_many_bodies")
        self.sending[client] += 1

    def release(self, client: str) -> None:
        self.sending[client] -= 1
        if self.sending[client] <= 0:
            del self.sending[client]


async def read_body(request: Request, max_bytes: int, ticket: Ticket, pace: BodyPace | None = None,
                    clients: ClientBodies | None = None) -> bytes:
    """The request body, counted as it is read (a chunked body has no Content-Length header).

    - 413 once more than ``max_bytes`` arrived or were declared: the rest is read and dropped, up
      to :data:`DRAIN_FACTOR` x ``max_bytes``, so a client still sending reads the 413 rather than a
      connection reset (none is read when it waits for ``100 Continue``);
    - 408 when the body does not arrive at ``pace`` (:class:`BodyPace`);
    - 429 when it is still arriving after :data:`SLOW_BODY_S` and its client address already sends
      as many slow bodies as ``clients`` allows.
    """
    pace = pace or BodyPace()
    declared = request.headers.get("content-length")
    if declared is not None and not declared.isdigit():
        raise BadRequest("the Content-Length header is not a number")
    size = None if declared is None else int(declared)
    over = size is not None and size > max_bytes
    if over and request.headers.get("expect", "").lower() == "100-continue":
        raise too_large(max_bytes)
    body, seen, start = bytearray(), 0, time.monotonic()
    client = request.client.host if request.client else "?"
    slow = False

    def now_slow() -> None:  # the body is still arriving at start + SLOW_BODY_S
        nonlocal slow
        if clients is not None and not slow:
            clients.take(client)
            slow = True

    try:
        while True:
            expected = max(seen, size if size is not None else seen + 2**16)  # chunked: each chunk buys time
            try:
                chunk, more = await _receive(request, start, pace, expected, None if slow else now_slow)
            except BadRequest as exc:
                if over and exc.status == 408:  # out of time while dropping the excess: its answer stands
                    raise too_large(max_bytes) from None
                raise
            seen += len(chunk)
            if over or seen > max_bytes:
                if not over:
                    over, body = True, bytearray()
                    ticket.hold(0)
                if not more or seen > DRAIN_FACTOR * max_bytes:
                    raise too_large(max_bytes)
            else:
                body += chunk
                ticket.hold(BODY_COPIES * len(body))
            if not more:
                return bytes(body)
    finally:
        if slow and clients is not None:
            clients.release(client)


async def _receive(request: Request, start: float, pace: BodyPace, expected: int,
                   now_slow: Callable[[], None] | None) -> tuple[bytes, bool]:
    """The next piece of the body and whether more follows, within the time ``pace`` allows;
    ``now_slow()`` is called once the body is still arriving :data:`SLOW_BODY_S` after ``start``."""
    allowed = pace.allowed_s(expected)
    receive = asyncio.ensure_future(request.receive())
    try:
        if now_slow is not None:
            await asyncio.wait({receive}, timeout=max(0.0, start + SLOW_BODY_S - time.monotonic()))
            if not receive.done():
                now_slow()
        message = await asyncio.wait_for(receive, max(0.0, start + allowed - time.monotonic()))
    except TimeoutError:
        raise BadRequest(f"the body did not arrive within {allowed:g} s (bodies get {pace.grace_s:g} s plus "
                         f"their size at {pace.min_rate / 1024:g} KB/s, at most {pace.max_s:g} s)", status=408,
                         code="request_timeout") from None
    finally:
        receive.cancel()  # a no-op once it is done
    if message["type"] == "http.disconnect":
        raise BadRequest("the client went away before sending the whole body", status=400)
    return message.get("body", b""), bool(message.get("more_body", False))


def json_values(raw: bytes) -> int:
    """An upper bound on the JSON values of ``raw`` without parsing it: its '{', '[' and ','
    (each value but the first follows a comma or opens an object or array; commas in strings add)."""
    return raw.count(b"{") + raw.count(b"[") + raw.count(b",")


def check_json_size(raw: bytes) -> int:
    """The body's :func:`json_values`; 400 over :data:`MAX_JSON_VALUES` (before parsing it)."""
    values = json_values(raw)
    if values > MAX_JSON_VALUES:
        raise BadRequest(f"the body has about {values:,} JSON values ('{{', '[' and ','); at most "
                         f"{MAX_JSON_VALUES:,} are parsed: send fewer messages and content parts")
    return values


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
    """Token counts for ``usage`` and the context check: the prompt as the model sees it.

    Counting a prompt also checks it as the chat template and processor will at generation, so a
    request they would refuse is a 400 here, before it joins (and fails) a batch: special tokens in
    its text (``<|image_pad|>`` makes the processor count images wrong; ``<|im_start|>`` forges a
    turn), a template that fails on its messages, or images the template leaves out.
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        tokenizer = getattr(processor, "tokenizer", processor)
        special = {*getattr(tokenizer, "all_special_tokens", ()),
                   *(getattr(processor, name, None) for name in ("image_token", "video_token"))}
        special = {t for t in special if isinstance(t, str) and t}
        self._special = re.compile("|".join(map(re.escape, sorted(special, key=len, reverse=True)))) if special else None
        self._image_token = getattr(processor, "image_token", None)

    def check_text(self, conversation: list[dict[str, Any]]) -> None:
        """400 when a text part holds one of the tokenizer's special tokens."""
        if self._special is None:
            return
        for i, message in enumerate(conversation):
            for j, part in enumerate(message["content"]):
                found = self._special.search(part["text"]) if part["type"] == "text" else None
                if found:
                    where = f"messages[{i}].content[{j}]"
                    raise BadRequest(f"{where}: the text holds the special token {found.group()!r}, which only the "
                                     "server writes (images go in image_url parts): remove it", where)

    def template(self, conversation: list[dict[str, Any]]) -> str:
        """The templated prompt; 400 when the template fails or leaves an image out."""
        self.check_text(conversation)
        try:
            text = self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - jinja raises TemplateError, its own exceptions, TypeError...
            raise BadRequest(f"the model's chat template cannot format these messages ({type(exc).__name__}: "
                             f"{str(exc)[:200]})", "messages") from None
        images = sum(p["type"] == "image" for m in conversation for p in m["content"])
        if self._image_token and text.count(self._image_token) != images:
            raise BadRequest(f"the model's chat template shows {text.count(self._image_token)} of the request's "
                             f"{images} images: send images in user messages only", "messages")
        return text

    def prompt(self, conversation: list[dict[str, Any]]) -> int:
        """Tokens of the templated prompt, each image counted as the tokens it expands to."""
        text = self.template(conversation)
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
