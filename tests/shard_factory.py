"""Building WebDataset shards in tests, including the broken ones real corpora contain."""

from __future__ import annotations

import io
import tarfile

import numpy as np
from PIL import Image


def encode(image: Image.Image | np.ndarray, fmt: str = "JPEG", **kwargs) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A tar with the given (name, bytes) members, in order, with fixed metadata."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def sample_members(key: str, image_bytes: bytes, caption: str | None, ext: str = "jpg") -> list[tuple[str, bytes]]:
    members = [(f"{key}.{ext}", image_bytes)]
    if caption is not None:
        members.append((f"{key}.txt", caption.encode()))
    return members


def photo_images(count: int, seed: int = 0) -> list[np.ndarray]:
    """Distinct RGB crops of scikit-image's bundled photos, varied sizes."""
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        ch, cw = int(rng.integers(160, min(h, 320) + 1)), int(rng.integers(160, min(w, 400) + 1))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        out.append(np.ascontiguousarray(photo[top : top + ch, left : left + cw]))
    return out
