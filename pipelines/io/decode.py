"""Decoding one image member into the square uint8 crop the encoders take.

Every odd input is either normalised (CMYK, 16-bit, palette, alpha, grayscale, EXIF rotation)
or rejected with a `DecodeError` whose message goes into the errors table. Pillow raises many
types for bad bytes (OSError, ValueError, SyntaxError, struct.error, its bomb errors, and
RecursionError or MemoryError on hostile files), from `open`, `load`, `exif_transpose` and
`convert` alike: any exception while decoding one image becomes a `DecodeError` naming its type.
Only KeyboardInterrupt and SystemExit, which are no failure of the image, pass through.

Memory is bounded before pixel data is read: the pixel count (`max_pixels`) and the bytes the
decoded image takes in Pillow's mode (`max_decoded_bytes`: 1 byte a pixel for L/P, 2 for 16-bit,
4 for RGB and everything wider) are checked on the header. Only the formats the shard readers
accept as image members are opened (`FORMATS`): Pillow's other plugins (EPS runs Ghostscript)
never see crawled bytes.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from dualtok_core.preprocess import Preprocess


class DecodeError(ValueError):
    """An image member that cannot become an encoder input; the message is the recorded reason."""


@dataclass(frozen=True)
class DecodeConfig:
    """How images become encoder inputs. `size` / `fit` / `interpolation` make IMAGE (set from the
    bundle: the largest input of the branches that share it); `semantic`, when set, makes a second
    input for a semantic branch whose preprocessing differs (BLIP-2's and SEED's whole-image resize)."""

    size: int = 256
    fit: str = "center_crop"
    interpolation: str = "bicubic"
    semantic: Preprocess | None = None
    max_pixels: int = 64_000_000  # decompression-bomb limit, checked before pixel data is read
    max_decoded_bytes: int = 512 << 20  # the decoded image in Pillow's mode, checked before pixel data is read
    min_side: int = 16  # smaller images are errors, not silently blown up
    draft: bool = True  # JPEG DCT-domain downscaling when the image is >= 2x the target

    def __post_init__(self) -> None:
        if self.size < 8 or self.max_pixels < 1 or self.min_side < 1 or self.max_decoded_bytes < 1:
            raise ValueError(f"decode config out of range: {self}")
        Preprocess(self.size, self.fit, self.interpolation)  # validates fit and interpolation

    @property
    def image(self) -> Preprocess:
        return Preprocess(self.size, self.fit, self.interpolation)


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # (size, size, 3) uint8
    width: int  # of the stored image, before any crop or resize
    height: int
    semantic_pixels: np.ndarray | None = None  # (s, s, 3) uint8, when config.semantic is set


def decode_image(data: bytes, config: DecodeConfig) -> DecodedImage:
    """Image bytes -> the RGB input(s) `config` describes (by default the centred square at `config.size`).

    Pillow's warnings about the data it reads ("Corrupt EXIF data", "Tag data larger than file"),
    one per odd file and worded differently each time, are not logged: the image is decoded or
    rejected with its reason either way. Its decompression-bomb warning is an error.
    """
    if not data:
        raise DecodeError("empty image member (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return _decode(data, config)


def _decode(data: bytes, config: DecodeConfig) -> DecodedImage:
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DecodeError(f"decompression bomb: {_describe(err)}") from err
    except Exception as err:  # noqa: BLE001 - any failure to open one image is that image's
        raise DecodeError(f"not a readable image: {_describe(err)}") from err
    width, height = img.size
    if width * height > config.max_pixels:
        raise DecodeError(f"decompression bomb: {width}x{height} = {width * height} pixels > limit {config.max_pixels}")
    if min(width, height) < config.min_side:
        raise DecodeError(f"image too small: {width}x{height}, the minimum side is {config.min_side}")
    try:
        if config.draft and img.format == "JPEG":
            # every input keeps at least its size across its region (centre square or whole image)
            side, target = min(width, height), max(config.size, config.semantic.size if config.semantic else 0)
            img.draft("RGB", (-(-target * width // side), -(-target * height // side)))
        _check_decoded_bytes(img, config.max_decoded_bytes)
        img.load()
        # gray stays gray through the crop and resize (a third of the bytes at full size); RGB after
        img = to_rgb_or_gray(ImageOps.exif_transpose(img))
        pixels = _rgb(config.image.apply(img))
        semantic = _rgb(config.semantic.apply(img)) if config.semantic is not None else None
    except DecodeError:
        raise
    except Exception as err:  # noqa: BLE001 - Pillow raises many types for corrupt data; each is this image's
        raise DecodeError(f"corrupt image data: {_describe(err)}") from err
    return DecodedImage(pixels=pixels, width=width, height=height, semantic_pixels=semantic)


def _rgb(pixels: np.ndarray) -> np.ndarray:
    return np.repeat(pixels[:, :, None], 3, axis=2) if pixels.ndim == 2 else pixels  # (S, S) -> (S, S, 3)


FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP", "PPM")  # what `shards.IMAGE_EXTENSIONS` name


def _check_decoded_bytes(img: Image.Image, limit: int) -> None:
    """The bytes Pillow allocates for the image in its mode (after any JPEG draft), before it does."""
    per_pixel = 1 if img.mode in ("1", "L", "P") else 2 if img.mode.startswith("I;16") else 4
    width, height = img.size
    if width * height * per_pixel > limit:
        raise DecodeError(f"decoded image too large: {width}x{height} in mode {img.mode} takes "
                          f"{width * height * per_pixel} bytes > limit {limit} (max_decoded_bytes)")


def _describe(err: BaseException) -> str:
    """The exception's type and message, without the addresses Pillow puts in some ("<_io.BytesIO
    object at 0x7f...>"), so that the same bad image gets the same reason in every run."""
    message = re.sub(r" at 0x[0-9a-fA-F]+", "", " ".join(str(err).split()))
    return f"{type(err).__name__}: {message}"[:300]


def to_rgb_or_gray(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, or 8-bit gray ("L") for single-channel images: alpha over white,
    16/32-bit scaled down, CMYK/palette converted."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(img)), mode="L")
    return img if img.mode == "L" else img.convert("RGB")


_CHUNK = 1 << 20  # pixels converted at a time: the temporaries stay a few MiB whatever the image size


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """16-bit (or wider) single-channel pixels -> uint8, keeping the full range: round(v * 255 / peak)
    in integer arithmetic, a chunk at a time (a float64 copy of an 8000x8000 image is 512 MB)."""
    if array.dtype == np.uint8:
        return array
    flat = array.reshape(-1)
    out = np.empty(flat.shape, dtype=np.uint8)
    if array.dtype.kind == "f":
        for start in range(0, flat.size, _CHUNK):
            chunk = np.nan_to_num(flat[start : start + _CHUNK], nan=0.0, posinf=255.0, neginf=0.0)
            out[start : start + _CHUNK] = np.clip(chunk, 0, 255)
        return out.reshape(array.shape)
    peak = 65535 if array.max(initial=0) > 255 else 255
    for start in range(0, flat.size, _CHUNK):
        chunk = np.clip(flat[start : start + _CHUNK], 0, peak).astype(np.int64)
        out[start : start + _CHUNK] = (chunk * 255 + peak // 2) // peak
    return out.reshape(array.shape)

