"""The demo benchmark: determinism, Visual-CoT records, scene validity, and that the digit needs a zoom."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visrl.boxes import Box, crop_box, parse_box, parse_pixel_suffix
from visrl.config import from_dict
from visrl.errors import ConfigError
from visrl.prompts import BOX_PROMPT
from visrl.synthetic import (
    COLOURS,
    DOT_COLOURS,
    LABEL_FILL,
    PATTERNS,
    SEGMENTS,
    SHAPES,
    Scene,
    SceneObject,
    SyntheticConfig,
    render_item,
    render_scene,
    write_benchmark,
)

SMALL = {"n_train": 4, "n_val": 2, "n_test": 3}
CANVASES = [(448, 336), (336, 448), (448, 448)]


def scenes(n: int, cfg: SyntheticConfig | None = None, tag: str = "t") -> list[Scene]:
    cfg = cfg or SyntheticConfig()
    return [render_scene(random.Random(f"{tag}/{i}"), cfg) for i in range(n)]


def all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_write_benchmark_is_deterministic(tmp_path: Path) -> None:
    cfg = SyntheticConfig(**SMALL, seed=3)
    paths = write_benchmark(tmp_path / "a", cfg)
    write_benchmark(tmp_path / "b", cfg)
    a, b = all_bytes(tmp_path / "a"), all_bytes(tmp_path / "b")
    assert paths == {s: tmp_path / "a" / f"{s}.json" for s in ("train", "val", "test")}
    assert len(a) == 3 + 4 + 2 + 3  # three JSON files and one PNG per item
    assert a == b
    other = all_bytes(Path(write_benchmark(tmp_path / "c", SyntheticConfig(**SMALL, seed=4))["train"]).parent)
    assert other["images/train_0.png"] != a["images/train_0.png"]


def test_items_do_not_depend_on_split_sizes() -> None:
    big, small = SyntheticConfig(n_train=50), SyntheticConfig(n_train=2)
    assert render_item(big, "train", 1).image.tobytes() == render_item(small, "train", 1).image.tobytes()
    assert render_item(big, "train", 1).image.tobytes() != render_item(big, "val", 1).image.tobytes()


def viscot_reference_box(box: list[int], width: int, height: int) -> str:
    """Visual-CoT's own tools/convert_data_to_llava_format.py get_bbox_str, restated."""
    b = list(box)
    if width > height:
        b[1] += (width - height) // 2
        b[3] += (width - height) // 2
        b = [x / width for x in b]
    else:
        b[0] += (height - width) // 2
        b[2] += (height - width) // 2
        b = [x / height for x in b]
    return "[%0.3f, %0.3f, %0.3f, %0.3f]" % tuple(b)  # noqa: UP031 - as Visual-CoT writes it


@pytest.mark.parametrize("size", CANVASES)
def test_records_are_visual_cot_format(tmp_path: Path, size: tuple[int, int]) -> None:
    cfg = SyntheticConfig(**SMALL, width=size[0], height=size[1])
    paths = write_benchmark(tmp_path, cfg)
    for split, path in paths.items():
        records = json.loads(path.read_text())
        assert len(records) == SMALL[f"n_{split}"]
        for i, rec in enumerate(records):
            scene = render_item(cfg, split, i)
            target = scene.target_object
            assert list(rec) == ["dataset", "split", "question_id", "image", "conversations",
                                 "width", "height"]
            assert (rec["dataset"], rec["split"], rec["question_id"]) == ("visrl_demo", split, f"{split}_{i}")
            assert (rec["width"], rec["height"]) == size
            first, second = rec["image"]
            assert first == f"images/{split}_{i}.png"
            assert Image.open(tmp_path / first).size == size
            path_part, pixel_box = parse_pixel_suffix(second)
            assert path_part == first and pixel_box == target.box
            assert re.fullmatch(r".*###\[\d+, \d+, \d+, \d+\]", second)
            turns = rec["conversations"]
            assert [t["from"] for t in turns] == ["human", "gpt", "human", "gpt"]
            assert turns[0]["value"] == f"<image>\n{scene.question} {BOX_PROMPT}"
            assert turns[2]["value"] == "<image>"
            assert turns[3]["value"] == scene.answer
            pixels = [int(v) for v in target.box.as_list()]
            assert turns[1]["value"] == viscot_reference_box(pixels, *size)
            back = parse_box(turns[1]["value"], "viscot", size)
            assert back is not None
            assert max(abs(u - v) for u, v in zip(back.as_list(), target.box.as_list(), strict=True)) <= 1.0


def test_answers_are_single_digits_and_balanced() -> None:
    answers = Counter(s.answer for s in scenes(400))
    assert set(answers) == {str(d) for d in range(10)}
    # 40 expected each; +-20 is over 3 standard deviations (sd ~ 6).
    assert all(20 <= n <= 60 for n in answers.values()), answers


def named_objects(scene: Scene) -> list[int]:
    words = scene.question.rstrip("?").split()
    colours = [w for w in words if w in COLOURS]
    shapes = [w for w in words if w in SHAPES]
    assert len(colours) == 1 and len(shapes) == 1, scene.question
    return [i for i, o in enumerate(scene.objects) if (o.colour, o.shape) == (colours[0], shapes[0])]


@pytest.mark.parametrize("size", CANVASES)
def test_scenes_are_well_formed(size: tuple[int, int]) -> None:
    cfg = SyntheticConfig(width=size[0], height=size[1])
    counts = Counter()
    for scene in scenes(150, cfg):
        assert scene.image.mode == "RGB" and scene.size == size
        counts[len(scene.objects)] += 1
        kinds = [(o.colour, o.shape) for o in scene.objects]
        assert len(set(kinds)) == len(kinds)
        assert named_objects(scene) == [scene.target]
        for i, a in enumerate(scene.objects):
            assert 0 <= a.box.x1 < a.box.x2 <= size[0] and 0 <= a.box.y1 < a.box.y2 <= size[1]
            for b in scene.objects[i + 1:]:
                assert not overlaps(a.box, b.box), (a, b)
    assert set(counts) == {3, 4, 5}


def overlaps(a: Box, b: Box) -> bool:
    return a.x1 < b.x2 and b.x1 < a.x2 and a.y1 < b.y2 and b.y1 < a.y2


def luminance(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=float)


def segment_points(obj: SceneObject) -> dict[str, tuple[float, float]]:
    """The centre of each 7-segment bar, in pixels of the scene image (1-pixel strokes)."""
    x, y, x2, y2 = obj.digit_box.as_list()
    w, h = x2 - x, y2 - y
    mid = (h - 1) // 2
    return {"a": (x + w / 2, y + 0.5), "g": (x + w / 2, y + mid + 0.5), "d": (x + w / 2, y2 - 0.5),
            "f": (x + 0.5, y + mid / 2 + 0.5), "b": (x2 - 0.5, y + mid / 2 + 0.5),
            "e": (x + 0.5, y + (mid + h) / 2), "c": (x2 - 0.5, y + (mid + h) / 2)}


def read_digit(view: Image.Image, obj: SceneObject, scale: float, origin: tuple[float, float] = (0, 0),
               threshold: float = 128) -> int | None:
    """Decode the 7-segment digit of ``obj`` in ``view`` (the scene or a crop at ``origin``, scaled)."""
    g = luminance(view)
    on = {k for k, (px, py) in segment_points(obj).items()
          if g[int((py - origin[1]) * scale), int((px - origin[0]) * scale)] < threshold}
    return next((d for d, segs in SEGMENTS.items() if set(segs) == on), None)


def segment_contrast(view: Image.Image, obj: SceneObject, scale: float,
                     origin: tuple[float, float] = (0, 0)) -> float:
    """(mean of unlit bars - mean of lit bars) / 255: 1 for crisp ink on white, 0 for a smudge."""
    g = luminance(view)
    lit, unlit = [], []
    for k, (px, py) in segment_points(obj).items():
        value = g[int((py - origin[1]) * scale), int((px - origin[0]) * scale)]
        (lit if k in SEGMENTS[obj.digit] else unlit).append(value)
    return (np.mean(unlit) - np.mean(lit)) / 255


@pytest.mark.parametrize("size", CANVASES)
def test_digit_is_drawn_inside_the_target(size: tuple[int, int]) -> None:
    for scene in scenes(60, SyntheticConfig(width=size[0], height=size[1])):
        for obj in scene.objects:
            d, b = obj.digit_box, obj.box
            assert b.x1 < d.x1 < d.x2 < b.x2 and b.y1 < d.y1 < d.y2 < b.y2
            g = luminance(scene.image)
            ink = g[int(d.y1):int(d.y2), int(d.x1):int(d.x2)]
            fill = np.array(COLOURS[obj.colour], dtype=float) @ [0.299, 0.587, 0.114]
            assert (ink < 40).sum() >= 3 and abs(fill - ink.min()) > 40
            # The white label sits wholly on the shape: the ring just outside it is the fill colour.
            ring_y, ring_x = int(d.y1) - 4, int(d.x1) - 4
            rgb = np.asarray(scene.image)
            assert tuple(rgb[ring_y, ring_x]) == COLOURS[obj.colour]
            assert tuple(rgb[ring_y + 2, ring_x + 2]) == LABEL_FILL
            assert read_digit(scene.image, obj, 1.0) == obj.digit
        assert scene.answer == str(scene.target_object.digit)


def test_digit_blurs_at_224_and_reads_in_a_112_crop() -> None:
    cfg = SyntheticConfig()
    far, near, far_reads, near_reads = [], [], 0, 0
    sample = [s for s in scenes(120, cfg) if s.target_object.digit != 8]  # 8 has no unlit bar
    for scene in sample:
        obj = scene.target_object
        scale = 224 / cfg.width
        small = scene.image.resize((224, round(cfg.height * scale)), Image.BICUBIC)
        far.append(segment_contrast(small, obj, scale))
        far_reads += read_digit(small, obj, scale, threshold=180) == obj.digit
        crop = crop_box(scene.image, obj.box)
        zoom = 112 / crop.width
        big = crop.resize((112, round(crop.height * zoom)), Image.BICUBIC)
        origin = (obj.box.x1, obj.box.y1)
        near.append(segment_contrast(big, obj, zoom, origin))
        near_reads += read_digit(big, obj, zoom, origin) == obj.digit
    assert min(near) > 0.8 and near_reads == len(sample)
    assert max(far) < 0.5 and float(np.mean(far)) < 0.35
    assert far_reads < 0.75 * len(sample)  # even a decoder that knows where the bars are


def test_config_from_yaml_dict_and_validation() -> None:
    cfg = from_dict(SyntheticConfig, {"object_size": [40, 50], "width": 448, "height": 448})
    assert cfg.object_size == (40, 50)
    with pytest.raises(ConfigError, match="max_objects"):
        SyntheticConfig(width=224, height=112)
    with pytest.raises(ConfigError, match="object_size"):
        SyntheticConfig(object_size=(50, 40))
    with pytest.raises(ConfigError, match="digit_size"):
        SyntheticConfig(digit_size=4)
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(SyntheticConfig, {"n_trian": 3})


DOTS = {"detail": "dot_colour", "object_size": (80, 96)}  # the demo model's task


def nearest_colour(pixel: np.ndarray) -> str:
    palette = {**COLOURS, **DOT_COLOURS, "background": (236, 236, 236)}
    return min(palette, key=lambda name: float(np.sum((pixel - np.array(palette[name])) ** 2)))


def test_dot_colour_scenes_ask_for_the_dot_and_draw_it() -> None:
    cfg = SyntheticConfig(**DOTS)
    for scene in scenes(30, cfg, tag="dots"):
        obj = scene.target_object
        assert scene.answer == obj.dot_colour == obj.detail_answer and obj.digit == -1
        assert f"dot on the {obj.colour} {obj.shape}" in scene.question or \
            f"dot inside the {obj.colour} {obj.shape}" in scene.question
        pixels = np.asarray(scene.image)
        for o in scene.objects:
            x1, y1, x2, y2 = (int(v) for v in o.digit_box.as_list())
            assert x2 - x1 == y2 - y1 == cfg.dot_size
            assert (pixels[y1:y2, x1:x2] == DOT_COLOURS[o.dot_colour]).all()
            assert o.box.x1 < x1 and x2 < o.box.x2 and o.box.y1 < y1 and y2 < o.box.y2
    assert Counter(s.answer for s in scenes(200, cfg, tag="dots")).keys() == DOT_COLOURS.keys()


def test_default_detail_is_still_the_digit() -> None:
    scene = render_item(SyntheticConfig(), "train", 0)
    assert scene.answer == str(scene.target_object.digit) and scene.target_object.dot_colour == ""
    assert render_item(SyntheticConfig(detail="digit"), "train", 0).image.tobytes() == scene.image.tobytes()
    with pytest.raises(ConfigError, match="detail"):
        SyntheticConfig(detail="letters")
    with pytest.raises(ConfigError, match="dot_size"):
        SyntheticConfig(dot_size=0)


def patch_shift(view: Image.Image, centre: tuple[float, float], colour: tuple[int, int, int]) -> float:
    """How far the dot moves the mean colour of the 16x16 window (one vision patch) around it."""
    x, y = int(centre[0]), int(centre[1])
    window = np.asarray(view).astype(float)[max(0, y - 8):y + 8, max(0, x - 8):x + 8]
    return float(np.linalg.norm(window.reshape(-1, 3).mean(0) - np.array(colour)))


def test_dot_is_a_speck_of_a_patch_in_the_overview_and_fills_one_in_the_crop() -> None:
    # The demo model sees the scene at 128x96 (its processor's pixel budget, 16 px patches) and the
    # crop at ~128 px: the dot moves a patch's mean colour a little there and a lot here.
    cfg = SyntheticConfig(**DOTS)
    far, near = [], []
    for scene in scenes(100, cfg, tag="dots"):
        obj = scene.target_object
        if obj.shape == "triangle":  # the window reaches past a triangle's sides
            continue
        cx, cy = obj.digit_box.center
        scale = 128 / cfg.width
        small = scene.image.resize((128, 96), Image.BICUBIC)
        far.append(patch_shift(small, (cx * scale, cy * scale), COLOURS[obj.colour]))
        crop = crop_box(scene.image, obj.box)
        zoom = 128 / crop.width
        big = crop.resize((128, round(crop.height * zoom)), Image.BICUBIC)
        near.append(patch_shift(big, ((cx - obj.box.x1) * zoom, (cy - obj.box.y1) * zoom), COLOURS[obj.colour]))
    assert float(np.median(near)) > 4 * float(np.median(far))
    assert float(np.median(far)) < 15 and float(np.median(near)) > 40


def test_distinct_colours_name_one_object_each() -> None:
    cfg = SyntheticConfig(**DOTS, distinct_colours=True)
    for scene in scenes(40, cfg, tag="distinct"):
        colours = [o.colour for o in scene.objects]
        assert len(set(colours)) == len(colours) and 3 <= len(colours) <= 5
    with pytest.raises(ConfigError, match="distinct_colours"):
        SyntheticConfig(distinct_colours=True, max_objects=6)


def test_distinct_details_give_each_object_its_own_answer() -> None:
    cfg = SyntheticConfig(detail="pattern", object_size=(80, 96), distinct_colours=True, min_objects=3,
                          max_objects=3, distinct_details=True)
    questions = set()
    for scene in scenes(40, cfg, tag="distinct-details"):
        answers = [o.detail_answer for o in scene.objects]
        assert sorted(answers) == sorted(PATTERNS)  # 3 objects, every pattern once
        assert scene.answer == scene.target_object.pattern
        questions.add(scene.target_object.colour)
    assert len(questions) == 5  # every colour gets asked about
    dots = SyntheticConfig(**DOTS, max_objects=4, distinct_details=True)
    for scene in scenes(20, dots, tag="distinct-dots"):
        assert len({o.dot_colour for o in scene.objects}) == len(scene.objects)
    with pytest.raises(ConfigError, match="max_objects must be <= 3 with distinct_details"):
        SyntheticConfig(detail="pattern", object_size=(80, 96), distinct_details=True)
    with pytest.raises(ConfigError, match="distinct_details needs detail"):
        SyntheticConfig(distinct_details=True, max_objects=3)


PATTERN_TEST_3_SHA = "0bba106981e20da4"  # render_item(test, 3) before distinct_details existed


def test_scenes_without_distinct_details_keep_their_bytes() -> None:
    # The option draws its answers only when asked for: the shipped benchmark's scenes are unchanged.
    cfg = SyntheticConfig(detail="pattern", object_size=(80, 96), distinct_colours=True)
    scene = render_item(cfg, "test", 3)
    assert [o.pattern for o in scene.objects] == [o.pattern for o in render_item(cfg, "test", 3).objects]
    assert hashlib.sha256(scene.image.tobytes()).hexdigest()[:16] == PATTERN_TEST_3_SHA
