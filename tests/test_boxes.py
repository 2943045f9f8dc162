"""core.boxes: the 0-100 grid box format, its parsers, IoU and drawing."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.boxes import (
    PALETTE,
    box_to_grid,
    draw_boxes,
    format_box,
    format_grounded,
    grid_to_pixels,
    iou,
    parse_boxes,
    parse_grounded,
)

RED, GREEN, WHITE = PALETTE[0], PALETTE[1], (255, 255, 255)


def test_format_box_and_round_trip():
    assert format_box((8, 0, 62, 91)) == "{<8><0><62><91>}"
    assert format_box(np.array([1, 2, 3, 4])) == "{<1><2><3><4>}"
    assert parse_boxes(format_box((0, 5, 100, 100))) == [(0, 5, 100, 100)]
    with pytest.raises(ValueError, match="must be integers"):
        format_box((1.5, 2, 3, 4))
    with pytest.raises(ValueError, match="needs 4 corners"):
        format_box((1, 2, 3))


def test_box_to_grid_truncates_like_the_original():
    # 29 / 100 * 100 = 28.999999999999996 and 58 / 100 * 100 = 57.99999999999999: int() gives 28 and 57
    assert box_to_grid(29, 0, 29, 100, 100, 100) == (28, 0, 57, 100)
    # 10/640*100 = 1.5625, 100/480*100 = 20.83, 40/640*100 = 6.25, 300/480*100 = 62.5
    assert box_to_grid(10, 100, 30, 200, 640, 480) == (1, 20, 6, 62)
    assert box_to_grid(0, 0, 7, 3, 7, 3) == (0, 0, 100, 100)
    with pytest.raises(ValueError, match="must be positive, got 0 x 480"):
        box_to_grid(0, 0, 1, 1, 0, 480)


def test_grid_to_pixels():
    assert grid_to_pixels((10, 20, 50, 60), 640, 480) == (64.0, 96.0, 320.0, 288.0)
    # a pixel box survives the trip to the grid within one grid cell
    px = grid_to_pixels(box_to_grid(123, 45, 200, 300, 640, 480), 640, 480)
    assert all(0 <= a - b < c / 100 for a, b, c in zip((123, 45, 323, 345), px, (640, 480, 640, 480)))


def test_format_grounded_and_round_trip():
    text = format_grounded("two dogs", [(1, 2, 40, 50), (55, 2, 90, 60)])
    assert text == "<p>two dogs</p> {<1><2><40><50>}<delim>{<55><2><90><60>}"
    assert format_grounded("a cat", (3, 4, 5, 6)) == "<p>a cat</p> {<3><4><5><6>}"
    assert parse_grounded(text) == [("two dogs", [(1, 2, 40, 50), (55, 2, 90, 60)])]
    with pytest.raises(ValueError, match="'ghost' has no boxes"):
        format_grounded("ghost", [])


def test_parse_boxes_spaces_several_and_malformed():
    assert parse_boxes("{<12> <34> <56> <78>}") == [(12, 34, 56, 78)]
    assert parse_boxes(" { <1><2> <3><4> } ") == [(1, 2, 3, 4)]
    text = "<p>a</p> {<1><2><3><4>}<delim>{<5><6><7><8>} and then {<9><10><11><12>}"
    assert parse_boxes(text) == [(1, 2, 3, 4), (5, 6, 7, 8), (9, 10, 11, 12)]
    assert parse_boxes("{<1><2><3>}") == []  # three corners
    assert parse_boxes("{<1234><2><3><4>}") == []  # four digits, as the original's \d{1,3}
    assert parse_boxes("{<105><0><100><100>}") == [(105, 0, 100, 100)]  # out of range: kept as written
    assert parse_boxes("no boxes here") == []


def test_parse_grounded_caption():
    answer = (
        "<p>A young man</p> {<8><0><62><91>} in <p>a suit</p> { <7><35><56><88> } sits at "
        "<p>his desks</p> {<0><85><100><100>}{<1><2><3><4>} near <p>nothing</p> here"
    )
    assert parse_grounded(answer) == [
        ("A young man", [(8, 0, 62, 91)]),
        ("a suit", [(7, 35, 56, 88)]),
        ("his desks", [(0, 85, 100, 100), (1, 2, 3, 4)]),  # `}{` without <delim> still splits
        ("nothing", []),  # named, not located
    ]
    assert parse_grounded("{<1><2><3><4>}") == []


def test_iou_hand_computed():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(25 / 175)  # 5x5 over 100 + 100 - 25
    assert iou((0, 0, 10, 10), (0, 0, 5, 10)) == pytest.approx(0.5)
    assert iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges
    # MiniGPT-v2's computeIoU: +1 on each side, 6x6 over 121 + 121 - 36
    assert iou((0, 0, 10, 10), (5, 5, 15, 15), pixel_inclusive=True) == pytest.approx(36 / 206)
    assert iou((3, 3, 3, 3), (3, 3, 3, 3)) == 0.0  # empty union


def test_draw_boxes_changes_the_expected_pixels():
    src = Image.new("RGB", (100, 100), WHITE)
    out = draw_boxes(src, [(None, (10, 20, 50, 60)), (None, (60, 5, 90, 30))])
    assert out is not src and src.getpixel((10, 40)) == WHITE  # the input is untouched
    # box 1 covers pixels 10..49 x 20..59, outlined 2 px wide (default for a 100 px image)
    for xy in [(10, 40), (11, 40), (49, 40), (48, 40), (30, 20), (30, 21), (30, 59)]:
        assert out.getpixel(xy) == RED, xy
    for xy in [(9, 40), (12, 40), (50, 40), (30, 40), (30, 19), (30, 60), (5, 5)]:
        assert out.getpixel(xy) == WHITE, xy
    assert out.getpixel((60, 15)) == GREEN and out.getpixel((89, 15)) == GREEN and out.getpixel((75, 15)) == WHITE
    # a label draws a filled tag just above the box, in the box's colour
    labelled = draw_boxes(src, [("cat", (10, 20, 50, 60))])
    assert labelled.getpixel((10, 18)) == RED and out.getpixel((10, 18)) == WHITE
    tag = np.asarray(labelled)[:20, 10:50]
    assert (tag == RED).all(-1).sum() > 20 and (tag != RED).any(-1).sum() > 5  # background and text ink


def test_draw_boxes_scales_the_grid_and_clips():
    out = draw_boxes(Image.new("L", (200, 50), 255), [(None, (10, 20, 50, 60)), (None, (0, 0, 120, 100))])
    assert out.mode == "RGB" and out.size == (200, 50)
    # (10, 20, 50, 60) on 200 x 50 -> pixels 20..99 x 10..29
    for xy in [(20, 20), (21, 20), (99, 20), (60, 10), (60, 29)]:
        assert out.getpixel(xy) == RED, xy
    for xy in [(19, 20), (22, 20), (100, 20), (60, 20), (60, 9), (60, 30)]:
        assert out.getpixel(xy) == WHITE, xy
    # the out-of-range x2 = 120 is clipped to the right edge of the image
    assert out.getpixel((199, 25)) == GREEN and out.getpixel((0, 25)) == GREEN


def test_import_does_not_import_torch():
    code = "import sys, core.boxes; assert 'torch' not in sys.modules, 'torch was imported'; print('ok')"
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
