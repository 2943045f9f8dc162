"""The 0-100 grid box format of MiniGPT-v2 / TinyGPT-V: write, parse, compare and draw boxes (torch-free).

A box is `{<x1><y1><x2><y2>}`, integer corners on a 0-100 grid relative to the ORIGINAL image size (reference §3.2).
Because preprocessing squashes the image to a square, the grid maps directly onto the model's input as well.
Grounded answers put a phrase before its boxes: `<p>two dogs</p> {<1><2><40><50>}<delim>{<55><2><90><60>}`.

    box = box_to_grid(x, y, w, h, width, height)      # COCO [x, y, w, h] pixels -> (x1, y1, x2, y2) on the grid
    format_grounded("a dog", [box])                   # '<p>a dog</p> {<12><30><40><77>}'
    parse_grounded(answer)                            # [('a dog', [(12, 30, 40, 77)])]
    draw_boxes(image, [("a dog", box)]).save("out.png")

Parsing keeps numbers as written: a model may answer `<105>` and \\d{1,3} lets it through, as in the original
evaluator; `grid_to_pixels` then gives a corner outside the image, and `draw_boxes` clips it to the image edge.
"""

from __future__ import annotations

import logging
import operator
import re
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

GRID = 100  # the grid's resolution: corners run 0..100
DELIM = "<delim>"
Box = tuple[int, int, int, int]

# the original evaluator (eval_ref.py) removes spaces, then matches exactly this
BOX_PATTERN = re.compile(r"\{<(\d{1,3})><(\d{1,3})><(\d{1,3})><(\d{1,3})>\}")
# a phrase and the boxes right after it, joined by <delim> or by nothing (`}{`, which models also write)
_GROUNDED_PATTERN = re.compile(r"<p>(.*?)</p>((?:\s*(?:<delim>)?\s*\{[^{}]*\})*)", re.DOTALL)
_SPACES = re.compile(r"\s+")

# distinct, saturated colours; item i of draw_boxes gets PALETTE[i % len(PALETTE)]
PALETTE = (
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (210, 210, 0),
    (255, 0, 255),
    (0, 255, 255),
    (250, 128, 114),
    (255, 165, 0),
    (0, 128, 0),
    (144, 238, 144),
    (175, 238, 238),
    (0, 191, 255),
    (138, 43, 226),
    (255, 215, 0),
)


def _as_box(box: Sequence[int]) -> Box:
    if len(box) != 4:
        raise ValueError(f"a box needs 4 corners (x1, y1, x2, y2), got {len(box)}: {box!r}")
    try:
        return tuple(operator.index(v) for v in box)  # type: ignore[return-value]
    except TypeError:
        raise ValueError(f"box corners must be integers on the 0-{GRID} grid, got {box!r}; use box_to_grid") from None


def format_box(box: Sequence[int]) -> str:
    """(x1, y1, x2, y2) on the grid -> `{<x1><y1><x2><y2>}`."""
    x1, y1, x2, y2 = _as_box(box)
    return f"{{<{x1}><{y1}><{x2}><{y2}>}}"


def box_to_grid(x: float, y: float, w: float, h: float, width: int, height: int) -> Box:
    """A COCO [x, y, w, h] box in pixels of a width x height image -> grid corners.

    Exactly the original's arithmetic (coco_dataset.py): x / W * 100, truncated with int(), so 0.29 of the
    width gives 28 (0.29 * 100 = 28.999...), not 29.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"the image size must be positive, got {width} x {height}")
    return (
        int(x / width * GRID),
        int(y / height * GRID),
        int((x + w) / width * GRID),
        int((y + h) / height * GRID),
    )


def grid_to_pixels(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    """Grid corners -> pixel corners (floats) of a width x height image, as the original evaluator: v / 100 * W."""
    x1, y1, x2, y2 = box
    return (x1 / GRID * width, y1 / GRID * height, x2 / GRID * width, y2 / GRID * height)


def format_grounded(phrase: str, boxes: Sequence[Sequence[int]]) -> str:
    """`<p>phrase</p> {<..>}<delim>{<..>}`; `boxes` is a list of boxes (a single box is accepted too)."""
    if len(boxes) == 4 and not any(hasattr(v, "__len__") for v in boxes):
        boxes = [boxes]  # type: ignore[list-item]
    if len(boxes) == 0:
        raise ValueError(f"phrase {phrase!r} has no boxes; a grounded phrase needs at least one")
    return f"<p>{phrase}</p> " + DELIM.join(format_box(b) for b in boxes)


def parse_boxes(text: str) -> list[Box]:
    """Every `{<x1><y1><x2><y2>}` in `text`, in order, after removing whitespace (`{ <1> <2>...}` counts)."""
    return [tuple(int(v) for v in m) for m in BOX_PATTERN.findall(_SPACES.sub("", text))]  # type: ignore[misc]


def parse_grounded(text: str) -> list[tuple[str, list[Box]]]:
    """`<p>phrase</p> {..}<delim>{..}` pieces of an answer -> [(phrase, [boxes])], in order.

    A phrase followed by no well-formed box comes back with an empty list, so a caller can tell
    "named but not located" from "not named".
    """
    return [(phrase.strip(), parse_boxes(boxes)) for phrase, boxes in _GROUNDED_PATTERN.findall(text)]


def iou(a: Sequence[float], b: Sequence[float], pixel_inclusive: bool = False) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; 0.0 when the union is empty.

    pixel_inclusive=True counts both edges (+1 on every side), as MiniGPT-v2's computeIoU does on pixel boxes;
    use it to reproduce the original RefCOCO numbers (a hit is IoU > 0.5).
    """
    one = 1 if pixel_inclusive else 0
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    inter_w = max(0, min(ax2, bx2) - max(ax1, bx1) + one)
    inter_h = max(0, min(ay2, by2) - max(ay1, by1) + one)
    inter = inter_w * inter_h
    area_a = max(0, ax2 - ax1 + one) * max(0, ay2 - ay1 + one)
    area_b = max(0, bx2 - bx1 + one) * max(0, by2 - by1 + one)
    union = area_a + area_b - inter
    return float(inter / union) if union > 0 else 0.0


def _pixel_rect(box: Sequence[int], width: int, height: int) -> tuple[int, int, int, int]:
    """Grid box -> the inclusive pixel rectangle Pillow draws, corners sorted and clipped to the image."""
    px1, py1, px2, py2 = grid_to_pixels(box, width, height)
    x1, x2 = sorted((round(px1), round(px2)))
    y1, y2 = sorted((round(py1), round(py2)))
    x1, y1 = min(max(x1, 0), width - 1), min(max(y1, 0), height - 1)
    x2, y2 = min(max(x2 - 1, x1), width - 1), min(max(y2 - 1, y1), height - 1)  # right/bottom edges are exclusive
    return x1, y1, x2, y2


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def draw_boxes(
    image: Image.Image, items: Sequence[tuple[str | None, Sequence[int]]], line_width: int | None = None
) -> Image.Image:
    """A copy of `image` (RGB) with each (label or None, grid box) drawn as a rectangle, its label on a filled tag.

    Boxes are scaled from the grid to the image size; item i gets PALETTE[i % len(PALETTE)]. The tag sits above the
    box, or inside its top edge when there is no room above. The line width defaults to ~1/150 of the short side.
    """
    out = image.convert("RGB") if image.mode != "RGB" else image.copy()
    width, height = out.size
    line = line_width if line_width is not None else max(2, round(min(width, height) / 150))
    font = _font(max(10, round(min(width, height) / 30)))
    pad = max(1, line // 2 + 1)
    draw = ImageDraw.Draw(out)
    for i, (label, box) in enumerate(items):
        color = PALETTE[i % len(PALETTE)]
        x1, y1, x2, y2 = _pixel_rect(_as_box(box), width, height)
        draw.rectangle((x1, y1, x2, y2), outline=color, width=line)
        if not label:
            continue
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        tag_w, tag_h = right - left + 2 * pad, bottom - top + 2 * pad
        tag_y = y1 - tag_h if y1 - tag_h >= 0 else y1 + line
        draw.rectangle((x1, tag_y, x1 + tag_w - 1, tag_y + tag_h - 1), fill=color)
        ink = (0, 0, 0) if sum(c * w for c, w in zip(color, (299, 587, 114))) > 128_000 else (255, 255, 255)
        draw.text((x1 + pad - left, tag_y + pad - top), label, fill=ink, font=font)
    logger.debug("drew %d box(es) on a %d x %d image", len(items), width, height)
    return out
