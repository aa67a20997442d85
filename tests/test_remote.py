"""The remote backend: chat_completion's retries and errors against a scripted loopback server,
and RemoteReasoner against a real `visrl serve` app over the tiny model (same greedy outputs as
the local Reasoner)."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from visrl.boxes import Box
from visrl.errors import ConfigError, RemoteError, RemoteRefused
from visrl.reasoning import Sampling
from visrl.remote import RemoteReasoner, chat_completion, encode_messages, with_images

# ---------------------------------------------------------------------- a scripted fake server


class FakeServer:
    """OpenAI-style /chat/completions on 127.0.0.1. Each scripted reply is an int (that HTTP status,
    with an OpenAI error body), a str (one choice), a list of str (several choices), bytes (a raw
    200 body), or a callable taking the request body and returning one of those. Unscripted
    requests echo the last text."""

    def __init__(self, replies: list[Any] | None = None, delay: Any = None) -> None:
        self.replies = list(replies or [])
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append(body)
                    fake.headers.append(dict(self.headers))
                    reply = fake.replies.pop(0) if fake.replies else _echo
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    if delay is not None:
                        time.sleep(delay(body))
                    if callable(reply):
                        reply = reply(body)
                    if isinstance(reply, bytes):
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(reply)))
                        self.end_headers()
                        self.wfile.write(reply)
                    elif isinstance(reply, int):
                        self._send(reply, {"error": {"message": f"scripted failure {reply}",
                                                     "type": "invalid_request_error"}})
                    else:
                        texts = [reply] if isinstance(reply, str) else reply
                        self._send(200, {"object": "chat.completion", "model": body["model"], "choices": [
                            {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
                            for i, t in reversed(list(enumerate(texts)))]})  # out of order on purpose
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _echo(body: dict[str, Any]) -> list[str]:
    """The last text part of the request, once per requested completion."""
    text = [p["text"] for p in body["messages"][-1]["content"] if p["type"] == "text"][-1]
    return [text] * body.get("n", 1)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    waits: list[float] = []
    monkeypatch.setattr("visrl.remote.time.sleep", waits.append)
    return waits


def _user(text: str, *images: Image.Image) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [*({"type": "image", "image": im} for im in images),
                                         {"type": "text", "text": text}]}]


# ---------------------------------------------------------------------- chat_completion


def test_retries_5xx_and_429_with_growing_backoff(sleeps: list[float]) -> None:
    with FakeServer([503, 429, "fine"]) as server:
        assert chat_completion(server.base_url, "m", _user("hi")) == ["fine"]
        assert len(server.requests) == 3
    assert len(sleeps) == 2 and 0.5 <= sleeps[0] <= 0.625 and 1.0 <= sleeps[1] <= 1.25


def test_gives_up_after_retries_naming_url_status_and_body(sleeps: list[float]) -> None:
    with FakeServer([500, 502, 500, "never reached"]) as server:
        with pytest.raises(RemoteError) as err:
            chat_completion(server.base_url, "m", _user("hi"), retries=3)
        assert len(server.requests) == 3
    message = str(err.value)
    assert f"{server.base_url}/chat/completions failed 3 time(s)" in message
    assert "HTTP 500: scripted failure 500" in message


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_client_errors_are_not_retried(status: int, sleeps: list[float]) -> None:
    with FakeServer([status, "never reached"]) as server:
        with pytest.raises(RemoteError, match=f"refused the request \\(HTTP {status}: scripted failure {status}\\)"):
            chat_completion(server.base_url, "m", _user("hi"))
        assert len(server.requests) == 1 and sleeps == []


def test_connection_refused_is_retried_then_named(sleeps: list[float]) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(RemoteError, match=rf"http://127.0.0.1:{port}/v1/chat/completions failed 2 time\(s\), last: ConnectError"):
        chat_completion(f"http://127.0.0.1:{port}/v1/", "m", _user("hi"), retries=2)
    assert len(sleeps) == 1


def test_replies_without_choices_are_remote_errors() -> None:
    with FakeServer([b"<html>proxy says hi</html>"]) as server:
        with pytest.raises(RemoteError, match="HTTP 200 without OpenAI-style choices: <html>proxy says hi</html>"):
            chat_completion(server.base_url, "m", _user("hi"))
    with FakeServer([[]]) as server:
        with pytest.raises(RemoteError, match="returned no choices for model 'm'"):
            RemoteReasoner(server.base_url, "m").generate([_user("hi")], Sampling())


@pytest.mark.parametrize("pixels, resized, text, box", [
    # Qwen2.5-VL's default budget: 640x480 only snaps to multiples of 28, so 644x476.
    ({}, (644, 476), '{"bbox_2d": [322, 238, 644, 476]}', Box(320, 240, 640, 480)),
    # a server started with a smaller max_pixels shrinks it first
    ({"server_max_pixels": 100352}, (364, 252), '{"bbox_2d": [91, 63, 182, 126]}', Box(160, 120, 320, 240)),
])
def test_qwen2_5_boxes_are_read_in_the_servers_resize(pixels: dict, resized: tuple, text: str, box: Box) -> None:
    reasoner = RemoteReasoner("http://127.0.0.1:9/v1", "m", box_format="qwen2_5", **pixels)
    image = Image.new("RGB", (640, 480))
    assert reasoner.input_size(image) == resized
    assert reasoner.parse(text, image) == box


def test_server_pixel_budget_must_be_ordered() -> None:
    with pytest.raises(ConfigError, match="server_min_pixels <= server_max_pixels"):
        RemoteReasoner("http://127.0.0.1:9/v1", "m", server_min_pixels=5000, server_max_pixels=4000)


def test_request_body_images_as_png_data_urls_and_auth_header() -> None:
    image = Image.new("RGB", (30, 20), (10, 200, 30))
    image.putpixel((3, 4), (255, 0, 0))
    with FakeServer() as server:
        texts = chat_completion(server.base_url, "tiny", _user("what?", image), temperature=0.7, top_p=0.9,
                                max_tokens=12, n=2, api_key="sekret")
        body, headers = server.requests[0], server.headers[0]
    assert texts == ["what?", "what?"]  # choices sorted by index
    assert {k: body[k] for k in ("model", "temperature", "top_p", "max_tokens", "n")} == {
        "model": "tiny", "temperature": 0.7, "top_p": 0.9, "max_tokens": 12, "n": 2}
    assert headers["Authorization"] == "Bearer sekret"
    image_part, text_part = body["messages"][0]["content"]
    assert text_part == {"type": "text", "text": "what?"}
    url = image_part["image_url"]["url"]
    assert image_part["type"] == "image_url" and url.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert decoded.size == (30, 20) and list(decoded.getdata()) == list(image.getdata())  # lossless


def test_encode_messages_keeps_strings_and_fills_placeholders() -> None:
    im = Image.new("RGB", (4, 4))
    messages = with_images([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]},
                            {"role": "assistant", "content": "a"}], [im])
    encoded = encode_messages(messages)
    assert encoded[0]["content"][0]["type"] == "image_url" and encoded[1]["content"] == "a"
    with pytest.raises(ValueError, match="more image placeholders"):
        with_images(messages[:1] * 2, [im])
    with pytest.raises(ValueError, match="left over"):
        with_images(messages[:1], [im, im])


# ---------------------------------------------------------------------- RemoteReasoner, fake server


def test_generate_keeps_order_under_concurrency() -> None:
    # Early requests answer slowest, so completion order is the reverse of submission order.
    with FakeServer(delay=lambda body: 0.2 - 0.015 * int(_echo(body)[0])) as server:
        reasoner = RemoteReasoner(server.base_url, "m", concurrency=4)
        out = reasoner.generate([_user(str(i)) for i in range(12)], Sampling())
    assert out == [[str(i)] for i in range(12)]
    assert server.max_in_flight == 4


def test_fewer_choices_than_n_are_filled_by_more_requests() -> None:
    with FakeServer([["a"], ["b", "c"], ["x"]]) as server:
        out = RemoteReasoner(server.base_url, "m").generate([_user("q")], Sampling(temperature=1.0, n=3))
    assert out == [["a", "b", "c"]]
    assert [r["n"] for r in server.requests] == [3, 2]


def test_two_step_parses_boxes_and_crops_on_the_client() -> None:
    image = Image.new("RGB", (200, 100), "white")
    # viscot: normalized to the 200x200 padded square; the image sits 50 px down.
    # Step 1 for both items, then step 2 for both (concurrency 1 keeps the script in order).
    with FakeServer(["[0.1, 0.3, 0.4, 0.6]", "no box here", "seven", "eight"]) as server:
        reasoner = RemoteReasoner(server.base_url, "m", concurrency=1)
        (hit,), (miss,) = reasoner.two_step([image, image], ["q1", "q2"], Sampling())
    assert hit.box is not None and hit.box.as_list() == pytest.approx([20, 10, 80, 70])
    assert hit.crop.size == (60, 60) and hit.answer == "seven"
    assert miss.box is None and miss.crop.size == (200, 100) and miss.answer == "eight"
    step2 = server.requests[2]["messages"]
    assert [m["role"] for m in step2] == ["user", "assistant", "user"]
    assert step2[1]["content"] == [{"type": "text", "text": "[0.1, 0.3, 0.4, 0.6]"}]
    assert [p["type"] for p in step2[2]["content"]] == ["image_url"]


@pytest.mark.parametrize("kwargs, message", [
    ({"base_url": "127.0.0.1:8000"}, "must be an http"),
    ({"box_format": "yolo"}, "unknown box_format 'yolo'"),
    ({"concurrency": 0}, "concurrency must be >= 1"),
])
def test_bad_settings_are_config_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RemoteReasoner(**{"base_url": "http://x/v1", "model": "m", **kwargs})


# ---------------------------------------------------------------------- against a real `visrl serve`


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny test model with its weights jolted: a fresh random init answers every prompt
    with the same newlines, which would make "same outputs" vacuous."""
    import torch

    from visrl.models import load_model
    from visrl.tiny import build_tiny_model

    torch.set_num_threads(1)
    loaded = load_model(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", preset="test"), device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in loaded.model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    return loaded


@pytest.fixture(scope="module")
def served(tiny: Any) -> Iterator[str]:
    """`visrl serve`'s app over the tiny model, on a free loopback port; yields the base URL."""
    from visrl.serve import ServeConfig, create_app

    yield from _serving(create_app(tiny, ServeConfig(model_name_or_path="tiny", max_batch_size=4, batch_wait_ms=20)))


def _serving(app: Any) -> Iterator[str]:
    """Run ``app`` on a free loopback port until the generator is closed; yields the base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=10)


def _demo_items(n: int) -> tuple[list[Image.Image], list[str]]:
    """Non-square scenes with a coloured square each, and a question about it."""
    from PIL import ImageDraw

    images, questions = [], []
    for i in range(n):
        image = Image.new("RGB", (120 + 16 * i, 90), (240, 240, 240))
        colour = [(200, 30, 30), (30, 160, 40), (40, 60, 210), (220, 200, 20), (150, 40, 160)][i % 5]
        ImageDraw.Draw(image).rectangle((10 + 12 * i, 20, 40 + 12 * i, 50), fill=colour)
        images.append(image)
        questions.append(f"What colour is square number {i}?")
    return images, questions


def test_remote_two_step_matches_local_reasoner(tiny: Any, served: str) -> None:
    from visrl.reasoning import Reasoner

    images, questions = _demo_items(5)
    sampling = Sampling(max_new_tokens=12)
    local = Reasoner(tiny, batch_size=5).two_step(images, questions, sampling)
    with RemoteReasoner(served, "tiny", box_format=tiny.box_format, concurrency=3) as remote:
        got = remote.two_step(images, questions, sampling)
    assert [[r.box_text for r in rs] for rs in got] == [[r.box_text for r in rs] for rs in local]
    assert [[r.answer for r in rs] for rs in got] == [[r.answer for r in rs] for rs in local]
    assert [r[0].box for r in got] == [r[0].box for r in local]
    assert [r[0].crop.size for r in got] == [r[0].crop.size for r in local]
    assert len({r[0].box_text for r in got}) > 1  # the outputs differ by image: a real comparison
    assert all(r[0].answer for r in got)


def test_remote_direct_n_and_stream_against_serve(tiny: Any, served: str) -> None:
    from visrl.reasoning import Reasoner

    images, questions = _demo_items(2)
    sampling = Sampling(max_new_tokens=8)
    with RemoteReasoner(served, "tiny", box_format=tiny.box_format) as remote:
        assert remote.direct(images, questions, sampling) == Reasoner(tiny).direct(images, questions, sampling)
        sampled = remote.propose_boxes(images[:1], questions[:1], Sampling(temperature=1.5, max_new_tokens=8, n=3))
        assert len(sampled) == 1 and len(sampled[0]) == 3 and len(set(sampled[0])) > 1
        events = list(remote.stream_two_step(images[0], questions[0], sampling))
    local = Reasoner(tiny).two_step(images[:1], questions[:1], sampling)[0][0]
    assert [e["kind"] for e in events] == ["box", "answer"]
    assert events[0]["box_text"] == local.box_text and events[-1]["answer"] == local.answer


def test_wrong_model_name_against_serve_is_a_clear_error(served: str) -> None:
    with pytest.raises(RemoteError, match=r"HTTP 404: the model 'nope' does not exist; this server serves 'tiny'"):
        chat_completion(served, "nope", _user("hi"))


def test_judges_use_chat_completion(served: str) -> None:
    """The judge-model plumbing goes through chat_completion (one attempt per judge retry)."""
    from visrl.judges import _chat_completion

    text = _chat_completion()(served, "tiny", _user("score?", Image.new("RGB", (28, 28))), temperature=0.0,
                              max_tokens=4)
    assert isinstance(text, str)


# ---------------------------------------------------------------------- API keys, against `visrl serve --api-key`

SERVE_KEY = "visrl-test-key-5f2a"


@pytest.fixture(scope="module")
def served_with_key(tiny: Any) -> Iterator[str]:
    """`visrl serve` started with an API key (as VISRL_API_KEY / --api-key do)."""
    from visrl.serve import ServeConfig, create_app

    yield from _serving(create_app(tiny, ServeConfig(model_name_or_path="tiny", api_key=SERVE_KEY)))


def test_api_key_env_must_name_a_set_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from visrl.remote import api_key_from_env

    assert api_key_from_env(None) is None
    monkeypatch.delenv("VISRL_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match="api_key_env names the environment variable VISRL_TEST_KEY, which is not set"):
        api_key_from_env("VISRL_TEST_KEY")
    with pytest.raises(ConfigError) as info:  # the key pasted in place of a name
        api_key_from_env("sk-live-1234", "judge_api_key_env")
    assert "judge_api_key_env must be the NAME" in str(info.value) and "sk-live" not in str(info.value)


def test_remote_backend_sends_the_key_named_by_api_key_env(
        served_with_key: str, workspace: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from visrl.config import to_dict
    from visrl.evaluate import EvalConfig
    from visrl.policy import load_reasoner

    cfg = EvalConfig(backend="remote", base_url=served_with_key, remote_model="tiny", dataset="d",
                     api_key_env="VISRL_TEST_KEY")
    sampling = Sampling(max_new_tokens=3)
    monkeypatch.delenv("VISRL_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match="VISRL_TEST_KEY, which is not set"):
        load_reasoner(workspace, cfg)
    with RemoteReasoner(served_with_key, "tiny") as no_key, pytest.raises(RemoteRefused, match="HTTP 401.*no key was sent"):
        no_key.generate([_user("hi")], sampling)
    monkeypatch.setenv("VISRL_TEST_KEY", "wrong")
    with load_reasoner(workspace, cfg) as wrong, pytest.raises(RemoteRefused, match="HTTP 401.*a key was sent"):
        wrong.generate([_user("hi")], sampling)
    monkeypatch.setenv("VISRL_TEST_KEY", SERVE_KEY)
    with load_reasoner(workspace, cfg) as keyed:
        [[text]] = keyed.generate([_user("hi")], sampling)
    assert isinstance(text, str)
    assert SERVE_KEY not in json.dumps(to_dict(cfg))  # what a job stores names the variable only


def test_model_judges_send_the_key_named_by_judge_api_key_env(
        served_with_key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from visrl.generate import GenerateConfig
    from visrl.judges import JudgeInput, make_judges

    waits: list[float] = []
    monkeypatch.setattr("visrl.judges.time.sleep", waits.append)
    cfg = GenerateConfig(model_name_or_path="m", dataset="d", answer_judge="model", crop_judge="none",
                         judge_base_url=served_with_key, judge_model="tiny", judge_api_key_env="VISRL_TEST_JUDGE_KEY")
    monkeypatch.delenv("VISRL_TEST_JUDGE_KEY", raising=False)
    with pytest.raises(ConfigError, match="judge_api_key_env names the environment variable VISRL_TEST_JUDGE_KEY"):
        cfg.judge_options()
    inp = JudgeInput(question="what?", references=["red"], answer="red", image=Image.new("RGB", (28, 28)))
    monkeypatch.setenv("VISRL_TEST_JUDGE_KEY", "wrong")
    judge, _ = make_judges(cfg.answer_judge, cfg.crop_judge, cfg.judge_options())
    with pytest.raises(RemoteRefused, match="judge model 'tiny'.*HTTP 401"):
        judge(inp)
    assert waits == []  # a refused key is not retried
    monkeypatch.setenv("VISRL_TEST_JUDGE_KEY", SERVE_KEY)
    judge, _ = make_judges(cfg.answer_judge, cfg.crop_judge, cfg.judge_options())
    judge(inp)  # answered (whatever the tiny model's reply scores): no 401, no retry
    assert waits == []


def test_remote_policy_takes_the_served_checkpoints_contract(tiny: Any, served: str, tmp_path: Path) -> None:
    """`visrl serve` publishes its checkpoint's contract; the remote policy parses and crops by it
    (a config key still overrides a field); a server that publishes none leaves the config's."""
    from visrl.policy import PolicyConfig, load_reasoner
    from visrl.remote import served_contract
    from visrl.workspace import Workspace

    ws = Workspace.open(tmp_path / "ws")
    assert served_contract(served, "tiny") == tiny.contract.to_dict()
    assert served_contract(served, "nope") is None and served_contract("http://127.0.0.1:9/v1", "tiny") is None
    cfg = {"backend": "remote", "base_url": served, "remote_model": "tiny", "dataset": "d"}
    with load_reasoner(ws, PolicyConfig(**cfg)) as remote:
        assert remote.contract == tiny.contract
    with load_reasoner(ws, PolicyConfig(**cfg, crop_margin=0.3)) as remote:
        assert remote.contract == tiny.contract.override(crop_margin=0.3)


def test_served_contract_behind_an_api_key(tiny: Any, served_with_key: str) -> None:
    from visrl.remote import served_contract

    assert served_contract(served_with_key, "tiny") is None  # 401 without the key: the config's contract
    assert served_contract(served_with_key, "tiny", api_key=SERVE_KEY) == tiny.contract.to_dict()
