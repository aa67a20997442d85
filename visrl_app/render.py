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


LABEL_PX = 24  # the annotator writes a box's label in a ~20 px band above the box (screen pixels)
DISPLAY_PX = (640, 440)  # the image is shown at most this size (fits beside the answers at 1440x900)
MAX_UPSCALE = 3.0  # small images (224 px scenes) are enlarged up to 3x so boxes can be grabbed


def display_geometry(size: tuple[int, int]) -> tuple[float, int]:
    """(scale, pad) for showing an image of ``size`` pixels in the desk's annotator.

    The image is resized by ``scale`` to fit ``DISPLAY_PX`` (the annotator itself only shrinks
    images to its width, so a tall image would push the page down and a small one stay tiny),
    then ``pad`` rows are added above it so the label over a box at y = 0 stays visible. Boxes
    shown are ``box * scale`` moved down by ``pad``; :func:`from_display` undoes it.
    """
    width, height = size
    scale = min(DISPLAY_PX[0] / width, DISPLAY_PX[1] / height, MAX_UPSCALE)
    return scale, LABEL_PX


def to_display(box: Box, scale: float, pad: int) -> Box:
    return Box(box.x1 * scale, box.y1 * scale + pad, box.x2 * scale, box.y2 * scale + pad)


def from_display(box: Box, scale: float, pad: int) -> Box:
    return Box(box.x1 / scale, (box.y1 - pad) / scale, box.x2 / scale, (box.y2 - pad) / scale)


def display_image(image: Image.Image, scale: float, pad: int) -> Image.Image:
    """``image`` resized by ``scale`` with ``pad`` rows above it (see :func:`display_geometry`)."""
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    shown = image.convert("RGB") if size == image.size else image.convert("RGB").resize(size, Image.LANCZOS)
    return pad_top(shown, pad)


def pad_top(image: Image.Image, pad: int, color: tuple[int, int, int] = (241, 245, 249)) -> Image.Image:
    """``image`` with ``pad`` rows of ``color`` above it (boxes shown on it move down by ``pad``)."""
    out = Image.new("RGB", (image.width, image.height + pad), color)
    out.paste(image.convert("RGB"), (0, pad))
    return out


def unrotate(box: Box, orientation: int, size: tuple[int, int]) -> Box:
    """A box read from the annotator after its rotate buttons turned the view ``orientation``
    quarter turns clockwise, back in the unrotated image of ``size`` (width, height) pixels.

    The annotator draws a clockwise quarter turn as x' = H - y, y' = x (canvas translate(H, 0),
    rotate(pi/2)); its boxes come back in that rotated frame.
    """
    width, height = size
    x1, y1, x2, y2 = box.as_list()
    turns = orientation % 4
    if turns == 1:
        return Box(y1, height - x2, y2, height - x1)
    if turns == 2:
        return Box(width - x2, height - y2, width - x1, height - y1)
    if turns == 3:
        return Box(width - y2, x1, width - y1, x2)
    return box
