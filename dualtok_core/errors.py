"""Errors that name what is wrong with the caller's input, raised before torch sees it."""

from __future__ import annotations

import os
from pathlib import Path

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class DualtokError(ValueError):
    """Base class: every error dualtok raises on purpose derives from this."""


class ImageInputError(DualtokError):
    """Images of the wrong dtype, shape, channel count or size."""


class TokenInputError(DualtokError):
    """Token ids of the wrong shape, dtype, or outside the codebook."""


class BundleError(DualtokError):
    """A bundle folder or URI that is missing a part, or whose parts disagree."""


def require_safetensors(folder: str | os.PathLike, what: str) -> None:
    """Weights load from safetensors only (every `from_pretrained` also passes `use_safetensors=True`):
    unpickling a `.bin` checkpoint can run code, so a folder holding only pickles is refused with
    the way to convert it. A folder with neither is left to the loader's own "missing file" error."""
    root = Path(folder)
    if not root.is_dir() or any(root.glob("*.safetensors")) or any(root.glob("*.safetensors.index.json")):
        return
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise BundleError(
            f"{what} {root} holds only pickle weights ({', '.join(pickles)}); dualtok loads safetensors only, "
            "since unpickling a checkpoint can run code. Convert it once, where you trust the file: load the "
            "folder with its library (diffusers/transformers `from_pretrained`) and write it back with "
            "`save_pretrained(folder, safe_serialization=True)`, then delete the pickle files"
        )
