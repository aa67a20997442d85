"""A crop judge that is a model: a local VLM asked what the crop shows.

VisRL's point is that the reinforcement stage needs no region annotations: a rollout's crop is
judged by a model, not by IoU with an annotated box. :class:`PolicyCropJudge` (``crop_judge:
policy`` in a generate config) shows a local model the crop alone. ``judge_model`` names the
model folder (usually the policy's own SFT warm-up, as in the paper's self-evolution; or a
separate small judge). The judge reads the question and the crop, never the item's annotated box.

When the question names an object at its end (:func:`object_phrase`: "What pattern is on the red
circle?" -> "red circle"), the model is asked :data:`NAME_PROMPT` ("Which object does this image
show?") and the score is the probability it gives that phrase as its reply (teacher-forced; the
geometric mean over the phrase's tokens, so a 1- and a 3-token name are on the same scale).
Naming what a crop shows is a direct reading of it, like the answer step's, which a small model
learns in a few hundred steps; a yes/no "does it show the red circle?" asks it to compare a word
with the pixels first (measured on the demo model: a yes/no check stayed at chance, 0.48 on 50
val crops, after 300 steps of 16 rows with a 20% share of check rows). A question without such a
phrase is put whole as a yes/no check (:data:`WHOLE_QUESTION_PROMPT`), scored P(yes) / (P(yes) +
P(no)) of the reply's first token. Scores are in [0, 1], for the method's 0.8 / 0.2 thresholds.
The model must have learned the reply: the demo recipe (``scripts/train_demo_model.py``,
``check_fraction``) trains it on crops of annotated boxes.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visrl.errors import ConfigError
from visrl.judgement import Judge, JudgeInput, Judgement

# Worded for any data (a real photo's "sign" or "car" as well as the demo's "red circle"): the
# judge model learns the reply's form from its training rows, not from this sentence.
NAME_PROMPT = "Which object does this image show? Answer with its name, or nothing."
WHOLE_QUESTION_PROMPT = "Does this image show what this question asks about: {question} Answer yes or no."
YES, NO = "yes", "no"
NOTHING = "nothing"  # the name of a crop that shows no object
# "... on the red circle?" / "... inside the green square?": up to 3 words after the last "the".
_OBJECT = re.compile(r"\bthe\s+((?:[\w-]+\s+){0,2}[\w-]+)\s*[?.!]?\s*$", re.I)


def object_phrase(question: str) -> str | None:
    """The object a question names at its end ("red circle"), or None when it names none."""
    match = _OBJECT.search(question.strip())
    return match.group(1).lower() if match else None


def check_prompt(question: str) -> str:
    """What the judge asks about a crop for ``question``: name the object, or (no object
    phrase) the yes/no check of the whole question."""
    if object_phrase(question) is None:
        return WHOLE_QUESTION_PROMPT.format(question=question.strip())
    return NAME_PROMPT


def check_messages(question: str) -> list[dict[str, Any]]:
    """The judge's conversation: the crop (one image) and :func:`check_prompt`."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": check_prompt(question)}]}]


@dataclass
class PolicyCropJudge(Judge):
    """``crop_judge: policy``: a local VLM's probability that the crop shows the question's object
    (module doc). ``model_path`` (and optional ``adapter``) is loaded on the first call, once;
    calls from the generate step's judge threads share it under a lock."""

    model_path: str
    adapter: str | None = None
    _loaded: Any = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    needs_image = True  # the generate step loads the item image and crops it for this judge

    def __post_init__(self) -> None:
        if not Path(self.model_path).is_dir():
            raise ConfigError(f"crop_judge: policy needs judge_model to be a local model folder; "
                              f"{self.model_path!r} is not a folder")

    @property
    def key(self) -> str:
        # The weights (content fingerprints, every shard) and the prompts identify the judge: a
        # retrained model in the same folder must not inherit the old one's cached judgements,
        # and a copy of the same weights elsewhere may.
        from visrl.fingerprint import folder_fingerprint

        weights = [(folder_fingerprint(p) or {}).get("sha256") for p in (self.model_path, self.adapter) if p]
        digest = hashlib.sha1(f"{weights}|{NAME_PROMPT}|{WHOLE_QUESTION_PROMPT}".encode()).hexdigest()[:8]
        return f"crop:policy:{Path(self.model_path).name}:{digest}"

    def __call__(self, inp: JudgeInput) -> Judgement | None:
        if inp.crop is None:
            return Judgement(0.0, "failed rollout: no crop to judge")
        phrase = object_phrase(inp.question)
        if phrase is not None:
            score = self.reply_probability(inp.crop, inp.question, phrase)
            return Judgement(round(score, 4), f"P({phrase!r} | crop, {NAME_PROMPT!r}) = {score:.3f}")
        with self._lock:
            tokenizer = self._load().processor.tokenizer
        yes_id, no_id = answer_token_ids(tokenizer)
        logits = self.reply_logits(inp.crop, inp.question, "")[-1]
        score = p_yes(float(logits[yes_id]), float(logits[no_id]))
        return Judgement(round(score, 4), f"P(yes) = {score:.3f} to {check_prompt(inp.question)!r}")

    def reply_probability(self, crop: Any, question: str, reply: str) -> float:
        """The geometric mean of the model's probabilities of ``reply``'s tokens as its answer."""
        import torch

        logits = self.reply_logits(crop, question, reply)
        with self._lock:
            tokenizer = self._load().processor.tokenizer
        ids = tokenizer.encode(reply, add_special_tokens=False)
        # The last len(ids) + 1 rows predict the reply's tokens (the prompt's last row the first).
        logp = torch.log_softmax(logits[-len(ids) - 1:-1].float(), dim=-1)
        return float(torch.exp(logp[torch.arange(len(ids)), torch.tensor(ids)].mean()))

    def reply_logits(self, crop: Any, question: str, reply: str) -> Any:
        """Next-token logits (rows = input positions) of the judge prompt on ``crop`` followed by
        ``reply`` (teacher-forced)."""
        import torch

        with self._lock:
            loaded = self._load()
            processor, model = loaded.processor, loaded.model
            text = processor.apply_chat_template(check_messages(question), tokenize=False,
                                                 add_generation_prompt=True) + reply
            enc = processor(text=[text], images=[crop.convert("RGB")], return_tensors="pt").to(loaded.device)
            if "pixel_values" in enc:
                enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
            with torch.inference_mode():
                return model(**enc).logits[0]

    def _load(self) -> Any:
        if self._loaded is None:
            from visrl.models import load_model

            self._loaded = load_model(self.model_path, adapter=self.adapter)
        return self._loaded


def answer_token_ids(tokenizer: Any) -> tuple[int, int]:
    """The first token of "yes" and of "no" (the reply's first step decides between them)."""
    yes, no = tokenizer.encode(YES, add_special_tokens=False), tokenizer.encode(NO, add_special_tokens=False)
    if not yes or not no or yes[0] == no[0]:
        raise ConfigError("the judge model's tokenizer cannot tell 'yes' from 'no' by the first token")
    return yes[0], no[0]


def p_yes(yes_logit: float, no_logit: float) -> float:
    """P(yes) renormalised over {yes, no}: a logistic of the logit difference."""
    import math

    diff = max(-60.0, min(60.0, yes_logit - no_logit))  # exp() of more overflows nothing useful
    return 1.0 / (1.0 + math.exp(-diff))


def make_policy_crop_judge(model: str | None, adapter: str | None = None) -> PolicyCropJudge:
    """The judge for ``crop_judge: policy``; ``model`` is the generate config's ``judge_model``."""
    if not model:
        raise ConfigError("crop_judge: policy needs judge_model: the local model folder that judges "
                          "crops (e.g. the SFT warm-up the policy starts from)")
    return PolicyCropJudge(model, adapter)
