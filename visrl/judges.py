"""Judges: score one rollout in [0, 1]. Rule-based answer judges, IoU crop judges, judge models.

A judge takes a :class:`JudgeInput` (question, reference answer(s), the rollout's answer, box and
crop, the item's annotated box) and returns a :class:`Judgement` (score in [0, 1] and a detail
string), or ``None`` when it does not apply (an IoU judge on an item without an annotated box).
Judges never raise on odd model output: a judge model's reply with no parseable score is a
:class:`Judgement` whose ``score`` is None (the rollout is then dropped from pairing and counted,
as the VisRL seed does; never 0.0, which could make it a rejected side).
Network failures of judge models are retried (:data:`RETRIES` times) and then raise
:class:`visrl.errors.RemoteError`, because a silent 0 there would poison the preference pairs.

Answer judges (``answer_judge`` in the generate config):
``exact``   normalized exact match (lowercase, no punctuation/articles, number words -> digits);
``f1``      token F1 over normalized tokens (SQuAD);
``anls``    ANLS, 1 - normalized Levenshtein distance, 0 below ``anls_threshold`` (DocVQA: 0.5);
``number``  the first number of the answer equals the reference within ``number_rel_tol``;
``auto``    numeric reference -> ``number``; up to 3 words -> max(exact, anls); else max(exact, f1);
``model``   a judge model behind an OpenAI-compatible endpoint, :data:`ANSWER_PROMPT`.
Crop judges (``crop_judge``): ``iou`` (IoU with the annotated box), ``iou_threshold`` (1 when that
IoU >= ``iou_threshold``, else 0), ``model`` (:data:`CROP_PROMPT`, sees the image and the crop),
``policy`` (a local model folder, ``judge_model``, scored by how likely it names the question's
object when shown the crop: :mod:`visrl.crop_judge`; reads no annotated box), ``none``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import re
import string
import time
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from visrl.boxes import iou
from visrl.errors import ConfigError, RemoteError, RemoteRefused
from visrl.judgement import Judge, JudgeInput, Judgement  # noqa: F401  (re-exported: they lived here)
from visrl.vocabulary import ANSWER_JUDGES, CROP_JUDGES  # noqa: F401  (re-exported)

RETRIES = 3  # attempts per judge-model call; waits 0.5 s, 1 s between them

ANSWER_PROMPT = (
    "You are grading an answer to a question about the image.\n"
    "Question: {question}\nReference answer: {reference}\nCandidate answer: {answer}\n"
    "Does the candidate answer give the same answer as the reference? Judge the meaning, not the "
    "wording. Reply with JSON only: {{\"score\": S}}, where S is a number from 0 (wrong) to 1 "
    "(fully correct)."
)
CROP_PROMPT = (
    "The first image is a picture; the second image is a region cropped from it.\n"
    "Question: {question}\nReference answer: {reference}\n"
    "Does the cropped region contain the visual evidence needed to answer the question with the "
    "reference answer? Reply with JSON only: {{\"score\": S}}, where S is a number from 0 (the "
    "evidence is not in the crop) to 1 (all of the evidence is clearly visible in the crop)."
)


@dataclass
class JudgeOptions:
    """Options of every judge; the generate config carries them as flat keys."""

    anls_threshold: float = 0.5
    number_rel_tol: float = 0.05
    iou_threshold: float = 0.5
    base_url: str | None = None
    model: str | None = None
    max_tokens: int = 64
    api_key: str | None = field(default=None, repr=False)  # read from the env var the config names
    chat: Any = field(default=None, repr=False)  # chat_completion stand-in, for tests


# ---------------------------------------------------------------------- text normalization

_NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14,
    "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20,
    "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90,
    "hundred": 100, "thousand": 1000,
}
_ARTICLES = {"a", "an", "the"}
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d+|\.\d+|\d+)")
# Punctuation except a '.' between two digits (a decimal point must survive normalization).
_PUNCT = re.compile(r"(?<!\d)\.|\.(?!\d)|[" + re.escape(string.punctuation.replace(".", "")) + "]")


def normalize(text: str | None) -> str:
    """Lowercase, thousands commas and punctuation dropped, articles dropped, number words ->
    digits, whitespace collapsed: ``"The Seven."`` -> ``"7"``."""
    if not text:
        return ""
    text = _THOUSANDS_COMMA.sub("", text.lower())
    text = _PUNCT.sub(" ", text)
    words = [str(_NUMBER_WORDS.get(w, w)) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def exact_match(answer: str | None, reference: str) -> float:
    return 1.0 if normalize(answer) == normalize(reference) and normalize(reference) else 0.0


def token_f1(answer: str | None, reference: str) -> float:
    pred, ref = normalize(answer).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum(min(pred.count(t), ref.count(t)) for t in set(pred) & set(ref))
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions), O(len(a) * len(b))."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(answer: str | None, reference: str, threshold: float = 0.5) -> float:
    """DocVQA's ANLS for one reference: lowercased, whitespace-collapsed strings."""
    pred = " ".join((answer or "").lower().split())
    ref = " ".join(reference.lower().split())
    if not pred and not ref:
        return 1.0
    distance = levenshtein(pred, ref) / max(len(pred), len(ref))
    return 1.0 - distance if distance < threshold else 0.0


def first_number(text: str | None) -> float | None:
    match = _NUMBER.search(normalize(text))
    return float(match.group()) if match else None


def is_number(text: str) -> bool:
    return bool(_NUMBER.fullmatch(normalize(text)))


def number_match(answer: str | None, reference: str, rel_tol: float = 0.05) -> float:
    """1 when the answer's first number is within ``rel_tol`` (relative) of the reference's."""
    pred, ref = first_number(answer), first_number(reference)
    if pred is None or ref is None:
        return 0.0
    if ref == 0:
        return float(pred == 0)
    return 1.0 if abs(pred - ref) <= rel_tol * abs(ref) else 0.0


def auto_score(answer: str | None, reference: str, opts: JudgeOptions) -> float:
    if is_number(reference):
        return number_match(answer, reference, opts.number_rel_tol)
    if len(normalize(reference).split()) <= 3:
        return max(exact_match(answer, reference), anls(answer, reference, opts.anls_threshold))
    return max(exact_match(answer, reference), token_f1(answer, reference))


# ---------------------------------------------------------------------- judges

@dataclass
class RuleAnswerJudge(Judge):
    """A rule-based answer judge: the best score over the reference alternatives."""

    name: str
    opts: JudgeOptions
    needs_image = False  # text against text

    @property
    def key(self) -> str:
        extra = {"anls": f"@{self.opts.anls_threshold}", "number": f"@{self.opts.number_rel_tol}",
                 "auto": f"@{self.opts.anls_threshold},{self.opts.number_rel_tol}"}
        return f"answer:{self.name}{extra.get(self.name, '')}"

    def __call__(self, inp: JudgeInput) -> Judgement | None:
        if inp.answer is None:
            return Judgement(0.0, "no answer (failed rollout)")
        score = max((self._one(inp.answer, ref) for ref in inp.references if ref), default=0.0)
        return Judgement(round(score, 4))

    def _one(self, answer: str, reference: str) -> float:
        if self.name == "exact":
            return exact_match(answer, reference)
        if self.name == "f1":
            return token_f1(answer, reference)
        if self.name == "anls":
            return anls(answer, reference, self.opts.anls_threshold)
        if self.name == "number":
            return number_match(answer, reference, self.opts.number_rel_tol)
        return auto_score(answer, reference, self.opts)


@dataclass
class IoUCropJudge(Judge):
    """IoU of the rollout's box with the item's annotated box; None when there is none."""

    threshold: float | None = None  # set: 1 when IoU >= threshold, else 0
    needs_image = False  # boxes against boxes: the crop is never looked at

    @property
    def key(self) -> str:
        return "crop:iou" if self.threshold is None else f"crop:iou>={self.threshold}"

    def __call__(self, inp: JudgeInput) -> Judgement | None:
        if inp.gt_box is None:
            return None
        value = iou(inp.box, inp.gt_box)
        if self.threshold is None:
            return Judgement(round(value, 4), f"iou={value:.3f}")
        return Judgement(float(value >= self.threshold), f"iou={value:.3f}")


@dataclass
class ModelJudge(Judge):
    """A judge model behind an OpenAI-compatible endpoint (temperature 0), one of two prompts."""

    target: str  # "answer" or "crop"
    opts: JudgeOptions
    needs_image = True  # both prompts send the image; the crop prompt sends the crop too

    @property
    def key(self) -> str:
        # The model's name alone does not identify a judge: the same name behind another server,
        # or another prompt or reply budget, scores differently, so its cached judgements must
        # not carry over. The API key is no part of it (a new key, the same judge).
        prompt = ANSWER_PROMPT if self.target == "answer" else CROP_PROMPT
        settings = f"{(self.opts.base_url or '').rstrip('/')}|{self.opts.max_tokens}|{prompt}"
        return f"{self.target}:model:{self.opts.model}@{hashlib.sha1(settings.encode()).hexdigest()[:8]}"

    def __call__(self, inp: JudgeInput) -> Judgement | None:
        if self.target == "crop" and inp.crop is None or self.target == "answer" and inp.answer is None:
            return Judgement(0.0, "failed rollout: nothing to judge")
        reference = " / ".join(r for r in inp.references if r)
        if self.target == "answer":
            text = ANSWER_PROMPT.format(question=inp.question, reference=reference, answer=inp.answer)
            images = [inp.image]
        else:
            text = CROP_PROMPT.format(question=inp.question, reference=reference)
            images = [inp.image, inp.crop]
        content: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": image_data_url(im)}} for im in images if im is not None]
        content.append({"type": "text", "text": text})
        reply = self._call([{"role": "user", "content": content}])
        score, detail = parse_score(reply)
        return Judgement(score, detail)  # None when unscored: dropped downstream, never 0.0

    def _call(self, messages: list[dict[str, Any]]) -> str:
        chat = self.opts.chat or _chat_completion()
        key = {"api_key": self.opts.api_key} if self.opts.api_key else {}
        error: Exception | None = None
        for attempt in range(RETRIES):
            try:
                return reply_text(chat(self.opts.base_url, self.opts.model, messages,
                                       temperature=0.0, max_tokens=self.opts.max_tokens, **key))
            except RemoteRefused as exc:  # a wrong key or model name: asking again changes nothing
                raise RemoteRefused(f"judge model {self.opts.model!r}: {exc}") from None
            except (RemoteError, OSError, TimeoutError) as exc:  # transient: server busy or restarting
                error = exc
                time.sleep(0.5 * (attempt + 1))
        raise RemoteError(f"judge model {self.opts.model!r} at {self.opts.base_url} failed "
                          f"{RETRIES} times: {error}; check that the server is up")


def references(item: dict[str, Any]) -> list[str]:
    """The reference answer plus alternatives listed in the item's meta ``answers`` (VQAv2-style);
    ``item`` is an ``items`` row (``meta`` as JSON text) or a dict with ``meta`` already parsed."""
    meta = item.get("meta")
    meta = (json.loads(meta) if meta else {}) if isinstance(meta, str) else meta or {}
    extra = meta.get("answers") if isinstance(meta, dict) else None
    refs = [item.get("answer") or ""] + [str(a) for a in extra or [] if a]
    return list(dict.fromkeys(refs))


def model_judge_key(env_name: str | None, *judges: str) -> str | None:
    """The judge server's API key, read from environment variable ``env_name`` (the config's
    ``judge_api_key_env``) only when one of ``judges`` is a model judge; else None."""
    if "model" not in judges:
        return None
    from visrl.remote import api_key_from_env

    return api_key_from_env(env_name, "judge_api_key_env")


def make_judges(answer_judge: str, crop_judge: str, opts: JudgeOptions) -> tuple[Judge, Judge | None]:
    """The answer judge and the crop judge (None for ``none``) the config names."""
    if answer_judge not in ANSWER_JUDGES:
        raise ConfigError(f"unknown answer_judge {answer_judge!r}; use one of {', '.join(ANSWER_JUDGES)}")
    if crop_judge not in CROP_JUDGES:
        raise ConfigError(f"unknown crop_judge {crop_judge!r}; use one of {', '.join(CROP_JUDGES)}")
    if crop_judge == "policy":  # a local model folder (judge_model): no server needed
        from visrl.crop_judge import make_policy_crop_judge

        if answer_judge == "model":
            raise ConfigError("crop_judge: policy reads judge_model as a local model folder, so the "
                              "answer judge cannot be 'model' too; use a rule-based answer_judge")
        return RuleAnswerJudge(answer_judge, opts), make_policy_crop_judge(opts.model)
    if "model" in (answer_judge, crop_judge) and not (opts.base_url and opts.model):
        raise ConfigError("a 'model' judge needs judge_base_url and judge_model (an OpenAI-compatible "
                          "server, e.g. `visrl serve` or vLLM)")
    answer: Judge = ModelJudge("answer", opts) if answer_judge == "model" else RuleAnswerJudge(answer_judge, opts)
    crop: Judge | None = {
        "none": None, "iou": IoUCropJudge(), "iou_threshold": IoUCropJudge(opts.iou_threshold),
        "model": ModelJudge("crop", opts) if crop_judge == "model" else None,
    }[crop_judge]
    return answer, crop


# ---------------------------------------------------------------------- judge-model plumbing

_SCORE_KEY = re.compile(r"score\W{0,3}\s*[:=]?\s*\"?([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)", re.I)
_JSON_OBJECT = re.compile(r"\{[^{}]*\}", re.S)
_LONE_NUMBER = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+))\s*$")


def parse_score(reply: str | None) -> tuple[float | None, str]:
    """The score in a judge model's reply, clamped to [0, 1], and a detail string.

    Accepts ``{"score": x}`` anywhere (code fences, words around it), ``score: x`` and a reply
    that is a lone number. Returns (None, why) when nothing usable is there.
    """
    text = reply or ""
    for blob in _JSON_OBJECT.findall(text):
        try:
            value = json.loads(blob).get("score")
        except (ValueError, AttributeError):
            continue
        if isinstance(value, int | float | str):
            score = _clamp(value)
            if score is not None:
                return score, _detail(text)
    match = _SCORE_KEY.search(text) or _LONE_NUMBER.match(text)
    if match:
        score = _clamp(match.group(1))
        if score is not None:
            return score, _detail(text)
    return None, f"no score in reply: {_detail(text) or '(empty)'}"


def _clamp(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number):
        return None
    return min(1.0, max(0.0, number))


def _detail(text: str) -> str:
    return " ".join(text.split())[:200]


def reply_text(reply: Any) -> str:
    """The assistant text of a chat completion given as text, an OpenAI-style dict or object."""
    if isinstance(reply, str):
        return reply
    if isinstance(reply, dict):
        try:
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            return ""
    try:
        return reply.choices[0].message.content or ""
    except (AttributeError, IndexError):
        return ""


def image_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _chat_completion() -> Any:
    """The HTTP call: one attempt of :func:`visrl.remote.chat_completion` (retries are ours)."""
    from visrl.remote import chat_completion

    def one_attempt(base_url: str, model: str, messages: list[dict[str, Any]], **kw: Any) -> str:
        texts = chat_completion(base_url, model, messages, retries=1, timeout=120, **kw)
        return texts[0] if texts else ""

    return one_attempt
