"""The built-in demo benchmark: intention-driven VQA that needs a zoom to answer.

Each scene is a ``width x height`` canvas (default 448x336, deliberately NOT square so the
Visual-CoT square padding is exercised) holding 3-5 small objects, each a distinct
(colour, shape) pair from 5 colours x 3 shapes. Every object carries a white label with a
7-segment digit drawn in 1-pixel strokes, 7 pixels tall (4 wide): seen whole at ~224 px wide the
strokes shrink to half a pixel and the 1-pixel gaps between them close, so the digit blurs into a
grey smudge, while a crop of the object enlarged to 112 px or more shows strokes 2-3 pixels thick
(measured on 200 scenes: lit-vs-unlit bar contrast ~0.28 at 224 px, >= 0.86 in a 112 px crop).
The question names one object by colour and shape ("What digit is written on the red circle?");
the answer is its digit ("7"); the ground-truth box is that object's bounding box (pixels of the
original image, plus ``box_margin``).

With ``detail: dot_colour`` each object carries, instead of the digit label, a small dot
(``dot_size`` pixels) of one of four colours that no object has; the question asks for the dot's
colour ("What colour is the dot on the red circle?"). A model trained from scratch on a CPU
learns colours in a few hundred steps but not glyphs. A dot's colour does not quite vanish from a
small overview, though: downsampling keeps a region's mean colour, so a well-trained model reads a
6 px dot even at 128x96.

With ``detail: pattern`` each object carries a ``pattern_size`` square of dark and light lines
``pattern_line`` pixels wide, in one of three patterns (horizontal, vertical, checkered);
the question asks which ("What pattern is on the red circle?"). The inks give every square the
same (random) mean grey and the patterns are point-symmetric with a random phase, so in an
overview shrunk 3.5x (448x336 -> 128x96) all three blur to a grey square (a linear probe on the
overview's 7x7 pixels around it scores 36% and one with squared pixels 53%, chance 33%; a
diagonal pattern or 2 px lines leaked 50-100% through aliasing), while a crop enlarged 1.3x shows the lines (a probe on the crop's
spectrum: 100%): the answer needs the zoom, and telling line orientations
apart is a local filter a small vision tower learns. The demo model is trained on this variant.

Objects sit in distinct cells of a coarse grid (``cell_size`` pixels) with jitter inside the
cell, so they never overlap and a small model can learn where things are. The vocabulary is
tiny on purpose: a later issue trains a small model on it on a CPU.

Files are written in Visual-CoT's training/benchmark JSON format (see ``viscot_record``), so the
same importer reads the demo and the real dataset. Everything is a pure function of the seed:
each item draws from its own ``random.Random(f"{seed}/{split}/{index}")``, so two runs write the
same bytes and growing ``n_train`` keeps the existing items (see ``render_item``).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from visrl.boxes import Box, format_box
from visrl.errors import ConfigError
from visrl.prompts import BOX_PROMPT

SPLITS: tuple[str, ...] = ("train", "val", "test")

# Saturated, well separated hues: colour must be readable even in the 224 px overview.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (45, 85, 215),
    "yellow": (235, 200, 30),
    "purple": (145, 60, 185),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
QUESTION_TEMPLATES: tuple[str, ...] = (
    "What digit is written on the {colour} {shape}?",
    "Which number is shown on the {colour} {shape}?",
    "What number is inside the {colour} {shape}?",
)
DOT_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "cyan": (0, 215, 230),
    "orange": (255, 140, 0),
}
DOT_QUESTION_TEMPLATES: tuple[str, ...] = (
    "What colour is the dot on the {colour} {shape}?",
    "Which colour does the dot on the {colour} {shape} have?",
    "What is the colour of the dot inside the {colour} {shape}?",
)
# Line patterns (see _pattern_ink) drawn with inks that give each the same mean grey.
PATTERNS: tuple[str, ...] = ("horizontal", "vertical", "checkered")
PATTERN_QUESTION_TEMPLATES: tuple[str, ...] = (
    "What pattern is on the {colour} {shape}?",
    "Which pattern does the {colour} {shape} show?",
    "What is the pattern inside the {colour} {shape}?",
)
DETAILS: tuple[str, ...] = ("digit", "dot_colour", "pattern")
# The answers of the details whose values ``distinct_details`` deals out without repeats.
DISTINCT_DETAILS: dict[str, tuple[str, ...]] = {"pattern": PATTERNS, "dot_colour": tuple(DOT_COLOURS)}
BACKGROUND = (236, 236, 236)
LABEL_FILL = (255, 255, 255)
DIGIT_INK = (0, 0, 0)

# 7-segment encoding: a top, b top-right, c bottom-right, d bottom, e bottom-left, f top-left,
# g middle.
SEGMENTS: dict[int, str] = {
    0: "abcdef", 1: "bc", 2: "abdeg", 3: "abcdg", 4: "bcfg",
    5: "acdfg", 6: "acdefg", 7: "abc", 8: "abcdefg", 9: "abcdfg",
}


@dataclass
class SyntheticConfig:
    """How many scenes to make and how they look (YAML keys of ``visrl data demo``-like commands)."""

    n_train: int = field(default=200, metadata={"help": "Scenes in the train split."})
    n_val: int = field(default=50, metadata={"help": "Scenes in the val split."})
    n_test: int = field(default=100, metadata={"help": "Scenes in the test split."})
    seed: int = field(default=0, metadata={"help": "Seed; the same seed writes the same bytes."})
    width: int = field(default=448, metadata={"help": "Canvas width in pixels."})
    height: int = field(default=336, metadata={
        "help": "Canvas height in pixels (default not square, to exercise Visual-CoT's padding)."})
    min_objects: int = field(default=3, metadata={"help": "Fewest objects per scene."})
    max_objects: int = field(default=5, metadata={
        "help": "Most objects per scene (at most 15 distinct colour-shape pairs, and one per grid cell)."})
    object_size: tuple[int, int] = field(default=(36, 56), metadata={
        "help": "Range [min, max] of an object's side in pixels."})
    digit_size: int = field(default=7, metadata={
        "help": "Digit height in pixels (width 0.6x); 7 blurs away at 224 px wide, reads in a 112 px crop."})
    digit_stroke: int = field(default=1, metadata={"help": "Digit stroke width in pixels."})
    cell_size: int = field(default=112, metadata={
        "help": "Side of a placement-grid cell in pixels; one object per cell, so none overlap."})
    box_margin: int = field(default=2, metadata={
        "help": "Pixels added around an object's shape for its ground-truth box."})
    dataset_name: str = field(default="visrl_demo", metadata={
        "help": "Value of the 'dataset' field of every record."})
    detail: str = field(default="digit", metadata={
        "help": "What the question asks about each object: 'digit' (a 7-segment digit on a white "
                "label) or 'dot_colour' (the colour of a small dot: black, white, cyan, orange)."})
    dot_size: int = field(default=6, metadata={
        "help": "Side of the dot in pixels (detail: dot_colour)."})
    pattern_size: int = field(default=13, metadata={
        "help": "Side of the pattern square in pixels (detail: pattern); odd keeps it symmetric."})
    pattern_line: int = field(default=1, metadata={
        "help": "Width of the pattern's lines in pixels (detail: pattern); 1 px lines vanish from a "
                "3.5x-shrunk overview (2 px lines alias into it) and read in a crop enlarged 1.3x."})
    distinct_colours: bool = field(default=False, metadata={
        "help": "Give every object of a scene its own colour, so the colour alone names the "
                "object (easier grounding; at most 5 objects)."})
    distinct_details: bool = field(default=False, metadata={
        "help": "Give every object of a scene its own answer (detail: pattern or dot_colour), so a "
                "crop of any other object gives a wrong answer and the exact answer judge alone "
                "tells a right box from a wrong one (at most 3 objects for patterns, 4 for dots)."})

    def __post_init__(self) -> None:
        self.object_size = tuple(int(v) for v in self.object_size)  # YAML gives a list
        problems = self._problems()
        if problems:
            raise ConfigError("invalid synthetic benchmark config: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        out = []
        for name in ("n_train", "n_val", "n_test"):
            if getattr(self, name) < 0:
                out.append(f"{name} must be >= 0, got {getattr(self, name)}")
        lo, hi = self.object_size if len(self.object_size) == 2 else (0, -1)
        if not 0 < lo <= hi:
            out.append(f"object_size must be [min, max] with 0 < min <= max, got {list(self.object_size)}")
        if not 1 <= self.min_objects <= self.max_objects:
            out.append(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if self.distinct_colours and self.max_objects > len(COLOURS):
            out.append(f"max_objects must be <= {len(COLOURS)} with distinct_colours")
        if self.distinct_details and self.detail not in DISTINCT_DETAILS:
            out.append(f"distinct_details needs detail {' or '.join(DISTINCT_DETAILS)}, got {self.detail!r}")
        elif self.distinct_details and self.max_objects > len(DISTINCT_DETAILS[self.detail]):
            out.append(f"max_objects must be <= {len(DISTINCT_DETAILS[self.detail])} with distinct_details "
                       f"(detail {self.detail} has that many answers)")
        if self.max_objects > len(COLOURS) * len(SHAPES):
            out.append(f"max_objects must be <= {len(COLOURS) * len(SHAPES)} (distinct colour-shape pairs)")
        if hi + 2 * self.box_margin > self.cell_size:
            out.append(f"cell_size {self.cell_size} must hold object_size max {hi} plus 2 x box_margin")
        cols, rows = self.width // self.cell_size, self.height // self.cell_size
        if cols * rows < self.max_objects:
            out.append(f"a {self.width}x{self.height} canvas has {cols}x{rows} cells of {self.cell_size} px, "
                       f"fewer than max_objects={self.max_objects}: enlarge the canvas or shrink cell_size")
        # Three bars and two gaps tall, two bars and a gap wide, or the segments run together.
        if self.digit_stroke < 1 or self.digit_size < 3 * self.digit_stroke + 2 \
                or _digit_width(self.digit_size) < 2 * self.digit_stroke + 1:
            out.append(f"digit_size must be >= 3 x digit_stroke + 2 (and digit_stroke >= 1), "
                       f"got digit_size={self.digit_size}, digit_stroke={self.digit_stroke}")
        if self.detail not in DETAILS:
            out.append(f"detail must be one of {', '.join(DETAILS)}, got {self.detail!r}")
        if not 1 <= self.dot_size <= lo // 3:
            out.append(f"dot_size must be between 1 and object_size min / 3, got {self.dot_size}")
        if self.detail == "pattern" and (self.pattern_line < 1
                                         or not 2 * self.pattern_line <= self.pattern_size <= lo // 3):
            out.append(f"pattern_size must be between 2 x pattern_line and object_size min / 3 "
                       f"(and pattern_line >= 1), got {self.pattern_size}, {self.pattern_line}")
        if lo < 3 * self.digit_size:
            out.append(f"object_size min {lo} must be >= 3 x digit_size ({3 * self.digit_size}) "
                       "to hold the digit's label")
        return out


@dataclass(frozen=True)
class SceneObject:
    """One object; boxes are pixels of the scene image."""

    colour: str
    shape: str
    digit: int  # -1 when the scene's detail is not a digit
    box: Box  # the shape's bounding box widened by box_margin: the ground-truth region
    digit_box: Box  # the digit's strokes (inside the white label), the dot, or the pattern square
    dot_colour: str = ""  # the dot's colour name (detail: dot_colour)
    pattern: str = ""  # the pattern's name (detail: pattern)

    @property
    def detail_answer(self) -> str:
        """What the question about this object expects as answer."""
        return self.dot_colour or self.pattern or str(self.digit)


@dataclass
class Scene:
    image: Image.Image
    objects: list[SceneObject]
    target: int  # index into objects of the object the question names
    question: str
    answer: str

    @property
    def target_object(self) -> SceneObject:
        return self.objects[self.target]

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def render_scene(rng: random.Random, cfg: SyntheticConfig) -> Scene:
    """Draw one scene from ``rng``; the question is about one randomly chosen object."""
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    if cfg.distinct_colours:
        kinds = [(c, rng.choice(SHAPES)) for c in rng.sample(list(COLOURS), n)]
    else:
        kinds = rng.sample([(c, s) for c in COLOURS for s in SHAPES], n)
    # Drawn only when asked for, so scenes without the option keep their exact bytes.
    answers = rng.sample(DISTINCT_DETAILS[cfg.detail], n) if cfg.distinct_details else None
    image = Image.new("RGB", (cfg.width, cfg.height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    objects = []
    for k, ((colour, shape), (cx, cy)) in enumerate(zip(kinds, _pick_cells(rng, cfg, n), strict=True)):
        side = rng.randint(*cfg.object_size)
        slack = cfg.cell_size - side - 2 * cfg.box_margin
        x1 = cx + cfg.box_margin + rng.randint(0, slack)
        y1 = cy + cfg.box_margin + rng.randint(0, slack)
        shape_box = Box(x1, y1, x1 + side, y1 + side)
        pattern = ""
        if cfg.detail == "dot_colour":
            digit, dot = -1, answers[k] if answers else rng.choice(list(DOT_COLOURS))
            digit_box = _draw_dot_object(draw, shape, COLOURS[colour], shape_box, dot, cfg)
        elif cfg.detail == "pattern":
            digit, dot, pattern = -1, "", answers[k] if answers else rng.choice(PATTERNS)
            digit_box = _draw_pattern_object(draw, rng, shape, COLOURS[colour], shape_box, pattern, cfg)
        else:  # the default keeps its exact sequence of draws: same seed, same bytes as before
            digit, dot = rng.randrange(10), ""
            digit_box = _draw_object(draw, shape, COLOURS[colour], shape_box, digit, cfg)
        m = cfg.box_margin
        box = Box(x1 - m, y1 - m, x1 + side + m, y1 + side + m).clamp(image.size)
        assert box is not None  # cells lie inside the canvas
        objects.append(SceneObject(colour, shape, digit, box, digit_box, dot, pattern))
    target = rng.randrange(n)
    obj = objects[target]
    templates = {"dot_colour": DOT_QUESTION_TEMPLATES,
                 "pattern": PATTERN_QUESTION_TEMPLATES}.get(cfg.detail, QUESTION_TEMPLATES)
    question = rng.choice(templates).format(colour=obj.colour, shape=obj.shape)
    return Scene(image, objects, target, question, obj.detail_answer)


def render_item(cfg: SyntheticConfig, split: str, index: int) -> Scene:
    """Item ``index`` of ``split``: each item has its own seeded generator, so it does not depend
    on how many items come before it or on the other splits."""
    return render_scene(random.Random(f"{cfg.seed}/{split}/{index}"), cfg)


def _pick_cells(rng: random.Random, cfg: SyntheticConfig, n: int) -> list[tuple[int, int]]:
    """Top-left corners of ``n`` distinct grid cells; the grid is centred on the canvas."""
    cols, rows = cfg.width // cfg.cell_size, cfg.height // cfg.cell_size
    ox = (cfg.width - cols * cfg.cell_size) // 2
    oy = (cfg.height - rows * cfg.cell_size) // 2
    cells = rng.sample(range(cols * rows), n)
    return [(ox + (c % cols) * cfg.cell_size, oy + (c // cols) * cfg.cell_size) for c in cells]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, fill: tuple[int, int, int],
                box: Box) -> tuple[int, int]:
    """Draw the shape; returns the centre of its label (the centroid's row for a triangle)."""
    x1, y1, x2, y2 = (int(v) for v in box.as_list())
    side = x2 - x1
    cx, cy = x1 + side // 2, y1 + side // 2
    if shape == "circle":
        draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill)
    elif shape == "square":
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
    else:  # triangle, apex up; the label goes at the centroid, where it is wide enough
        draw.polygon([(cx, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=fill)
        cy = y1 + (2 * side) // 3
    return cx, cy


def _draw_dot_object(draw: ImageDraw.ImageDraw, shape: str, fill: tuple[int, int, int], box: Box,
                     dot: str, cfg: SyntheticConfig) -> Box:
    """Draw the shape and its dot (a ``dot_size`` square) at the label's place; returns the dot's box."""
    cx, cy = _draw_shape(draw, shape, fill, box)
    x, y = cx - cfg.dot_size // 2, cy - cfg.dot_size // 2
    draw.rectangle((x, y, x + cfg.dot_size - 1, y + cfg.dot_size - 1), fill=DOT_COLOURS[dot])
    return Box(x, y, x + cfg.dot_size, y + cfg.dot_size)


def _pattern_ink(pattern: str, u: int, v: int, line: int, phase: int) -> bool:
    """Whether the pixel at offset (u, v) from the pattern square's centre is dark.

    Bands are counted from the centre outwards (|u|, |v|), so every pattern is point-symmetric:
    none shifts the square's dark mass, which a shrunk overview would still show. ``phase`` (0 or
    1, random) swaps dark and light bands: a truncated stripe pattern has light (or dark) edge rows
    that a shrunk overview keeps as a faint elongation, and a random phase gives that no sign.
    """
    if pattern == "horizontal":
        band = abs(v) // line
    elif pattern == "vertical":
        band = abs(u) // line
    else:  # checkered
        band = abs(u) // line + abs(v) // line
    return (band + phase) % 2 == 1


def _draw_pattern_object(draw: ImageDraw.ImageDraw, rng: random.Random, shape: str,
                         fill: tuple[int, int, int], box: Box, pattern: str, cfg: SyntheticConfig) -> Box:
    """Draw the shape and its pattern square at the label's place; returns the square's box.

    The square's mean grey (110-145) and contrast (140-210) are drawn at random and its two inks
    are set so that the mean is exactly that grey whatever the pattern's dark share: shrunk, all
    four patterns become the same random grey, and neither brightness nor position tells them apart.
    """
    side = cfg.pattern_size
    cx, cy = _draw_shape(draw, shape, fill, box)
    half = side // 2
    cells = [(u, v) for v in range(-half, side - half) for u in range(-half, side - half)]
    phase = rng.randrange(2)
    dark = [(cx + u, cy + v) for u, v in cells if _pattern_ink(pattern, u, v, cfg.pattern_line, phase)]
    share = len(dark) / len(cells)
    mean, contrast = rng.uniform(110, 145), rng.uniform(140, 210)
    light_ink, dark_ink = round(mean + contrast * share), round(mean - contrast * (1 - share))
    draw.rectangle((cx - half, cy - half, cx - half + side - 1, cy - half + side - 1), fill=(light_ink,) * 3)
    draw.point(dark, fill=(dark_ink,) * 3)
    return Box(cx - half, cy - half, cx - half + side, cy - half + side)


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, fill: tuple[int, int, int], box: Box,
                 digit: int, cfg: SyntheticConfig) -> Box:
    """Draw the shape, its white label and digit; returns the digit's box."""
    cx, cy = _draw_shape(draw, shape, fill, box)
    dh = cfg.digit_size
    dw = _digit_width(dh)
    dx, dy = cx - dw // 2, cy - dh // 2
    pad = cfg.digit_stroke + 1
    draw.rectangle((dx - pad, dy - pad, dx + dw - 1 + pad, dy + dh - 1 + pad), fill=LABEL_FILL)
    _draw_digit(draw, digit, dx, dy, dw, dh, cfg.digit_stroke)
    return Box(dx, dy, dx + dw, dy + dh)


def _digit_width(height: int) -> int:
    return max(3, round(0.6 * height))


def _draw_digit(draw: ImageDraw.ImageDraw, digit: int, x: int, y: int, w: int, h: int,
                t: int) -> None:
    """A 7-segment ``digit`` filling the w x h pixel box at (x, y), strokes ``t`` pixels."""
    mid = (h - t) // 2  # top row of the middle bar
    rects = {
        "a": (x, y, x + w - 1, y + t - 1),
        "b": (x + w - t, y, x + w - 1, y + mid + t - 1),
        "c": (x + w - t, y + mid, x + w - 1, y + h - 1),
        "d": (x, y + h - t, x + w - 1, y + h - 1),
        "e": (x, y + mid, x + t - 1, y + h - 1),
        "f": (x, y, x + t - 1, y + mid + t - 1),
        "g": (x, y + mid, x + w - 1, y + mid + t - 1),
    }
    for segment in SEGMENTS[digit]:
        draw.rectangle(rects[segment], fill=DIGIT_INK)


def viscot_record(scene: Scene, image_path: str, split: str, question_id: str,
                  dataset: str) -> dict[str, Any]:
    """One record in Visual-CoT's format (as written by its tools/convert_data_to_llava_format.py).

    ``image`` holds the path twice, the second with the pixel box after ``###`` as integers;
    the first gpt turn is the box normalized to the image padded to a square (expand2square),
    three decimals. ``width``/``height`` are the optional size fields of Visual-CoT's benchmark
    records.
    """
    box = scene.target_object.box
    pixels = "[" + ", ".join(str(int(v)) for v in box.as_list()) + "]"
    width, height = scene.size
    return {
        "dataset": dataset,
        "split": split,
        "question_id": question_id,
        "image": [image_path, f"{image_path}###{pixels}"],
        "conversations": [
            {"from": "human", "value": f"<image>\n{scene.question} {BOX_PROMPT}"},
            {"from": "gpt", "value": format_box(box, "viscot", scene.size)},
            {"from": "human", "value": "<image>"},
            {"from": "gpt", "value": scene.answer},
        ],
        "width": width,
        "height": height,
    }


def split_sizes(cfg: SyntheticConfig) -> dict[str, int]:
    return {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}


def write_benchmark(out_dir: Path, cfg: SyntheticConfig) -> dict[str, Path]:
    """Write ``images/<split>_<i>.png`` and ``<split>.json`` (Visual-CoT format) under ``out_dir``.

    Image paths in the JSON are relative to ``out_dir``. Returns {split: json path}. The same
    ``cfg`` always writes the same bytes.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, count in split_sizes(cfg).items():
        records = []
        for i in range(count):
            scene = render_item(cfg, split, i)
            rel = f"images/{split}_{i}.png"
            # Fixed compression and no metadata: PNG bytes depend on the pixels only.
            scene.image.save(out_dir / rel, format="PNG", compress_level=6)
            records.append(viscot_record(scene, rel, split, f"{split}_{i}", cfg.dataset_name))
        path = out_dir / f"{split}.json"
        path.write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
        paths[split] = path
    return paths
