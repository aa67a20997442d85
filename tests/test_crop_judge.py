"""visrl.crop_judge: a local model asked whether a crop shows the question's object."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import load_script
from PIL import Image

from visrl.boxes import Box, crop_box
from visrl.crop_judge import NAME_PROMPT, PolicyCropJudge, check_prompt, object_phrase, p_yes
from visrl.errors import ConfigError
from visrl.judges import JudgeInput, JudgeOptions, make_judges

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "data" / "demo-model"
RED, BLUE = (215, 40, 40), (45, 85, 215)


@pytest.mark.parametrize(("question", "phrase", "prompt"), [
    ("What pattern is on the red circle?", "red circle", NAME_PROMPT),
    ("What is the pattern inside the Green Square?", "green square", None),
    ("How many people are there?", None,
     "Does this image show what this question asks about: How many people are there? Answer yes or no."),
])
def test_object_phrase_and_check_prompt(question: str, phrase: str | None, prompt: str | None) -> None:
    assert object_phrase(question) == phrase
    if prompt is not None:
        assert check_prompt(question) == prompt


def test_p_yes_is_a_logistic_of_the_logit_difference() -> None:
    assert p_yes(0.0, 0.0) == 0.5
    assert p_yes(2.0, 0.0) == pytest.approx(0.8808, abs=1e-4)
    assert p_yes(-1e9, 1e9) == pytest.approx(0.0) and p_yes(1e9, -1e9) == pytest.approx(1.0)


def test_make_judges_builds_the_policy_judge_and_checks_its_folder(tmp_path: Path) -> None:
    answer, crop = make_judges("exact", "policy", JudgeOptions(model=str(SHIPPED)))
    assert isinstance(crop, PolicyCropJudge) and crop.needs_image and answer.key == "answer:exact"
    assert crop.key.startswith("crop:policy:demo-model:")
    with pytest.raises(ConfigError, match="needs judge_model"):
        make_judges("exact", "policy", JudgeOptions())
    with pytest.raises(ConfigError, match="is not a folder"):
        make_judges("exact", "policy", JudgeOptions(model=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="answer judge cannot be 'model'"):
        make_judges("model", "policy", JudgeOptions(model=str(SHIPPED), base_url="http://x"))


class ColourScriptedJudge(PolicyCropJudge):
    """The real judge and the real tiny Qwen3-VL and processor, whose forward pass alone is
    scripted from the image it is given: when it is mostly red, every row's logit of the token
    that follows in the input is +10 (the reply is what the model would say), else -10; and the
    last row's logit of "yes" is +3, else -3. Everything else (prompts, chat template,
    processor, token ids, the score) is the production path."""

    def _load(self) -> Any:
        if self._loaded is None:
            from dataclasses import replace

            from visrl.models import load_model

            loaded = load_model(self.model_path, dtype="float32", device="cpu")
            scripted = scripted_class(type(loaded.model), loaded.processor.tokenizer)
            self._loaded = replace(loaded, model=scripted.from_pretrained(self.model_path).eval())
        return self._loaded


def scripted_class(base: type, tokenizer: Any) -> type:
    """A subclass of the real model class whose forward alone is scripted (see above)."""
    from visrl.crop_judge import answer_token_ids

    yes_id, _ = answer_token_ids(tokenizer)
    sure = 10.0

    class Scripted(base):  # type: ignore[misc, valid-type]
        prompts: list[str] = []

        def forward(self, input_ids: Any = None, pixel_values: Any = None, **kwargs: Any) -> Any:
            from types import SimpleNamespace

            import torch

            Scripted.prompts.append(tokenizer.decode(input_ids[0]))
            # pixel_values: (patches, 3 x 2 x 16 x 16), channels first, normalised to [-1, 1].
            channels = pixel_values.reshape(pixel_values.shape[0], 3, -1).mean(dim=(0, 2))
            red = bool(channels[0] > channels[1] + 0.3 and channels[0] > channels[2] + 0.3)
            length = input_ids.shape[1]
            logits = torch.zeros(1, length, self.config.text_config.vocab_size)
            logits[0, torch.arange(length - 1), input_ids[0, 1:]] = sure if red else -sure
            logits[0, -1, yes_id] = 3.0 if red else -3.0
            return SimpleNamespace(logits=logits)

    return Scripted


def scene(colour: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (448, 336), (236, 236, 236))
    image.paste(Image.new("RGB", (90, 90), colour), (40, 40))
    image.paste(Image.new("RGB", (90, 90), BLUE if colour == RED else RED), (300, 200))
    return image


@pytest.mark.slow
def test_policy_judge_scores_a_crop_that_shows_the_object_above_one_that_does_not() -> None:
    import torch

    torch.set_num_threads(1)
    judge = ColourScriptedJudge(str(SHIPPED))
    image = scene(RED)
    question = "What pattern is on the red circle?"
    shows = JudgeInput(question, ["vertical"], "vertical", box=Box(38, 38, 132, 132), image=image,
                       crop=crop_box(image, Box(38, 38, 132, 132)))
    misses = JudgeInput(question, ["vertical"], "vertical", box=Box(298, 198, 392, 292), image=image,
                        crop=crop_box(image, Box(298, 198, 392, 292)))
    good, bad = judge(shows), judge(misses)
    vocab = judge._loaded.model.config.text_config.vocab_size
    # Each reply token: softmax of +10 against vocab - 1 zeros (or of -10); the geometric mean.
    assert good.score == pytest.approx(math.exp(10) / (math.exp(10) + vocab - 1), abs=1e-4)
    assert bad.score == pytest.approx(math.exp(-10) / (math.exp(-10) + vocab - 1), abs=1e-6)
    assert good.score > 0.95 and bad.score < 1e-3 and "'red circle'" in good.detail
    recorded = type(judge._loaded.model).prompts
    assert recorded[-1].endswith(f"{NAME_PROMPT}<|im_end|>\n<|im_start|>assistant\nred circle")
    assert recorded[-1].count("<|image_pad|>") >= 4  # the crop (alone) went in as the image
    # A question that names no object is put whole, as yes/no: P(yes) = 1 / (1 + e^-3) on red.
    whole = judge(JudgeInput("How many people are there?", ["2"], "2", image=image, crop=shows.crop))
    assert whole.score == pytest.approx(0.9526, abs=1e-4) and "Answer yes or no." in recorded[-1]
    # The annotated box is not read: the same rollout with a different (or no) gt box scores the same.
    assert judge(JudgeInput(**{**shows.__dict__, "gt_box": Box(300, 200, 390, 290)})).score == good.score
    # A failed rollout (no crop) scores 0 without touching the model.
    assert judge(JudgeInput(question, ["vertical"], None)).score == 0.0


def bench() -> Any:
    return load_script("bench/learning.py", "learning_bench")


@pytest.mark.slow
def test_policy_crop_judge_generate_reads_no_annotated_box(tmp_path: Path) -> None:
    """generate with the policy crop judge, run twice from the same seed, on a workspace with the
    train items' boxes and on one without: the same rollouts, the same scores."""
    import torch

    torch.set_num_threads(1)
    learning = bench()
    from visrl.config import load_config
    from visrl.demo import GENERATE_CONFIG, create_demo_workspace
    from visrl.generate import GenerateConfig, run_generate
    from visrl.store import Store

    data = {"n_train": 3, "n_val": 0, "n_test": 0}
    boxed = create_demo_workspace(tmp_path / "boxed", n_pairs_items=0, progress=lambda _: None, data=data)
    shutil.copytree(boxed, tmp_path / "unboxed")
    unboxed = tmp_path / "unboxed"
    withheld = learning.strip_boxes(unboxed, "train")
    assert len(withheld) == 3 and all(i["gt_box"] is None for i in Store.open(unboxed).items("demo", "train"))
    cfg = load_config(GenerateConfig, GENERATE_CONFIG, {
        "model_name_or_path": "models/tiny-demo", "adapter_name_or_path": None, "limit": 2, "attempts": 3,
        "crop_judge": "policy", "judge_model": "models/tiny-demo", "min_parse_rate": 0.0, "seed": 0})
    scores = []
    for ws in (boxed, unboxed):
        torch.manual_seed(0)
        run_generate(ws, cfg)
        rows = Store.open(ws).rollouts()
        scores.append({(r["item_id"], r["attempt"], r["kind"]): (r["box_text"], r["crop_score"], r["answer_score"])
                       for r in rows})
    assert len(scores[0]) == 12 and scores[0] == scores[1]
    judged = [s[1] for s in scores[0].values() if s[1] is not None]
    assert len(judged) >= 6 and all(0.0 <= v <= 1.0 for v in judged)  # the model judge did score them
