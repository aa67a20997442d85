"""`visrl serve`: request validation, OpenAI shapes, n > 1, micro-batching, API keys and binding."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from visrl.config import load_config
from visrl.errors import ConfigError
from visrl.reasoning import Sampling
from visrl.serve import (
    BatchWorker,
    SamplingKey,
    ServeConfig,
    check_bind,
    create_app,
    is_loopback,
    serve,
)

REPO = Path(__file__).resolve().parent.parent


class RecordingReasoner:
    """Stands in for Reasoner.generate: answers "<text> #k" and records every batch it ran."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[tuple[int, Sampling]] = []
        self.images_seen: list[tuple[int, int]] = []
        self.delay_s = delay_s

    def generate(self, conversations: list[list[dict[str, Any]]], sampling: Sampling,
                 progress: bool = False) -> list[list[str]]:
        time.sleep(self.delay_s)
        self.batches.append((len(conversations), sampling))
        out = []
        for conv in conversations:
            self.images_seen += [p["image"].size for m in conv for p in m["content"] if p["type"] == "image"]
            text = [p["text"] for p in conv[-1]["content"] if p["type"] == "text"]
            out.append([f"{text[-1] if text else 'image'} #{k}" for k in range(sampling.n)])
        return out


def _data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _body(**changes: Any) -> dict[str, Any]:
    image = Image.new("RGB", (56, 28), "red")
    body = {"model": "tiny", "max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _data_url(image)}}, {"type": "text", "text": "what?"}]}]}
    body.update(changes)
    return body


@pytest.fixture
def fake() -> RecordingReasoner:
    return RecordingReasoner()


@pytest.fixture
def client(fake: RecordingReasoner) -> Iterator[TestClient]:
    cfg = ServeConfig(model_name_or_path="models/tiny", served_model_name="tiny", max_tokens_limit=64)
    with TestClient(create_app(fake, cfg)) as test_client:
        yield test_client


# ---------------------------------------------------------------------- shapes


def test_models_lists_the_served_model(client: TestClient) -> None:
    reply = client.get("/v1/models").json()
    assert reply["object"] == "list" and [m["id"] for m in reply["data"]] == ["tiny"]
    assert reply["data"][0]["object"] == "model" and client.get("/health").json() == {"status": "ok"}


def test_chat_completion_shape_and_sampling(client: TestClient, fake: RecordingReasoner) -> None:
    reply = client.post("/v1/chat/completions", json=_body(n=3, temperature=0.7, top_p=0.9))
    assert reply.status_code == 200
    data = reply.json()
    assert data["object"] == "chat.completion" and data["model"] == "tiny" and data["id"].startswith("chatcmpl-")
    assert [c["index"] for c in data["choices"]] == [0, 1, 2]
    assert [c["message"] for c in data["choices"]] == [
        {"role": "assistant", "content": f"what? #{k}"} for k in range(3)]
    assert {c["finish_reason"] for c in data["choices"]} == {"stop"}
    assert set(data["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert fake.batches == [(1, Sampling(temperature=0.7, top_p=0.9, max_new_tokens=8, n=3))]
    assert fake.images_seen == [(56, 28)]


def _events(reply: Any) -> list[Any]:
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in reply.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


@pytest.mark.parametrize("include_usage", [False, True])
def test_stream_sends_openai_chunks(client: TestClient, fake: RecordingReasoner, include_usage: bool) -> None:
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = _events(client.post("/v1/chat/completions", json=_body(n=2, stream=True, **extra)))
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    per_choice = [[c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == k]
                  for k in range(2)]
    for k, choice in enumerate(per_choice):
        assert [c["delta"] for c in choice] == [{"role": "assistant", "content": ""}, {"content": f"what? #{k}"}, {}]
        assert [c["finish_reason"] for c in choice] == [None, None, "stop"]
    usage = [c["usage"] for c in chunks if not c["choices"]]
    assert len(usage) == include_usage and all(u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
                                               for u in usage)
    assert fake.batches == [(1, Sampling(temperature=1.0, top_p=1.0, max_new_tokens=8, n=2))]


def test_defaults_string_content_and_multi_turn(client: TestClient, fake: RecordingReasoner) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "[0.1, 0.2, 0.3, 0.4]"}, {"role": "user", "content": "and?"}]
    reply = client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages})
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == "and? #0"
    # OpenAI's defaults: temperature 1, top_p 1, n 1; max_tokens defaults to the server's limit.
    assert fake.batches == [(1, Sampling(temperature=1.0, top_p=1.0, max_new_tokens=64, n=1))]


_BAD = [
    ({"model": "other"}, 404, "model", "the model 'other' does not exist; this server serves 'tiny'"),
    ({"messages": []}, 400, "messages", "messages must be a non-empty list"),
    ({"messages": "hi"}, 400, "messages", "messages must be a non-empty list"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0]", "role system, user or assistant"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, 400,
     "messages", "the last message must be from the user"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]},
     400, "messages[0].content[0]", "only data:image/...;base64, URLs are accepted"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "images/a.png"}}]}]},
     400, "messages[0].content[0]", "reads no files"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,bm90IGFuIGltYWdl"}}]}]}, 400, "messages[0].content[0]", "not a readable image"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, 400, "messages[0].content[0]",
     "must be a text part or an image_url part"),
    ({"n": 0}, 400, "n", "n must be an integer in [1, 16], got 0"),
    ({"n": 17}, 400, "n", "n must be an integer in [1, 16], got 17"),
    ({"n": True}, 400, "n", "n must be an integer"),
    ({"temperature": -0.5}, 400, "temperature", "temperature must be in [0.0, 100.0], got -0.5"),
    ({"temperature": "hot"}, 400, "temperature", "temperature must be a number"),
    ({"top_p": 0}, 400, "top_p", "top_p must be in (0.0, 1.0]"),
    ({"max_tokens": 65}, 400, "max_tokens", "max_tokens must be an integer in [1, 64], got 65"),
    ({"max_tokens": 0}, 400, "max_tokens", "max_tokens must be an integer in [1, 64]"),
    ({"stream": "yes"}, 400, "stream", "stream must be true or false"),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options", "allowed only with stream: true"),
    ({"stream": True, "stream_options": "usage"}, 400, "stream_options", "stream_options is an object"),
]


@pytest.mark.parametrize("changes, status, param, message", _BAD)
def test_bad_requests_get_openai_errors(client: TestClient, fake: RecordingReasoner, changes: dict[str, Any],
                                        status: int, param: str, message: str) -> None:
    reply = client.post("/v1/chat/completions", json=_body(**changes))
    assert reply.status_code == status
    error = reply.json()["error"]
    assert message in error["message"] and error["param"] == param and error["type"] == "invalid_request_error"
    assert fake.batches == []


def test_too_many_images_and_non_json(client: TestClient) -> None:
    part = _body()["messages"][0]["content"][0]
    reply = client.post("/v1/chat/completions", json=_body(messages=[{"role": "user", "content": [part] * 17}]))
    assert reply.status_code == 400 and "at most 16 images" in reply.json()["error"]["message"]
    reply = client.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert reply.status_code == 400 and reply.json()["error"]["message"] == "the request body is not valid JSON"


def test_generate_failure_is_500_for_every_waiting_request() -> None:
    class Broken(RecordingReasoner):
        def generate(self, *args: Any, **kwargs: Any) -> list[list[str]]:
            raise RuntimeError("CUDA out of memory")

    cfg = ServeConfig(model_name_or_path="tiny")
    with TestClient(create_app(Broken(), cfg)) as client:
        replies = [client.post("/v1/chat/completions", json=_body()) for _ in range(2)]
    for reply in replies:  # the worker survives a failed batch
        assert reply.status_code == 500
        assert reply.json()["error"] == {"message": "generation failed: RuntimeError: CUDA out of memory",
                                         "type": "server_error", "param": None, "code": None}


# ---------------------------------------------------------------------- batching


def test_worker_batches_concurrent_requests_by_sampling() -> None:
    fake = RecordingReasoner()
    worker = BatchWorker(fake, max_batch_size=4, wait_s=0.3)
    greedy, sampled = SamplingKey(0.0, 1.0, 8, 1), SamplingKey(1.0, 1.0, 8, 2)
    conv = [{"role": "user", "content": [{"type": "text", "text": "q"}]}]
    futures = [worker.submit(conv, key) for key in (greedy, sampled, greedy, greedy, greedy, sampled)]
    results = [f.result(timeout=10)[0] for f in futures]
    worker.close()
    # The first 4 arrive within the wait: one batch per sampling setting; the other 2 come next.
    assert [(n, s.temperature) for n, s in fake.batches] == [(3, 0.0), (1, 1.0), (1, 0.0), (1, 1.0)]
    assert results == [["q #0"], ["q #0", "q #1"], ["q #0"], ["q #0"], ["q #0"], ["q #0", "q #1"]]


def test_concurrent_http_requests_share_one_generate_call() -> None:
    fake = RecordingReasoner()
    cfg = ServeConfig(model_name_or_path="tiny", max_batch_size=8, batch_wait_ms=300)
    replies: list[Any] = [None] * 5
    with TestClient(create_app(fake, cfg)) as client:
        def ask(i: int) -> None:
            replies[i] = client.post("/v1/chat/completions", json=_body(model="tiny", messages=[
                {"role": "user", "content": f"q{i}"}], max_tokens=4, temperature=0))

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert [r.json()["choices"][0]["message"]["content"] for r in replies] == [f"q{i} #0" for i in range(5)]
    assert [n for n, _ in fake.batches] == [5]


# ---------------------------------------------------------------------- keys and binding


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True),
    ("0.0.0.0", False), ("192.168.1.5", False), ("::", False), ("myhost.example", False)])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_refuses_non_loopback_host_without_api_key(fake: RecordingReasoner) -> None:
    cfg = ServeConfig(model_name_or_path="tiny", host="0.0.0.0")
    with pytest.raises(ConfigError, match="host 0.0.0.0 is reachable from other machines: set api_key"):
        create_app(fake, cfg)
    with pytest.raises(ConfigError, match="set api_key"):
        serve(cfg)  # refused before any model is loaded (there is none called 'tiny')
    check_bind(ServeConfig(model_name_or_path="tiny", host="0.0.0.0", api_key="k"))


def test_api_key_required_when_set(fake: RecordingReasoner) -> None:
    cfg = ServeConfig(model_name_or_path="tiny", host="0.0.0.0", api_key="s3cret")
    with TestClient(create_app(fake, cfg)) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            reply = client.post("/v1/chat/completions", json=_body(), headers=headers)
            assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
            assert client.get("/v1/models", headers=headers).status_code == 401
        assert fake.batches == []
        good = {"Authorization": "Bearer s3cret"}
        assert client.post("/v1/chat/completions", json=_body(), headers=good).status_code == 200
        assert client.get("/v1/models", headers=good).status_code == 200
        assert client.get("/health").status_code == 200  # liveness needs no key
    assert "s3cret" not in repr(cfg)


# ---------------------------------------------------------------------- configs


@pytest.mark.parametrize("path", ["configs/serve.yaml", "configs/demo/serve.yaml"])
def test_shipped_configs_load(path: str) -> None:
    cfg = load_config(ServeConfig, REPO / path)
    assert cfg.host == "127.0.0.1" and cfg.api_key is None and cfg.max_batch_size >= 1


@pytest.mark.parametrize("data, message", [
    ("model_name_or_path: m\nprot: 80\n", "unknown key(s) prot"),
    ("model_name_or_path: m\nport: 70000\n", "port must be in 1..65535, got 70000"),
    ("model_name_or_path: m\nmax_batch_size: 0\n", "max_batch_size must be >= 1, got 0"),
])
def test_bad_configs(tmp_path: Path, data: str, message: str) -> None:
    (tmp_path / "serve.yaml").write_text(data)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(ServeConfig, tmp_path / "serve.yaml")


# ---------------------------------------------------------------------- the real tiny model


@pytest.fixture(scope="module")
def tiny_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    import torch

    from visrl.models import load_model
    from visrl.tiny import build_tiny_model

    torch.set_num_threads(1)
    path = build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny", preset="test")
    cfg = ServeConfig(model_name_or_path=str(path), max_batch_size=4)
    with TestClient(create_app(load_model(path, device="cpu"), cfg)) as client:
        yield client


def test_tiny_model_usage_counts_image_tokens(tiny_client: TestClient) -> None:
    reply = tiny_client.post("/v1/chat/completions", json=_body(max_tokens=5, temperature=1.0, n=2))
    assert reply.status_code == 200
    data = reply.json()
    assert len(data["choices"]) == 2 and all(isinstance(c["message"]["content"], str) for c in data["choices"])
    usage = data["usage"]
    # A 56x28 image is 2x1 merged patches of 28 px: 2 image tokens, plus the chat template's text.
    assert usage["prompt_tokens"] > 10
    assert 0 <= usage["completion_tokens"] <= 10 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert all(c["finish_reason"] in ("stop", "length") for c in data["choices"])
