"""The two-step contract: box text <-> pixels in every format and frame, the crop, the budgets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
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
    ({"crop_margin": -0.1}, r"crop_margin must be a fraction in \[0, 1\], got -0.1"),
    ({"image_max_pixels": 0}, "image_max_pixels must be a positive number of pixels or null, got 0"),
    ({"image_min_pixels": 100, "image_max_pixels": 50}, r"image_min_pixels \(100\) must not exceed"),
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
