"""Two-step reasoning with the tiny model: batched, sampled, streamed, parsed and cropped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from visrl.boxes import Box, format_box
from visrl.reasoning import Reasoner, Sampling, fit_pixels, split_images
from visrl.synthetic import SyntheticConfig, render_item


@pytest.fixture(scope="module")
def reasoner(tmp_path_factory: pytest.TempPathFactory) -> Reasoner:
    import torch

    from visrl.models import load_model
    from visrl.tiny import build_tiny_model

    torch.set_num_threads(1)
    loaded = load_model(build_tiny_model(tmp_path_factory.mktemp("r") / "tiny", preset="test"))
    # A random model may end at once; with end tokens suppressed every row decodes all its tokens,
    # so batched and one-by-one outputs can be compared token for token.
    tok = loaded.tokenizer
    blank = [i for i in range(len(tok)) if not tok.decode([i]).strip()]
    loaded.model.generation_config.suppress_tokens = sorted(set(tok.added_tokens_decoder) | set(blank))
    return Reasoner(loaded, batch_size=3)


@pytest.fixture(scope="module")
def scenes() -> list[Any]:
    cfg = SyntheticConfig()
    return [render_item(cfg, "test", i) for i in range(4)]


def test_batched_greedy_equals_one_at_a_time(reasoner: Reasoner, scenes: list[Any]) -> None:
    images, questions = [s.image for s in scenes], [s.question for s in scenes]
    greedy = Sampling(max_new_tokens=6)
    batched = reasoner.propose_boxes(images, questions, greedy)  # batches of 3 and 1, left-padded
    single = [reasoner.propose_boxes([im], [q], greedy)[0] for im, q in zip(images, questions, strict=True)]
    assert batched == single
    assert all(len(texts) == 1 and texts[0] for texts in batched)


def test_sampling_gives_n_texts_per_item(reasoner: Reasoner, scenes: list[Any]) -> None:
    import torch

    torch.manual_seed(0)
    texts = reasoner.propose_boxes([s.image for s in scenes[:2]], [s.question for s in scenes[:2]],
                                   Sampling(temperature=1.5, max_new_tokens=6, n=3))
    assert [len(t) for t in texts] == [3, 3]
    assert len(set(texts[0])) > 1  # samples, not copies
    greedy = reasoner.propose_boxes([scenes[0].image], [scenes[0].question], Sampling(max_new_tokens=6, n=3))
    assert len(greedy[0]) == 3 and len(set(greedy[0])) == 1


def test_two_step_parses_crops_and_answers(reasoner: Reasoner, scenes: list[Any],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    scene = scenes[0]
    target = scene.target_object.box
    text = format_box(target, "viscot", scene.size)
    real_generate = reasoner.generate
    seen: list[Any] = []

    def scripted(conversations: list, sampling: Sampling, progress: bool = False) -> list[list[str]]:
        seen.append(conversations)
        if len(conversations[0]) == 1:  # the box step: one user turn
            return [[text, "no box here"][: sampling.n] for _ in conversations]
        return real_generate(conversations, sampling, progress)

    monkeypatch.setattr(reasoner, "generate", scripted)
    [results] = reasoner.two_step([scene.image], [scene.question], Sampling(temperature=1.0, n=2, max_new_tokens=4))
    hit, miss = results
    assert hit.box is not None and abs(hit.box.x1 - target.x1) <= 1 and abs(hit.box.y2 - target.y2) <= 1
    assert abs(hit.crop.width - hit.box.width) <= 2 and abs(hit.crop.height - hit.box.height) <= 2
    assert isinstance(hit.answer, str) and hit.answer and set(hit.timings) == {"box_s", "answer_s"}
    assert miss.box is None and miss.crop.size == scene.image.size  # answered on the full image
    answer_conv = seen[1][0]
    assert [m["role"] for m in answer_conv] == ["user", "assistant", "user"]
    assert answer_conv[1]["content"][0]["text"] == text
    crop_part = answer_conv[2]["content"][0]
    assert crop_part["type"] == "image" and crop_part["image"].size == hit.crop.size


def test_stream_ends_with_the_greedy_answer(reasoner: Reasoner, scenes: list[Any]) -> None:
    scene = scenes[1]
    greedy = Sampling(max_new_tokens=5)
    events = list(reasoner.stream_two_step(scene.image, scene.question, greedy))
    assert events[0]["kind"] == "box" and events[0]["crop"] is not None
    answers = [e["answer"] for e in events[1:]]
    assert len(answers) >= 2 and all(a.startswith(answers[0]) for a in answers[1:])  # it grows
    [[result]] = reasoner.two_step([scene.image], [scene.question], greedy)
    assert (events[0]["box_text"], answers[-1]) == (result.box_text, result.answer)


def test_direct_answers_without_a_box(reasoner: Reasoner, scenes: list[Any]) -> None:
    out = reasoner.direct([s.image for s in scenes[:2]], [s.question for s in scenes[:2]], Sampling(max_new_tokens=3))
    assert [len(o) for o in out] == [1, 1]


@pytest.mark.parametrize(("size", "low", "high", "expected"), [
    ((448, 336), None, 12288, (128, 96)),      # shrunk to the budget, aspect kept
    ((64, 32), 8192, None, (128, 64)),         # a small crop enlarged
    ((100, 100), 100, 1_000_000, (100, 100)),  # inside the budget: untouched
])
def test_fit_pixels(size: tuple[int, int], low: int | None, high: int | None, expected: tuple[int, int]) -> None:
    assert fit_pixels(Image.new("RGB", size), low, high).size == expected


def test_crop_budget_shows_more_detail(reasoner: Reasoner, scenes: list[Any]) -> None:
    crop = Reasoner(reasoner.loaded, crop_min_pixels=112 * 112).prepare_crop(
        scenes[0].image.crop(Box(0, 0, 56, 28).as_list()))
    assert crop.size == (158, 79)


def test_qwen2_5_boxes_are_read_in_the_resized_frame(reasoner: Reasoner) -> None:
    image = Image.new("RGB", (448, 336))
    r = Reasoner(reasoner.loaded, box_format="qwen2_5")
    width, height = r.input_size(image)
    assert (width % 28, height % 28) == (0, 0) and width * height <= 112 * 112
    box = r.parse(f'{{"bbox_2d": [0, 0, {width // 2}, {height // 2}]}}', image)
    assert box is not None and abs(box.x2 - 224) < 1 and abs(box.y2 - 168) < 1


def test_split_images_keeps_order() -> None:
    a, b = Image.new("RGB", (2, 2)), Image.new("RGB", (3, 3))
    conv = [{"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "q"}]},
            {"role": "assistant", "content": "plain text"},
            {"role": "user", "content": [{"type": "image", "image": b}]}]
    bare, images = split_images(conv)
    assert images == [a, b] and bare[0]["content"][0] == {"type": "image"} and bare[1] == conv[1]


def test_models_path_is_shared(tmp_path: Path) -> None:
    # The remote backend is reachable from here, for code that picks a backend by config.
    import visrl.reasoning as reasoning

    assert reasoning.RemoteReasoner.__name__ == "RemoteReasoner"
