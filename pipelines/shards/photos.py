"""Real photos for the demo, the tests and the benchmarks, with no download.

The base photos are the colour ones scikit-image ships inside its wheel (those `skimage.data`
loads without pooch or a network). Image `i` is base `i % 8`; its first appearance is the whole
photo, later ones are seeded crops (varied aspect ratios), mirror flips and rescales, so that any
`count` gives distinct images with sides between 160 and 640 px. Image `i` depends only on
`(seed, i)`, so a shorter list is a prefix of a longer one.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import skimage.data
from PIL import Image

from dualtok_core.errors import DualtokError
from dualtok.pipelines.shards.writer import ImageSource, ShardWriterConfig, ShardWriteSummary, write_shards

logger = logging.getLogger(__name__)

MIN_SIDE, MAX_SIDE = 160, 640
MIN_ASPECT = 0.4  # short side / long side of a crop; keeps both sides inside [MIN_SIDE, MAX_SIDE]
JPEG_QUALITY = 90

# name -> (loader, caption). All are RGB uint8 files bundled in scikit-image's own data folder.
BASE_PHOTOS: dict[str, tuple[Callable[[], np.ndarray], str]] = {
    "astronaut": (skimage.data.astronaut, "a photo of an astronaut"),
    "cat": (skimage.data.chelsea, "a photo of a cat"),
    "coffee": (skimage.data.coffee, "a photo of a cup of coffee"),
    "rocket": (skimage.data.rocket, "a photo of a rocket on its launch pad"),
    "galaxies": (skimage.data.hubble_deep_field, "a telescope image of distant galaxies"),
    "tissue": (skimage.data.immunohistochemistry, "a microscope image of stained tissue"),
    "retina": (skimage.data.retina, "a photo of the back of an eye"),
    "motorcycle": (lambda: skimage.data.stereo_motorcycle()[0], "a photo of a motorcycle"),
}


def sample_photos(count: int, seed: int = 0) -> list[tuple[str, np.ndarray, str]]:
    """`count` distinct (key, uint8 RGB (H, W, 3) image, caption) triples, deterministic in `seed`."""
    if count < 1:
        raise DualtokError(f"count must be >= 1, got {count}")
    names = list(BASE_PHOTOS)
    used = min(count, len(names))
    bases = {name: _load_base(name) for name in names[:used]}
    photos: list[tuple[str, np.ndarray, str]] = []
    seen: set[str] = set()
    for i in range(count):
        name = names[i % len(names)]
        variant = i // len(names)
        rng = np.random.default_rng([seed, i])
        while True:
            image, detail = _variant(bases[name], variant, rng)
            digest = hashlib.sha256(image.tobytes() + repr(image.shape).encode()).hexdigest()
            if digest not in seen:  # a repeated crop would make two samples of one image
                break
        seen.add(digest)
        caption = BASE_PHOTOS[name][1] + (f" ({detail})" if detail else "")
        photos.append((f"{name}-{variant:04d}", image, caption))
    return photos


def _load_base(name: str) -> np.ndarray:
    image = BASE_PHOTOS[name][0]()
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise DualtokError(f"scikit-image's {name} is {image.dtype} {image.shape}, not uint8 RGB")
    return image


def _variant(base: np.ndarray, variant: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Variant 0: the whole photo fitted into [160, 640]; others: a seeded crop, flip and scale."""
    height, width = base.shape[:2]
    if variant == 0:
        return _resize(base, _fit(width, height, min(MAX_SIDE, max(width, height)))), ""
    aspect = rng.uniform(MIN_ASPECT, 1.0)
    # The crop's long side covers 45-100% of the photo's shorter side so crops stay recognisable.
    long_side = int(rng.uniform(0.45, 1.0) * min(height, width))
    short_side = max(1, int(long_side * aspect))
    crop_w, crop_h = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    crop = base[top : top + crop_h, left : left + crop_w]  # (crop_h, crop_w, 3)
    mirrored = bool(rng.random() < 0.5)
    if mirrored:
        crop = crop[:, ::-1]
    target_long = int(rng.integers(math.ceil(MIN_SIDE / aspect), MAX_SIDE + 1))
    image = _resize(crop, _fit(crop_w, crop_h, target_long))
    return image, f"crop {variant}" + (", mirrored" if mirrored else "")


def _fit(width: int, height: int, long_side: int) -> tuple[int, int]:
    """(width, height) scaled so the longer side is `long_side`, both clamped to [160, 640]."""
    scale = long_side / max(width, height)
    return (
        int(np.clip(round(width * scale), MIN_SIDE, MAX_SIDE)),
        int(np.clip(round(height * scale), MIN_SIDE, MAX_SIDE)),
    )


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if (image.shape[1], image.shape[0]) == size:
        return np.ascontiguousarray(image)
    resized = Image.fromarray(np.ascontiguousarray(image)).resize(size, Image.Resampling.BICUBIC)
    return np.asarray(resized)  # (H, W, 3) uint8


def encode_jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_sample_shards(
    output: str,
    count: int,
    per_shard: int,
    seed: int = 0,
    storage_options: dict[str, Any] | None = None,
) -> ShardWriteSummary:
    """`count` sample photos as JPEG (quality 90) in WebDataset shards of `per_shard` under `output`."""
    sources = [
        ImageSource(uri=f"skimage.data:{key}", caption=caption, data=encode_jpeg(image))
        for key, image, caption in sample_photos(count, seed)
    ]
    config = ShardWriterConfig(samples_per_shard=per_shard, images="keep")
    return write_shards(sources, output, config, storage_options)
