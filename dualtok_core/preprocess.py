"""How a branch's square input is cut from an image of any shape: one small, torch-free spec.

Job configs read it (the tokenize plan decides what the decode stage makes) without importing the
models; `imaging` applies it to tensors and the decode stage to PIL images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dualtok_core.errors import ImageInputError

FITS = ("center_crop", "resize")  # the centred square of the image, or the whole image squashed square
INTERPOLATIONS = ("bicubic", "bilinear")  # the filters PIL and torch (antialiased) both have


@dataclass(frozen=True)
class Preprocess:
    """How a branch's square input is cut from an image of any shape.

    `center_crop` takes the centred min(H, W) square (what dualtok's own bundles train on);
    `resize` squashes the whole image to a square, as BLIP-2's and SEED's processors do
    (`Resize((224, 224), bicubic)`): nothing is cut off, the aspect ratio is not kept.
    """

    size: int
    fit: str = "center_crop"
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        check_preprocess(self.fit, self.interpolation)
        if self.size < 1:
            raise ImageInputError(f"input size must be positive, got {self.size}")

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The region of a width x height image that becomes the input."""
        if self.fit == "resize":
            return (0, 0, width, height)
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return (left, top, left + side, top + side)

    def apply(self, image: Any) -> np.ndarray:
        """A PIL image (RGB or L) -> uint8 (size, size[, 3]), PIL's antialiased filter from the full image."""
        from PIL import Image

        resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[self.interpolation]
        out = image.resize((self.size, self.size), resample, box=self.box(*image.size), reducing_gap=None)
        return np.asarray(out, dtype=np.uint8)

    def describe(self) -> dict[str, Any]:
        return {"size": self.size, "fit": self.fit, "interpolation": self.interpolation}


def check_preprocess(fit: str, interpolation: str) -> None:
    if fit not in FITS:
        raise ImageInputError(f"input fit must be one of {list(FITS)}, got {fit!r}")
    if interpolation not in INTERPOLATIONS:
        raise ImageInputError(f"input interpolation must be one of {list(INTERPOLATIONS)}, got {interpolation!r}")
