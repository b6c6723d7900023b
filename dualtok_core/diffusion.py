"""Branch III: re-render a full-size image from a low-res guide and 77 generation embeddings.

Paper sec. 3.3: the guide image is upsampled, encoded by the Stable Diffusion 1.x VAE into z_0,
pushed up the noise schedule by DDIM inversion (eq. 9) to z_t, then denoised over exactly the
same timesteps (eq. 10) under classifier-free guidance by the semantic branch's generation
embeddings, and decoded. The parts are the stock diffusers/transformers SD 1.x classes, so a
real SD folder in diffusers format loads as it is and `save_pretrained` writes that layout.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, DDIMInverseScheduler, DDIMScheduler, UNet2DConditionModel
from tokenizers.pre_tokenizers import ByteLevel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, PreTrainedTokenizerBase

from dualtok_core.errors import BundleError, DualtokError, ImageInputError, TokenInputError, require_safetensors
from dualtok_core.imaging import per_image_on_cpu, resize_float

logger = logging.getLogger(__name__)

# Sampling defaults of every re-rendering (the facade, the audit, the demo): DDIM steps of the whole
# schedule, the share of it a guide is inverted to (dual runs int(strength * steps) of them), and
# the classifier-free guidance scale.
DEFAULT_STEPS, DEFAULT_STRENGTH, DEFAULT_GUIDANCE = 25, 0.7, 3.0

PARTS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")
INVERSION_CONDITIONS = ("unconditional", "semantic")
TEXT_LENGTH = 77  # CLIP's context: SD 1.x conditions on (B, 77, D)
_BOOKKEEPING_KEYS = frozenset({"architectures", "dtype", "torch_dtype", "transformers_version"})
_RANGE_SLACK = 0.25  # how far outside [0, 1] a guide may stray (bicubic overshoot) before it is refused

# Stable Diffusion 1.x's noise schedule (its scheduler/scheduler_config.json, PNDM or DDIM alike).
SD_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
}

# The offline tokenizer of random-init presets: all 256 byte-level symbols, alone and
# word-final, plus CLIP's two specials, so any text tokenizes without a downloaded vocab.
_BYTE_SYMBOLS = sorted(ByteLevel.alphabet())
BYTE_LEVEL_VOCAB_SIZE = 2 * len(_BYTE_SYMBOLS) + 2
_BOS_ID, _EOS_ID = BYTE_LEVEL_VOCAB_SIZE - 2, BYTE_LEVEL_VOCAB_SIZE - 1


def _vae_kwargs(widths: tuple[int, ...], layers: int, sample_size: int) -> dict[str, Any]:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * len(widths),
        "up_block_types": ("UpDecoderBlock2D",) * len(widths),
        "block_out_channels": widths,
        "layers_per_block": layers,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": sample_size,
    }


def _unet_kwargs(
    widths: tuple[int, ...], layers: int, dim: int, heads: int | tuple[int, ...], sample_size: int
) -> dict[str, Any]:
    # SD 1.x: cross-attention in every block but the deepest down block (and its mirror).
    down = ("CrossAttnDownBlock2D",) * (len(widths) - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(widths) - 1)
    return {
        "sample_size": sample_size,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": widths,
        "layers_per_block": layers,
        "cross_attention_dim": dim,
        "attention_head_dim": heads,
        "norm_num_groups": 32,
    }


def _text_kwargs(vocab: int, hidden: int, layers: int, heads: int, bos: int, eos: int) -> dict[str, Any]:
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": TEXT_LENGTH,
        "projection_dim": hidden,
        "hidden_act": "quick_gelu",
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": eos,
    }


PRESETS: dict[str, dict[str, Any]] = {
    # Tests: VAE factor 2, so a 64 px image is a 32x32 latent; seconds on a CPU.
    "tiny": {
        "vae": _vae_kwargs((32, 64), layers=1, sample_size=64),
        "unet": {
            **_unet_kwargs((32, 64), layers=1, dim=32, heads=(2, 4), sample_size=32),
            # diffusers' own test UNet: attention only at the coarse level, where it is cheap.
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        },
        "text_encoder": _text_kwargs(BYTE_LEVEL_VOCAB_SIZE, 32, layers=2, heads=4, bos=_BOS_ID, eos=_EOS_ID),
        "scheduler_config": dict(SD_SCHEDULER_CONFIG),
    },
    # CPU demo: SD 1.x structure (VAE factor 8, four UNet levels), reduced widths.
    "small": {
        "vae": _vae_kwargs((32, 64, 128, 128), layers=1, sample_size=256),
        "unet": _unet_kwargs((64, 128, 256, 256), layers=1, dim=256, heads=8, sample_size=32),
        "text_encoder": _text_kwargs(BYTE_LEVEL_VOCAB_SIZE, 256, layers=4, heads=4, bos=_BOS_ID, eos=_EOS_ID),
        "scheduler_config": dict(SD_SCHEDULER_CONFIG),
    },
    # Stable Diffusion 1.x shapes; real weights come from an SD folder via from_pretrained.
    "paper": {
        "vae": _vae_kwargs((128, 256, 512, 512), layers=2, sample_size=512),
        "unet": _unet_kwargs((320, 640, 1280, 1280), layers=2, dim=768, heads=8, sample_size=64),
        "text_encoder": _text_kwargs(49408, 768, layers=12, heads=12, bos=49406, eos=49407),
        "scheduler_config": dict(SD_SCHEDULER_CONFIG),
    },
}


def byte_level_clip_tokenizer() -> PreTrainedTokenizerBase:
    """A CLIP tokenizer with a 514-symbol byte-level vocabulary and no merges, built offline."""
    vocab = {symbol: i for i, symbol in enumerate(_BYTE_SYMBOLS)}
    vocab.update({symbol + "</w>": len(_BYTE_SYMBOLS) + i for i, symbol in enumerate(_BYTE_SYMBOLS)})
    vocab.update({"<|startoftext|>": _BOS_ID, "<|endoftext|>": _EOS_ID})
    # Written as vocab.json + merges.txt, the files a real SD folder holds, so the same loader
    # path reads both (and transformers 4.x's slow tokenizer, which only takes files, works too).
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        Path(folder, "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=TEXT_LENGTH, pad_token="<|endoftext|>")


def _keys_for(scheduler_class: type, config: dict[str, Any]) -> dict[str, Any]:
    """The config keys a scheduler class takes: SD folders ship a PNDM config (skip_prk_steps,
    ...) and DDIM's has thresholding keys the inverse lacks; either would only log warnings."""
    accepted = inspect.signature(scheduler_class.__init__).parameters
    return {key: value for key, value in config.items() if key in accepted}


@dataclass(frozen=True)
class DDIMTimesteps:
    """The timesteps one reconstruction visits, and the schedule length that spaced them.

    Both DDIM schedulers derive the neighbouring timestep from `num_inference_steps`, so it
    travels with the list: inverting and denoising over one `DDIMTimesteps` is exact.
    """

    timesteps: torch.Tensor  # (K,) int64, descending: the order denoising visits them
    num_inference_steps: int

    def __len__(self) -> int:
        return int(self.timesteps.numel())


class DiffusionReconstructor(nn.Module):
    """Stable Diffusion 1.x parts + DDIM inversion and guided denoising (frozen, inference only).

    The condition is the semantic branch's (B, 77, D) generation embeddings, which the UNet
    cross-attends to. `unclip.UnCLIPReconstructor` is the other kind: one image embedding per image.
    """

    kind = "text"  # what conditions the UNet: 77 x D text-encoder-like embeddings

    def __init__(
        self,
        vae: nn.Module,
        unet: nn.Module,
        text_encoder: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        scheduler_config: dict[str, Any],
    ) -> None:
        super().__init__()
        self.vae, self.unet, self.text_encoder, self.tokenizer = vae, unet, text_encoder, tokenizer
        # The schedules are CPU tables even when the parts are built under `torch.device("meta")`.
        with torch.device("cpu"):
            self.scheduler = DDIMScheduler.from_config(_keys_for(DDIMScheduler, scheduler_config))
            # DDIMInverseScheduler's own defaults (linear betas, steps_offset 0, clip_sample True)
            # are not SD's: it must share the forward scheduler's config to be its inverse.
            inverse_config = _keys_for(DDIMInverseScheduler, self.scheduler.config)
            self.inverse_scheduler = DDIMInverseScheduler.from_config(inverse_config)
        self._check_parts_agree()
        self.requires_grad_(False).eval()
        self.register_buffer("_uncond_cache", None, persistent=False)

    def _check_parts_agree(self) -> None:
        text_dim = int(self.text_encoder.config.hidden_size)
        if text_dim != self.cross_attention_dim:
            raise BundleError(
                f"text_encoder hidden_size {text_dim} != unet cross_attention_dim {self.cross_attention_dim}"
            )
        if int(self.unet.config.in_channels) != int(self.vae.config.latent_channels):
            raise BundleError(
                f"unet in_channels {self.unet.config.in_channels} != vae latent_channels "
                f"{self.vae.config.latent_channels}"
            )
        if self.tokenizer.model_max_length != TEXT_LENGTH:
            raise BundleError(
                f"tokenizer model_max_length is {self.tokenizer.model_max_length}, SD 1.x needs {TEXT_LENGTH}"
            )

    # ---- shapes -------------------------------------------------------------------------

    @property
    def cross_attention_dim(self) -> int:
        """D of the (B, 77, D) conditioning the UNet cross-attends to."""
        return int(self.unet.config.cross_attention_dim)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side (8 for SD 1.x)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's dtype: latents and conditioning are cast to it."""
        return next(self.unet.parameters()).dtype

    @property
    def config(self) -> dict[str, Any]:
        """Every part's config, the tokenizer's identity and the noise schedule (for fingerprints)."""
        parts = {
            "vae": dict(self.vae.config),
            "unet": dict(self.unet.config),
            "text_encoder": self.text_encoder.config.to_dict(),
            "scheduler": dict(self.scheduler.config),
        }
        # Bookkeeping keys change with installs and with saving (transformers adds `architectures`
        # and `dtype` on save), not with what is computed; the weights' dtype is in the state dict.
        config = {
            name: {k: v for k, v in part.items() if not k.startswith("_") and k not in _BOOKKEEPING_KEYS}
            for name, part in parts.items()
        }
        config["tokenizer"] = {"class": type(self.tokenizer).__name__, "vocab_size": len(self.tokenizer)}
        # Through JSON, as it is saved: a tuple in memory and a list after loading are one config.
        return json.loads(json.dumps(config, default=str))

    # ---- building, saving, loading ------------------------------------------------------

    @classmethod
    def build_random(cls, preset_kwargs: dict[str, Any], seed: int) -> DiffusionReconstructor:
        """Random-init parts from a `PRESETS` entry; the byte-level tokenizer stands in for CLIP's."""
        # fork_rng: seeding the build must not reseed the caller's global generator.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = AutoencoderKL(**preset_kwargs["vae"])
            unet = UNet2DConditionModel(**preset_kwargs["unet"])
            text_encoder = CLIPTextModel(CLIPTextConfig(**preset_kwargs["text_encoder"]))
        return cls(vae, unet, text_encoder, byte_level_clip_tokenizer(), preset_kwargs["scheduler_config"])

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write Stable Diffusion's diffusers layout (safetensors), loadable by StableDiffusionPipeline."""
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        self.vae.save_pretrained(root / "vae", safe_serialization=True)
        self.unet.save_pretrained(root / "unet", safe_serialization=True)
        self.text_encoder.save_pretrained(root / "text_encoder")
        self.tokenizer.save_pretrained(root / "tokenizer")
        self.scheduler.save_pretrained(root / "scheduler")
        index = {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": diffusers.__version__,
            "vae": ["diffusers", "AutoencoderKL"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "requires_safety_checker": False,
        }
        (root / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        logger.info("saved diffusion parts to %s", root)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None
    ) -> DiffusionReconstructor:
        """Read the SD 1.x diffusers layout; other subfolders (safety_checker, ...) are ignored.

        `dtype` casts every part after loading (transformers and diffusers name the load-time
        argument differently across versions; a cast works with all of them).
        """
        model = cls(*cls._read_parts(Path(path)))
        return model if dtype is None else model.to(dtype)

    from_stable_diffusion = from_pretrained

    @staticmethod
    def _read_parts(root: Path) -> tuple[nn.Module, nn.Module, nn.Module, PreTrainedTokenizerBase, dict[str, Any]]:
        """The five SD parts of a diffusers folder: vae, unet, text_encoder, tokenizer, scheduler config."""
        if not root.is_dir():
            raise BundleError(f"diffusion folder {str(root)!r} does not exist")
        for part in PARTS:
            if not (root / part).is_dir():
                raise BundleError(
                    f"diffusion folder {str(root)!r} has no {part}/ subfolder (SD diffusers layout)"
                )
        for part in ("vae", "unet", "text_encoder"):
            require_safetensors(root / part, "diffusion weights")
        # low_cpu_mem_usage=False: diffusers' default wants `accelerate` and logs a paragraph per
        # load (per actor, per audit slice) without it; the parts are small enough to load plainly.
        vae = AutoencoderKL.from_pretrained(root / "vae", use_safetensors=True, low_cpu_mem_usage=False)
        unet = UNet2DConditionModel.from_pretrained(root / "unet", use_safetensors=True, low_cpu_mem_usage=False)
        text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", use_safetensors=True)
        tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
        scheduler_config = DDIMScheduler.load_config(root / "scheduler")
        logger.info("loaded diffusion parts from %s", root)
        return vae, unet, text_encoder, tokenizer, scheduler_config

    # ---- conditioning -------------------------------------------------------------------

    @torch.no_grad()
    def text_embeddings(self, captions: list[str]) -> torch.Tensor:
        """Captions -> (B, 77, D) last hidden states of the text encoder: the eq. 8 target."""
        if isinstance(captions, str) or not captions:
            raise DualtokError("captions must be a non-empty list of strings")
        ids = self.tokenizer(
            list(captions), padding="max_length", max_length=TEXT_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids  # (B, 77)
        return self.text_encoder(ids.to(self.text_encoder.device))[0]  # (B, 77, D)

    def unconditional_embedding(self) -> torch.Tensor:
        """(1, 77, D) text encoding of "": SD 1.x was trained to drop captions to "", not to zeros.

        Computed once and cached as a non-persistent buffer (it moves with `.to()`); the parts
        are frozen, so the cache never goes stale.
        """
        if self._uncond_cache is None:
            self._uncond_cache = self.text_embeddings([""])  # (1, 77, D)
        return self._uncond_cache

    # ---- the diffusion process ----------------------------------------------------------

    def timesteps_for(self, steps: int, strength: float) -> DDIMTimesteps:
        """The last int(strength * steps) timesteps of a `steps`-step DDIM schedule, as img2img takes them."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise DualtokError(f"steps must be a positive int, got {steps!r}")
        if steps > self.scheduler.config.num_train_timesteps:
            trained = self.scheduler.config.num_train_timesteps
            raise DualtokError(f"steps {steps} exceeds the {trained} timesteps the model was trained on")
        if not 0.0 < float(strength) <= 1.0:
            raise DualtokError(f"strength must lie in (0, 1], got {strength}")
        # The epsilon absorbs float error (0.29 * 100 = 28.999...) without changing img2img's floor.
        count = min(int(steps * strength + 1e-6), steps)
        if count < 1:
            raise DualtokError(f"strength {strength} x steps {steps} leaves no timestep; raise either")
        self.scheduler.set_timesteps(steps)
        return DDIMTimesteps(self.scheduler.timesteps[steps - count :].clone(), steps)  # (count,)

    def prepare_condition(self, cond: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The checked condition as the UNet takes it; the 77 x D embeddings are taken as they are."""
        return cond

    def _noise(self, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        cond = cond.to(self.device, self.dtype).expand(latents.shape[0], -1, -1)  # (N, 77, D)
        return self.unet(latents, t, encoder_hidden_states=cond).sample  # (N, 4, h, w)

    @torch.no_grad()
    def invert(self, latents: torch.Tensor, timesteps: DDIMTimesteps, cond: torch.Tensor) -> torch.Tensor:
        """DDIM inversion (eq. 9), guidance 1: z_0 (B, 4, h, w) -> z_t at the largest timestep."""
        self.inverse_scheduler.set_timesteps(timesteps.num_inference_steps)
        z = latents.to(self.device, self.dtype)  # (B, 4, h, w)
        for t in timesteps.timesteps.flip(0):  # ascending: each step lands on t
            z = self.inverse_scheduler.step(self._noise(z, t, cond), int(t), z).prev_sample
        return z

    @torch.no_grad()
    def denoise(
        self,
        latents: torch.Tensor,
        timesteps: DDIMTimesteps,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        guidance: float,
        *,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """DDIM denoising (eq. 10) from z_t (B, 4, h, w) under classifier-free guidance -> z_0."""
        self.scheduler.set_timesteps(timesteps.num_inference_steps)
        z = latents.to(self.device, self.dtype)  # (B, 4, h, w)
        batch = z.shape[0]
        uncond = uncond.to(self.device, self.dtype).expand(batch, *uncond.shape[1:])  # (B, 77, D)
        cond = cond.to(self.device, self.dtype).expand(batch, *cond.shape[1:])  # (B, 77, D)
        both = torch.cat([uncond, cond])  # (2B, 77, D): unconditional rows first
        for t in timesteps.timesteps:
            if guidance == 1.0:  # the guided mix reduces to the conditional prediction alone
                eps = self._noise(z, t, cond)  # (B, 4, h, w)
            else:
                eps_uncond, eps_cond = self._noise(torch.cat([z, z]), t, both).chunk(2)
                eps = eps_uncond + guidance * (eps_cond - eps_uncond)  # (B, 4, h, w)
            noise = None
            if eta > 0.0:  # drawn on the CPU generator so a seed means the same image on any device
                noise = torch.randn(z.shape, generator=generator).to(z.device, z.dtype)
            z = self.scheduler.step(eps, int(t), z, eta=eta, variance_noise=noise).prev_sample
        return z

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> scaled latent mean (B, 4, S/f, S/f); the mean keeps it deterministic."""
        x = images.to(self.vae.device, self.vae.dtype) * 2.0 - 1.0  # (B, 3, S, S) in [-1, 1]
        mean = per_image_on_cpu(lambda chunk: self.vae.encode(chunk).latent_dist.mean, x)  # (B, 4, S/f, S/f)
        return self.scale_latents(mean)

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> the scale the UNet works at (SD's shift and scaling_factor); `decode` inverts it."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 4, h, w) -> images (B, 3, h*f, w*f) float32 in [0, 1]."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + shift
        x = per_image_on_cpu(lambda chunk: self.vae.decode(chunk).sample, z)  # (B, 3, S, S) in about [-1, 1]
        return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    # ---- public entry points ------------------------------------------------------------

    def reconstruct(
        self,
        guide: torch.Tensor,
        cond: torch.Tensor,
        *,
        size: int,
        steps: int,
        strength: float,
        guidance: float,
        seed: int,
        inversion_condition: str = "unconditional",
        eta: float = 0.0,
    ) -> torch.Tensor:
        """Guide (B, 3, g, g) in [0, 1] + embeddings (B, 77, D) -> images (B, 3, size, size) in [0, 1]."""
        guide = self._check_guide(guide)
        cond = self._check_cond(cond, batch=guide.shape[0])
        self._check_sampling(size, guidance, eta)
        if inversion_condition not in INVERSION_CONDITIONS:
            raise DualtokError(
                f"inversion_condition must be one of {INVERSION_CONDITIONS}, got {inversion_condition!r}"
            )
        schedule = self.timesteps_for(steps, strength)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        cond = self.prepare_condition(cond, generator)
        uncond = self.unconditional_embedding()  # (1, 77, D)
        # Bicubic overshoots [0, 1]; the VAE was trained on clipped pixels.
        latents = self.encode(resize_float(guide, size).clamp(0.0, 1.0))  # (B, 4, size/f, size/f)
        noisy = self.invert(latents, schedule, cond if inversion_condition == "semantic" else uncond)
        latents = self.denoise(noisy, schedule, cond, uncond, guidance, eta=eta, generator=generator)
        return self.decode(latents)  # (B, 3, size, size)

    def generate(
        self, cond: torch.Tensor, *, size: int, steps: int, guidance: float, seed: int, eta: float = 0.0
    ) -> torch.Tensor:
        """Semantic tokens only, as SEED/LaVIT decode: denoise seeded Gaussian noise -> (B, 3, size, size)."""
        cond = self._check_cond(cond, batch=None)
        self._check_sampling(size, guidance, eta)
        schedule = self.timesteps_for(steps, 1.0)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        cond = self.prepare_condition(cond, generator)
        side = size // self.vae_scale_factor
        shape = (cond.shape[0], int(self.unet.config.in_channels), side, side)
        noise = torch.randn(shape, generator=generator) * self.scheduler.init_noise_sigma  # (B, 4, h, w)
        noise = noise.to(self.device, self.dtype)
        uncond = self.unconditional_embedding()
        latents = self.denoise(noise, schedule, cond, uncond, guidance, eta=eta, generator=generator)
        return self.decode(latents)  # (B, 3, size, size)

    # ---- input checks -------------------------------------------------------------------

    def _check_guide(self, guide: torch.Tensor) -> torch.Tensor:
        if not isinstance(guide, torch.Tensor) or not guide.is_floating_point():
            raise ImageInputError(f"guide must be a float tensor in [0, 1], got {type(guide).__name__}")
        if guide.ndim != 4 or guide.shape[1] != 3 or guide.shape[2] != guide.shape[3] or guide.shape[0] == 0:
            raise ImageInputError(f"guide must have shape (B, 3, g, g), got {tuple(guide.shape)}")
        # Slack for resampling overshoot (clamped later); [-1, 1] or 0-255 images still fail.
        low, high = float(guide.min()), float(guide.max())
        if low < -_RANGE_SLACK or high > 1.0 + _RANGE_SLACK:
            raise ImageInputError(f"guide must lie in [0, 1], got values in [{low:.3g}, {high:.3g}]")
        return guide.to(self.device)

    def _check_cond(self, cond: torch.Tensor, batch: int | None) -> torch.Tensor:
        expected = (TEXT_LENGTH, self.cross_attention_dim)
        if not isinstance(cond, torch.Tensor) or cond.ndim != 3 or tuple(cond.shape[1:]) != expected:
            got = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise TokenInputError(
                f"cond must be generation embeddings (B, {expected[0]}, {expected[1]}), got {got}"
            )
        if batch is not None and cond.shape[0] != batch:
            raise TokenInputError(f"cond has batch {cond.shape[0]} but guide has batch {batch}")
        if cond.shape[0] == 0:
            raise TokenInputError("cond is an empty batch")
        return cond.to(self.device, self.dtype)

    def _check_sampling(self, size: int, guidance: float, eta: float) -> None:
        factor = self.vae_scale_factor
        if isinstance(size, bool) or not isinstance(size, int) or size < factor or size % factor:
            raise DualtokError(f"size must be a positive multiple of the VAE factor {factor}, got {size!r}")
        if float(guidance) < 1.0:
            raise DualtokError(f"guidance is the classifier-free scale, >= 1 (1 disables it); got {guidance}")
        if float(eta) < 0.0:
            raise DualtokError(f"eta must be >= 0 (0 is deterministic DDIM), got {eta}")
