"""Learned metrics for audits, from weights the user already has on disk. Nothing downloads.

- CLIP score (Hessel et al. 2021, as torchmetrics computes it): 100 * max(cos(image, caption), 0)
  with a transformers CLIP folder (`CLIPModel.save_pretrained` + its processor and tokenizer,
  e.g. a local copy of openai/clip-vit-large-patch14); also the cosine between the original's and
  the reconstruction's image embeddings.
- LPIPS (Zhang et al. 2018, the `lpips` package's v0.1 "alex" network): AlexNet features from
  torchvision's checkpoint file (`alexnet-owt-7be5be79.pth`) and the lpips package's linear
  heads (`lpips/weights/v0.1/alex.pth`), both read with `torch.load(weights_only=True)`.
When no path is given the metric is skipped, and `skipped_notes` says how to enable it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dualtok_core.errors import BundleError

logger = logging.getLogger(__name__)

# The lpips package's input scaling (its ScalingLayer) and the AlexNet ReLU outputs it compares.
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)
_ALEX_TAPS = (1, 4, 7, 9, 11)  # indices in torchvision's alexnet.features
_ALEX_WIDTHS = (64, 192, 384, 256, 256)


@dataclass(frozen=True)
class PerceptualWeights:
    """Local paths (or None to skip) of the learned metrics' weights."""

    clip: str | None = None  # a transformers CLIP folder
    lpips_alexnet: str | None = None  # torchvision AlexNet state dict (.pth)
    lpips_linear: str | None = None  # the lpips package's v0.1 alex.pth

    def __post_init__(self) -> None:
        if (self.lpips_alexnet is None) != (self.lpips_linear is None):
            raise ValueError("LPIPS needs both metrics.lpips_alexnet and metrics.lpips_linear (or neither)")

    def skipped_notes(self) -> list[str]:
        notes = []
        if self.lpips_alexnet is None:
            notes.append("LPIPS skipped: no weights given. Set metrics.lpips_alexnet=<torchvision "
                         "alexnet-owt-7be5be79.pth> and metrics.lpips_linear=<lpips v0.1 alex.pth> (local files).")
        if self.clip is None:
            notes.append("CLIP score skipped: no model given. Set metrics.clip=<a local transformers CLIP "
                         "folder, e.g. a copy of openai/clip-vit-large-patch14>.")
        return notes


def _alexnet_features() -> nn.Sequential:
    """torchvision's `alexnet().features`, layer for layer, so its checkpoint keys load as they are."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
    )


def _load_state(path: str, what: str) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise BundleError(f"{what} weights {path} do not exist (give a local file; nothing is downloaded)")
    return torch.load(path, map_location="cpu", weights_only=True)


class LPIPS(nn.Module):
    """LPIPS v0.1 with the AlexNet backbone; lower is more similar, 0 for identical images."""

    def __init__(self, alexnet_path: str, linear_path: str) -> None:
        super().__init__()
        self.features = _alexnet_features()
        backbone = _load_state(alexnet_path, "LPIPS AlexNet")
        wanted = {k[len("features."):]: v for k, v in backbone.items() if k.startswith("features.")}
        missing = sorted(set(self.features.state_dict()) - set(wanted))
        if missing:
            raise BundleError(f"{alexnet_path} is not a torchvision AlexNet state dict: no features.{missing[0]}")
        self.features.load_state_dict(wanted)
        linear = _load_state(linear_path, "LPIPS linear")
        self.heads = nn.ModuleList(nn.Conv2d(w, 1, 1, bias=False) for w in _ALEX_WIDTHS)
        for k, head in enumerate(self.heads):
            key = f"lin{k}.model.1.weight"
            if key not in linear or tuple(linear[key].shape) != tuple(head.weight.shape):
                raise BundleError(f"{linear_path} is not the lpips v0.1 alex.pth: {key} missing or misshaped")
            head.weight.data.copy_(linear[key])
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1))
        self.eval()

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _ALEX_TAPS:
                taps.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))  # unit length per position
            if i == _ALEX_TAPS[-1]:
                break
        return taps

    @torch.inference_mode()
    def forward(self, reference: np.ndarray, reconstruction: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) pairs -> (B,) distances."""
        device = self.shift.device
        a, b = (torch.from_numpy(np.ascontiguousarray(x)).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
                for x in (reference, reconstruction))  # (B, 3, H, W) in [-1, 1]
        total = torch.zeros(a.shape[0], device=device)
        for head, fa, fb in zip(self.heads, self._taps(a), self._taps(b)):
            total += head((fa - fb) ** 2).mean(dim=(1, 2, 3))  # (B,)
        return total.cpu().numpy().astype(np.float64)


class ClipScorer:
    """CLIP image and text embeddings from a local transformers folder."""

    def __init__(self, folder: str, device: torch.device | None = None) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        if not Path(folder, "config.json").is_file():
            raise BundleError(f"{folder} is not a transformers CLIP folder (no config.json); nothing is downloaded")
        self.device = device or torch.device("cpu")
        model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)  # never a pickle
        self.model = model.eval().to(self.device)
        self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)

    @torch.inference_mode()
    def image_embeddings(self, images: np.ndarray) -> torch.Tensor:
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]  # (B, 3, s, s)
        features = self.model.get_image_features(pixel_values=pixels.to(self.device))
        # transformers 5 returns an output whose pooler_output is the projection; 4.x the tensor itself
        features = getattr(features, "pooler_output", features)  # (B, P)
        return torch.nn.functional.normalize(features.float(), dim=-1)

    @torch.inference_mode()
    def text_embeddings(self, captions: list[str]) -> torch.Tensor:
        limit = int(self.model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(captions, padding=True, truncation=True, max_length=limit, return_tensors="pt")
        features = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                attention_mask=tokens["attention_mask"].to(self.device))
        features = getattr(features, "pooler_output", features)  # (B, P)
        return torch.nn.functional.normalize(features.float(), dim=-1)

    def clip_score(self, images: np.ndarray, captions: list[str]) -> np.ndarray:
        """(B,) 100 * max(cos(image, caption), 0)."""
        cos = (self.image_embeddings(images) * self.text_embeddings(captions)).sum(dim=-1)
        return (100.0 * cos.clamp(min=0.0)).cpu().numpy().astype(np.float64)

    def image_similarity(self, reference: np.ndarray, reconstruction: np.ndarray) -> np.ndarray:
        """(B,) cosine between the two images' CLIP embeddings."""
        cos = (self.image_embeddings(reference) * self.image_embeddings(reconstruction)).sum(dim=-1)
        return cos.cpu().numpy().astype(np.float64)
