"""Branch I: the guide VQ-VAE (paper sec. 3.1).

A MoVQ-style VQ-VAE made asymmetric: the encoder downsamples a 256 px image much further than
MoVQ's x8 (to a 2x2..16x16 grid of codebook ids), and the spatially-modulated decoder upsamples
only x8, so it rebuilds a *low-resolution guide image* (16..128 px) rather than the input. The
diffusion branch later upsamples that guide and re-renders it with the semantic tokens.

Built from diffusers parts with diffusers' own module names (``encoder``, ``quant_conv``,
``quantize``, ``post_quant_conv``, ``decoder``), so a Kandinsky 2.2 MoVQ checkpoint maps onto it
name for name (`GuideVQModel.from_movq`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import Decoder, Encoder
from diffusers.models.autoencoders.vq_model import VectorQuantizer
from diffusers.utils import BaseOutput

from dualtok_core.checkpoints import LoadReport, read_tensors
from dualtok_core.errors import BundleError, DualtokError, ImageInputError, TokenInputError
from dualtok_core.imaging import check_token_ids, per_image_on_cpu, resize_float
from dualtok_core.preprocess import check_preprocess

logger = logging.getLogger(__name__)

# The token corpus stores guide ids as uint16.
MAX_CODEBOOK_SIZE = 65536
# The decoder always upsamples x8 (MoVQ's decoder: 4 blocks, 3 upsamplers), so grid = guide / 8.
DECODER_UPSAMPLING = 8
# diffusers' SpatialNorm builds GroupNorm(num_groups=32) whatever norm_num_groups says.
SPATIAL_NORM_GROUPS = 32
# Distances to the codebook are computed this many latents at a time, so that a 16384-code
# codebook and a large batch never materialise one (N, K) matrix of several GiB.
_DISTANCE_CHUNK = 4096


class GuideConfigError(DualtokError):
    """A GuideVQModel configuration whose sizes, depths or widths do not fit together."""


PRESETS: dict[str, dict] = {
    # Tests: a 4-image tokenize takes well under a second on a CPU.
    "tiny": dict(
        image_size=256, guide_size=64, encoder_block_out_channels=(32, 64),
        decoder_block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=4,
        num_vq_embeddings=256, vq_embed_dim=4, norm_num_groups=32,
    ),
    # CPU demos and benchmarks: the paper's layout at a fraction of its widths.
    "small": dict(
        image_size=256, guide_size=64, encoder_block_out_channels=(32, 64, 64, 128),
        decoder_block_out_channels=(32, 64, 64, 128), layers_per_block=2, latent_channels=4,
        num_vq_embeddings=4096, vq_embed_dim=4, norm_num_groups=32,
    ),
    # Kandinsky 2.2 MoVQ's widths and codebook, so `from_movq` copies most of its weights.
    "paper": dict(
        image_size=256, guide_size=64, encoder_block_out_channels=(128, 256, 256, 512),
        decoder_block_out_channels=(128, 256, 256, 512), layers_per_block=2, latent_channels=4,
        num_vq_embeddings=16384, vq_embed_dim=4, norm_num_groups=32,
    ),
}


@dataclass
class GuideOutput(BaseOutput):
    """What one training forward returns; every loss is a scalar tensor.

    `recon_loss` is the MSE of eq. 5 in the decoder's [-1, 1] space. `guide` is the decoder output
    mapped to [0, 1] *without* clamping, i.e. exactly the tensor the loss saw.
    """

    loss: torch.Tensor
    recon_loss: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    guide: torch.Tensor  # (B, 3, guide_size, guide_size)
    ids: torch.Tensor  # (B, grid_size * grid_size) int64


def _encoder_channels(image_size: int, grid_size: int, base: tuple[int, ...]) -> tuple[int, ...]:
    """Per-block encoder widths: `base`, its last width repeated until the depth the sizes need.

    Each encoder block but the last halves the resolution, so image_size -> grid_size takes
    log2(image_size / grid_size) + 1 blocks.
    """
    ratio = image_size // grid_size if grid_size > 0 else 0
    if grid_size <= 0 or image_size % grid_size or ratio & (ratio - 1):
        raise GuideConfigError(
            f"image_size / grid_size must be a power of two, got {image_size} / {grid_size}"
        )
    depth = int(math.log2(ratio)) + 1
    if len(base) > depth:
        raise GuideConfigError(
            f"encoder_block_out_channels has {len(base)} entries but image_size {image_size} -> grid "
            f"{grid_size} needs {depth} encoder blocks; give at most {depth} widths (the last repeats)"
        )
    return tuple(base) + (base[-1],) * (depth - len(base))


def _check_config(
    image_size: int, guide_size: int, grid_size: int | None, encoder_base: tuple[int, ...],
    decoder_widths: tuple[int, ...], latent_channels: int, vq_embed_dim: int,
    num_vq_embeddings: int, norm_num_groups: int,
) -> tuple[int, tuple[int, ...]]:
    """Validate the sizes and widths; return (grid_size, per-block encoder widths)."""
    if guide_size <= 0 or guide_size % DECODER_UPSAMPLING:
        raise GuideConfigError(f"guide_size must be a positive multiple of 8, got {guide_size}")
    if grid_size is not None and grid_size != guide_size // DECODER_UPSAMPLING:
        raise GuideConfigError(
            f"grid_size must equal guide_size // 8 = {guide_size // DECODER_UPSAMPLING} (the decoder "
            f"upsamples x8), got grid_size {grid_size} for guide_size {guide_size}"
        )
    grid_size = guide_size // DECODER_UPSAMPLING
    if guide_size > image_size:
        raise GuideConfigError(f"guide_size {guide_size} is larger than image_size {image_size}")
    if not encoder_base:
        raise GuideConfigError("encoder_block_out_channels is empty")
    encoder_widths = _encoder_channels(image_size, grid_size, encoder_base)
    if len(decoder_widths) != 4:
        raise GuideConfigError(
            f"decoder_block_out_channels must have 4 entries (x8 upsampling), got {decoder_widths}"
        )
    bad = [w for w in decoder_widths if w % SPATIAL_NORM_GROUPS]
    if bad:
        raise GuideConfigError(
            f"decoder_block_out_channels must be multiples of 32 (SpatialNorm uses 32 groups), got {bad}"
        )
    bad = [w for w in (*encoder_widths, *decoder_widths) if w % norm_num_groups]
    if bad:
        raise GuideConfigError(f"block widths {bad} are not divisible by norm_num_groups {norm_num_groups}")
    if vq_embed_dim != latent_channels:
        # The spatial-norm decoder is modulated by the quantized vectors through convs built for
        # latent_channels inputs (diffusers' VQModel.decode has the same constraint).
        raise GuideConfigError(
            f"vq_embed_dim ({vq_embed_dim}) must equal latent_channels ({latent_channels}) for the "
            "spatial-norm decoder"
        )
    if not 1 < num_vq_embeddings <= MAX_CODEBOOK_SIZE:
        raise GuideConfigError(
            f"num_vq_embeddings must be in [2, {MAX_CODEBOOK_SIZE}] (ids are stored as uint16), "
            f"got {num_vq_embeddings}"
        )
    return grid_size, encoder_widths


class GuideVQModel(ModelMixin, ConfigMixin):
    """Images (B, 3, 256, 256) in [0, 1] <-> grid*grid codebook ids <-> guide image (B, 3, g, g)."""

    # Settings added after bundles existed: at these values a bundle's part hash is what it was.
    _HASH_NEUTRAL_DEFAULTS = {"input_fit": "center_crop", "input_interpolation": "bicubic"}
    _skip_layerwise_casting_patterns = ["quantize"]
    _supports_group_offloading = False

    @register_to_config
    def __init__(
        self,
        image_size: int = 256,
        guide_size: int = 64,
        grid_size: int | None = None,
        encoder_block_out_channels: tuple[int, ...] = (128, 256, 256, 512),
        decoder_block_out_channels: tuple[int, ...] = (128, 256, 256, 512),
        layers_per_block: int = 2,
        latent_channels: int = 4,
        num_vq_embeddings: int = 16384,
        vq_embed_dim: int | None = None,
        norm_num_groups: int = 32,
        beta: float = 0.25,
        legacy: bool = False,
        input_fit: str = "center_crop",  # how an image becomes the square input (imaging.Preprocess)
        input_interpolation: str = "bicubic",
    ) -> None:
        super().__init__()
        check_preprocess(input_fit, input_interpolation)
        vq_embed_dim = latent_channels if vq_embed_dim is None else vq_embed_dim
        decoder_widths = tuple(decoder_block_out_channels)
        grid_size, encoder_widths = _check_config(
            image_size, guide_size, grid_size, tuple(encoder_block_out_channels), decoder_widths,
            latent_channels, vq_embed_dim, num_vq_embeddings, norm_num_groups,
        )
        # Record the derived values so that a saved config states them.
        self.register_to_config(grid_size=grid_size, vq_embed_dim=vq_embed_dim)
        self.encoder_widths = encoder_widths

        # Like MoVQ, attention only at the lowest resolution (last encoder / first decoder block).
        down_types = ("DownEncoderBlock2D",) * (len(encoder_widths) - 1) + ("AttnDownEncoderBlock2D",)
        self.encoder = Encoder(
            in_channels=3, out_channels=latent_channels, down_block_types=down_types,
            block_out_channels=encoder_widths, layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups, double_z=False,
        )
        self.quant_conv = nn.Conv2d(latent_channels, vq_embed_dim, 1)
        # diffusers' quantizer is used as the codebook holder (its `embedding` keeps MoVQ's weight
        # names); the losses are computed in `forward`, where beta placement is explicit.
        self.quantize = VectorQuantizer(num_vq_embeddings, vq_embed_dim, beta=beta, legacy=legacy)
        self.post_quant_conv = nn.Conv2d(vq_embed_dim, latent_channels, 1)
        self.decoder = Decoder(
            in_channels=latent_channels, out_channels=3,
            up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3,
            block_out_channels=decoder_widths, layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups, norm_type="spatial",
        )

    @property
    def num_tokens(self) -> int:
        return self.config.grid_size**2

    @property
    def codebook(self) -> torch.Tensor:
        return self.quantize.embedding.weight  # (K, D)

    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if not isinstance(images, torch.Tensor) or not images.dtype.is_floating_point:
            kind = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
            raise ImageInputError(f"guide images must be a float tensor in [0, 1], got {kind}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ImageInputError(f"guide images must have shape (B, 3, {size}, {size}), got {tuple(images.shape)}")
        if images.shape[-2:] != (size, size):
            raise ImageInputError(
                f"guide images must be {size}x{size} (the model's image_size), got "
                f"{images.shape[-2]}x{images.shape[-1]}; resize with imaging.to_model_input"
            )
        low, high = float(images.min()), float(images.max())
        if low < -1e-3 or high > 1 + 1e-3:
            raise ImageInputError(f"guide images must lie in [0, 1], got values in [{low:.3g}, {high:.3g}]")
        return images.to(self.device, self.dtype)

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> the unquantized latents z_e, (B, D, grid, grid).

        Without autograd on a CPU, one image at a time (`per_image_on_cpu`): the encoder's
        full-resolution activations of a whole batch do not fit in the caches."""
        x = self._check_images(images) * 2.0 - 1.0  # (B, 3, S, S) in [-1, 1], MoVQ's input range
        return per_image_on_cpu(lambda chunk: self.quant_conv(self.encoder(chunk)), x)  # (B, D, h, w)

    def nearest_codes(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) latents -> (B, h*w) ids of the nearest codebook vectors (ties: lowest id)."""
        batch, dim = latents.shape[:2]
        flat = latents.detach().permute(0, 2, 3, 1).reshape(-1, dim).float()  # (B*h*w, D)
        codes = self.codebook.detach().float()  # (K, D)
        code_norms = codes.pow(2).sum(1)  # (K,)
        ids = []
        for chunk in flat.split(_DISTANCE_CHUNK):
            # |z|^2 is the same for every code of a row, so it does not change the argmin.
            dist = code_norms - 2.0 * chunk @ codes.T  # (n, K)
            ids.append(dist.argmin(dim=1))
        return torch.cat(ids).view(batch, -1)  # (B, h*w)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, image_size, image_size) float in [0, 1] -> (B, grid*grid) int64 ids."""
        return self.nearest_codes(self.encode_latents(images))

    def _decode_quantized(self, quant: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) quantized vectors -> (B, 3, 8h, 8w) in the decoder's [-1, 1] space."""
        # MoVQ: the quantized vectors modulate every decoder norm (spatial norm), as in VQModel.decode.
        return self.decoder(self.post_quant_conv(quant), quant)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, grid*grid) ids -> (B, 3, guide_size, guide_size) guide images in [0, 1]."""
        grid = self.config.grid_size
        ids = check_token_ids(ids, grid * grid, self.config.num_vq_embeddings, "guide").to(self.device)
        quant = self.quantize.embedding(ids).view(ids.shape[0], grid, grid, -1)  # (B, h, w, D)
        quant = quant.permute(0, 3, 1, 2).contiguous()  # (B, D, h, w)
        return ((self._decode_quantized(quant) + 1.0) / 2.0).clamp(0.0, 1.0)

    def forward(self, images: torch.Tensor) -> GuideOutput:
        """Training forward: eq. 4-5 reconstruction plus the VQ codebook and commitment terms."""
        z = self.encode_latents(images)  # (B, D, h, w)
        ids = self.nearest_codes(z)  # (B, h*w)
        z_q = self.quantize.embedding(ids).view(z.shape[0], z.shape[2], z.shape[3], -1)
        z_q = z_q.permute(0, 3, 1, 2)  # (B, D, h, w)
        codebook_loss = F.mse_loss(z_q, z.detach())  # pulls codes towards the encoder output
        commitment_loss = F.mse_loss(z, z_q.detach())  # keeps the encoder near its codes
        if self.config.legacy:  # diffusers' historical weighting: beta on the codebook term
            vq_loss = self.config.beta * codebook_loss + commitment_loss
        else:  # van den Oord et al. 2017: beta on commitment
            vq_loss = codebook_loss + self.config.beta * commitment_loss
        z_st = z + (z_q - z).detach()  # straight-through: decoder gradients reach the encoder
        decoded = self._decode_quantized(z_st)  # (B, 3, g, g) in [-1, 1]
        # eq. 4: the target is the input shrunk to the guide size (antialiased bicubic), clamped
        # because bicubic overshoots and the guide can only ever hold [0, 1].
        target = resize_float(images.to(self.device), self.config.guide_size).clamp(0.0, 1.0)
        recon_loss = F.mse_loss(decoded.float(), target * 2.0 - 1.0)  # eq. 5, in [-1, 1]
        return GuideOutput(
            loss=recon_loss + vq_loss, recon_loss=recon_loss, codebook_loss=codebook_loss,
            commitment_loss=commitment_loss, guide=(decoded + 1.0) / 2.0, ids=ids,
        )

    @torch.no_grad()
    def reset_dead_codes(
        self, latents: torch.Tensor, used: torch.Tensor, generator: torch.Generator | None = None
    ) -> int:
        """Restart every code with `used[k] == False` on a randomly drawn encoder latent.

        latents: recent z_e, (B, D, h, w) from `encode_latents` or (N, D). used: bool (K,).
        Returns how many codes were restarted. Under data parallelism call it with the same
        gathered latents and generator on every rank (or on one rank and broadcast the codebook).
        """
        num_codes, dim = self.codebook.shape
        if latents.ndim == 4:
            latents = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])  # (N, D)
        if latents.ndim != 2 or latents.shape[1] != dim or latents.shape[0] == 0:
            raise DualtokError(f"latents must be (B, {dim}, h, w) or (N, {dim}), got {tuple(latents.shape)}")
        if used.shape != (num_codes,) or used.dtype != torch.bool:
            raise DualtokError(
                f"used must be a bool tensor of shape ({num_codes},), got {used.dtype} {tuple(used.shape)}"
            )
        dead = (~used).nonzero().squeeze(1).to(self.codebook.device)  # (n_dead,)
        if dead.numel() == 0:
            return 0
        count = latents.shape[0]
        if count >= dead.numel():  # distinct latents, so no two restarted codes coincide
            picks = torch.randperm(count, generator=generator)[: dead.numel()]
        else:
            picks = torch.randint(0, count, (dead.numel(),), generator=generator)
        self.codebook[dead] = latents[picks.to(latents.device)].to(self.codebook)
        logger.info("restarted %d of %d dead guide codes", dead.numel(), num_codes)
        return int(dead.numel())

    @classmethod
    def from_movq(cls, path: str | os.PathLike, **config: Any) -> tuple[GuideVQModel, LoadReport]:
        """Build a guide model initialised from a Kandinsky 2.2 MoVQ folder (diffusers VQModel).

        `path` holds `config.json` and `diffusion_pytorch_model.safetensors` (or a sharded index),
        or is a Kandinsky pipeline folder with them under `movq/`. Widths, codebook and latent size
        default to MoVQ's; `config` overrides them (e.g. `guide_size=32`). Tensors are copied by
        name where the shapes agree; the encoder's extra downsampling blocks stay random.
        """
        folder = _movq_folder(Path(path))
        movq_config = json.loads((folder / "config.json").read_text())
        if movq_config.get("norm_type") != "spatial":
            raise BundleError(
                f"{folder} is not a MoVQ checkpoint: its VQModel norm_type is "
                f"{movq_config.get('norm_type')!r}, expected 'spatial'"
            )
        widths = tuple(movq_config["block_out_channels"])
        defaults = dict(
            encoder_block_out_channels=widths, decoder_block_out_channels=widths,
            layers_per_block=movq_config.get("layers_per_block", 1),
            latent_channels=movq_config.get("latent_channels", 3),
            num_vq_embeddings=movq_config.get("num_vq_embeddings", 256),
            vq_embed_dim=movq_config.get("vq_embed_dim"),
            norm_num_groups=movq_config.get("norm_num_groups", 32),
        )
        model = cls(**{**defaults, **config})
        state, _ = read_tensors(folder, "diffusion_pytorch_model", what="MoVQ weights")
        movq_depth = len(movq_config.get("down_block_types", widths))
        report = _load_matching(model, state, movq_depth, len(model.encoder_widths))
        report.source = str(folder)
        logger.info("guide model from MoVQ %s: %s", folder, report.summary())
        return model, report


def _movq_folder(path: Path) -> Path:
    for folder in (path, path / "movq"):
        if (folder / "config.json").is_file():
            return folder
    raise BundleError(f"no MoVQ config.json in {path} or {path / 'movq'}")


def _movq_to_guide_name(name: str, movq_depth: int, guide_depth: int) -> str:
    """Same name, except that MoVQ's lowest-resolution attention goes to the guide's.

    Both models put attention in their last encoder block only; the guide's last block is deeper
    (index guide_depth - 1), while MoVQ's resnets keep their index (their widths match there).
    """
    prefix = f"encoder.down_blocks.{movq_depth - 1}.attentions."
    if name.startswith(prefix):
        return f"encoder.down_blocks.{guide_depth - 1}.attentions." + name[len(prefix):]
    return name


def _load_matching(
    model: GuideVQModel, state: dict[str, torch.Tensor], movq_depth: int, guide_depth: int
) -> LoadReport:
    own = model.state_dict()
    report, to_load = LoadReport(source=None, names=list(own), part="guide"), {}
    for movq_name, tensor in state.items():
        name = _movq_to_guide_name(movq_name, movq_depth, guide_depth)
        if name not in own:
            report.unused.append(movq_name)
        elif tuple(tensor.shape) != tuple(own[name].shape):
            report.mismatched[name] = (tuple(tensor.shape), tuple(own[name].shape))
        else:
            to_load[name] = tensor.to(own[name].dtype)
    model.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    report.unused.sort()
    return report


def codebook_usage(ids: torch.Tensor, num_codes: int) -> tuple[float, float]:
    """(fraction of the codebook used, perplexity = exp(entropy of the id histogram)) over `ids`.

    Perplexity equals the number of codes used when they are used equally often, and 1 when a
    single code takes every token (codebook collapse).
    """
    flat = ids.reshape(-1).long().cpu()  # (N,)
    if flat.numel() == 0:
        raise TokenInputError("codebook_usage needs at least one id")
    if int(flat.min()) < 0 or int(flat.max()) >= num_codes:
        raise TokenInputError(f"ids must lie in [0, {num_codes}), got [{int(flat.min())}, {int(flat.max())}]")
    counts = torch.bincount(flat, minlength=num_codes).double()  # (K,)
    total = counts.sum()
    probs = counts[counts > 0] / total
    perplexity = float(torch.exp(-(probs * probs.log()).sum()))
    return float((counts > 0).sum()) / num_codes, perplexity
