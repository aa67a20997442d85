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

Every request's cost is bounded before it is spent (:mod:`visrl.serve_limits`): the body by the
bytes actually read (413) and by time at a minimum rate (408), slow bodies per client address
(429), the JSON values and content parts (400), each image's and the request's pixels from the
image headers before decoding and the decode work itself (400, :mod:`visrl.images`), the prompt's
tokens against the model's context (400 ``context_length_exceeded``), and the requests and memory
held at once (503 with Retry-After). Bodies are parsed and images decoded off the event loop, so
``/health`` answers during any of it, and a client that disconnects has its request dropped from
the queue (or its batch stopped when it was the batch's only client).

One bad request fails only itself: each is checked before it joins a batch as the chat template
and processor will check it (:class:`visrl.serve_limits.TokenCounter`), and should a batch still
fail, its requests are run again one by one, so only the guilty one hears an error (a 400 and one
log line when the model refused its input; a 500 and one logged traceback for a server fault).

One model serves every request: a single worker thread owns it and runs requests in micro-batches
(up to ``max_batch_size`` requests with the same sampling settings, collected for
``batch_wait_ms``), so concurrent clients are batched, never run the model at the same time.
Binding anything but a loopback address requires ``api_key``; requests then need
``Authorization: Bearer <api_key>``.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import ipaddress
import json
import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image

from visrl.errors import ConfigError, VisRLError
from visrl.images import DECODE_TIMEOUT_S, MAX_IMAGE_PIXELS
from visrl.reasoning import Reasoner
from visrl.serve_limits import (
    BODY_COPIES,
    JSON_VALUE_BYTES,
    RGB_BYTES,
    Admission,
    BadRequest,
    BodyPace,
    ClientBodies,
    Ticket,
    TokenCounter,
    check_json_size,
    check_prompt,
    model_context,
    read_body,
)
from visrl.serve_request import SamplingKey, parse_request

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")


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
    max_body_mb: float = field(default=64.0, metadata={
        "help": "Largest request body in MB, counted as it is read (a few full-resolution PNGs are 10-30 MB); "
                "more is refused with 413."})
    max_image_pixels: int = field(default=MAX_IMAGE_PIXELS, metadata={
        "help": "Most pixels of one image (width x height, read from its header before decoding); "
                "default 4096x4096 = 50 MB as RGB."})
    max_request_pixels: int = field(default=2 * MAX_IMAGE_PIXELS, metadata={
        "help": "Most pixels of all images of one request together (the two-step prompt sends 2)."})
    max_pending: int = field(default=64, metadata={
        "help": "Requests held at once (being read, queued or generating); more are refused with 503."})
    max_pending_mb: int = field(default=1024, metadata={
        "help": "Memory in MB all held requests may take (3x their body while parsed, then 3 bytes per "
                "decoded pixel); a request that would overdraw it is refused with 503."})
    body_timeout_s: float = field(default=120.0, metadata={
        "help": "Most seconds a client may take to send its body (64 MB in 120 s is ~0.5 MB/s); a slower one "
                "gets 408, so trickling clients cannot hold connections."})
    body_grace_s: float = field(default=5.0, metadata={
        "help": "Seconds any body may take beyond its size at min_body_kb_s (a body's deadline is "
                "body_grace_s + size / min_body_kb_s, at most body_timeout_s)."})
    min_body_kb_s: float = field(default=256.0, metadata={
        "help": "Slowest upload rate accepted, in KB/s (2 Mbit/s): a 100 KB body trickled at a byte every 3 s "
                "gets 408 after ~5 s, not after body_timeout_s."})
    max_client_bodies: int = field(default=8, metadata={
        "help": "Bodies one client address may be sending at once once they take over 0.5 s; more get 429."})
    max_connections: int = field(default=256, metadata={
        "help": "Open connections (uvicorn's limit_concurrency); past it uvicorn answers 503."})
    decode_timeout_s: float = field(default=DECODE_TIMEOUT_S, metadata={
        "help": "Seconds all images of one request may take to decode; a slower one is refused with 400."})
    max_context_tokens: int | None = field(default=None, metadata={
        "help": "Prompt plus max_tokens must fit this many tokens; null = the model's max_position_embeddings."})

    def __post_init__(self) -> None:
        problems = []
        # Written as `not (low <= value)` so that NaN, which compares false, is refused too.
        if not 0 < self.port < 65536:
            problems.append(f"port must be in 1..65535, got {self.port}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("max_batch_size", "max_tokens_limit", "max_image_pixels", "max_request_pixels",
                     "max_pending", "max_pending_mb", "max_client_bodies", "max_connections"):
            if not getattr(self, name) >= 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.batch_wait_ms <= 10_000:
            problems.append(f"batch_wait_ms must be in [0, 10000], got {self.batch_wait_ms}")
        for name in ("body_timeout_s", "body_grace_s", "decode_timeout_s"):
            if not 0 < getattr(self, name) <= 3600:
                problems.append(f"{name} must be in (0, 3600], got {getattr(self, name)}")
        if not 0 < self.min_body_kb_s < math.inf:
            problems.append(f"min_body_kb_s must be > 0, got {self.min_body_kb_s}")
        if not 0 < self.max_body_mb <= 4096:
            problems.append(f"max_body_mb must be in (0, 4096], got {self.max_body_mb}")
        # One largest request must fit the memory budget, or it would hear 503 forever.
        need_mb = max(BODY_COPIES * self.max_body_mb, RGB_BYTES * self.max_request_pixels / 2**20)
        if not problems and self.max_pending_mb < need_mb:
            problems.append(f"max_pending_mb must hold one largest request: at least {math.ceil(need_mb)} "
                            f"(3 x max_body_mb, 3 bytes x max_request_pixels), got {self.max_pending_mb}")
        if self.max_context_tokens is not None and not self.max_context_tokens >= 1:
            problems.append(f"max_context_tokens must be >= 1 or null, got {self.max_context_tokens}")
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


# ---------------------------------------------------------------------- the model worker

class JobFuture(Future):
    """A request's result; :meth:`cancel` (a client gone) also marks it ``gone`` for a running batch."""

    def __init__(self) -> None:
        super().__init__()
        self.gone = threading.Event()

    def cancel(self) -> bool:
        self.gone.set()
        return super().cancel()  # succeeds only while queued: the worker then skips it


@dataclass
class _Job:
    conversation: list[dict[str, Any]]
    sampling: SamplingKey
    prompt_tokens: int | None = None
    future: JobFuture = field(default_factory=JobFuture)


class BatchWorker:
    """One thread owns the model; requests queue up and run in micro-batches.

    Batching matters because a client such as :class:`visrl.remote.RemoteReasoner` sends many
    requests at once, and one batched generate call is several times faster than one call each.
    A cancelled request (its client went away) is skipped if still queued; :meth:`batch_gone`
    tells a running generate call (:class:`ServeReasoner`) when every request of its batch is gone.
    """

    def __init__(self, reasoner: Any, max_batch_size: int, wait_s: float, counter: Any = None) -> None:
        self.reasoner, self.max_batch_size, self.wait_s, self.counter = reasoner, max_batch_size, wait_s, counter
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._running: list[_Job] = []
        self._thread = threading.Thread(target=self._run, name="visrl-serve-model", daemon=True)
        self._thread.start()

    def submit(self, conversation: list[dict[str, Any]], sampling: SamplingKey,
               prompt_tokens: int | None = None) -> JobFuture:
        job = _Job(conversation, sampling, prompt_tokens)
        self._queue.put(job)
        return job.future

    def batch_gone(self) -> bool:
        """True when the batch being generated has no client left to answer."""
        running = self._running
        return bool(running) and all(job.future.gone.is_set() for job in running)

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
        jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]  # drops cancelled ones
        if not jobs:
            return
        try:
            results = self._call(jobs, key)
        except Exception as exc:
            if len(jobs) == 1:
                jobs[0].future.set_exception(failure(exc))
                return
            # One request the checks let through must not fail the others: run each alone.
            log.warning("a batch of %d requests failed (%s); running them one by one", len(jobs), _brief(exc))
            for job in jobs:
                try:
                    job.future.set_result(self._call([job], key)[0])
                except Exception as alone:  # noqa: BLE001 - this request's own failure, reported to it
                    job.future.set_exception(failure(alone))
            return
        except BaseException as exc:  # e.g. SystemExit: every waiting request must hear about it
            for job in jobs:
                job.future.set_exception(exc)
            return
        for job, result in zip(jobs, results, strict=True):
            job.future.set_result(result)

    def _call(self, jobs: list[_Job], key: SamplingKey) -> list[tuple[list[str], dict[str, Any]]]:
        from visrl.reasoning import Sampling

        self._running = jobs
        try:
            sampling = Sampling(temperature=key.temperature, top_p=key.top_p,
                                max_new_tokens=key.max_new_tokens, n=key.n)
            outputs = self.reasoner.generate([job.conversation for job in jobs], sampling)
            return [(texts, self._usage(job, texts, key.max_new_tokens)) for job, texts in zip(jobs, outputs, strict=True)]
        finally:
            self._running = []

    def _usage(self, job: _Job, texts: list[str], max_new_tokens: int) -> dict[str, Any]:
        if self.counter is None:
            return {"prompt_tokens": job.prompt_tokens or 0, "completion_tokens": [0] * len(texts)}
        prompt = job.prompt_tokens if job.prompt_tokens is not None else self.counter.prompt(job.conversation)
        # Reasoner.generate returns text, so completions are re-tokenized; odd bytes of an
        # untrained model can re-tokenize longer than generated, hence the cap at max_new_tokens.
        return {"prompt_tokens": prompt,
                "completion_tokens": [min(self.counter.completion(t), max_new_tokens) for t in texts]}


# Raised by tokenizers, processors and chat templates for input they cannot take (jinja2's
# TemplateError is an Exception subclass of its own; matched by name so jinja2 need not be imported).
_INPUT_ERRORS = (ValueError, TypeError)


def failure(exc: Exception) -> BadRequest:
    """The answer to a request whose generate call failed on its own (alone, not in a batch).

    The model refusing its input (a ValueError or TypeError from the processor or tokenizer, a
    template error) is that request's fault: 400 and one log line. Anything else is a server fault
    (out of memory, a bug): 500, and its traceback is logged once here, never sent to the client.
    """
    if isinstance(exc, _INPUT_ERRORS) or type(exc).__name__ == "TemplateError":
        log.warning("a request the model cannot take was refused: %s", _brief(exc))
        return BadRequest(f"the model cannot take this request: {_brief(exc)}", "messages")
    log.error("generation failed", exc_info=exc)
    return BadRequest(f"generation failed: {type(exc).__name__}: {exc}", status=500, kind="server_error")


def _brief(exc: BaseException, limit: int = 200) -> str:
    """``Type: message`` on one line, at most ``limit`` characters (log lines and client answers)."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------- the app

def create_app(reasoner_or_loaded: Any, cfg: ServeConfig) -> Any:
    """The FastAPI app over a :class:`visrl.reasoning.Reasoner` (or a LoadedModel to wrap in one)."""
    check_bind(cfg)
    reasoner = _as_reasoner(reasoner_or_loaded, cfg)
    contract = getattr(reasoner, "contract", None)
    processor = getattr(getattr(reasoner, "loaded", None), "processor", None)
    # The counter gets its own copy of the processor: it tokenizes prompts in request threads while
    # the model's copy pads batches (a fast tokenizer's padding state is not shared safely).
    worker = BatchWorker(reasoner, cfg.max_batch_size, cfg.batch_wait_ms / 1000,
                         TokenCounter(copy.deepcopy(processor)) if processor is not None else None)
    if isinstance(reasoner, ServeReasoner):
        reasoner.should_stop = worker.batch_gone
    admission = Admission(cfg.max_pending, cfg.max_pending_mb * 2**20)
    clients = ClientBodies(cfg.max_client_bodies)
    context = cfg.max_context_tokens or model_context(reasoner)
    name = cfg.model_name

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        yield
        worker.close()

    app = FastAPI(title="visrl serve", lifespan=lifespan)
    app.state.worker, app.state.admission, app.state.clients = worker, admission, clients

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request) -> Any:
        try:
            authorize(request, cfg.api_key)
        except BadRequest as exc:
            return error(exc)
        entry = {"id": name, "object": "model", "created": int(time.time()), "owned_by": "visrl",
                 "root": cfg.model_name_or_path}
        if contract is not None:  # how this model writes boxes and wants its crops (RemoteReasoner reads it)
            entry["visrl_contract"] = contract.to_dict()
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        try:
            authorize(request, cfg.api_key)
        except BadRequest as exc:
            return error(exc)
        ticket = admission.ticket()  # memory while the body arrives; a queue place once it has
        try:
            return await complete(request, ticket, cfg, worker, context, clients)
        except BadRequest as exc:
            return error(exc)
        except VisRLError as exc:  # e.g. a prompt the model cannot take
            return error(BadRequest(str(exc)))
        except Exception as exc:  # a bug or an out-of-memory: the client gets a 500, the log the traceback
            log.exception("generation failed")
            return error(BadRequest(f"generation failed: {type(exc).__name__}: {exc}", status=500,
                                    kind="server_error"))
        finally:
            ticket.leave()

    return app


async def complete(request: Request, ticket: Ticket, cfg: ServeConfig, worker: BatchWorker,
                   context: int | None, clients: ClientBodies | None = None) -> Any:
    """Read, admit, queue and answer one chat-completions request (BadRequest for a refusal)."""
    pace = BodyPace(cfg.body_grace_s, cfg.min_body_kb_s * 1024, cfg.body_timeout_s)
    raw = await read_body(request, int(cfg.max_body_mb * 2**20), ticket, pace, clients)
    ticket.take_place()  # only now: a client still sending its body holds no place in the queue
    # Parsing JSON and decoding images take CPU seconds: off the event loop, so /health and
    # other clients are served meanwhile.
    body, conversation, sampling, tokens = await asyncio.to_thread(
        admit_request, raw, cfg, ticket, context, worker.counter)
    del raw
    texts, usage = await result_unless_gone(request, worker.submit(conversation, sampling, tokens))
    reply = completion_body(cfg.model_name, texts, usage, sampling.max_new_tokens)
    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(stream_events(reply, include_usage), media_type="text/event-stream")
    return reply


def error(exc: BadRequest) -> JSONResponse:
    """OpenAI's error body; a refusal that may leave the body unread closes the connection."""
    headers = {}
    if exc.status in (408, 413, 429, 503):  # rather than read on what the client still sends
        headers["Connection"] = "close"
    if exc.status in (429, 503):
        headers["Retry-After"] = "1"
    # A message may quote the client's text: never let a lone surrogate make the answer itself fail.
    message = exc.message.encode("utf-8", "backslashreplace").decode()
    return JSONResponse({"error": {"message": message, "type": exc.kind, "param": exc.param,
                                   "code": exc.code}}, status_code=exc.status, headers=headers)


def authorize(request: Request, api_key: str | None) -> None:
    if not api_key:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
        raise BadRequest("missing or wrong API key: send 'Authorization: Bearer <api_key>'",
                         status=401, code="invalid_api_key")


def admit_request(raw: bytes, cfg: ServeConfig, ticket: Ticket, context: int | None,
                  counter: Any) -> tuple[dict[str, Any], list[dict[str, Any]], SamplingKey, int | None]:
    """Parse a body read by :func:`read_body`: (body, conversation, sampling, prompt tokens).

    The ticket holds the body's bytes while it is parsed, then only its decoded images' bytes."""
    # Counted before parsing: json.loads holds the GIL throughout, and its objects cost ~650 bytes
    # a value, far more than the body's bytes.
    body_bytes = ticket.bytes + check_json_size(raw) * JSON_VALUE_BYTES
    ticket.hold(body_bytes)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadRequest("the request body is not valid JSON") from None
    conversation, sampling = parse_request(body, cfg.model_name, cfg.max_tokens_limit, cfg.max_image_pixels,
                                           cfg.max_request_pixels, lambda n: ticket.hold(body_bytes + n),
                                           cfg.decode_timeout_s)
    ticket.hold(sum(p["image"].width * p["image"].height * RGB_BYTES
                    for m in conversation for p in m["content"] if p["type"] == "image"))
    return body, conversation, sampling, check_prompt(conversation, sampling.max_new_tokens, context, counter)


async def result_unless_gone(request: Request, future: JobFuture) -> Any:
    """The job's result; if the client disconnects first, the job is cancelled (a queued one is
    dropped, a running batch stops once all its clients are gone) and a 499 is logged."""
    done = asyncio.wrap_future(future)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server is shutting down
        future.cancel()
        raise
    finally:
        gone.cancel()
    if not done.done():
        future.cancel()
        log.info("client disconnected; its request was cancelled")
        raise BadRequest("the client disconnected before the answer was ready", status=499)
    return done.result()


async def _disconnected(request: Request) -> None:
    # The body has been read, so the next ASGI message is the client's disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


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


class ServeReasoner(Reasoner):
    """The Reasoner of ``visrl serve``: a generate call stops at the next token once
    :attr:`should_stop` says so (the worker's :meth:`BatchWorker.batch_gone`: every client of the
    batch disconnected), so a gone client frees the one model within a token, not a whole reply."""

    def should_stop(self) -> bool:
        return False  # replaced by the worker's batch_gone in create_app

    def _generate_kwargs(self, sampling: Any, n: int) -> dict[str, Any]:
        kwargs = super()._generate_kwargs(sampling, n)
        kwargs["stopping_criteria"] = _stop_when(lambda: self.should_stop())
        return kwargs


def _stop_when(check: Callable[[], bool]) -> Any:
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Gone(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full((input_ids.shape[0],), check(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Gone()])


def _as_reasoner(obj: Any, cfg: ServeConfig) -> Any:
    from visrl.models import LoadedModel

    if not isinstance(obj, LoadedModel):
        return obj  # a Reasoner (or a stand-in with the same generate)
    return ServeReasoner(obj, batch_size=cfg.max_batch_size)


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
    # PIL's own guard (warn over 1x, refuse over 2x this) backs the header check of visrl.images.
    Image.MAX_IMAGE_PIXELS = cfg.max_image_pixels
    # limit_concurrency: past max_connections open connections uvicorn itself answers 503.
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", limit_concurrency=cfg.max_connections)
