"""Draws the committed benchmark images (run once; the PNGs are committed so every run reads the same bytes).

    python -m benchmarks.assets.draw      # rewrites benchmarks/assets/*.png

448 x 448: the stage-4 size; the runtime resizes to the export's own size, as it would a user's photo.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).parent
SIZE = 448


def draw_shapes(shapes: list[tuple[str, str, tuple[int, int, int, int]]], background: str) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), background)
    pen = ImageDraw.Draw(image)
    for kind, colour, box in shapes:
        if kind == "circle":
            pen.ellipse(box, fill=colour)
        elif kind == "square":
            pen.rectangle(box, fill=colour)
        else:  # triangle
            x0, y0, x1, y1 = box
            pen.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=colour)
    return image


def main() -> None:
    images = {
        "shapes_a.png": draw_shapes(
            [("circle", "red", (40, 60, 200, 220)), ("square", "blue", (250, 250, 400, 400))], "white"
        ),
        "shapes_b.png": draw_shapes(
            [
                ("triangle", "green", (60, 40, 260, 240)),
                ("circle", "yellow", (280, 80, 420, 220)),
                ("square", "purple", (120, 290, 300, 430)),
            ],
            "lightgray",
        ),
        "shapes_c.png": draw_shapes(
            [("square", "orange", (100, 100, 348, 348)), ("circle", "black", (180, 180, 268, 268))], "skyblue"
        ),
    }
    for name, image in images.items():
        image.save(HERE / name, optimize=True)


if __name__ == "__main__":
    main()
