"""The shipped demo model (data/demo-model): it loads, and it scores what its card says."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "data" / "demo-model"


def recipe() -> Any:
    """scripts/train_demo_model.py as a module (its evaluate_model is the card's evaluation)."""
    return load_script("scripts/train_demo_model.py", "train_demo_model")


def load(path: Path) -> tuple[Any, Any]:
    """Through the project's loader when it knows Qwen3-VL, else the builder's own processor."""
    try:
        from visrl.models import load_model
    except ImportError:
        load_model = None
    if load_model is not None:
        loaded = load_model(str(path), dtype="float32", device="cpu")
        return loaded.model, loaded.processor
    from transformers import AutoModelForImageTextToText

    from visrl.tiny_qwen3 import load_processor

    return AutoModelForImageTextToText.from_pretrained(str(path)), load_processor(path)


def test_shipped_files_are_small_and_described() -> None:
    files = [p for p in MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    card = (MODEL / "MODEL_CARD.md").read_text(encoding="utf-8")
    for heading in ("Recipe", "Data", "Compute", "Evaluation"):
        assert f"## {heading}" in card
    report = json.loads((MODEL / "training_report.json").read_text(encoding="utf-8"))
    assert report["evaluation"]["split"] == "test" and report["evaluation"]["n"] >= 100


@pytest.mark.slow
def test_shipped_model_scores_its_card_on_50_test_items() -> None:
    import torch

    from visrl.synthetic import SyntheticConfig

    torch.set_num_threads(1)
    module = recipe()
    report = json.loads((MODEL / "training_report.json").read_text(encoding="utf-8"))
    card = report["evaluation"]
    model, processor = load(MODEL)
    data = SyntheticConfig(**report["config"]["data"])
    from visrl.contract import read_contract

    # The card's numbers were measured in the layout the model was trained in (its contract).
    question_first = read_contract(MODEL).prompt_layout == "question_first"
    got = module.evaluate_model(model, processor, data, "test", 50, question_first=question_first)
    # 50 of the card's test items: a proportion's standard error is <= 0.07 here; allow 3 of them,
    # plus the first 50 items being an easier or harder half of the card's set.
    for key in ("acc@0.5", "two_step_acc", "true_crop_acc", "direct_acc", "parse_rate"):
        assert abs(got[key] - card[key]) <= 0.2, (key, got[key], card[key])
    assert got["parse_rate"] >= 0.9
    assert got["true_crop_acc"] - got["direct_acc"] >= 0.15  # the answer needs the zoom


def test_tiny_qwen3_builds_reloads_and_trains_on_assistant_turns(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForImageTextToText

    from visrl.synthetic import SyntheticConfig, render_item
    from visrl.tiny_qwen3 import TinyQwen3Spec, build_tiny_qwen3, load_processor

    torch.set_num_threads(1)
    spec = TinyQwen3Spec(text_hidden=64, text_layers=1, text_heads=2, text_kv_heads=1, text_intermediate=64,
                         vision_hidden=32, vision_depth=2, vision_heads=2, vision_intermediate=32)
    path = build_tiny_qwen3(tmp_path / "m", spec)
    model = AutoModelForImageTextToText.from_pretrained(str(path))
    processor = load_processor(path)
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    assert model.config.vision_config.num_position_embeddings == 64
    assert processor.tokenizer.tokenize("0.781") == ["0", ".", "7", "8", "1"]  # one token per digit
    module = recipe()
    scene = render_item(SyntheticConfig(detail="dot_colour", object_size=(80, 96)), "train", 0)
    batch = module.collate(processor, [module.make_row(scene, direct=False), module.make_row(scene, direct=True)])
    # 448x336 -> 128x96 (4x3 merged tokens); the crop of a ~90 px object -> 128x128 (4x4).
    assert batch["image_grid_thw"].tolist() == [[1, 6, 8], [1, 8, 8], [1, 6, 8]]
    trained = processor.tokenizer.decode([t for t in batch["labels"][0].tolist() if t != -100])
    box = module.format_box(scene.target_object.box, "viscot", scene.size)
    assert trained == f"{box}<|im_end|>{scene.answer}<|im_end|>"
    assert float(model(**batch).loss) > 0


def test_assistant_labels_cover_each_answer_and_its_end() -> None:
    labels = recipe().assistant_labels([1, 7, 8, 5, 9, 2, 1, 7, 8, 6, 9], start=[7, 8], end=9)
    assert labels == [-100, -100, -100, 5, 9, -100, -100, -100, -100, 6, 9]


def test_binding_rows_name_the_object_their_crop_or_box_holds() -> None:
    import random

    from visrl.boxes import iou
    from visrl.crop_judge import NAME_PROMPT
    from visrl.synthetic import SyntheticConfig, render_item

    module = recipe()
    data = SyntheticConfig(detail="pattern", object_size=(80, 96), distinct_colours=True)
    replies: dict[str, int] = {}
    for index in range(40):
        scene = render_item(data, "train", index)
        messages, images = module.make_row(scene, "check", random.Random(index))
        assert messages[0]["content"][1]["text"] == NAME_PROMPT and len(images) == 1
        reply = messages[-1]["content"][0]["text"]
        named = [o for o in scene.objects if f"{o.colour} {o.shape}" == reply]
        # The crop's size tells which object it is: the named one's box, give or take 10% a side.
        assert reply == "nothing" or (named and abs(images[0].width - named[0].box.width) <= 0.25 * named[0].box.width)
        replies[reply] = replies.get(reply, 0) + 1
        messages, images = module.make_row(scene, "colour", random.Random(index))
        asked = module.parse_box(messages[0]["content"][1]["text"].split(" at ")[1].rstrip("?"), "viscot", scene.size)
        [obj] = [o for o in scene.objects if iou(asked, o.box) > 0.9]
        assert messages[-1]["content"][0]["text"] == obj.colour and images == [scene.image]
    assert replies.get("nothing", 0) >= 3 and len(replies) >= 10  # empty crops and many objects


def test_row_shares_are_validated_and_drawn() -> None:
    import random

    module = recipe()
    with pytest.raises(module.ConfigError, match="add up to more than 1"):
        module.DemoTrainConfig(direct_fraction=0.5, check_fraction=0.4, colour_fraction=0.2)
    with pytest.raises(module.ConfigError, match="boxed_items"):
        module.DemoTrainConfig(boxed_items=-1)
    cfg = module.DemoTrainConfig(direct_fraction=0.1, check_fraction=0.3, colour_fraction=0.2)
    rng = random.Random(0)
    kinds = [module.row_kind(rng, cfg) for _ in range(4000)]
    shares = {k: kinds.count(k) / len(kinds) for k in module.ROW_KINDS}
    assert shares == pytest.approx({"direct": 0.1, "check": 0.3, "colour": 0.2, "box": 0.0, "name": 0.0,
                                    "two_step": 0.4},
                                   abs=0.03)


def test_binding_weight_lands_on_each_coordinates_leading_digit() -> None:
    from visrl.tiny_qwen3 import load_processor

    module = recipe()
    tok = load_processor(MODEL).tokenizer
    ids = tok.encode("x[0.123, 0.456, 0.789, 0.901]y")
    labels = [-100] + ids[1:-1] + [-100]  # the box text is the trained turn, x and y are not
    weights = module.lead_digit_weights(ids, labels, tok.convert_tokens_to_ids("."), 10.0)
    heavy = [tok.decode([i]) for i, w in zip(ids, weights, strict=True) if w == 10.0]
    assert heavy == ["1", "4", "7", "9"]  # the tenths digit of x1, y1, x2, y2
    assert weights[0] == weights[-1] == 0.0 and weights.count(1.0) == len(ids) - 2 - 4


def test_box_rows_train_the_box_step_alone_with_their_weighted_loss() -> None:
    import torch

    from visrl.synthetic import SyntheticConfig, render_item

    torch.set_num_threads(1)
    module = recipe()
    model, processor = load(MODEL)
    scene = render_item(SyntheticConfig(detail="pattern", object_size=(80, 96), distinct_colours=True), "train", 0)
    messages, images = module.make_row(scene, "box")
    assert images == [scene.image] and [m["role"] for m in messages] == ["user", "assistant"]
    plain = module.collate(processor, [(messages, images)])
    weighted = module.collate(processor, [(messages, images)], binding_weight=10.0)
    assert "loss_weights" not in plain and weighted["loss_weights"].max().item() == 10.0
    with torch.no_grad():
        # Weights of 1 everywhere give the model's own mean loss back: the two paths agree.
        ones = {**weighted, "loss_weights": (weighted["loss_weights"] > 0).float()}
        assert module.weighted_loss(model, dict(ones)).item() == pytest.approx(model(**plain).loss.item(), rel=1e-4)
        assert module.weighted_loss(model, dict(weighted)).item() != pytest.approx(model(**plain).loss.item(), rel=1e-3)


def tiny_start(folder: Path) -> tuple[Path, dict[str, Any]]:
    """A one-layer random Qwen3-VL in ``folder`` and the demo task's data fields: a run of a few steps."""
    from visrl.tiny_qwen3 import TinyQwen3Spec, build_tiny_qwen3

    spec = TinyQwen3Spec(text_hidden=64, text_layers=1, text_heads=2, text_kv_heads=1, text_intermediate=64,
                         vision_hidden=32, vision_depth=2, vision_heads=2, vision_intermediate=32)
    data = {"detail": "pattern", "object_size": [80, 96], "distinct_colours": True, "min_objects": 3,
            "max_objects": 3, "distinct_details": True}
    return build_tiny_qwen3(folder, spec), data


def test_a_stopped_run_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    module = recipe()
    init, data = tiny_start(tmp_path / "init")

    def config(steps: int) -> Any:
        return module.DemoTrainConfig(init_from=str(init), steps=steps, max_minutes=10, batch_size=2, threads=1,
                                      device="cpu", eval_every=0, log_every=1, save_every=2, warmup_steps=1,
                                      binding_weight=10.0, box_fraction=0.5, data=data)

    first, _, _ = module.train(config(3), tmp_path / "run")  # a checkpoint at step 2, then one more step
    assert first["steps"] == 3 and (tmp_path / "run" / "checkpoint" / "loop.json").is_file()
    resumed, _, _ = module.train(config(6), tmp_path / "run")  # restarted: continues after step 2
    assert resumed["steps"] == 6 and len(resumed["loss_every_log"]) == 6  # 2 restored + steps 3..6


def test_pointer_targets_name_the_overview_token_that_holds_the_named_object() -> None:
    import torch

    from visrl.synthetic import SyntheticConfig, render_item

    module = recipe()
    processor = load(MODEL)[1]
    data = SyntheticConfig(detail="pattern", object_size=(80, 96), distinct_colours=True, min_objects=3,
                           max_objects=3, distinct_details=True)
    scenes = [render_item(data, "train", i) for i in range(4)]
    kinds = ["two_step", "check", "box", "name"]
    rows = [module.make_row(s, k, __import__("random").Random(0)) for s, k in zip(scenes, kinds, strict=True)]
    batch = module.collate(processor, rows, question_first=True)
    got = module.pointer_targets(scenes, kinds, rows, batch["image_grid_thw"])
    assert [got["pointer_counts"][k].item() for k in (0, 2, 3)] == [12, 12, 12]  # the scene's 4x3 merged tokens
    assert got["pointer_targets"][1].item() == -1  # a crop names no object of a full scene
    for k in (0, 2, 3):
        box = scenes[k].target_object.box  # the 448x336 scene's cells of 112 px are its 4x3 tokens
        cell = int((box.y1 + box.y2) / 2 // 112) * 4 + int((box.x1 + box.x2) / 2 // 112)
        assert got["pointer_targets"][k].item() == cell
    # The loss reads those tokens: a head that scores only the named token's hidden state wins.
    hidden = torch.zeros(len(rows), batch["input_ids"].shape[1], 1)
    image_id = load(MODEL)[0].config.image_token_id
    for b in range(len(rows)):
        positions = (batch["input_ids"][b] == image_id).nonzero().squeeze(-1)
        if got["pointer_targets"][b] >= 0:
            hidden[b, positions[got["pointer_targets"][b]]] = 20.0
    loss = module.pointer_loss(hidden, batch["input_ids"], image_id, got["pointer_counts"], got["pointer_targets"],
                               torch.nn.Identity())
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_the_pointer_loss_needs_question_first_and_a_layer_of_the_model() -> None:
    from visrl.errors import ConfigError

    module = recipe()
    with pytest.raises(ConfigError, match="question_first"):
        module.DemoTrainConfig(pointer_weight=1.0)
    with pytest.raises(ConfigError, match="pointer_weight"):
        module.DemoTrainConfig(pointer_weight=-1.0, question_first=True)


def test_a_pointer_run_resumes_with_its_head_and_saves_a_stock_model(tmp_path: Path) -> None:
    from safetensors import safe_open

    from visrl.errors import ConfigError

    module = recipe()
    init, data = tiny_start(tmp_path / "init")

    def config(steps: int, layer: int = 1) -> Any:
        return module.DemoTrainConfig(init_from=str(init), steps=steps, max_minutes=10, batch_size=2, threads=1,
                                      device="cpu", eval_every=0, log_every=1, save_every=2, warmup_steps=1,
                                      question_first=True, pointer_weight=1.0, pointer_layer=layer,
                                      box_fraction=0.5, data=data)

    with pytest.raises(ConfigError, match="pointer_layer"):
        module.train(config(3, layer=2), tmp_path / "bad")  # the model has one decoder layer
    with pytest.raises(ConfigError, match="pointer_layer"):
        module.train(config(3, layer=0), tmp_path / "bad0")  # the embeddings hold no visual features yet
    first, _, _ = module.train(config(3), tmp_path / "run")
    import torch

    saved = torch.load(tmp_path / "run" / "checkpoint" / "state.pt", map_location="cpu")
    assert set(saved["pointer_head"]) == {"weight", "bias"}
    resumed, _, _ = module.train(config(5), tmp_path / "run")
    assert first["steps"] == 3 and resumed["steps"] == 5 and len(resumed["loss_every_log"]) == 5
    with safe_open(str(tmp_path / "run" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "pointer" in k]  # the head is training-only
    assert json.loads((tmp_path / "run" / "visrl_model.json").read_text())["prompt_layout"] == "question_first"


def test_phase_two_continues_phase_one_question_first_with_the_pointer_loss() -> None:
    from visrl.config import load_config

    module = recipe()
    cfg = load_config(module.DemoTrainConfig, ROOT / "configs" / "demo" / "train_demo_binding.yaml")
    assert cfg.init_from == "data/demo-base" and (ROOT / cfg.init_from / "model.safetensors").is_file()
    assert cfg.question_first and cfg.pointer_weight > 0 and cfg.output_dir == "data/demo-model"
    assert cfg.max_minutes <= 120 and cfg.save_every > 0  # the CPU budget; a stopped run resumes


def test_crop_jitter_moves_the_crop_not_the_box_text() -> None:
    import random

    from visrl.boxes import crop_box, format_box
    from visrl.errors import ConfigError
    from visrl.synthetic import SyntheticConfig, render_item

    module = recipe()
    scene = render_item(SyntheticConfig(detail="pattern", object_size=(80, 96), distinct_colours=True), "train", 3)
    exact_messages, exact_images = module.make_row(scene, "two_step", random.Random(1))
    messages, images = module.make_row(scene, "two_step", random.Random(1), crop_jitter=0.2)
    assert messages == exact_messages  # same question, same annotated box text, same answer
    assert format_box(scene.target_object.box, "viscot", scene.size) in str(messages)
    assert exact_images[1].tobytes() == crop_box(scene.image, scene.target_object.box).tobytes()
    assert images[1].tobytes() != exact_images[1].tobytes()
    w, h = scene.target_object.box.width, scene.target_object.box.height
    assert abs(images[1].width - w) <= 0.4 * w + 1 and abs(images[1].height - h) <= 0.4 * h + 1
    with pytest.raises(ConfigError, match="crop_jitter"):
        module.DemoTrainConfig(crop_jitter=0.5)
