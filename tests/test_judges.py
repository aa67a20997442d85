from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from PIL import Image

from visrl.boxes import Box
from visrl.errors import ConfigError, RemoteError
from visrl.judges import (
    IoUCropJudge,
    JudgeInput,
    JudgeOptions,
    ModelJudge,
    RuleAnswerJudge,
    anls,
    auto_score,
    exact_match,
    make_judges,
    normalize,
    number_match,
    parse_score,
    token_f1,
)


@pytest.mark.parametrize("text, expected", [
    ("The Seven.", "7"),
    ("  a  Red   circle! ", "red circle"),
    ("1,000 apples", "1000 apples"),
    ("3.5 m.", "3.5 m"),
    ("twenty", "20"),
    (None, ""),
])
def test_normalize(text: str | None, expected: str) -> None:
    assert normalize(text) == expected


@pytest.mark.parametrize("answer, reference, expected", [
    ("Seven", "7", 1.0),
    ("the cat", "Cat.", 1.0),
    ("a dog", "cat", 0.0),
    ("", "", 0.0),  # an empty reference never matches
])
def test_exact_match(answer: str, reference: str, expected: float) -> None:
    assert exact_match(answer, reference) == expected


def test_token_f1() -> None:
    assert token_f1("red circle", "the red square") == pytest.approx(0.5)
    assert token_f1("blue", "red") == 0.0
    assert token_f1("Red Square", "red square") == 1.0


@pytest.mark.parametrize("answer, reference, expected", [
    ("hello", "hello", 1.0),
    ("Hello ", "hello", 1.0),
    ("hellp", "hello", 0.8),  # one edit in five characters
    ("abc", "xyz", 0.0),  # distance 1.0 >= 0.5: zero
    ("ab", "abcd", 0.0),  # distance exactly 0.5 is cut off too (DocVQA: < threshold)
])
def test_anls(answer: str, reference: str, expected: float) -> None:
    assert anls(answer, reference) == pytest.approx(expected)


@pytest.mark.parametrize("answer, reference, tol, expected", [
    ("The answer is 7.", "7", 0.0, 1.0),
    ("seven", "7", 0.0, 1.0),
    ("8", "7", 0.05, 0.0),
    ("102", "100", 0.05, 1.0),
    ("106", "100", 0.05, 0.0),
    ("no idea", "7", 0.05, 0.0),
    ("0", "0", 0.05, 1.0),
])
def test_number_match(answer: str, reference: str, tol: float, expected: float) -> None:
    assert number_match(answer, reference, tol) == expected


def test_auto_picks_by_reference() -> None:
    opts = JudgeOptions()
    assert auto_score("It is 7", "7", opts) == 1.0  # numeric: the first number counts
    assert auto_score("bluw", "blue", opts) == pytest.approx(0.75)  # short: ANLS forgives a typo
    assert auto_score("the man is riding a red bike", "a man riding a red bicycle", opts) == pytest.approx(
        token_f1("the man is riding a red bike", "a man riding a red bicycle"))


def test_rule_judge_uses_best_reference_and_fails_without_answer() -> None:
    judge = RuleAnswerJudge("exact", JudgeOptions())
    inp = JudgeInput("q?", ["cat", "kitten"], "Kitten")
    assert judge(inp).score == 1.0
    failed = judge(JudgeInput("q?", ["cat"], None))
    assert failed.score == 0.0 and "failed" in failed.detail
    assert RuleAnswerJudge("anls", JudgeOptions(anls_threshold=0.3)).key == "answer:anls@0.3"


def test_iou_judges() -> None:
    gt = Box(0, 0, 10, 10)
    inp = JudgeInput("q?", ["a"], "a", box=Box(0, 0, 10, 5), gt_box=gt)
    assert IoUCropJudge()(inp).score == pytest.approx(0.5)
    assert IoUCropJudge(0.6)(inp).score == 0.0
    assert IoUCropJudge(0.5)(inp).score == 1.0
    assert IoUCropJudge()(JudgeInput("q?", ["a"], "a", box=gt)) is None  # no annotated box


@pytest.mark.parametrize("reply, score", [
    ('{"score": 0.7}', 0.7),
    ('```json\n{"score": 1}\n```', 1.0),
    ('Sure! Here it is: {"reason": "matches", "score": "0.9"} hope that helps', 0.9),
    ("score: 0.25", 0.25),
    ("Score = 0.4 because ...", 0.4),
    ("0.6", 0.6),
    ('{"score": 7}', 1.0),  # out of range: clamped
    ('{"score": -2}', 0.0),
    ("The crop shows the object, I'd say 80 out of 100.", None),
    ("", None),
    (None, None),
    ('{"score": "high"}', None),
])
def test_parse_score(reply: str | None, score: float | None) -> None:
    value, detail = parse_score(reply)
    assert value == score
    if score is None:
        assert detail.startswith("no score in reply")


def test_make_judges_validates() -> None:
    with pytest.raises(ConfigError, match="unknown answer_judge 'exactly'"):
        make_judges("exactly", "iou", JudgeOptions())
    with pytest.raises(ConfigError, match="judge_base_url"):
        make_judges("model", "none", JudgeOptions())
    answer, crop = make_judges("auto", "none", JudgeOptions())
    assert crop is None and answer.key.startswith("answer:auto")


# ---------------------------------------------------------------------- judge model over HTTP

class FakeJudgeServer:
    """An OpenAI-compatible /chat/completions on 127.0.0.1 with scripted replies, and /models
    listing ``models`` (answered 401 unless the request carries ``api_key``, when one is set)."""

    def __init__(self, replies: list[Any] | Any, models: tuple[str, ...] = ("judge",),
                 api_key: str | None = None) -> None:
        self.replies = replies if callable(replies) else list(replies)  # str = assistant text; int = HTTP error status
        self.requests: list[dict[str, Any]] = []
        self.probes: list[str] = []  # the Authorization header of each GET /models ("" when none)
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                auth = self.headers.get("Authorization", "")
                server.probes.append(auth)
                if self.path != "/v1/models":
                    self.send_response(404)
                    self.end_headers()
                    return
                if api_key and auth != f"Bearer {api_key}":
                    self.send_response(401)
                    self.end_headers()
                    return
                data = json.dumps({"object": "list", "data": [{"id": m, "object": "model"} for m in models]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data.encode())

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    if callable(server.replies):  # a reply that depends on the request
                        reply = server.replies(body)
                    else:
                        reply = server.replies.pop(0) if server.replies else '{"score": 0.5}'
                if isinstance(reply, int):
                    self.send_response(reply)
                    self.end_headers()
                    return
                data = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                                   "choices": [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant", "content": reply}}]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data.encode())

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeJudgeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _model_input() -> JudgeInput:
    image = Image.new("RGB", (40, 30), "white")
    return JudgeInput("What digit?", ["7"], "7", box=Box(0, 0, 20, 15), image=image,
                      crop=image.crop((0, 0, 20, 15)))


def test_model_judges_over_loopback_with_retry() -> None:
    with FakeJudgeServer([503, '```json\n{"score": 0.9}\n```', "score: 0.3", "no idea"]) as server:
        opts = JudgeOptions(base_url=server.base_url, model="judge-1")
        answer, crop = make_judges("model", "model", opts)
        got = answer(_model_input())  # first request answered 503: retried
        assert got.score == 0.9
        assert crop(_model_input()).score == 0.3
        nothing = answer(_model_input())
        assert nothing.score is None and "no score" in nothing.detail  # unscored, never 0.0
        assert len(server.requests) == 4
        first = server.requests[1]
        assert first["model"] == "judge-1" and first["temperature"] == 0.0
        parts = first["messages"][0]["content"]
        assert [p["type"] for p in parts] == ["image_url", "text"]
        assert "Reference answer: 7" in parts[-1]["text"] and "Candidate answer: 7" in parts[-1]["text"]
        crop_parts = server.requests[2]["messages"][0]["content"]
        assert [p["type"] for p in crop_parts] == ["image_url", "image_url", "text"]
        assert crop_parts[0]["image_url"]["url"].startswith("data:image/png;base64,")


def test_model_judge_gives_up_with_remote_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("visrl.judges.time.sleep", lambda s: None)
    with FakeJudgeServer([500, 500, 500, 500]) as server:
        judge = ModelJudge("answer", JudgeOptions(base_url=server.base_url, model="j"))
        with pytest.raises(RemoteError, match="failed 3 times"):
            judge(_model_input())


def test_model_judge_skips_failed_rollouts() -> None:
    calls: list[Any] = []
    judge = ModelJudge("crop", JudgeOptions(base_url="http://x", model="j", chat=lambda *a, **k: calls.append(a)))
    got = judge(JudgeInput("q", ["a"], None))
    assert got.score == 0.0 and calls == []


@pytest.mark.parametrize("answer_judge, crop_judge, expected", [
    ("exact", "iou", (False, False)),
    ("auto", "iou_threshold", (False, False)),
    ("model", "model", (True, True)),  # both prompts send the image
    ("number", "none", (False, None)),
])
def test_each_judge_declares_whether_it_reads_pixels(answer_judge: str, crop_judge: str,
                                                     expected: tuple[bool, bool | None]) -> None:
    from visrl.judgement import Judge

    answer, crop = make_judges(answer_judge, crop_judge, JudgeOptions(base_url="http://x", model="m"))
    assert (answer.needs_image, None if crop is None else crop.needs_image) == expected
    assert isinstance(answer, Judge) and (crop is None or isinstance(crop, Judge))
