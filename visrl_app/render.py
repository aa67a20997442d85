"""Drawing boxes on images for display (pure PIL; nothing here changes stored data).

Every box is absolute pixels of the ORIGINAL image, as stored; the drawings keep the image size,
so a box read back from the annotator is in the same pixels.
"""

from __future__ import annotations

from PIL import Image, ImageDraw

from visrl.boxes import Box, crop_box

GREEN = (34, 197, 94)  # chosen
RED = (239, 68, 68)  # rejected
BLUE = (37, 99, 235)  # annotated (ground truth)
ORANGE = (249, 115, 22)  # a model's predicted focus box in the chat


def line_width(size: tuple[int, int]) -> int:
    """About 0.6% of the longer side, at least 2 px: visible on 224 px and 2000 px images."""
    return max(2, round(max(size) / 160))


def draw_dashed_box(image: Image.Image, box: Box, color: tuple[int, int, int],
                    dash: int | None = None) -> Image.Image:
    """A copy of ``image`` with ``box`` outlined in dashes (the annotated box: distinct from the
    solid chosen/rejected boxes the curator can drag)."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    width = line_width(out.size)
    dash = dash or max(4, width * 3)
    x1, y1, x2, y2 = box.as_list()
    for a, b, fixed, horizontal in ((x1, x2, y1, True), (x1, x2, y2, True),
                                    (y1, y2, x1, False), (y1, y2, x2, False)):
        pos = a
        while pos < b:
            end = min(pos + dash, b)
            if horizontal:
                draw.line([(pos, fixed), (end, fixed)], fill=color, width=width)
            else:
                draw.line([(fixed, pos), (fixed, end)], fill=color, width=width)
            pos += 2 * dash
    return out


def draw_box(image: Image.Image, box: Box, color: tuple[int, int, int],
             label: str | None = None) -> Image.Image:
    """A copy of ``image`` with ``box`` outlined solid (and a small label above it)."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    draw.rectangle(box.as_list(), outline=color, width=line_width(out.size))
    if label:
        draw.text((box.x1 + 2, max(0, box.y1 - 12)), label, fill=color)
    return out


def side_crop(image: Image.Image, box: Box | None) -> Image.Image | None:
    """The crop a side's answer was conditioned on (``visrl.boxes.crop_box``), or None."""
    return None if box is None else crop_box(image.convert("RGB"), box)


def annotator_box(box: Box, label: str, color: tuple[int, int, int]) -> dict:
    """A box in gradio_image_annotation's value format (absolute pixels, RGB tuple colour)."""
    return {"xmin": round(box.x1), "ymin": round(box.y1), "xmax": round(box.x2),
            "ymax": round(box.y2), "label": label, "color": color}
