"""Image loading and preprocessing shared by training, export and the runtime (Pillow + numpy, torch-free).

`load_image` turns whatever a user hands us (a path, bytes, a PIL image, a numpy array) into an 8-bit RGB PIL image,
or raises `ImageError` naming the file and what to do. `preprocess` then does exactly what BLIP-2's
`blip2_image_eval` processor does (reference §1.9): a plain squash-resize to size x size with PIL bicubic (aspect ratio
not kept, no crop), ToTensor's /255 and Normalize's per-channel (x - mean) / std, all in float32.

    from core.image import load_image, preprocess_for
    pixels = preprocess_for("photo.jpg", cfg.image)   # np.float32 [3, S, S]

Decoding happens under a module lock with Pillow's two global switches pinned: LOAD_TRUNCATED_IMAGES off (a truncated
file must fail, not come back half grey) and MAX_IMAGE_PIXELS off (our own `max_pixels` check, made from the header
before any pixel is decoded, replaces Pillow's, which only warns up to twice its limit). The switches are restored after.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

if TYPE_CHECKING:
    from core.config import ImageConfig

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit
RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_PILLOW_LOCK = threading.Lock()

ImageInput = str | Path | bytes | bytearray | Image.Image | np.ndarray


class ImageError(ValueError):
    """An image that cannot be used: missing, empty, not an image, truncated, too large, or an unsupported array."""


@contextmanager
def _strict_pillow() -> Iterator[None]:
    """Pin Pillow's globals for one decode: truncated data raises, and Pillow's own pixel limit is off (ours applies)."""
    with _PILLOW_LOCK:
        saved = (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS)
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = saved


def _check_pixels(width: int, height: int, max_pixels: int, name: str) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: the image is {width} x {height} pixels; it has no pixels")
    if width * height > max_pixels:
        raise ImageError(
            f"{name}: {width:,} x {height:,} = {width * height:,} pixels is more than the limit of {max_pixels:,} "
            f"pixels; downscale the image first, or raise max_pixels (ImageConfig.max_pixels) if you trust it"
        )


def _flatten_alpha(im: Image.Image) -> Image.Image:
    """Composite an image with transparency onto white, as a viewer shows it."""
    if im.mode == "La":
        im = im.convert("LA")  # Pillow has no La -> RGBA conversion
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _to_rgb(im: Image.Image, name: str) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. Returns `im` itself when it already is RGB."""
    mode = im.mode
    if mode == "RGB":
        return im
    logger.debug("%s: converting Pillow mode %s to RGB", name, mode)
    if mode == "I" or mode.startswith("I;16"):
        # 16-bit grey (PNG gives I;16, older Pillow gave I): scale 0..65535 onto 0..255; Pillow's convert("L") clips.
        values = np.clip(np.asarray(im).astype(np.float64), 0, 65535)  # [H, W]
        return Image.fromarray(np.rint(values / 257.0).astype(np.uint8)).convert("RGB")
    if mode == "F":
        values = np.asarray(im).astype(np.float64)  # [H, W]
        if not np.isfinite(values).all():
            raise ImageError(f"{name}: the float image holds NaN or infinite values")
        # F images come as [0, 1] (most writers) or [0, 255]; anything else is clipped.
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
        return Image.fromarray(np.rint(np.clip(values * scale, 0, 255)).astype(np.uint8)).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in im.info:
        return _flatten_alpha(im)
    try:
        return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, HSV, LAB, RGBX
    except (ValueError, OSError) as err:
        raise ImageError(f"{name}: cannot convert Pillow mode {mode!r} to RGB ({err})") from None


def _decode(im: Image.Image, max_pixels: int, name: str) -> Image.Image:
    """Check the header size, decode every pixel, convert to RGB. Caller holds `_strict_pillow`."""
    _check_pixels(im.width, im.height, max_pixels, name)
    try:
        im.load()
    except (OSError, SyntaxError, EOFError, ValueError) as err:
        raise ImageError(
            f"{name}: the image data is truncated or corrupt ({err}); the file is probably incomplete, "
            f"copy or download it again"
        ) from None
    return _to_rgb(im, name)


def _open_and_decode(fp: Any, max_pixels: int, name: str) -> Image.Image:
    with _strict_pillow():
        try:
            im = Image.open(fp)
        except UnidentifiedImageError:
            raise ImageError(f"{name}: not an image Pillow can read (unknown or unsupported format)") from None
        except (OSError, SyntaxError, EOFError, ValueError) as err:
            raise ImageError(f"{name}: cannot be read as an image ({err})") from None
        with im:
            out = _decode(im, max_pixels, name)
            # closing `im` frees its pixels, so an RGB image that came back as itself must be copied out first
            return out.copy() if out is im else out


def _from_array(array: np.ndarray, max_pixels: int) -> Image.Image:
    name = f"numpy array of shape {tuple(array.shape)} and dtype {array.dtype}"
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        hint = ""
        if array.ndim == 3 and array.shape[0] in (1, 3, 4):
            hint = "; it looks channel-first, transpose it with array.transpose(1, 2, 0)"
        raise ImageError(f"{name}: expected H x W, H x W x 3 or H x W x 4{hint}")
    _check_pixels(array.shape[1], array.shape[0], max_pixels, name)
    if array.dtype == np.bool_:
        u8 = array.astype(np.uint8) * 255
    elif array.dtype == np.uint8:
        u8 = array
    elif array.dtype == np.uint16:
        u8 = np.rint(array.astype(np.float64) / 257.0).astype(np.uint8)  # 65535 -> 255
    elif np.issubdtype(array.dtype, np.floating):
        low, high = float(np.min(array)), float(np.max(array))
        if not (np.isfinite(low) and np.isfinite(high)) or low < 0.0 or high > 1.0:
            raise ImageError(
                f"{name}: float values must lie in [0, 1], these span [{low:g}, {high:g}]; "
                f"divide by 255 if they are 0-255 values"
            )
        u8 = np.rint(array.astype(np.float64) * 255.0).astype(np.uint8)
    else:
        raise ImageError(f"{name}: unsupported dtype; use uint8, uint16, bool, or float in [0, 1]")
    im = Image.fromarray(np.ascontiguousarray(u8))  # L, RGB or RGBA from the shape
    return _to_rgb(im, name)


def load_image(image: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load `image` as an 8-bit RGB PIL image, fully decoded.

    Accepts a path, the bytes of an image file, a PIL image, or a numpy array (H x W, H x W x 3, H x W x 4;
    uint8, uint16, bool, or float in [0, 1]). Transparency is composited onto white; 16-bit images are scaled
    (65535 -> 255), not clipped. Raises ImageError for a missing, empty, unreadable, truncated or too-large image.
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        name = str(path)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ImageError(f"{name}: no such file") from None
        except OSError as err:
            raise ImageError(f"{name}: cannot read the file ({err.strerror or err})") from None
        if path.is_dir():
            raise ImageError(f"{name}: is a folder, not an image file")
        if size == 0:
            raise ImageError(f"{name}: the file is empty (0 bytes)")
        try:
            fp = path.open("rb")
        except OSError as err:
            raise ImageError(f"{name}: cannot read the file ({err.strerror or err})") from None
        with fp:
            return _open_and_decode(fp, max_pixels, name)
    if isinstance(image, (bytes, bytearray, memoryview)):
        name = f"image bytes ({len(image):,} bytes)"
        if len(image) == 0:
            raise ImageError("image bytes: empty (0 bytes)")
        return _open_and_decode(io.BytesIO(bytes(image)), max_pixels, name)
    if isinstance(image, Image.Image):
        name = getattr(image, "filename", "") or f"PIL image ({image.mode}, {image.width} x {image.height})"
        with _strict_pillow():
            out = _decode(image, max_pixels, name)
        return out.copy() if out is image else out  # never hand back the caller's own object
    if isinstance(image, np.ndarray):
        return _from_array(image, max_pixels)
    raise ImageError(
        f"unsupported image input of type {type(image).__name__}; pass a path, bytes, a PIL image or a numpy array"
    )


def _resample_filter(resample: str) -> Image.Resampling:
    try:
        return RESAMPLING[resample]
    except KeyError:
        raise ValueError(f"unknown resample {resample!r}; choose one of {', '.join(RESAMPLING)}") from None


def _norm_constants(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    mean32 = np.asarray(mean, dtype=np.float32)
    std32 = np.asarray(std, dtype=np.float32)
    if mean32.shape != (3,) or std32.shape != (3,):
        raise ValueError(f"mean and std need 3 values each (R, G, B), got {len(mean32)} and {len(std32)}")
    if not np.all(std32 > 0):
        raise ValueError(f"std values must be positive, got {tuple(std)}")
    return mean32, std32


def preprocess(
    image: ImageInput,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    resample: str = "bicubic",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """One image -> float32 [3, size, size]: squash-resize (aspect ratio not kept), /255, (x - mean) / std per channel.

    The same float32 operations as torchvision's Resize + ToTensor + Normalize on a PIL image, so the result matches
    BLIP-2's processor bit for bit.
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    size = int(size)
    filt = _resample_filter(resample)
    mean32, std32 = _norm_constants(mean, std)
    im = load_image(image, max_pixels=max_pixels)
    if im.size != (size, size):
        im = im.resize((size, size), filt)
    x = np.asarray(im, dtype=np.float32) / np.float32(255.0)  # [S, S, 3] in [0, 1]
    x = (x - mean32) / std32  # [S, S, 3]
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # [3, S, S]


def preprocess_batch(
    images: Sequence[ImageInput],
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    resample: str = "bicubic",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Several images -> float32 [B, 3, size, size]."""
    if len(images) == 0:
        raise ValueError("preprocess_batch needs at least one image, got none")
    return np.stack([preprocess(im, size, mean, std, resample, max_pixels) for im in images])  # [B, 3, S, S]


def preprocess_for(image: ImageInput, image_cfg: ImageConfig) -> np.ndarray:
    """`preprocess` with the size, resampling, mean, std and max_pixels of a model's ImageConfig -> [3, S, S]."""
    return preprocess(image, image_cfg.size, image_cfg.mean, image_cfg.std, image_cfg.resample, image_cfg.max_pixels)


def preprocess_batch_for(images: Sequence[ImageInput], image_cfg: ImageConfig) -> np.ndarray:
    """`preprocess_batch` with a model's ImageConfig -> [B, 3, S, S]."""
    return preprocess_batch(
        images, image_cfg.size, image_cfg.mean, image_cfg.std, image_cfg.resample, image_cfg.max_pixels
    )
