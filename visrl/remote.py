"""The remote backend: two-step reasoning against an OpenAI-compatible chat-completions server.

Large generation runs belong on a serving engine (vLLM, or ``visrl serve`` for a local model), so
:class:`RemoteReasoner` offers the methods of :class:`visrl.reasoning.Reasoner` over HTTP. It builds
the very prompts the local reasoner builds (:mod:`visrl.prompts`), sends images as PNG data URLs,
parses boxes and crops on this side (:mod:`visrl.boxes`), and runs requests concurrently.

Differences from the local reasoner, by necessity:

- ``qwen2_5`` boxes are pixels of the image *the model saw*, i.e. after the server's processor
  resized it. The client cannot ask the server for that size, so its
  :class:`visrl.contract.TwoStepContract` recomputes it with Qwen's ``smart_resize`` from the
  server's budget (``server_min_pixels``/``server_max_pixels``, the contract's
  ``image_min_pixels``/``image_max_pixels``; default: Qwen2.5-VL's shipped processor, 3,136 and
  12,845,056 pixels, which vLLM uses unless told otherwise); set them to the server's
  ``--mm-processor-kwargs`` budget when it differs.
- ``stream_two_step`` does not stream tokens: it yields the box event, then one answer event with
  the whole answer (a two-step answer is a few words, and ``visrl serve``'s stream carries each
  completion in one delta anyway).
- The contract's ``full_max_pixels`` / ``crop_min_pixels`` are applied here, before sending, as
  the local reasoner applies them before its processor.

:func:`chat_completion` is the one HTTP call; judges use it too. :func:`check_servers` asks
every server a config names whether it is up, takes the key and serves the model, in seconds.
"""

from __future__ import annotations

import base64
import io
import os
import random
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
from PIL import Image

from visrl.boxes import QWEN2_5_MAX_PIXELS, QWEN2_5_MIN_PIXELS
from visrl.contract import TwoStepContract
from visrl.errors import ConfigError, RemoteError, RemoteRefused
from visrl.two_step import TwoStep, with_images  # noqa: F401  (with_images: re-exported)
from visrl.vocabulary import BOX_FORMATS

Message = dict[str, Any]
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})  # transient: busy, restarting, overloaded
BACKOFF_S = 0.5  # first wait between attempts; doubles each time, plus up to 25% jitter
MAX_BACKOFF_S = 8.0
SNIPPET_CHARS = 300  # how much of an error body goes into a RemoteError message
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# ---------------------------------------------------------------------- API keys

def api_key_from_env(env_name: str | None, key: str = "api_key_env") -> str | None:
    """The API key in environment variable ``env_name``; None when no variable is named.

    Configs name the variable (``api_key_env: VLLM_API_KEY``), never the key: configs are stored
    with every job. ``key`` is the config key, for the message. An unset or empty variable, or
    a value that cannot be a variable name (a pasted key, say), is a ConfigError; the value is
    never echoed, since it may be the secret itself.
    """
    if not env_name:
        return None
    if not ENV_NAME.fullmatch(env_name):
        raise ConfigError(f"{key} must be the NAME of an environment variable holding the API key "
                          f"(e.g. VLLM_API_KEY), not the key itself; the value given ({len(env_name)} "
                          "characters, not shown) is not a variable name")
    value = os.environ.get(env_name, "")
    if not value:
        raise ConfigError(f"{key} names the environment variable {env_name}, which is not set or empty: "
                          f"export {env_name}=<the key the server was started with>, or set {key}: null "
                          "for a server without a key")
    return value


# ---------------------------------------------------------------------- one HTTP call

def chat_completion(base_url: str, model: str, messages: list[Message], *, temperature: float = 0.0,
                    top_p: float = 1.0, max_tokens: int = 64, n: int = 1, api_key: str | None = None,
                    timeout: float = 60, retries: int = 3, client: httpx.Client | None = None) -> list[str]:
    """POST ``{base_url}/chat/completions`` and return the choices' texts in index order.

    ``base_url`` ends in the API root, e.g. ``http://127.0.0.1:8000/v1``. PIL images in messages
    (``{"type": "image", "image": PIL}``) are sent as PNG data URLs. ``retries`` is the number of
    attempts: connection errors, timeouts, 408/429/5xx are retried with exponential backoff; other
    4xx answers are the caller's mistake and raise at once. The server may return fewer than ``n``
    choices (some ignore ``n``); callers that need exactly ``n`` ask again (see RemoteReasoner).
    """
    url = base_url.rstrip("/") + "/chat/completions"
    payload = {"model": model, "messages": encode_messages(messages), "temperature": temperature,
               "top_p": top_p, "max_tokens": max_tokens, "n": n}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    owned = client is None
    client = client or httpx.Client(timeout=timeout)
    try:
        response = _post_with_retries(client, url, payload, headers, timeout, max(1, retries))
    finally:
        if owned:
            client.close()
    return _choice_texts(url, response)


def _post_with_retries(client: httpx.Client, url: str, payload: dict[str, Any], headers: dict[str, str],
                       timeout: float, attempts: int) -> httpx.Response:
    problem = ""
    for attempt in range(attempts):
        if attempt:
            time.sleep(min(MAX_BACKOFF_S, BACKOFF_S * 2 ** (attempt - 1)) * (1 + random.random() / 4))
        try:
            response = client.post(url, json=payload, headers=headers, timeout=timeout)
        except httpx.TransportError as exc:  # refused, reset, timed out: the server may come back
            problem = f"{type(exc).__name__}: {exc or 'no detail'}"
            continue
        if response.status_code < 400:
            return response
        problem = f"HTTP {response.status_code}: {_snippet(response)}"
        if response.status_code in (401, 403):
            sent = "a key" if "Authorization" in headers else "no key"
            raise RemoteRefused(f"{url} refused the request ({problem}): a missing or wrong API key; {sent} was "
                                "sent: set api_key_env (judge_api_key_env for a judge) to the variable holding "
                                "the server's key")
        if response.status_code not in RETRY_STATUSES:
            raise RemoteRefused(f"{url} refused the request ({problem}); check the model name and the request")
    raise RemoteError(f"{url} failed {attempts} time(s), last: {problem}; check that the server is "
                      "up and reachable")


def _choice_texts(url: str, response: httpx.Response) -> list[str]:
    try:
        choices = response.json()["choices"]
        ordered = sorted(choices, key=lambda c: c.get("index", 0))
        return [c["message"].get("content") or "" for c in ordered]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise RemoteError(f"{url} answered HTTP {response.status_code} without OpenAI-style choices: "
                          f"{_snippet(response)}") from None


def _snippet(response: httpx.Response) -> str:
    """The error's message when the body is OpenAI-shaped, else the start of the body."""
    try:
        error = response.json().get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:SNIPPET_CHARS]
    except (ValueError, AttributeError):
        pass
    text = " ".join(response.text.split())
    return text[:SNIPPET_CHARS] or "(empty body)"


def served_contract(base_url: str, model: str, api_key: str | None = None, timeout: float = 10) -> dict[str, Any] | None:
    """The two-step contract a ``visrl serve`` publishes for ``model`` in ``GET /models``
    (``visrl_contract``), or None when the server publishes none (vLLM) or cannot be asked."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(base_url.rstrip("/") + "/models", headers=headers, timeout=timeout)
        entries = response.json().get("data", []) if response.status_code == 200 else []
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and entry.get("id") == model and isinstance(entry.get("visrl_contract"), dict):
            return entry["visrl_contract"]
    return None


# ---------------------------------------------------------------------- is the server there?

PROBE_TIMEOUT_S = 4.0  # all servers are asked at once: a config is refused within ~4 s, not hours later


@dataclass(frozen=True)
class Server:
    """A server a config names: the config key of its URL, the URL (API root), the model the
    run will ask for, the API key (read from ``key_env``, the config key naming its variable)."""

    what: str
    base_url: str
    model: str | None
    key_env: str
    api_key: str | None = field(default=None, repr=False)


def servers_of(cfg: Any, policy: bool = True, judges: bool = True) -> list[Server]:
    """The servers ``cfg`` (a generate or eval config) will call: the policy's with ``backend:
    remote``, and the judge model's when a judge is ``model``. Reads the key variables (a
    ConfigError when one named is unset)."""
    servers = []
    if policy and getattr(cfg, "backend", "local") == "remote":
        servers.append(Server("base_url", cfg.base_url, cfg.remote_model, "api_key_env",
                              api_key_from_env(cfg.api_key_env, "api_key_env")))
    if judges and "model" in (getattr(cfg, "answer_judge", None), getattr(cfg, "crop_judge", None)):
        servers.append(Server("judge_base_url", cfg.judge_base_url, cfg.judge_model, "judge_api_key_env",
                              api_key_from_env(cfg.judge_api_key_env, "judge_api_key_env")))
    return servers


def check_servers(servers: list[Server], timeout: float = PROBE_TIMEOUT_S) -> None:
    """Ask every server ``GET {base_url}/models`` at once; a RemoteError naming each one that is
    down, refuses the key, or does not serve the model, with the URL and the reason. Returns
    within ~``timeout`` seconds even when name resolution hangs (the probes run in daemon threads)."""
    results: dict[int, str | None] = {}
    threads = [threading.Thread(target=lambda i=i, s=s: results.__setitem__(i, probe_server(s, timeout)),
                                daemon=True, name="visrl-probe") for i, s in enumerate(servers)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout + 0.5
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    problems = [results.get(i, f"{s.what} {s.base_url}: timeout, no answer within {timeout:g} s")
                for i, s in enumerate(servers)]
    problems = [p for p in problems if p]
    if problems:
        raise RemoteError("; ".join(problems) + " (checked before the run, so it does not fail hours in)")


def probe_server(server: Server, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when ``server`` lists its model in ``GET /models``, else what is wrong, one line."""
    url = (server.base_url or "").rstrip("/") + "/models"
    where = f"{server.what} {server.base_url}"
    headers = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}
    try:
        response = httpx.get(url, headers=headers, timeout=timeout)
    except httpx.TimeoutException:
        return f"{where}: timeout, no answer within {timeout:g} s"
    except httpx.HTTPError as exc:
        text = str(exc) or type(exc).__name__
        reason = "connection refused" if "refused" in text.lower() else f"cannot connect ({text})"
        return f"{where}: {reason}; start the server or fix {server.what}"
    if response.status_code in (401, 403):
        sent = "a key was sent" if server.api_key else "no key was sent"
        return (f"{where}: HTTP {response.status_code}, the API key was refused ({sent}); set {server.key_env} "
                "to the variable holding the server's key")
    if response.status_code != 200:
        return (f"{where}: HTTP {response.status_code} on GET {url} ({_snippet(response)}); the base URL must "
                "be the API root, e.g. http://127.0.0.1:8000/v1")
    served = _served_names(response)
    if served is None:
        return f"{where}: GET {url} answered without an OpenAI-style model list ({_snippet(response)})"
    if server.model and server.model not in served:
        key = "remote_model" if server.what == "base_url" else "judge_model"
        return (f"{where} serves {', '.join(map(repr, served)) or 'no model'}, not {server.model!r}; "
                f"set {key} to the served name")
    return None


def _served_names(response: httpx.Response) -> list[str] | None:
    try:
        entries = response.json().get("data")
    except (ValueError, AttributeError):
        return None
    if not isinstance(entries, list):
        return None
    return [str(e.get("id")) for e in entries if isinstance(e, dict) and e.get("id") is not None]


# ---------------------------------------------------------------------- messages

def image_data_url(image: Image.Image) -> str:
    """A lossless PNG data URL (the server must see the same pixels as a local model would)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def encode_messages(messages: list[Message]) -> list[Message]:
    """HF-style messages as OpenAI JSON: PIL image parts become ``image_url`` data-URL parts."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = [_encode_part(part) for part in content]
        out.append({**message, "content": content})
    return out


def _encode_part(part: Message) -> Message:
    if part.get("type") != "image":
        return part
    image = part.get("image")
    if not isinstance(image, Image.Image):
        raise ValueError("an image part has no PIL image to send; fill placeholders with visrl.reasoning.with_images()")
    return {"type": "image_url", "image_url": {"url": image_data_url(image)}}


# ---------------------------------------------------------------------- the reasoner

class RemoteReasoner(TwoStep):
    """:class:`visrl.reasoning.Reasoner`'s methods against an OpenAI-compatible server.

    ``base_url`` is the API root (``http://host:port/v1``), ``model`` the served model name.
    ``concurrency`` requests are in flight at once (the server batches them); results keep the
    input order. Box texts are parsed, crops cut and images prepared by ``contract`` (default: one
    made of ``box_format``, ``crop_margin`` and the server's pixel budget; see the module notes).
    """

    def __init__(self, base_url: str, model: str, box_format: str = "viscot", api_key: str | None = None,
                 concurrency: int = 8, timeout: float = 60, retries: int = 3, crop_margin: float = 0.0,
                 server_min_pixels: int = QWEN2_5_MIN_PIXELS, server_max_pixels: int = QWEN2_5_MAX_PIXELS,
                 contract: TwoStepContract | None = None) -> None:
        if not base_url or not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url must be an http(s) URL such as http://127.0.0.1:8000/v1, got {base_url!r}")
        if box_format not in BOX_FORMATS:
            raise ConfigError(f"unknown box_format {box_format!r}; use one of {', '.join(BOX_FORMATS)}")
        if concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
        if not 0 < server_min_pixels <= server_max_pixels:
            raise ConfigError(f"need 0 < server_min_pixels <= server_max_pixels, got {server_min_pixels}, "
                              f"{server_max_pixels}")
        self.contract = contract or TwoStepContract(box_format=box_format, crop_margin=crop_margin,
                                                    image_min_pixels=server_min_pixels,
                                                    image_max_pixels=server_max_pixels)
        self.base_url, self.model = base_url.rstrip("/"), model
        self.api_key, self.concurrency, self.timeout, self.retries = api_key, concurrency, timeout, retries
        # One pooled client shared by the worker threads (httpx.Client is thread-safe).
        self._client = httpx.Client(timeout=timeout, limits=httpx.Limits(max_connections=concurrency))

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RemoteReasoner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -------------------------------------------------- the Reasoner interface

    def generate(self, conversations: list[list[Message]], sampling: Any, progress: bool = False) -> list[list[str]]:
        """``sampling.n`` completions per conversation (image parts hold PIL images), in order."""
        if not conversations:
            return []
        workers = min(self.concurrency, len(conversations))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="visrl-remote") as pool:
            results = pool.map(lambda conv: self._complete(conv, sampling), conversations)
            if progress:
                results = _with_bar(results, len(conversations))
            return list(results)

    def input_size(self, image: Image.Image) -> tuple[int, int]:
        """The (width, height) a Qwen2.5-VL processor with the server's pixel budget resizes to."""
        return self.contract.input_size(image.size)

    # -------------------------------------------------- internals

    def _complete(self, conversation: list[Message], sampling: Any) -> list[str]:
        """Exactly ``n`` completions: ask again for the rest when the server returns fewer."""
        n = int(getattr(sampling, "n", 1))
        texts: list[str] = []
        for _ in range(n):  # at most n round trips: each returns at least one choice or raises
            got = chat_completion(
                self.base_url, self.model, conversation, temperature=float(sampling.temperature),
                top_p=float(sampling.top_p), max_tokens=int(sampling.max_new_tokens), n=n - len(texts),
                api_key=self.api_key, timeout=self.timeout, retries=self.retries, client=self._client)
            if not got:
                raise RemoteError(f"{self.base_url}/chat/completions returned no choices for model {self.model!r}")
            texts += got
            if len(texts) >= n:
                break
        return texts[:n]


def _with_bar(results: Iterator[Any], total: int) -> Iterator[Any]:
    from tqdm import tqdm

    yield from tqdm(results, total=total, desc="remote", unit="req")
