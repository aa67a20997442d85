"""The two-step contract: box text <-> pixels in every format and frame, the crop, the budgets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import ScriptedTwoStep
from PIL import Image

from visrl.boxes import BOX_FORMATS, Box
from visrl.contract import CONTRACT_FILE, TwoStepContract, fit_size, read_contract, write_contract
from visrl.errors import ConfigError

CAP_1280 = 1280 * 28 * 28  # ~1280 visual tokens of Qwen2/2.5-VL (28 px per merged token side)


def test_qwen2_5_text_is_read_and_written_in_the_processor_frame() -> None:
    # The example: a 2000x1500 photo under Qwen2.5-VL's shipped budget is resized to
    # 1988x1512 (multiples of 28), so [1000, 500, 1500, 1000] there is ~[1006, 496, 1509, 992].
    contract = TwoStepContract(box_format="qwen2_5")
    assert contract.input_size((2000, 1500)) == (1988, 1512)
    box = contract.parse("[1000, 500, 1500, 1000]", (2000, 1500))
    assert box is not None and [round(v) for v in box.as_list()] == [1006, 496, 1509, 992]
    assert contract.format(box, (2000, 1500)) == '{"bbox_2d": [1000, 500, 1500, 1000]}'
    # Under a 1280-token cap the frame shrinks, and the same text names another region.
    capped = contract.override(image_max_pixels=CAP_1280)
    width, height = capped.input_size((2000, 1500))
    assert (width % 28, height % 28) == (0, 0) and width * height <= CAP_1280
    assert capped.parse("[574, 280, 861, 560]", (2000, 1500)) == pytest.approx(
        Box(574 * 2000 / width, 280 * 1500 / height, 861 * 2000 / width, 560 * 1500 / height))


def test_full_image_budget_is_part_of_the_frame() -> None:
    contract = TwoStepContract(box_format="qwen2_5", full_max_pixels=500 * 375)
    assert fit_size((2000, 1500), max_pixels=500 * 375) == (500, 375)
    assert contract.input_size((2000, 1500)) == (504, 364)


@pytest.mark.parametrize("fmt", BOX_FORMATS)
def test_every_format_round_trips_pixels(fmt: str) -> None:
    contract = TwoStepContract(box_format=fmt, image_max_pixels=CAP_1280)
    size = (1280, 960)
    box = Box(100, 200, 700, 650)
    back = contract.parse(contract.format(box, size), size)
    assert back is not None
    # Text precision: 0.001 of the side (viscot, normalized), 1/1000 (qwen2/3), 1 px of the frame.
    assert max(abs(a - b) for a, b in zip(back.as_list(), box.as_list(), strict=True)) <= 2.0


@pytest.mark.parametrize(("margin", "box", "expected"), [
    (0.0, Box(10, 10, 20, 20), Box(10, 10, 20, 20)),
    (0.1, Box(10, 10, 20, 20), Box(9, 9, 21, 21)),     # 10% of 10 px on each side
    (0.5, Box(0, 0, 20, 20), Box(0, 0, 30, 30)),       # clamped at the image edge
    (0.0, Box(50, 50, 52, 52), Box(47, 47, 55, 55)),   # grown to 8 px around the centre
    (0.0, None, Box(0, 0, 100, 80)),                   # no box: the whole image
])
def test_crop_region_and_crop_agree(margin: float, box: Box | None, expected: Box) -> None:
    contract = TwoStepContract(crop_margin=margin)
    image = Image.new("RGB", (100, 80))
    assert contract.crop_region(box, image.size) == expected
    assert contract.crop(image, box).size == (int(expected.width), int(expected.height))


def test_prepare_applies_the_full_and_crop_budgets() -> None:
    contract = TwoStepContract(full_max_pixels=128 * 96, crop_min_pixels=112 * 112)
    assert contract.prepare_full(Image.new("L", (448, 336))).size == (128, 96)
    crop = contract.prepare_crop(Image.new("RGB", (56, 28)))
    assert crop.size == (158, 79) and crop.mode == "RGB"


def test_override_ignores_unset_keys_and_names_unknown_ones() -> None:
    base = TwoStepContract(box_format="qwen2", crop_margin=0.1)
    assert base.override(box_format=None, crop_margin=None) is base
    assert base.override(crop_margin=0.2) == TwoStepContract(box_format="qwen2", crop_margin=0.2)
    with pytest.raises(ConfigError, match="unknown contract field.*crop_margn"):
        base.override(crop_margn=0.2)


@pytest.mark.parametrize(("values", "message"), [
    ({"box_format": "yolo"}, "box_format 'yolo' unknown"),
    ({"crop_margin": -0.1}, r"crop_margin must be in \[0.0, 10.0\], got -0.1"),
    ({"crop_margin": float("nan")}, r"crop_margin must be in \[0.0, 10.0\], got nan"),
    ({"image_max_pixels": 0}, "image_max_pixels must be at least 1 pixel or null, got 0"),
    ({"image_min_pixels": 100, "image_max_pixels": 50}, r"image_min_pixels \(100\) must not exceed"),
    ({"prompt_layout": "sideways"}, "prompt_layout 'sideways' unknown; use one of image_first, question_first"),
])
def test_bad_values_are_named(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TwoStepContract(**values)


def test_checkpoint_record_round_trips_and_adapter_wins(tmp_path: Path) -> None:
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    (base / CONTRACT_FILE).parent.mkdir()
    (base / CONTRACT_FILE).write_text(json.dumps({"box_format": "viscot"}))  # an older record
    written = TwoStepContract(box_format="qwen2_5", crop_margin=0.1, image_max_pixels=CAP_1280)
    write_contract(adapter, written, base={"path": str(base)})
    record = json.loads((adapter / CONTRACT_FILE).read_text())
    assert record["base"] == {"path": str(base)} and record["crop_margin"] == 0.1
    assert read_contract(base, adapter) == written
    assert read_contract(base) == TwoStepContract(box_format="viscot")
    assert read_contract(tmp_path / "none", default_box_format="qwen3") == TwoStepContract(box_format="qwen3")


# ---------------------------------------------------------------------- one box through every stage

ROUND_SIZE = (640, 480)
ROUND_CAP = 256 * 28 * 28  # 200,704 px: Qwen2.5-VL's frame for 640x480 becomes 504x364, not the original
GOOD, FAR = Box(64, 48, 320, 288), Box(400, 300, 600, 460)  # pixels of the original image; IoU 0


def model_text(fmt: str, box: Box, size: tuple[int, int]) -> str:
    """What a model of each family writes for ``box``, computed here from DESIGN.md's definitions
    (not by the code under test); qwen2_5 from transformers' own ``smart_resize``."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    w, h = size
    if fmt == "viscot":  # normalized to the image padded to a square
        side = max(w, h)
        ox, oy = (side - w) // 2, (side - h) // 2
        values = [(box.x1 + ox) / side, (box.y1 + oy) / side, (box.x2 + ox) / side, (box.y2 + oy) / side]
        return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"
    if fmt == "normalized":
        return "[" + ", ".join(f"{v:.3f}" for v in (box.x1 / w, box.y1 / h, box.x2 / w, box.y2 / h)) + "]"
    thousandths = [round(box.x1 / w * 1000), round(box.y1 / h * 1000), round(box.x2 / w * 1000), round(box.y2 / h * 1000)]
    if fmt == "qwen2":
        return "<|box_start|>({},{}),({},{})<|box_end|>".format(*thousandths)
    if fmt == "qwen3":
        return json.dumps({"bbox_2d": thousandths})
    rh, rw = smart_resize(h, w, factor=28, min_pixels=3136, max_pixels=ROUND_CAP)
    return json.dumps({"bbox_2d": [round(box.x1 * rw / w), round(box.y1 * rh / h),
                                   round(box.x2 * rw / w), round(box.y2 * rh / h)]})


class ScriptedPolicy(ScriptedTwoStep):
    """A scripted two-step policy: it writes the good box, then the far one, in its family's text,
    and answers "7" when the crop it is shown is the good box's crop (as the contract cuts it),
    else "3"."""

    def __init__(self, contract: TwoStepContract) -> None:
        super().__init__(contract)
        self.crop_sizes: list[tuple[int, int]] = []

    def reply(self, conversation: list, sampling: Any) -> list[str]:
        fmt = self.contract.box_format
        if self.is_box_step(conversation):
            return [model_text(fmt, GOOD, ROUND_SIZE), model_text(fmt, FAR, ROUND_SIZE)][: sampling.n]
        good = self.contract.crop_region(GOOD, ROUND_SIZE)
        crop = self.crop_image(conversation)
        self.crop_sizes.append(crop.size)
        near = abs(crop.width - good.width) <= 4 and abs(crop.height - good.height) <= 4  # text precision
        return ["7" if near else "3"]


def _close(a: Box | None, b: Box, tolerance: float) -> bool:
    return a is not None and max(abs(x - y) for x, y in zip(a.as_list(), b.as_list(), strict=True)) <= tolerance


@pytest.mark.parametrize("fmt", BOX_FORMATS)
def test_one_box_round_trips_item_generate_pair_export_parse(fmt: str, store: Any, tmp_path: Path) -> None:
    from visrl.formats.export import export
    from visrl.formats.trl import dpo_rows, sft_rows
    from visrl.generate import GenerateConfig, run_generate
    from visrl.store import box_from_json

    contract = TwoStepContract(box_format=fmt, crop_margin=0.1, image_max_pixels=ROUND_CAP)
    # Text precision, in px of the original: 1/1000 of 640 (viscot, normalized, qwen2/3) or one px
    # of the 504x364 frame (qwen2_5: 640/504 = 1.27 px).
    tolerance = 1.0 if fmt != "qwen2_5" else 640 / 504
    ws = store.workspace
    Image.new("RGB", ROUND_SIZE, (90, 120, 30)).save(ws.images_dir / "photo.png")
    dataset = store.add_dataset("photos", "test")
    store.add_items(dataset, [{"split": "train", "source_id": "0", "image": "images/photo.png",
                               "width": ROUND_SIZE[0], "height": ROUND_SIZE[1], "question": "What is it?",
                               "answer": "7", "gt_box": GOOD}])
    policy = ScriptedPolicy(contract)
    cfg = GenerateConfig(model_name_or_path="scripted", dataset="photos", attempts=1, crop_judge="iou")
    report = run_generate(ws, cfg, reasoner=policy)
    # generate: the policy's text parsed into the original frame; the far box kept as the negative
    rollouts = {r["kind"]: r for r in store.rollouts(run_key=report.run_key)}
    assert set(rollouts) == {"policy", "negative"} and report.pairs == 1
    assert _close(box_from_json(rollouts["policy"]["box"]), GOOD, tolerance)
    assert _close(box_from_json(rollouts["negative"]["box"]), FAR, tolerance)
    assert rollouts["policy"]["answer"] == "7" and rollouts["negative"]["answer"] == "3"
    stored = contract.crop_region(box_from_json(rollouts["policy"]["box"]), ROUND_SIZE)
    assert (stored.width, stored.height) in policy.crop_sizes  # the margin crop, as the contract cuts it
    # pair -> stage-2 training row: the box texts are the model's own, each crop is its side's
    [row] = dpo_rows(store, ws, statuses=("pending",), stage=2, contract=contract)
    chosen_text = row["chosen"][0]["content"][0]["text"]
    rejected_text = row["rejected"][0]["content"][0]["text"]
    assert chosen_text == model_text(fmt, GOOD, ROUND_SIZE)
    assert rejected_text == model_text(fmt, FAR, ROUND_SIZE)
    assert _close(contract.parse(chosen_text, ROUND_SIZE), GOOD, tolerance)
    for side, kind in (("chosen", "policy"), ("rejected", "negative")):  # the stored box's crop
        cut = contract.crop_region(box_from_json(rollouts[kind]["box"]), ROUND_SIZE)
        assert row[f"{side}_answer_images"][1].size == (cut.width, cut.height)
    # item -> SFT row -> parse
    [sft] = sft_rows(store, ws, contract=contract)
    assert sft["messages"][1]["content"][0]["text"] == model_text(fmt, GOOD, ROUND_SIZE)
    # export (LLaMA-Factory) -> parse
    out = export(store, ws, "llamafactory", tmp_path / "lf", statuses=("pending",), contract=contract)
    [record] = json.loads((Path(out["path"]) / "pairs.json").read_text())
    exported = json.dumps(record)
    assert json.dumps(model_text(fmt, GOOD, ROUND_SIZE))[1:-1] in exported
    # the frame the texts are in is the one the processor really resizes the row's image to
    if fmt == "qwen2_5":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        processor = Qwen2VLImageProcessorPil()  # Qwen2.5-VL's shipped budget, then the contract's cap
        contract.apply_budget(processor)
        grid = processor(images=[row["images"][0]])["image_grid_thw"][0].tolist()
        assert (grid[2] * 14, grid[1] * 14) == contract.input_size(ROUND_SIZE) == (504, 364)


# ---------------------------------------------------------------------- prompt layout

class RecordingPolicy(ScriptedTwoStep):
    """Records the conversations it is asked to complete and answers with a fixed box."""

    def __init__(self, contract: TwoStepContract) -> None:
        super().__init__(contract)
        self.seen: list[list[dict]] = []

    def reply(self, conversation: list, sampling: Any) -> list[str]:
        self.seen.append(conversation)
        return ["[0.1, 0.2, 0.5, 0.6]"] * sampling.n


def _part_order(message: dict) -> list[str]:
    return [part["type"] for part in message["content"]]


@pytest.mark.parametrize(("layout", "first_turn"), [("image_first", ["image", "text"]),
                                                     ("question_first", ["text", "image"])])
def test_the_checkpoints_layout_orders_every_prompt(layout: str, first_turn: list[str], tmp_path: Path) -> None:
    from visrl.prompts import answer_prompt, box_prompt, two_step_conversation
    from visrl.reasoning import Sampling

    write_contract(tmp_path, TwoStepContract(prompt_layout=layout))
    contract = read_contract(tmp_path)  # the layout travels with the checkpoint
    assert contract.prompt_layout == layout
    policy = RecordingPolicy(contract)
    image = Image.new("RGB", ROUND_SIZE, "white")
    policy.two_step([image], ["What is on the red square?"], Sampling(n=1))
    policy.direct([image], ["What is on the red square?"], Sampling(n=1))
    box_turn, answer_turn, direct_turn = policy.seen
    assert _part_order(box_turn[0]) == _part_order(answer_turn[0]) == _part_order(direct_turn[0]) == first_turn
    assert _part_order(answer_turn[2]) == ["image"]  # the crop turn holds no text in either layout
    assert box_turn[0]["content"][first_turn.index("text")]["text"].startswith("What is on the red square?")
    # Training rows (visrl.formats.trl) and GRPO rows build theirs with these, in the contract's layout.
    for messages in (box_prompt("q?", layout), answer_prompt("q?", "[0, 0, 1, 1]", layout),
                     two_step_conversation("q?", "[0, 0, 1, 1]", "red", layout)):
        assert _part_order(messages[0]) == first_turn
