"""The edits on the desk's screen: boxes read back from the annotator and typed answers, compared
with the stored pair (what autosave stores and what Undo discards).

Boxes come back in pixels of the image as displayed: padded above for labels
(:func:`visrl_app.render.display_geometry`: resized, padded above) and possibly turned by the annotator's rotate buttons; both
are undone here, so what is stored is pixels of the original image.
"""

from __future__ import annotations

from typing import Any

from visrl import review
from visrl.boxes import Box
from visrl.errors import DataError
from visrl_app import render

BOX_TOLERANCE_PX = 0.75  # the annotator rounds to whole pixels; smaller moves are no edit


def read_annotator_boxes(value: dict[str, Any] | None, stored: dict[str, Box | None] | None = None,
                         pad: int = 0, size: tuple[int, int] | None = None, scale: float = 1.0,
                         new_side: str = "chosen") -> dict[str, Box]:
    """{"chosen": Box, "rejected": Box} from the annotator's value, in original-image pixels.

    Undoes the display scaling and label padding (:func:`visrl_app.render.display_geometry`) and
    any rotation the annotator's rotate buttons applied. A new box gets the default label "chosen"; when a side then has two
    boxes, the one that is not the stored box is the new one: it replaces the stored box of
    ``new_side`` (the desk's "A new box replaces" choice; a box relabelled by double-click keeps its
    label), or, when the other side has no box (deleted), becomes that side.
    """
    stored = stored or {}
    orientation = int((value or {}).get("orientation") or 0)
    found: dict[str, list[Box]] = {"chosen": [], "rejected": []}
    for raw in (value or {}).get("boxes") or []:
        label = (raw.get("label") or "").strip().lower()
        if label not in found:
            raise DataError(f"a box is labelled {raw.get('label')!r}; label each box 'chosen' or "
                            "'rejected' (double-click it) and save again")
        box = Box(float(raw["xmin"]), float(raw["ymin"]), float(raw["xmax"]), float(raw["ymax"]))
        if size is not None and orientation:
            shown = (round(size[0] * scale), round(size[1] * scale) + pad)
            box = render.unrotate(box, orientation, shown)
        found[label].append(render.from_display(box, scale, pad))
    for side, boxes in found.items():
        if len(boxes) > 2 or (len(boxes) == 2 and len(found["chosen"]) + len(found["rejected"]) > 3):
            raise DataError(f"{len(boxes)} boxes are labelled {side!r}; delete the extra ones and save again")
    out: dict[str, Box] = {}
    for side, other in (("chosen", "rejected"), ("rejected", "chosen")):
        boxes = found[side]
        if len(boxes) == 2:
            # the box that is not the stored one is new (both moved: the later one, drawn last)
            newest = ([b for b in boxes if _changed(stored.get(side), b, scale)] or boxes)[-1]
            kept = boxes[0] if boxes[1] is newest else boxes[1]
            if found[other] and side == "chosen" and new_side == "rejected":
                out[side], out[other] = kept, newest  # drawn with the default label, meant for rejected
            elif found[other]:
                out[side] = newest  # a new box replaces this side's box
            else:
                out[side], out[other] = kept, newest  # the other side's box was deleted: it takes that
        elif boxes and side not in out:
            out[side] = boxes[0]
    return out


def _changed(a: Box | None, b: Box, scale: float = 1.0) -> bool:
    # A box sent to the annotator comes back rounded to whole display pixels: 0.5 / scale
    # original pixels off without any move.
    tolerance = BOX_TOLERANCE_PX + 0.5 / scale
    return a is None or any(abs(x - y) > tolerance for x, y in zip(a.as_list(), b.as_list(), strict=True))


def pending_edits(pair: dict[str, Any], annotated: dict[str, Any] | None, chosen: str | None,
                  rejected: str | None, pad: int, scale: float = 1.0,
                  new_side: str = "chosen") -> list[tuple[str, str, Any]]:
    """The edits on screen that differ from the stored pair: (kind, side, value) with kind "box"
    or "answer". ``None`` inputs mean "not on screen" (nothing to save)."""
    edits: list[tuple[str, str, Any]] = []
    if annotated is not None:
        stored = review.pair_boxes(pair)
        size = (pair["width"], pair["height"])
        for side, box in read_annotator_boxes(annotated, stored, pad, size, scale, new_side).items():
            # The annotator keeps boxes inside the image: a stored box that leaves it (imported
            # data) comes back clamped without anyone touching it.
            on_image = stored[side].clamp(size) if stored[side] is not None else None
            if _changed(stored[side], box, scale) and (on_image is None or _changed(on_image, box, scale)):
                # dragged into the label band above the image: clamp onto the image
                clamped = box.clamp(size) if box.is_valid() else None
                edits.append(("box", side, clamped if clamped is not None and clamped.is_valid() else box))
    for side, text in (("chosen", chosen), ("rejected", rejected)):
        if text is not None and text.strip() != (pair[f"{side}_answer"] or "").strip():
            edits.append(("answer", side, text))
    return edits
