"""Decoding one image member into the square uint8 crop the encoders take.

Every odd input is either normalised (CMYK, 16-bit, palette, alpha, grayscale, EXIF rotation)
or rejected with a `DecodeError` whose message goes into the errors table; nothing here lets an
exception other than `DecodeError` escape for a bad image.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class DecodeError(ValueError):
    """An image member that cannot become an encoder input; the message is the recorded reason."""


@dataclass(frozen=True)
class DecodeConfig:
    """How images become encoder inputs. `size` is set from the bundle (the guide input size)."""

    size: int = 256
    max_pixels: int = 64_000_000  # decompression-bomb limit, checked before pixel data is read
    min_side: int = 16  # smaller images are errors, not silently blown up
    draft: bool = True  # JPEG DCT-domain downscaling when the image is >= 2x the target

    def __post_init__(self) -> None:
        if self.size < 8 or self.max_pixels < 1 or self.min_side < 1:
            raise ValueError(f"decode config out of range: {self}")


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # (size, size, 3) uint8
    width: int  # of the stored image, before any crop or resize
    height: int


def decode_image(data: bytes, config: DecodeConfig) -> DecodedImage:
    """Image bytes -> centered square RGB crop resized to `config.size`."""
    if not data:
        raise DecodeError("empty image member (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DecodeError(f"not a readable image: {err}") from err
    width, height = img.size
    if width * height > config.max_pixels:
        raise DecodeError(f"decompression bomb: {width}x{height} = {width * height} pixels > limit {config.max_pixels}")
    if min(width, height) < config.min_side:
        raise DecodeError(f"image too small: {width}x{height}, the minimum side is {config.min_side}")
    try:
        if config.draft and img.format == "JPEG":
            side = min(width, height)
            img.draft("RGB", (-(-config.size * width // side), -(-config.size * height // side)))
        img.load()
        img = ImageOps.exif_transpose(img)
        rgb = to_rgb(img)
    except (OSError, ValueError, SyntaxError) as err:
        raise DecodeError(f"corrupt image data: {type(err).__name__}: {err}") from err
    return DecodedImage(pixels=square_resize(rgb, config.size), width=width, height=height)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: alpha over white, 16/32-bit scaled down, CMYK/palette converted."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(img)), mode="L").convert("RGB")
    return img.convert("RGB")


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """16-bit (or wider) single-channel pixels -> uint8, keeping the full range."""
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind == "f":
        return np.clip(array, 0, 255).astype(np.uint8)
    peak = 65535 if array.max(initial=0) > 255 else 255
    return np.clip(array.astype(np.float64) * (255.0 / peak), 0, 255).round().astype(np.uint8)


def square_resize(img: Image.Image, size: int) -> np.ndarray:
    """Center square crop, then resize to (size, size) with a bicubic filter."""
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    box = (left, top, left + side, top + side)
    out = img.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=None)
    return np.asarray(out, dtype=np.uint8)
