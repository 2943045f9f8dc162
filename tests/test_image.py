"""core.image: golden preprocessing values, every Pillow mode to RGB, and the errors a user sees."""

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from core.config import ImageConfig
from core.image import (
    ImageError,
    load_image,
    preprocess,
    preprocess_batch,
    preprocess_batch_for,
    preprocess_for,
)

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def synthetic(width: int = 10, height: int = 6) -> np.ndarray:
    """A fixed uint8 [H, W, 3] image from a formula (no file, no randomness)."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([(xs * xs * 7 + ys * 13) % 256, (xs * ys * 11 + 50) % 256, 255 - xs * 20 - ys * 9], -1).astype(
        np.uint8
    )


def encoded(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def mode_of(source: Path | bytes) -> str:
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
        return im.mode


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# Golden values: synthetic() squashed 10x6 -> 4x4 with PIL bicubic, /255, CLIP mean/std. Bit-identical to
# torchvision's ToTensor + Normalize (checked once against torch float32 ops when these numbers were written).
GOLDEN = {
    (0, 0, 0): -1.6462782621383667,
    (0, 1, 2): -0.2302308976650238,
    (0, 3, 3): -0.27402618527412415,
    (1, 0, 0): -0.9566853642463684,
    (1, 2, 1): 0.7692080140113831,
    (1, 3, 3): 0.6041225790977478,
    (2, 0, 0): 1.875715970993042,
    (2, 2, 3): -0.6127957701683044,
    (2, 3, 0): 1.3211332559585571,
}


def test_preprocess_golden_values():
    x = preprocess(synthetic(), 4, MEAN, STD)
    assert x.shape == (3, 4, 4) and x.dtype == np.float32 and x.flags["C_CONTIGUOUS"]
    for index, value in GOLDEN.items():
        assert x[index] == pytest.approx(value, abs=1e-6), index
    assert float(x.mean()) == pytest.approx(0.0689717, abs=1e-6)


def test_preprocess_same_from_array_pil_png_bytes_and_path(tmp_path):
    arr = synthetic()
    png = encoded(Image.fromarray(arr), "PNG")
    ref = preprocess(arr, 4, MEAN, STD)
    for source in (Image.fromarray(arr), png, write(tmp_path, "s.png", png), str(tmp_path / "s.png")):
        np.testing.assert_array_equal(preprocess(source, 4, MEAN, STD), ref)


def test_preprocess_for_and_batches_follow_image_config():
    cfg = ImageConfig(size=4, mean=MEAN, std=STD)
    one = preprocess_for(synthetic(), cfg)
    np.testing.assert_array_equal(one, preprocess(synthetic(), 4, MEAN, STD))
    batch = preprocess_batch_for([synthetic(), synthetic(5, 5)], cfg)
    assert batch.shape == (2, 3, 4, 4) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[0], one)
    np.testing.assert_array_equal(batch, preprocess_batch([synthetic(), synthetic(5, 5)], 4, MEAN, STD))
    # squash, not crop: a uniform image stays uniform, and the normalised value is (v/255 - mean) / std
    flat = preprocess(np.full((3, 9, 3), 200, np.uint8), 4, MEAN, STD)
    assert flat[0, 2, 3] == pytest.approx((200 / 255 - MEAN[0]) / STD[0], abs=1e-6)
    with pytest.raises(ValueError, match="unknown resample 'cubic'"):
        preprocess(synthetic(), 4, MEAN, STD, resample="cubic")
    with pytest.raises(ValueError, match="at least one image"):
        preprocess_batch([], 4, MEAN, STD)


def test_grayscale_1bit_and_16bit_png(tmp_path):
    gray = Image.fromarray(np.array([[0, 77, 255]], np.uint8))
    assert np.asarray(load_image(write(tmp_path, "g.png", encoded(gray, "PNG")))).tolist() == [
        [[0, 0, 0], [77, 77, 77], [255, 255, 255]]
    ]
    bits = Image.fromarray(np.array([[False, True]]))
    assert mode_of(encoded(bits, "PNG")) == "1"
    assert np.asarray(load_image(write(tmp_path, "b.png", encoded(bits, "PNG"))))[0, :, 0].tolist() == [0, 255]
    deep = Image.fromarray(np.array([[0, 257, 32768, 65535]], np.uint16))
    path = write(tmp_path, "d.png", encoded(deep, "PNG"))
    assert mode_of(path) == "I;16"
    out = load_image(path)
    assert out.mode == "RGB" and np.asarray(out)[0, :, 1].tolist() == [0, 1, 128, 255]  # scaled, not clipped


def test_float_tiff(tmp_path):
    im = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert im.mode == "F"
    assert np.asarray(load_image(write(tmp_path, "f.tif", encoded(im, "TIFF"))))[0, :, 2].tolist() == [0, 128, 255]


def test_alpha_and_palette_composite_on_white(tmp_path):
    rgba = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [0, 0, 0, 128]]], np.uint8)
    out = np.asarray(load_image(write(tmp_path, "a.png", encoded(Image.fromarray(rgba), "PNG"))))
    assert out.tolist() == [[[255, 255, 255], [0, 0, 255], [127, 127, 127]]]
    la = Image.fromarray(np.array([[[10, 0], [10, 255]]], np.uint8), mode="LA")
    assert np.asarray(load_image(la))[0, :, 0].tolist() == [255, 10]
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    path = write(tmp_path, "p.png", encoded(pal, "PNG", transparency=0))
    assert mode_of(path) == "P"
    assert np.asarray(load_image(path)).tolist() == [[[255, 255, 255], [255, 0, 0]]]


def test_cmyk_jpeg(tmp_path):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    path = write(tmp_path, "c.jpg", encoded(cmyk, "JPEG", quality=95))
    assert mode_of(path) == "CMYK"
    r, g, b = load_image(path).getpixel((4, 4))
    assert r >= 250 and g <= 5 and b <= 5


def test_numpy_inputs():
    assert load_image(np.array([[0, 32768, 65535]], np.uint16)).getpixel((2, 0)) == (255, 255, 255)
    assert load_image(np.array([[0.0, 0.25, 1.0]])).getpixel((1, 0)) == (64, 64, 64)
    assert load_image(np.array([[True, False]])).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(np.full((2, 2, 1), 9, np.uint8)).getpixel((1, 1)) == (9, 9, 9)
    assert load_image(np.array([[[0, 255, 0, 0]]], np.uint8)).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ImageError, match=r"must lie in \[0, 1\], these span \[0, 255\]; divide by 255"):
        load_image(np.array([[0.0, 255.0]]))
    with pytest.raises(ImageError, match=r"shape \(3, 8, 9\).*channel-first, transpose"):
        load_image(np.zeros((3, 8, 9), np.uint8))
    with pytest.raises(ImageError, match="unsupported dtype"):
        load_image(np.zeros((2, 2), np.int64))


def test_pil_input_is_copied_not_returned():
    src = Image.fromarray(synthetic())
    out = load_image(src)
    assert out is not src and out.tobytes() == src.tobytes()


def test_error_messages_name_the_file(tmp_path):
    jpeg = encoded(Image.fromarray(synthetic(64, 48)), "JPEG")
    truncated = write(tmp_path, "cut.jpg", jpeg[: len(jpeg) // 2])
    with pytest.raises(ImageError, match=r"cut\.jpg: the image data is truncated or corrupt"):
        load_image(truncated)
    with pytest.raises(ImageError, match=r"notes\.txt: not an image Pillow can read"):
        load_image(write(tmp_path, "notes.txt", b"hello, this is text\n"))
    with pytest.raises(ImageError, match=r"empty\.png: the file is empty \(0 bytes\)"):
        load_image(write(tmp_path, "empty.png", b""))
    with pytest.raises(ImageError, match=r"missing\.jpg: no such file"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match=r"image bytes: empty"):
        load_image(b"")
    with pytest.raises(ImageError, match="unsupported image input of type int"):
        load_image(3)  # type: ignore[arg-type]


def test_max_pixels_is_checked_from_the_header_before_decoding(tmp_path):
    big = encoded(Image.fromarray(synthetic(20, 10)), "PNG")
    msg = r"big\.png: 20 x 10 = 200 pixels is more than the limit of 199 pixels"
    with pytest.raises(ImageError, match=msg):
        load_image(write(tmp_path, "big.png", big), max_pixels=199)
    # a truncated file that is also too large fails on its size: the pixels were never decoded
    with pytest.raises(ImageError, match=msg):
        load_image(write(tmp_path, "big.png", big[: len(big) // 2]), max_pixels=199)
    assert load_image(write(tmp_path, "ok.png", big), max_pixels=200).size == (20, 10)
    with pytest.raises(ImageError, match="is more than the limit of 100 pixels"):
        load_image(synthetic(20, 10), max_pixels=100)
    with pytest.raises(ImageError, match="is more than the limit of 100 pixels"):
        preprocess_for(synthetic(20, 10), ImageConfig(max_pixels=100))


def test_pillow_globals_neither_hide_errors_nor_change(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    jpeg = encoded(Image.fromarray(synthetic(64, 48)), "JPEG")
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(jpeg[: len(jpeg) // 2])
    # our max_pixels, not Pillow's global, decides (Pillow would refuse 200 pixels at 2 x 50)
    assert load_image(encoded(Image.fromarray(synthetic(20, 10)), "PNG"), max_pixels=1000).size == (20, 10)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True and Image.MAX_IMAGE_PIXELS == 50


def test_import_does_not_import_torch():
    code = "import sys, core.image, core.config; assert 'torch' not in sys.modules, 'torch was imported'; print('ok')"
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
