"""``visrl serve``: an OpenAI-compatible chat-completions server over one local model.

It is the peer the remote backend (:mod:`visrl.remote`) is tested against, and a small stand-in
for vLLM when a run should generate with a model in another process. Endpoints:

- ``GET /v1/models`` -- the one served model;
- ``POST /v1/chat/completions`` -- messages with text and images as ``image_url`` *data URLs*
  (the server never reads files or fetches URLs), ``n``, ``temperature``, ``top_p``,
  ``max_tokens``; the OpenAI response shape with ``usage``; bad requests get 400 (unknown model
  404, missing key 401) with OpenAI's ``{"error": {...}}`` body. ``stream: true`` answers with
  server-sent ``chat.completion.chunk`` events ending in ``data: [DONE]`` (and a usage chunk with
  ``stream_options.include_usage``); the batch generates whole completions, so each choice's
  text arrives in one content delta, after its role delta;
- ``GET /health`` -- 200 once the model is loaded (no key needed).

One model serves every request: a single worker thread owns it and runs requests in micro-batches
(up to ``max_batch_size`` requests with the same sampling settings, collected for
``batch_wait_ms``), so concurrent clients are batched, never run the model at the same time.
Binding anything but a loopback address requires ``api_key``; requests then need
``Authorization: Bearer <api_key>``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import ipaddress
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image

from visrl.errors import ConfigError, VisRLError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 2**20  # a request with a few full-resolution PNGs is ~10-30 MB
MAX_IMAGES = 16  # per request; the two-step prompt has 2
MAX_N = 16  # completions per request


@dataclass
class ServeConfig:
    """What ``visrl serve CONFIG`` serves and where (YAML keys map one to one onto fields)."""

    model_name_or_path: str = field(metadata={"help": "Model folder (absolute, or relative to the workspace)."})
    adapter_name_or_path: str | None = field(default=None, metadata={"help": "Optional LoRA adapter folder."})
    served_model_name: str | None = field(default=None, metadata={
        "help": "The name clients send as 'model'; default: the model folder's name."})
    host: str = field(default="127.0.0.1", metadata={
        "help": "Address to bind; anything but loopback requires api_key."})
    port: int = field(default=8000, metadata={"help": "TCP port."})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16."})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, ..."})
    max_batch_size: int = field(default=8, metadata={"help": "Most requests run together in one generate call."})
    batch_wait_ms: float = field(default=5.0, metadata={
        "help": "How long the worker waits for more requests to batch with the first one (ms)."})
    max_tokens_limit: int = field(default=1024, metadata={
        "help": "Largest max_tokens a request may ask for; also the default when it gives none."})
    api_key: str | None = field(default=None, repr=False, metadata={
        "help": "Bearer key clients must send; required when host is not loopback (or set VISRL_API_KEY)."})

    def __post_init__(self) -> None:
        problems = []
        if not 0 < self.port < 65536:
            problems.append(f"port must be in 1..65535, got {self.port}")
        if self.max_batch_size < 1:
            problems.append(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.batch_wait_ms < 0:
            problems.append(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms}")
        if self.max_tokens_limit < 1:
            problems.append(f"max_tokens_limit must be >= 1, got {self.max_tokens_limit}")
        if problems:
            raise ConfigError("invalid serve config: " + "; ".join(problems))

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model_name_or_path).name


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve anywhere
        return False


def check_bind(cfg: ServeConfig) -> None:
    """Refuse to expose a model beyond this machine without a key."""
    if not is_loopback(cfg.host) and not cfg.api_key:
        raise ConfigError(f"host {cfg.host} is reachable from other machines: set api_key in the config "
                          "(or VISRL_API_KEY), or bind 127.0.0.1")


# ---------------------------------------------------------------------- request validation

class BadRequest(Exception):
    """A request the server refuses; becomes an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code


@dataclass(frozen=True)
class SamplingKey:
    """A request's sampling settings; requests batch together only when these are equal."""

    temperature: float
    top_p: float
    max_new_tokens: int
    n: int


def parse_request(body: Any, model_name: str, max_tokens_limit: int) -> tuple[list[dict[str, Any]], SamplingKey]:
    """The HF chat conversation (PIL images inline) and sampling settings of a request body."""
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
    conversation = [_message(m, i) for i, m in enumerate(messages)]
    if conversation[-1]["role"] != "user":
        raise BadRequest("the last message must be from the user", "messages")
    images = sum(p["type"] == "image" for m in conversation for p in m["content"])
    if images > MAX_IMAGES:
        raise BadRequest(f"at most {MAX_IMAGES} images per request, got {images}", "messages")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    sampling = SamplingKey(
        temperature=_number(body, "temperature", 1.0, 0.0, 100.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        max_new_tokens=max_tokens_limit if max_tokens is None else _integer(max_tokens, "max_tokens", 1, max_tokens_limit),
        n=_integer(body.get("n", 1), "n", 1, MAX_N))
    return conversation, sampling


def _message(message: Any, index: int) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
        raise BadRequest(f"{where} must be an object with role system, user or assistant", where)
    content = message.get("content")
    if isinstance(content, str):
        return {"role": message["role"], "content": [{"type": "text", "text": content}]}
    if not isinstance(content, list):
        raise BadRequest(f"{where}.content must be a string or a list of parts", where)
    return {"role": message["role"], "content": [_part(p, f"{where}.content[{j}]") for j, p in enumerate(content)]}


def _part(part: Any, where: str) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if kind == "image_url":
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        return {"type": "image", "image": decode_data_url(url, where)}
    raise BadRequest(f"{where} must be a text part or an image_url part", where)


def decode_data_url(url: Any, where: str = "image_url") -> Image.Image:
    """An RGB image from a ``data:image/...;base64,`` URL; anything else (paths, http) is refused."""
    if not isinstance(url, str) or not url.startswith("data:image/") or ";base64," not in url:
        raise BadRequest(f"{where}: only data:image/...;base64, URLs are accepted (this server reads no "
                         "files and fetches no URLs)", where)
    try:
        raw = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
        image = Image.open(io.BytesIO(raw))
        image.load()
        return image.convert("RGB")
    except (binascii.Error, ValueError, OSError, Image.DecompressionBombError) as exc:
        raise BadRequest(f"{where}: not a readable image ({exc})", where) from None


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float,
            low_open: bool = False) -> float:
    value = body.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{name} must be a number, got {value!r}", name)
    if value > high or value < low or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise BadRequest(f"{name} must be in {bound}, got {value}", name)
    return float(value)


def _integer(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"{name} must be an integer in [{low}, {high}], got {value!r}", name)
    return value


# ---------------------------------------------------------------------- the model worker

@dataclass
class _Job:
    conversation: list[dict[str, Any]]
    sampling: SamplingKey
    future: Future = field(default_factory=Future)


class BatchWorker:
    """One thread owns the model; requests queue up and run in micro-batches.

    Batching matters because a client such as :class:`visrl.remote.RemoteReasoner` sends many
    requests at once, and one batched generate call is several times faster than one call each.
    """

    def __init__(self, reasoner: Any, max_batch_size: int, wait_s: float, counter: Any = None) -> None:
        self.reasoner, self.max_batch_size, self.wait_s, self.counter = reasoner, max_batch_size, wait_s, counter
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="visrl-serve-model", daemon=True)
        self._thread.start()

    def submit(self, conversation: list[dict[str, Any]], sampling: SamplingKey) -> Future:
        job = _Job(conversation, sampling)
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = self._collect(first)
            for key in dict.fromkeys(job.sampling for job in batch):  # first-come order
                self._generate([job for job in batch if job.sampling == key], key)
            if stop:
                return

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        batch, deadline = [first], time.monotonic() + self.wait_s
        while len(batch) < self.max_batch_size:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                return batch, True
            batch.append(job)
        return batch, False

    def _generate(self, jobs: list[_Job], key: SamplingKey) -> None:
        from visrl.reasoning import Sampling

        try:
            sampling = Sampling(temperature=key.temperature, top_p=key.top_p,
                                max_new_tokens=key.max_new_tokens, n=key.n)
            outputs = self.reasoner.generate([job.conversation for job in jobs], sampling)
            results = [(texts, self._usage(job.conversation, texts, key.max_new_tokens)) for job, texts in zip(jobs, outputs, strict=True)]
        except BaseException as exc:  # every waiting request must hear about it
            for job in jobs:
                job.future.set_exception(exc)
            return
        for job, result in zip(jobs, results, strict=True):
            job.future.set_result(result)

    def _usage(self, conversation: list[dict[str, Any]], texts: list[str], max_new_tokens: int) -> dict[str, Any]:
        if self.counter is None:
            return {"prompt_tokens": 0, "completion_tokens": [0] * len(texts)}
        # Reasoner.generate returns text, so completions are re-tokenized; odd bytes of an
        # untrained model can re-tokenize longer than generated, hence the cap at max_new_tokens.
        return {"prompt_tokens": self.counter.prompt(conversation),
                "completion_tokens": [min(self.counter.completion(t), max_new_tokens) for t in texts]}


class TokenCounter:
    """Token counts for ``usage``: the prompt as the model sees it (image tokens included)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def prompt(self, conversation: list[dict[str, Any]]) -> int:
        text = self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        images = [p["image"] for m in conversation for p in m["content"] if p["type"] == "image"]
        encoded = self.processor(text=[text], images=images or None)
        return len(encoded["input_ids"][0])

    def completion(self, text: str) -> int:
        return len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------- the app

def create_app(reasoner_or_loaded: Any, cfg: ServeConfig) -> Any:
    """The FastAPI app over a :class:`visrl.reasoning.Reasoner` (or a LoadedModel to wrap in one)."""
    check_bind(cfg)
    reasoner = _as_reasoner(reasoner_or_loaded, cfg)
    processor = getattr(getattr(reasoner, "loaded", None), "processor", None)
    worker = BatchWorker(reasoner, cfg.max_batch_size, cfg.batch_wait_ms / 1000,
                         TokenCounter(processor) if processor is not None else None)
    name = cfg.model_name

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        yield
        worker.close()

    app = FastAPI(title="visrl serve", lifespan=lifespan)
    app.state.worker = worker

    def error(exc: BadRequest) -> JSONResponse:
        return JSONResponse({"error": {"message": exc.message, "type": exc.kind, "param": exc.param,
                                       "code": exc.code}}, status_code=exc.status)

    def authorize(request: Request) -> None:
        if not cfg.api_key:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {cfg.api_key}".encode()):
            raise BadRequest("missing or wrong API key: send 'Authorization: Bearer <api_key>'",
                             status=401, code="invalid_api_key")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request) -> Any:
        try:
            authorize(request)
        except BadRequest as exc:
            return error(exc)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(time.time()),
                                            "owned_by": "visrl", "root": cfg.model_name_or_path}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        try:
            authorize(request)
            if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
                raise BadRequest(f"request body over {MAX_BODY_BYTES // 2**20} MB", status=413)
            try:
                body = await request.json()
            except ValueError:
                raise BadRequest("the request body is not valid JSON") from None
            conversation, sampling = parse_request(body, name, cfg.max_tokens_limit)
            texts, usage = await asyncio.wrap_future(worker.submit(conversation, sampling))
        except BadRequest as exc:
            return error(exc)
        except VisRLError as exc:  # e.g. a prompt the model cannot take
            return error(BadRequest(str(exc)))
        except Exception as exc:  # a bug or an out-of-memory: the client gets a 500, the log the traceback
            log.exception("generation failed")
            return error(BadRequest(f"generation failed: {type(exc).__name__}: {exc}", status=500,
                                    kind="server_error"))
        reply = completion_body(name, texts, usage, sampling.max_new_tokens)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(stream_events(reply, include_usage), media_type="text/event-stream")
        return reply

    return app


def stream_events(reply: dict[str, Any], include_usage: bool) -> Iterator[str]:
    """A finished chat.completion as OpenAI's stream: per choice a role delta, a content delta and
    a finish chunk; then the usage chunk (empty choices) when asked for; then ``[DONE]``."""
    head = {"id": reply["id"], "object": "chat.completion.chunk", "created": reply["created"],
            "model": reply["model"]}

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

    for choice in reply["choices"]:
        i, text = choice["index"], choice["message"]["content"]
        yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
        yield event([{"index": i, "delta": {"content": text}, "logprobs": None, "finish_reason": None}])
        yield event([{"index": i, "delta": {}, "logprobs": None, "finish_reason": choice["finish_reason"]}])
    if include_usage:
        yield event([], usage=reply["usage"])
    yield "data: [DONE]\n\n"


def completion_body(model: str, texts: list[str], usage: dict[str, Any], max_new_tokens: int) -> dict[str, Any]:
    """OpenAI's chat.completion object; a choice that used all its tokens finished by 'length'."""
    completion = usage["completion_tokens"]
    choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": "length" if used >= max_new_tokens else "stop"}
               for i, (text, used) in enumerate(zip(texts, completion, strict=True))]
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": choices,
            "usage": {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": sum(completion),
                      "total_tokens": usage["prompt_tokens"] + sum(completion)}}


def _as_reasoner(obj: Any, cfg: ServeConfig) -> Any:
    from visrl.models import LoadedModel

    if not isinstance(obj, LoadedModel):
        return obj  # a Reasoner (or a stand-in with the same generate)
    from visrl.reasoning import Reasoner

    return Reasoner(obj, batch_size=cfg.max_batch_size)


def serve(cfg: ServeConfig, workspace: str | Path | None = None) -> None:
    """Load the model and serve it until interrupted (blocks)."""
    import uvicorn

    from visrl.models import load_model
    from visrl.policy import resolve_model_path
    from visrl.workspace import Workspace, resolve_root

    check_bind(cfg)
    ws = Workspace(resolve_root(workspace))  # only to resolve models/...; nothing is created
    loaded = load_model(resolve_model_path(ws, cfg.model_name_or_path),
                        adapter=resolve_model_path(ws, cfg.adapter_name_or_path),
                        dtype=cfg.dtype, device=cfg.device)
    app = create_app(loaded, cfg)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
