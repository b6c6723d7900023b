"""Checking and resizing uint8 image batches on their way into the models.

Every branch takes float images in [0, 1], (B, 3, S, S), at its own input size. This module
is the one place that turns the user's uint8 (B, H, W, 3) arrays into that, and the one place
that says what is wrong with them when they are not images.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dualtok_core.errors import ImageInputError, TokenInputError
from dualtok_core.preprocess import Preprocess, check_preprocess


def pil_batch(images: Any, preprocess: Preprocess) -> np.ndarray:
    """One PIL image, or a sequence of them of any sizes and modes -> uint8 (B, size, size, 3):
    each rotated by its EXIF orientation, made RGB (alpha over white), then cut and resized as
    `preprocess` says. Arrays and tensors are not touched here: they go to `check_uint8_images`."""
    from PIL import Image, ImageOps

    batch = [images] if isinstance(images, Image.Image) else list(images)
    if not batch:
        raise ImageInputError("images is an empty list")
    size = preprocess.size
    out = np.empty((len(batch), size, size, 3), dtype=np.uint8)
    for i, image in enumerate(batch):
        if not isinstance(image, Image.Image):
            raise ImageInputError(f"images[{i}] is a {type(image).__name__}; a list of images must hold PIL images")
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        out[i] = preprocess.apply(image.convert("RGB"))
    return out


def is_pil_input(images: Any) -> bool:
    from PIL import Image

    return isinstance(images, Image.Image) or (
        isinstance(images, (list, tuple)) and any(isinstance(i, Image.Image) for i in images))


def check_uint8_images(images: np.ndarray | torch.Tensor, min_size: int = 1) -> torch.Tensor:
    """Validate a (B, H, W, 3) uint8 batch and return it as a uint8 tensor (same memory)."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise ImageInputError(f"images must be uint8 (0-255), got dtype {images.dtype}")
        tensor = torch.from_numpy(np.ascontiguousarray(images))
    elif isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8:
            raise ImageInputError(f"images must be uint8 (0-255), got dtype {images.dtype}")
        tensor = images
    else:
        raise ImageInputError(f"images must be a numpy array or torch tensor, got {type(images).__name__}")
    if tensor.ndim == 3:
        raise ImageInputError(
            f"images must be a batch (B, H, W, 3); got one image of shape {tuple(tensor.shape)}: add a batch axis"
        )
    if tensor.ndim != 4:
        raise ImageInputError(f"images must have shape (B, H, W, 3), got {tuple(tensor.shape)}")
    if tensor.shape[-1] != 3:
        raise ImageInputError(
            f"images must have 3 channels (RGB) in the last axis, got {tensor.shape[-1]} "
            f"(shape {tuple(tensor.shape)}); convert grayscale/RGBA/CMYK to RGB first"
        )
    if tensor.shape[0] == 0:
        raise ImageInputError("images is an empty batch")
    height, width = int(tensor.shape[1]), int(tensor.shape[2])
    if min(height, width) < min_size:
        raise ImageInputError(f"images are {height}x{width}; the encoders need at least {min_size}x{min_size}")
    return tensor


def to_model_input(
    images: torch.Tensor, size: int, device: torch.device, dtype: torch.dtype, fit: str = "center_crop",
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, size, size) in [0, 1]: the centre square (or, with fit
    "resize", the whole image), antialiased resize."""
    check_preprocess(fit, interpolation)
    x = images.to(device).permute(0, 3, 1, 2)  # (B, 3, H, W)
    if fit == "center_crop":
        x = center_square(x)
    x = x.to(torch.float32) / 255.0
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode=interpolation, antialias=True, align_corners=False)
    return x.clamp_(0.0, 1.0).to(dtype).contiguous(memory_format=torch.channels_last)


def augment(
    images: torch.Tensor, size: int, scale: tuple[float, float], hflip: bool, device: torch.device,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Training augmentation: uint8 (B, H, W, 3) -> float (B, 3, size, size) in [0, 1].

    Each image's centre square is cropped to a random square whose area is a share in `scale` of
    it, at a random place, resized to `size` (bicubic, antialiased), and mirrored left-right with
    probability 1/2 when `hflip`. Square crops, because every branch takes square inputs.
    """
    low, high = scale
    x = center_square(images.to(device).permute(0, 3, 1, 2)).to(torch.float32) / 255.0  # (B, 3, s, s)
    side = x.shape[-1]
    out = []
    for image in x:
        share = low + (high - low) * float(torch.rand((), generator=generator))
        crop = max(1, min(side, round(side * share**0.5)))
        top, left = (int(torch.randint(0, side - crop + 1, (), generator=generator)) for _ in range(2))
        patch = image[None, :, top : top + crop, left : left + crop]  # (1, 3, crop, crop)
        if crop != size:
            patch = F.interpolate(patch, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        if hflip and float(torch.rand((), generator=generator)) < 0.5:
            patch = patch.flip(-1)
        out.append(patch)
    return torch.cat(out).clamp_(0.0, 1.0).contiguous(memory_format=torch.channels_last)


def center_square(x: torch.Tensor) -> torch.Tensor:
    """Crop (..., H, W) to its centered min(H, W) square."""
    height, width = x.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return x[..., top : top + side, left : left + side]


def resize_float(images: torch.Tensor, size: int) -> torch.Tensor:
    """Float (B, 3, h, w) -> (B, 3, size, size), bicubic with antialiasing when shrinking."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float (B, 3, H, W) in [0, 1] -> uint8 (B, H, W, 3) numpy."""
    x = images.detach().float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def check_token_ids(ids: np.ndarray | torch.Tensor, length: int, vocab: int, name: str) -> torch.Tensor:
    """Validate a (B, length) batch of integer ids in [0, vocab) and return it as int64."""
    if isinstance(ids, np.ndarray):
        if not np.issubdtype(ids.dtype, np.integer):
            raise TokenInputError(f"{name} ids must be integers, got dtype {ids.dtype}")
        tensor = torch.from_numpy(ids.astype(np.int64))
    elif isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TokenInputError(f"{name} ids must be integers, got dtype {ids.dtype}")
        tensor = ids.to(torch.int64)
    else:
        raise TokenInputError(f"{name} ids must be a numpy array or torch tensor, got {type(ids).__name__}")
    if tensor.ndim != 2 or tensor.shape[1] != length:
        raise TokenInputError(f"{name} ids must have shape (B, {length}), got {tuple(tensor.shape)}")
    if tensor.numel() and (int(tensor.min()) < 0 or int(tensor.max()) >= vocab):
        raise TokenInputError(
            f"{name} ids must lie in [0, {vocab}); got values in [{int(tensor.min())}, {int(tensor.max())}]"
        )
    return tensor


def per_image_on_cpu(fn: Any, batch: torch.Tensor) -> torch.Tensor:
    """`fn(batch)`, but one image at a time (concatenated along dim 0) where that is faster: on a
    CPU without autograd. A convolutional encoder's full-resolution activations of a whole batch
    do not fit in a CPU's caches; image by image they mostly do. Measured with the `small` preset's
    guide encoder (256 px): 141 against 238 ms an image at batch 16 on 1 thread, 82 against 136 on 2;
    its diffusion VAE, ~12 % (docs/benchmarks.md). Per-image layers (convolutions, GroupNorm) give
    each image the same result either way (to float32 rounding), and an image's ids no longer depend
    on the batch it came in. GPUs, and training, get the whole batch."""
    if batch.device.type != "cpu" or torch.is_grad_enabled() or batch.shape[0] <= 1:
        return fn(batch)
    return torch.cat([fn(image) for image in batch.split(1)])
