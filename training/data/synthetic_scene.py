"""The synthetic world's scenes: seeded, procedurally drawn images of 1-4 coloured shapes, and the objects they hold.

A scene is a pure function of (split seed, index): `draw_scene(split_seed, index, image_size)` always gives the same
pixels and the same objects. The image is split into a 3x3 grid of cells; each object takes its own cell, and its
centre stays in the middle half of that cell, so its position name ("top left", "centre", ...) is never ambiguous and
no two objects overlap. Every background carries faint seeded noise ("plain" backgrounds at +-2 grey levels), so no
two images are byte-equal even when their layouts match.

Objects are drawn with Pillow at full strength (no antialiasing), so the centre of a large shape is exactly its colour
before JPEG compression.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from core.boxes import box_to_grid

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (130, 50, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = ("small", "large")
# Side of the shape's box as a fraction of the image side. A large shape (< 1/3) always fits in its cell.
SIZE_RANGES = {"small": (0.18, 0.22), "large": (0.28, 0.32)}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (248, 248, 248),
    "light grey": (226, 226, 226),
    "cream": (250, 243, 222),
    "light blue": (224, 236, 250),
    "light green": (226, 245, 228),
}
NOISE_LEVELS = (2, 2, 6, 10)  # grey-level amplitude; 2 looks plain
POSITIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
# How a position reads inside a sentence: "a red circle at the top left", "... in the centre", "... on the left".
POSITION_PHRASES = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "centre": "in the centre",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
SPLITS = ("train", "val", "test")
MIN_IMAGE_SIZE = 32
_GAP = 2  # pixels kept free between two objects' boxes


@dataclass(frozen=True)
class ShapeObject:
    colour: str
    shape: str
    size: str  # "small" | "large"
    bbox: tuple[int, int, int, int]  # (x, y, w, h) in pixels of the drawn image
    cell: int  # 0..8, reading order over a 3x3 grid

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]

    @property
    def name(self) -> str:
        """The canonical phrase: `small red circle`."""
        return f"{self.size} {self.colour} {self.shape}"

    def grid_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(x1, y1, x2, y2) on the 0-100 grid, by the project's box helper (int() truncation)."""
        return tuple(box_to_grid(*self.bbox, width, height))

    def to_dict(self, width: int, height: int) -> dict:
        return {
            "colour": self.colour,
            "shape": self.shape,
            "size": self.size,
            "position": self.position,
            "bbox": list(self.bbox),
            "grid_box": list(self.grid_box(width, height)),
        }


@dataclass(frozen=True)
class Scene:
    split: str
    index: int
    image: Image.Image
    objects: tuple[ShapeObject, ...]  # in reading order (by cell)
    background: str

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height

    def object_dicts(self) -> list[dict]:
        return [obj.to_dict(self.width, self.height) for obj in self.objects]


def split_seed(seed: int, split: str) -> int:
    """A 63-bit seed for one split of a world: different splits never share a per-image RNG stream."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    digest = hashlib.sha256(f"tinygptv-synthetic:{seed}:{split}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def scene_rng(split_seed_: int, index: int, purpose: str = "scene") -> random.Random:
    """The RNG of one image (purpose "scene") or of one of its annotations (purpose = task name)."""
    return random.Random(f"{split_seed_}:{index}:{purpose}")  # str seeds hash through sha512: stable across runs


def _star_points(x0: float, y0: float, side: float) -> list[tuple[float, float]]:
    """A five-point star stretched to fill the box [x0, x0+side-1] x [y0, y0+side-1] exactly."""
    raw = []
    for k in range(10):
        radius = 1.0 if k % 2 == 0 else 0.5  # inner radius 0.5: a chunky star that still reads at 12 px
        angle = -math.pi / 2 + k * math.pi / 5
        raw.append((radius * math.cos(angle), radius * math.sin(angle)))
    xs, ys = [p[0] for p in raw], [p[1] for p in raw]
    sx, sy = (side - 1) / (max(xs) - min(xs)), (side - 1) / (max(ys) - min(ys))
    return [(x0 + (px - min(xs)) * sx, y0 + (py - min(ys)) * sy) for px, py in raw]


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, bbox: tuple[int, int, int, int], rgb: tuple[int, int, int]
) -> None:
    x, y, w, h = bbox
    x2, y2 = x + w - 1, y + h - 1  # Pillow boxes are inclusive
    if shape == "circle":
        draw.ellipse([x, y, x2, y2], fill=rgb)
    elif shape == "square":
        draw.rectangle([x, y, x2, y2], fill=rgb)
    elif shape == "triangle":
        draw.polygon([(x + (w - 1) / 2, y), (x2, y2), (x, y2)], fill=rgb)
    elif shape == "star":
        draw.polygon(_star_points(x, y, w), fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return not (
        a[0] + a[2] + _GAP <= b[0]
        or b[0] + b[2] + _GAP <= a[0]
        or a[1] + a[3] + _GAP <= b[1]
        or b[1] + b[3] + _GAP <= a[1]
    )


def _place(rng: random.Random, cell: int, side: int, size: int, placed: list) -> tuple[int, int, int, int] | None:
    """A box of `side` px whose centre lies in the middle half of `cell`, clear of `placed`; None after 20 tries."""
    cell_w = size / 3
    cx0, cy0 = (cell % 3 + 0.5) * cell_w, (cell // 3 + 0.5) * cell_w
    for attempt in range(20):
        jitter = cell_w / 4 if attempt < 19 else 0.0  # the last try sits at the cell centre
        cx, cy = cx0 + rng.uniform(-jitter, jitter), cy0 + rng.uniform(-jitter, jitter)
        x = min(max(round(cx - side / 2), 1), size - side - 1)
        y = min(max(round(cy - side / 2), 1), size - side - 1)
        box = (x, y, side, side)
        if not any(_overlaps(box, other) for other in placed):
            return box
    return None


def draw_scene(split_seed_: int, index: int, image_size: int = 128, split: str = "train") -> Scene:
    """Scene `index` of the split whose seed is `split_seed_`, drawn at `image_size` x `image_size` pixels."""
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size {image_size} is too small to draw shapes; use at least {MIN_IMAGE_SIZE}")
    rng = scene_rng(split_seed_, index)
    n_objects = rng.randint(1, 4)
    cells = sorted(rng.sample(range(9), n_objects))
    background = rng.choice(sorted(BACKGROUNDS))
    noise = rng.choice(NOISE_LEVELS)
    objects: list[ShapeObject] = []
    for cell in cells:
        colour, shape, size = rng.choice(sorted(COLOURS)), rng.choice(SHAPES), rng.choice(SIZES)
        side = max(6, round(rng.uniform(*SIZE_RANGES[size]) * image_size))
        box = _place(rng, cell, side, image_size, [o.bbox for o in objects])
        if box is not None:  # a crowded scene drops the object rather than overlap
            objects.append(ShapeObject(colour, shape, size, box, cell))

    noise_rng = np.random.default_rng(rng.getrandbits(64))
    grey = noise_rng.integers(-noise, noise + 1, size=(image_size, image_size, 1), dtype=np.int16)  # [H, W, 1]
    pixels = np.clip(np.asarray(BACKGROUNDS[background], dtype=np.int16) + grey, 0, 255).astype(np.uint8)  # [H, W, 3]
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        draw_shape(draw, obj.shape, obj.bbox, obj.rgb)
    return Scene(split=split, index=index, image=image, objects=tuple(objects), background=background)
