"""Branch III, unCLIP kind: re-render from a guide and one CLIP image embedding per image.

SEED-LLaMA decodes its tokens through `stable-diffusion-2-1-unclip`: the tokens become a 1024-d
CLIP ViT-H image embedding (`SemanticTokenizer.image_embeddings`), which conditions the UNet through
its class embedding rather than cross-attention. As diffusers' `StableUnCLIPImg2ImgPipeline` does:

  embedding (B, E) -> normalised by `image_normalizer`, noised to `noise_level` by
  `image_noising_scheduler`, un-normalised, then concatenated with the sinusoidal embedding of the
  noise level -> class_labels (B, 2E); the UNet cross-attends to the text encoding of "" and
  classifier-free guidance contrasts with all-zero class labels.

Branch III's method is unchanged: the upsampled guide is VAE-encoded, DDIM-inverted to the
strength's timestep and denoised under this condition. A folder in the unCLIP pipeline's
diffusers layout loads as it is (the image encoder and feature extractor it also holds are not
used: the embedding comes from the tokens).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
from torch import nn
from transformers import PreTrainedTokenizerBase

from dualtok_core.diffusion import DiffusionReconstructor
from dualtok_core.errors import BundleError, TokenInputError, require_safetensors

logger = logging.getLogger(__name__)

UNCLIP_PARTS = ("image_normalizer", "image_noising_scheduler")
NOISE_LEVEL = 0  # SEED-LLaMA decodes at noise_level=0: the embedding as the tokens give it


class UnCLIPReconstructor(DiffusionReconstructor):
    """Stable unCLIP's parts + Branch III's inversion and guided denoising."""

    kind = "unclip"

    def __init__(
        self,
        vae: nn.Module,
        unet: nn.Module,
        text_encoder: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        scheduler_config: dict[str, Any],
        image_normalizer: StableUnCLIPImageNormalizer,
        noising_config: dict[str, Any],
        noise_level: int = NOISE_LEVEL,
    ) -> None:
        super().__init__(vae, unet, text_encoder, tokenizer, scheduler_config)
        self.image_normalizer = image_normalizer
        with torch.device("cpu"):
            self.image_noising_scheduler = DDPMScheduler.from_config(noising_config)
        self.noise_level = int(noise_level)
        config = self.unet.config
        projected = config.projection_class_embeddings_input_dim
        if config.class_embed_type != "projection" or projected != 2 * self.embed_dim:
            raise BundleError(
                f"an unCLIP UNet takes (noised {self.embed_dim}-d image embedding, noise-level embedding) as "
                f"projected class labels; this one has class_embed_type={config.class_embed_type!r}, "
                f"projection_class_embeddings_input_dim={config.projection_class_embeddings_input_dim}"
            )
        if not 0 <= self.noise_level < self.image_noising_scheduler.config.num_train_timesteps:
            raise BundleError(f"noise_level {noise_level} is outside the image noising schedule")
        self.requires_grad_(False).eval()
        self.register_buffer("_prompt_cache", None, persistent=False)

    @property
    def embed_dim(self) -> int:
        """E of the (B, E) image embeddings the tokens decode to."""
        return int(self.image_normalizer.config.embedding_dim)

    @property
    def config(self) -> dict[str, Any]:
        config = super().config
        config["image_normalizer"] = {"embedding_dim": self.embed_dim}
        noising = dict(self.image_noising_scheduler.config)
        config["image_noising_scheduler"] = json.loads(json.dumps(noising, default=str))
        config["noise_level"] = self.noise_level
        return config

    # ---- conditioning -------------------------------------------------------------------

    def prompt_embedding(self) -> torch.Tensor:
        """(1, 77, D) text encoding of "": what the UNet cross-attends to, for every row (cached)."""
        if self._prompt_cache is None:
            self._prompt_cache = self.text_embeddings([""])
        return self._prompt_cache

    def unconditional_embedding(self) -> torch.Tensor:
        """(1, 2E) zero class labels: the pipeline's negative image embedding."""
        return torch.zeros(1, 2 * self.embed_dim, device=self.device, dtype=self.dtype)

    def _check_cond(self, cond: torch.Tensor, batch: int | None) -> torch.Tensor:
        if not isinstance(cond, torch.Tensor) or cond.ndim != 2 or cond.shape[1] != self.embed_dim:
            got = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise TokenInputError(f"cond must be image embeddings (B, {self.embed_dim}) for an unCLIP UNet, got {got}")
        if batch is not None and cond.shape[0] != batch:
            raise TokenInputError(f"cond has batch {cond.shape[0]} but guide has batch {batch}")
        if cond.shape[0] == 0:
            raise TokenInputError("cond is an empty batch")
        return cond.to(self.device, self.dtype)

    def prepare_condition(self, cond: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Image embeddings (B, E) -> class labels (B, 2E): noised to `noise_level`, plus its embedding."""
        noise = torch.randn(cond.shape, generator=generator).to(cond.device, cond.dtype)  # CPU draw: any device
        level = torch.full((cond.shape[0],), self.noise_level, device=cond.device, dtype=torch.long)
        normalizer = self.image_normalizer
        scaled = (cond - normalizer.mean.to(cond.dtype)) / normalizer.std.to(cond.dtype)
        noised = self.image_noising_scheduler.add_noise(scaled, noise, level)
        noised = noised * normalizer.std.to(cond.dtype) + normalizer.mean.to(cond.dtype)
        level_embedding = get_timestep_embedding(level, self.embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        return torch.cat([noised, level_embedding.to(cond.dtype)], dim=1)  # (B, 2E)

    def _noise(self, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        rows = latents.shape[0]
        prompt = self.prompt_embedding().to(self.device, self.dtype).expand(rows, -1, -1)  # (N, 77, D)
        labels = cond.to(self.device, self.dtype).expand(rows, -1)  # (N, 2E)
        return self.unet(latents, t, encoder_hidden_states=prompt, class_labels=labels).sample

    # ---- saving, loading ----------------------------------------------------------------

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the unCLIP pipeline's diffusers layout (without its image encoder, which is not used)."""
        root = Path(path)
        super().save_pretrained(root)
        self.image_normalizer.save_pretrained(root / "image_normalizer", safe_serialization=True)
        self.image_noising_scheduler.save_pretrained(root / "image_noising_scheduler")
        index = json.loads((root / "model_index.json").read_text())
        index.update(_class_name="StableUnCLIPImg2ImgPipeline",
                     image_normalizer=["stable_diffusion", "StableUnCLIPImageNormalizer"],
                     image_noising_scheduler=["diffusers", "DDPMScheduler"])
        (root / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> UnCLIPReconstructor:
        """Read the `stable-diffusion-2-1-unclip` diffusers layout."""
        root = Path(path)
        parts = cls._read_parts(root)
        for part in UNCLIP_PARTS:
            if not (root / part).is_dir():
                raise BundleError(f"unCLIP folder {str(root)!r} has no {part}/ subfolder")
        require_safetensors(root / "image_normalizer", "diffusion weights")
        normalizer = StableUnCLIPImageNormalizer.from_pretrained(
            root / "image_normalizer", use_safetensors=True, low_cpu_mem_usage=False
        )
        model = cls(*parts, normalizer, DDPMScheduler.load_config(root / "image_noising_scheduler"))
        return model if dtype is None else model.to(dtype)

    from_stable_diffusion = from_pretrained


def is_unclip_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / "image_normalizer").is_dir()


def load_reconstructor(path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> DiffusionReconstructor:
    """The diffusion part of a folder, of the kind its layout says (unCLIP when it has an image normalizer)."""
    cls = UnCLIPReconstructor if is_unclip_folder(path) else DiffusionReconstructor
    return cls.from_pretrained(path, dtype=dtype)
