"""A ``/v1/chat/completions`` request body as a chat conversation and sampling settings.

Images arrive only as ``data:image/...;base64,`` URLs (the server reads no files and fetches no
URLs); their sizes are read from the image headers and checked against a per-image and a
per-request pixel budget before any of them is decoded (:mod:`visrl.images`), and all of a
request's images are decoded under one deadline.

Everything a request holds is checked here, before it can join a batch: a value the model or the
tokenizer would fail on later (a NaN temperature, a lone UTF-16 surrogate in text, an image in a
system or assistant message) would otherwise fail every request batched with it.
"""

from __future__ import annotations

import base64
import binascii
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from visrl.errors import DataError
from visrl.images import DECODE_TIMEOUT_S, MAX_IMAGE_PIXELS, decode_image, peek_image
from visrl.serve_limits import RGB_BYTES, BadRequest

MAX_IMAGES = 16  # per request; the two-step prompt has 2
MAX_N = 16  # completions per request
# Messages, and content parts of all messages, per request: the two-step prompt has 3 messages and
# 5 parts. Each part is templated and walked in Python: 1.55 M empty parts took 29 s and 1 GB.
MAX_PARTS = 256


@dataclass(frozen=True)
class SamplingKey:
    """A request's sampling settings; requests batch together only when these are equal."""

    temperature: float
    top_p: float
    max_new_tokens: int
    n: int


def parse_request(body: Any, model_name: str, max_tokens_limit: int, max_image_pixels: int = MAX_IMAGE_PIXELS,
                  max_request_pixels: int = 2 * MAX_IMAGE_PIXELS, hold: Callable[[int], None] | None = None,
                  decode_timeout_s: float = DECODE_TIMEOUT_S) -> tuple[list[dict[str, Any]], SamplingKey]:
    """The HF chat conversation (PIL images inline, RGB) and sampling settings of a request body.

    Images are checked from their headers first -- each at most ``max_image_pixels``, all together
    at most ``max_request_pixels`` -- and ``hold(bytes)`` is told their decoded size (3 bytes a
    pixel) before any is decoded, so it can refuse (e.g. :meth:`Ticket.hold`); all of them must
    decode within ``decode_timeout_s``.
    """
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if body.get("model") != model_name:
        raise BadRequest(f"the model {body.get('model')!r} does not exist; this server serves {model_name!r}",
                         "model", status=404, code="model_not_found")
    if not isinstance(body.get("stream", False), bool):
        raise BadRequest("stream must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None and (not body.get("stream") or not isinstance(options, dict)):
        raise BadRequest("stream_options is an object, allowed only with stream: true", "stream_options")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", "messages")
    parts = sum(len(m["content"]) if isinstance(m, dict) and isinstance(m.get("content"), list) else 1
                for m in messages)
    if max(len(messages), parts) > MAX_PARTS:
        raise BadRequest(f"at most {MAX_PARTS} messages and {MAX_PARTS} content parts per request, got "
                         f"{len(messages)} messages and {parts} parts", "messages")
    conversation = [_message(m, i) for i, m in enumerate(messages)]
    if conversation[-1]["role"] != "user":
        raise BadRequest("the last message must be from the user", "messages")
    images = [p for m in conversation for p in m["content"] if p["type"] == "image"]
    if len(images) > MAX_IMAGES:
        raise BadRequest(f"at most {MAX_IMAGES} images per request, got {len(images)}", "messages")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    sampling = SamplingKey(
        temperature=_number(body, "temperature", 1.0, 0.0, 100.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        max_new_tokens=max_tokens_limit if max_tokens is None else _integer(max_tokens, "max_tokens", 1, max_tokens_limit),
        n=_integer(body.get("n", 1), "n", 1, MAX_N))
    decode_images(images, max_image_pixels, max_request_pixels, hold, time.monotonic() + decode_timeout_s)
    return conversation, sampling


def decode_images(parts: list[dict[str, Any]], max_image_pixels: int, max_request_pixels: int,
                  hold: Callable[[int], None] | None, deadline: float | None = None) -> None:
    """Replace each image part's data URL by its decoded RGB image, within the pixel budgets and,
    all of them, by ``deadline`` (``time.monotonic()``; None: :data:`DECODE_TIMEOUT_S` each)."""
    opened = []
    try:
        for part in parts:
            opened.append(_peek_data_url(part.pop("data_url"), part["where"], max_image_pixels))
        pixels = sum(image.width * image.height for image in opened)
        if pixels > max_request_pixels:
            raise BadRequest(f"the request's {len(opened)} images have {pixels:,} pixels together; the limit is "
                             f"{max_request_pixels:,}: send fewer or smaller images", "messages")
        if hold is not None:
            hold(pixels * RGB_BYTES)
        for part, image in zip(parts, opened, strict=True):
            try:
                part["image"] = decode_image(image, part["where"], deadline, max_image_pixels)
            except DataError as exc:
                raise BadRequest(str(exc), part["where"]) from None
            del part["where"]
    finally:
        for image in opened:
            image.close()


def _message(message: Any, index: int) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
        raise BadRequest(f"{where} must be an object with role system, user or assistant", where)
    content = message.get("content")
    if isinstance(content, str):
        return {"role": message["role"], "content": [{"type": "text", "text": _text(content, f"{where}.content")}]}
    if not isinstance(content, list):
        raise BadRequest(f"{where}.content must be a string or a list of parts", where)
    parts = [_part(p, f"{where}.content[{j}]") for j, p in enumerate(content)]
    if message["role"] != "user" and any(p["type"] == "image" for p in parts):
        # Chat templates drop them (Qwen3-VL's) or place them where no model was trained to see one.
        raise BadRequest(f"{where}: images are accepted in user messages only, not in a {message['role']} "
                         "message", where)
    return {"role": message["role"], "content": parts}


def _text(text: str, where: str) -> str:
    """``text`` if it is valid Unicode: JSON's ``\\ud800`` escapes decode to lone surrogates, which
    no tokenizer takes (they are not UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRequest(f"{where}: the text holds a lone UTF-16 surrogate ({text[exc.start]!a} at character "
                         f"{exc.start}); send valid Unicode", where) from None
    return text


def _part(part: Any, where: str) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return {"type": "text", "text": _text(part["text"], where)}
    if kind == "image_url":
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        if not isinstance(url, str) or not url.startswith("data:image/") or ";base64," not in url:
            raise BadRequest(f"{where}: only data:image/...;base64, URLs are accepted (this server reads no "
                             "files and fetches no URLs)", where)
        return {"type": "image", "data_url": url, "where": where}  # decoded by decode_images
    raise BadRequest(f"{where} must be a text part or an image_url part", where)


def decode_data_url(url: Any, where: str = "image_url", max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An RGB image from a ``data:image/...;base64,`` URL; anything else (paths, http) is refused."""
    parts = [_part({"type": "image_url", "image_url": {"url": url}}, where)]
    decode_images(parts, max_pixels, max_pixels, None)
    return parts[0]["image"]


def _peek_data_url(url: str, where: str, max_pixels: int) -> Image.Image:
    try:
        raw = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"{where}: not a readable image (bad base64: {exc})", where) from None
    try:
        return peek_image(raw, max_pixels, where)
    except DataError as exc:
        raise BadRequest(str(exc), where) from None


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float,
            low_open: bool = False) -> float:
    value = body.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{name} must be a number, got {value!r}", name)
    if not math.isfinite(value):  # JSON's NaN passes every comparison below; the sampler then fails
        raise BadRequest(f"{name} must be a finite number, got {value}", name)
    if value > high or value < low or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise BadRequest(f"{name} must be in {bound}, got {value}", name)
    return float(value)


def _integer(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"{name} must be an integer in [{low}, {high}], got {value!r}", name)
    return value
