"""Branch II: the SEED-style semantic tokenizer (paper sec. 3.2).

image (B, 3, 224, 224) in [0, 1]
  -> BLIP-2 ViT (EVA ViT-g/14: 257 tokens x 1408), frozen
  -> Causal Q-Former (BERT-base, 32 learned queries, causal self-attention among the queries,
     unmasked cross-attention to the ViT tokens)                    -> causal embeddings (B, 32, 768)
  -> codebook: Linear-Tanh-Linear 768 -> 32, nearest of 8192 codes  -> ids (B, 32)
  -> Linear-Tanh-Linear 32 -> 768, embedding decoder (4 blocks)     -> decoded embeddings (B, 32, 768)
  -> Reverse Q-Former (77 learned queries attend to the 32 decoded) -> generation embeddings (B, 77, 768)

Training runs in three stages (`STAGE_TRAINABLE`), each with its loss: `qformer` (eq. 6,
`image_text_features` + `contrastive_loss`), `codebook` (eq. 7, `reconstruction_loss`) and
`reverse` (eq. 8, `generation_loss`). The ViT is never trained.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from torch import nn
from transformers import Blip2QFormerModel, Blip2VisionModel
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

from dualtok_core.checkpoints import LoadReport
from dualtok_core.errors import BundleError, DualtokError, ImageInputError
from dualtok_core.imaging import check_token_ids
from dualtok_core.preprocess import check_preprocess
from dualtok_core.qformer import (
    BLIP2_MEAN,
    BLIP2_STD,
    QFORMER_KEYS,
    VISION_KEYS,
    blip2_config,
    check_text_ids,
    copy_checkpoint,
    qformer_config_from,
    read_blip2_checkpoint,
    run_queries,
    run_text,
    vision_config_from,
)
from dualtok_core.seed import SeedImageHead, read_seed_checkpoint, seed_settings, seed_tensors, seed_weights_file

logger = logging.getLogger(__name__)

# Which top-level parts train in each stage; everything else is frozen (requires_grad False, eval()).
# The ViT is in no stage: SEED keeps BLIP-2's ViT frozen throughout.
# SEED stage 1 (its pretrain_qformer.yaml): label smoothing of the eq. 6 contrastive targets.
SEED_LABEL_SMOOTHING = 0.1

STAGE_TRAINABLE: dict[str, tuple[str, ...]] = {
    "qformer": ("query_tokens", "qformer", "text_embeddings", "vision_proj", "text_proj", "temperature"),
    "codebook": ("quantizer", "decoder"),
    "reverse": ("generation_queries", "reverse_qformer", "generation_proj"),
}

# BLIP-2 stage-1 shapes: EVA ViT-g/14 (transformers' Blip2VisionConfig defaults) and BERT-base.
PAPER_VISION = dict(
    hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16, patch_size=14,
    qkv_bias=True, layer_norm_eps=1e-6,
)
PAPER_QFORMER = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    cross_attention_frequency=2, vocab_size=30522, max_position_embeddings=512,
)
PAPER_REVERSE = dict(
    hidden_size=768, num_hidden_layers=4, num_attention_heads=12, intermediate_size=3072, cross_attention_frequency=2,
)
_NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

PRESETS: dict[str, dict[str, Any]] = {
    # Tests: a tokenize of a few images takes well under a second on a CPU. The Q-Formers'
    # init std is ~1/sqrt(width): BERT's 0.02 at width 32 leaves a random Q-Former nearly blind to
    # the image and the text (each attention sublayer then adds ~1% to the residual).
    "tiny": dict(
        image_size=224,
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=16,
        ),
        qformer_config=dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            cross_attention_frequency=1, vocab_size=512, max_position_embeddings=64, initializer_range=0.2,
            **_NO_DROPOUT,
        ),
        reverse_qformer_config=dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            cross_attention_frequency=1, initializer_range=0.2, **_NO_DROPOUT,
        ),
        num_queries=32, image_text_dim=16, codebook_size=512, codebook_dim=8,
        decoder_layers=2, decoder_heads=4, num_generation_tokens=77, gen_dim=32,
    ),
    # CPU demo and benchmarks: the paper's structure (257 ViT tokens, cross-attention every 2nd
    # layer, 8192 x 32 codebook, 4 decoder blocks, 4-layer Reverse Q-Former) at reduced widths.
    "small": dict(
        image_size=224,
        vision_config=dict(
            hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6, patch_size=14,
        ),
        qformer_config=dict(
            hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
            cross_attention_frequency=2, vocab_size=30522, max_position_embeddings=512,
        ),
        reverse_qformer_config=dict(
            hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
            cross_attention_frequency=2,
        ),
        num_queries=32, image_text_dim=256, codebook_size=8192, codebook_dim=32,
        # gen_dim is the `small` diffusion preset's UNet cross-attention width (presets.check_compatible).
        decoder_layers=4, decoder_heads=4, num_generation_tokens=77, gen_dim=256,
    ),
    "paper": dict(
        image_size=224,
        vision_config=PAPER_VISION,
        qformer_config=PAPER_QFORMER,
        reverse_qformer_config=PAPER_REVERSE,
        num_queries=32, image_text_dim=256, codebook_size=8192, codebook_dim=32,
        decoder_layers=4, decoder_heads=12, num_generation_tokens=77, gen_dim=768,
    ),
}


@dataclass
class QuantizeOutput(BaseOutput):
    ids: torch.Tensor  # (B, Q) int64
    quantized: torch.Tensor  # (B, Q, D): the chosen codes projected back to the Q-Former width, straight-through
    codebook_loss: torch.Tensor  # ||sg[z] - e||^2: moves the codes
    commitment_loss: torch.Tensor  # ||z - sg[e]||^2: moves the encoder output


@dataclass
class SemanticReconOutput(BaseOutput):
    loss: torch.Tensor  # cosine_loss + codebook_loss + commitment_beta * commitment_loss
    cosine_loss: torch.Tensor  # eq. 7 as 1 - mean cosine (same gradient, >= 0)
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    ids: torch.Tensor  # (B, Q)


def contrastive_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    temperature: torch.Tensor | float,
    label_smoothing: float = SEED_LABEL_SMOOTHING,
) -> torch.Tensor:
    """Symmetric InfoNCE (eq. 6) over row-aligned pairs of normalised features (N, E).

    The features are arguments so that a data-parallel job can all-gather them first; row i of
    `image_feat` must be the pair of row i of `text_feat`.
    """
    if image_feat.ndim != 2 or image_feat.shape != text_feat.shape:
        raise DualtokError(
            f"image and text features must be the same (N, E) shape, got {tuple(image_feat.shape)} "
            f"and {tuple(text_feat.shape)}"
        )
    # BLIP-2 keeps its learnable temperature in [0.001, 0.5].
    temp = torch.as_tensor(temperature, dtype=torch.float32, device=image_feat.device).clamp(0.001, 0.5)
    logits = image_feat.float() @ text_feat.float().t() / temp  # (N, N)
    targets = torch.arange(logits.shape[0], device=logits.device)
    image_to_text = F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    text_to_image = F.cross_entropy(logits.t(), targets, label_smoothing=label_smoothing)
    return (image_to_text + text_to_image) / 2


class SemanticQuantizer(nn.Module):
    """SEED's codebook: Linear-Tanh-Linear down to `dim`, nearest code, Linear-Tanh-Linear back up."""

    def __init__(self, width: int, size: int, dim: int) -> None:
        super().__init__()
        self.project_in = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, dim))
        self.codebook = nn.Embedding(size, dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / size, 1.0 / size)  # as SEED / taming
        self.project_out = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, width))

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(B, Q, dim) -> ids (B, Q) of the nearest codes in Euclidean distance."""
        flat = z.reshape(-1, z.shape[-1]).float()  # (B*Q, dim)
        codes = self.codebook.weight.float()  # (K, dim)
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.t() + codes.pow(2).sum(1)[None]  # (B*Q, K)
        return dist.argmin(dim=1).reshape(z.shape[:-1])  # (B, Q)

    def forward(self, causal: torch.Tensor) -> QuantizeOutput:
        z = self.project_in(causal.to(self.codebook.weight.dtype))  # (B, Q, dim)
        ids = self.nearest(z)  # (B, Q)
        codes = self.codebook(ids)  # (B, Q, dim)
        codebook_loss = F.mse_loss(codes, z.detach())
        commitment_loss = F.mse_loss(z, codes.detach())
        straight_through = z + (codes - z).detach()  # forward: codes; backward: identity to z
        return QuantizeOutput(
            ids=ids,
            quantized=self.project_out(straight_through),  # (B, Q, D)
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
        )

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.project_out(self.codebook(ids))  # (B, Q, D)


class EmbeddingDecoder(nn.Module):
    """Learned positions + pre-norm transformer blocks: quantized codes -> causal embeddings (eq. 7)."""

    def __init__(self, width: int, num_tokens: int, layers: int, heads: int) -> None:
        super().__init__()
        self.position = nn.Parameter(torch.randn(1, num_tokens, width) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width, heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu",
                batch_first=True, norm_first=True, layer_norm_eps=1e-6,
            )
            for _ in range(layers)
        )

    def forward(self, quantized: torch.Tensor) -> torch.Tensor:
        x = quantized + self.position  # (B, Q, D)
        for block in self.blocks:
            x = block(x)
        return x  # (B, Q, D)


class SemanticTokenizer(ModelMixin, ConfigMixin):
    """Images <-> 32 semantic ids, and ids -> 77 generation embeddings for the diffusion branch."""

    # Settings added after bundles existed: at these values a bundle's part hash is what it was.
    _HASH_NEUTRAL_DEFAULTS = {
        "vision_post_norm_eps": None, "image_head": None, "image_embed_dim": 1024, "image_qformer_config": None,
        "input_fit": "center_crop", "input_interpolation": "bicubic",
    }

    @register_to_config
    def __init__(
        self,
        image_size: int = 224,
        vision_config: dict[str, Any] | None = None,
        qformer_config: dict[str, Any] | None = None,
        reverse_qformer_config: dict[str, Any] | None = None,
        num_queries: int = 32,
        causal_queries: bool = True,
        image_text_dim: int = 256,
        initial_temperature: float = 0.07,
        codebook_size: int = 8192,
        codebook_dim: int = 32,
        commitment_beta: float = 0.25,
        decoder_layers: int = 4,
        decoder_heads: int = 12,
        num_generation_tokens: int = 77,
        gen_dim: int = 768,
        attn_implementation: str = "sdpa",
        vision_post_norm_eps: float | None = None,
        image_head: str | None = None,
        image_embed_dim: int = 1024,
        image_qformer_config: dict[str, Any] | None = None,
        input_fit: str = "center_crop",  # how an image becomes the square input (imaging.Preprocess)
        input_interpolation: str = "bicubic",
    ) -> None:
        super().__init__()
        check_preprocess(input_fit, input_interpolation)
        vision_config = dict(PAPER_VISION if vision_config is None else vision_config)
        qformer_config = dict(PAPER_QFORMER if qformer_config is None else qformer_config)
        reverse_qformer_config = dict(PAPER_REVERSE if reverse_qformer_config is None else reverse_qformer_config)
        # The config records the resolved shapes, so that a saved config says what was built.
        self.register_to_config(
            vision_config=vision_config, qformer_config=qformer_config, reverse_qformer_config=reverse_qformer_config
        )
        self._frozen: tuple[str, ...] = ()

        vcfg = vision_config_from(vision_config, image_size, attn_implementation)
        qcfg = qformer_config_from(qformer_config, vcfg.hidden_size, True, attn_implementation)
        width = qcfg.hidden_size
        rcfg = qformer_config_from(reverse_qformer_config, width, False, attn_implementation)

        self.vision_model = Blip2VisionModel(vcfg)
        if vision_post_norm_eps is not None:  # LAVIS's ln_vision (SEED) is 1e-5; transformers uses the ViT's eps
            self.vision_model.post_layernorm.eps = float(vision_post_norm_eps)
        self.query_tokens = nn.Parameter(torch.randn(1, num_queries, width) * qcfg.initializer_range)
        self.qformer = Blip2QFormerModel(qcfg)
        self.text_embeddings = Blip2TextEmbeddings(qcfg)
        for embedding in (self.text_embeddings.word_embeddings, self.text_embeddings.position_embeddings):
            nn.init.normal_(embedding.weight, std=qcfg.initializer_range)  # BERT's init, not nn.Embedding's N(0, 1)
        self.vision_proj = nn.Linear(width, image_text_dim)
        self.text_proj = nn.Linear(width, image_text_dim)
        self.temperature = nn.Parameter(torch.tensor(float(initial_temperature)))

        self.quantizer = SemanticQuantizer(width, codebook_size, codebook_dim)
        self.decoder = EmbeddingDecoder(width, num_queries, decoder_layers, decoder_heads)

        self.generation_queries = nn.Parameter(
            torch.randn(1, num_generation_tokens, rcfg.hidden_size) * rcfg.initializer_range
        )
        self.reverse_qformer = Blip2QFormerModel(rcfg)
        self.generation_proj = nn.Linear(rcfg.hidden_size, gen_dim)

        # SEED's released decoding path: codes -> one CLIP image embedding for an unCLIP UNet.
        if image_head is not None:
            image_qformer = None
            if image_head == "qformer":
                icfg = qformer_config_from(dict(image_qformer_config or PAPER_REVERSE), width, False,
                                           attn_implementation)
                image_qformer = Blip2QFormerModel(icfg)
            decoder = EmbeddingDecoder(width, num_queries, decoder_layers, decoder_heads)
            self.image_embedding_head = SeedImageHead(
                image_head, decoder, width, num_queries, image_embed_dim, image_qformer
            )

    # ---- images -> causal embeddings -> ids ---------------------------------------------------
    def _pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """Validate float (B, 3, S, S) images in [0, 1] and normalise them as BLIP-2 does."""
        size = self.config.image_size
        if not isinstance(images, torch.Tensor):
            raise ImageInputError(f"images must be a torch tensor (B, 3, {size}, {size}), got {type(images).__name__}")
        if not images.dtype.is_floating_point:
            raise ImageInputError(
                f"images must be float in [0, 1], got {images.dtype}; imaging.to_model_input converts uint8 batches"
            )
        if images.ndim != 4 or images.shape[1] != 3:
            raise ImageInputError(f"images must have shape (B, 3, {size}, {size}), got {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != (size, size):
            raise ImageInputError(
                f"images are {images.shape[-2]}x{images.shape[-1]}; the semantic branch takes {size}x{size}"
            )
        if images.numel() and (float(images.min()) < -1e-3 or float(images.max()) > 1 + 1e-3):
            raise ImageInputError(
                f"images must lie in [0, 1], got values in [{float(images.min()):.3g}, {float(images.max()):.3g}]"
            )
        weight = self.vision_model.embeddings.patch_embedding.weight
        mean = torch.tensor(BLIP2_MEAN, device=weight.device, dtype=weight.dtype).view(1, 3, 1, 1)
        std = torch.tensor(BLIP2_STD, device=weight.device, dtype=weight.dtype).view(1, 3, 1, 1)
        return (images.to(device=weight.device, dtype=weight.dtype) - mean) / std  # (B, 3, S, S)

    def _vision_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # A frozen ViT (every stage) keeps no activations for backward: ViT-g is ~1B parameters.
        trainable = any(p.requires_grad for p in self.vision_model.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            return self.vision_model(pixel_values=pixel_values).last_hidden_state  # (B, T, E)

    def causal_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Float images (B, 3, S, S) in [0, 1] -> the Causal Q-Former's query outputs (B, Q, D)."""
        states = self._vision_states(self._pixel_values(images))  # (B, T, E)
        queries = self.query_tokens.expand(states.shape[0], -1, -1)  # (B, Q, D)
        return run_queries(self.qformer, queries, states, causal=self.config.causal_queries)  # (B, Q, D)

    def quantize(self, causal: torch.Tensor) -> QuantizeOutput:
        """Causal embeddings (B, Q, D) -> nearest codes (ids, straight-through quantized, VQ losses)."""
        expected = (self.config.num_queries, self.qformer.config.hidden_size)
        if causal.ndim != 3 or tuple(causal.shape[1:]) != expected:
            raise DualtokError(
                f"causal embeddings must be (B, {expected[0]}, {expected[1]}), got {tuple(causal.shape)}"
            )
        return self.quantizer(causal)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Float images (B, 3, S, S) in [0, 1] -> semantic ids (B, Q) int64."""
        return self.quantize(self.causal_embeddings(images)).ids  # (B, Q)

    # ---- ids -> decoded embeddings -> generation embeddings -------------------------------------
    def _check_ids(self, ids: torch.Tensor) -> torch.Tensor:
        ids = check_token_ids(ids, self.config.num_queries, self.config.codebook_size, "semantic")
        return ids.to(self.quantizer.codebook.weight.device)

    def decode_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """Semantic ids (B, Q) -> reconstructed causal embeddings (B, Q, D)."""
        return self.decoder(self.quantizer.lookup(self._check_ids(ids)))  # (B, Q, D)

    def generation_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """Semantic ids (B, Q) -> generation embeddings (B, 77, gen_dim), the diffusion condition."""
        decoded = self.decode_embeddings(ids)  # (B, Q, D)
        queries = self.generation_queries.expand(decoded.shape[0], -1, -1)  # (B, 77, Dr)
        states = run_queries(self.reverse_qformer, queries, decoded, causal=False)  # (B, 77, Dr)
        return self.generation_proj(states)  # (B, 77, gen_dim)

    def image_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """Semantic ids (B, Q) -> image embeddings (B, image_embed_dim), SEED's unCLIP condition."""
        if self.config.image_head is None:
            raise DualtokError(
                "this semantic tokenizer has no image-embedding head (SEED's unCLIP path); its ids decode "
                "through generation_embeddings into a text-conditioned UNet"
            )
        return self.image_embedding_head(self.quantizer.lookup(self._check_ids(ids)))  # (B, image_embed_dim)

    # ---- training losses ------------------------------------------------------------------------
    def image_text_features(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage `qformer` (eq. 6): normalised (B, E) features of the last causal query and of the text [CLS]."""
        mask = check_text_ids(input_ids, attention_mask, self.qformer.config)
        causal = self.causal_embeddings(images)  # (B, Q, D)
        if causal.shape[0] != input_ids.shape[0]:
            raise DualtokError(f"{causal.shape[0]} images but {input_ids.shape[0]} captions")
        device = causal.device
        cls = run_text(self.qformer, self.text_embeddings, input_ids.to(device), mask.to(device))  # (B, D)
        image_feat = F.normalize(self.vision_proj(causal[:, -1]), dim=-1)  # (B, E)
        text_feat = F.normalize(self.text_proj(cls), dim=-1)  # (B, E)
        return image_feat, text_feat

    def reconstruction_loss(self, images: torch.Tensor) -> SemanticReconOutput:
        """Stage `codebook` (eq. 7): cosine between decoded and (detached) causal embeddings, plus VQ terms."""
        with torch.no_grad():
            causal = self.causal_embeddings(images)  # (B, Q, D), the target; the Q-Former is frozen here
        quantized = self.quantize(causal)
        decoded = self.decoder(quantized.quantized)  # (B, Q, D)
        cosine = F.cosine_similarity(decoded.float(), causal.float(), dim=-1)  # (B, Q)
        cosine_loss = 1 - cosine.mean()
        loss = cosine_loss + quantized.codebook_loss + self.config.commitment_beta * quantized.commitment_loss
        return SemanticReconOutput(
            loss=loss,
            cosine_loss=cosine_loss,
            codebook_loss=quantized.codebook_loss,
            commitment_loss=quantized.commitment_loss,
            ids=quantized.ids,
        )

    def generation_loss(
        self, target: torch.Tensor, *, ids: torch.Tensor | None = None, images: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Stage `reverse` (eq. 8): MSE between generation embeddings and the frozen text encoder's
        features `target` (B, 77, gen_dim); the embeddings come from `ids` or are encoded from `images`."""
        if (ids is None) == (images is None):
            raise DualtokError("generation_loss takes exactly one of ids= or images=")
        if images is not None:
            ids = self.encode(images)
        generated = self.generation_embeddings(ids)  # (B, 77, gen_dim)
        if tuple(target.shape) != tuple(generated.shape):
            raise DualtokError(
                f"target must be the text encoder's features {tuple(generated.shape)}, got {tuple(target.shape)}"
            )
        return F.mse_loss(generated.float(), target.to(generated.device).float())

    # ---- training stages -----------------------------------------------------------------------
    @staticmethod
    def _stage_parts(stage: str) -> tuple[str, ...]:
        if stage not in STAGE_TRAINABLE:
            raise DualtokError(
                f"unknown semantic training stage {stage!r}; stages are {list(STAGE_TRAINABLE)} "
                "(the guide stage trains Branch I, GuideVQModel)"
            )
        return STAGE_TRAINABLE[stage]

    def stage_parameters(self, stage: str) -> dict[str, nn.Parameter]:
        """Name -> parameter of everything that trains in `stage` (what its optimizer gets)."""
        parts = self._stage_parts(stage)
        return {name: p for name, p in self.named_parameters() if name.split(".")[0] in parts}

    def freeze_for_stage(self, stage: str) -> None:
        """Train only the stage's parts: the rest get requires_grad False and stay in eval() mode."""
        parts = self._stage_parts(stage)
        for name, param in self.named_parameters():
            param.requires_grad_(name.split(".")[0] in parts)
        self._frozen = tuple(name for name, _ in self.named_children() if name not in parts)
        self.train()
        logger.info("semantic stage %s: training %s", stage, list(parts))

    def train(self, mode: bool = True) -> SemanticTokenizer:
        """As nn.Module.train, but frozen parts stay in eval mode (no dropout in a frozen Q-Former)."""
        super().train(mode)
        for name in self._frozen:
            getattr(self, name).eval()
        return self

    # ---- BLIP-2 initialisation ------------------------------------------------------------------
    @classmethod
    def from_blip2(cls, path: str | os.PathLike, **overrides: Any) -> tuple[SemanticTokenizer, LoadReport]:
        """Build from a BLIP-2 checkpoint folder (transformers format, safetensors): the ViT, Q-Former,
        query tokens and, where present (Blip2ForImageTextRetrieval), the Q-Former's text embeddings
        and contrastive projections are copied; the report lists what stays random."""
        root = Path(path)
        config = blip2_config(root)
        vision, qformer = config.vision_config, config.qformer_config
        if not isinstance(vision.image_size, int):
            raise BundleError(f"{root}: the ViT's image_size {vision.image_size} is not square")
        derived = {
            "image_size": vision.image_size,
            "vision_config": {key: getattr(vision, key) for key in VISION_KEYS},
            "qformer_config": {key: getattr(qformer, key) for key in QFORMER_KEYS},
            "num_queries": config.num_query_tokens,
            "image_text_dim": config.image_text_hidden_size,
        }
        tensors, unused = read_blip2_checkpoint(root)
        return cls._from_checkpoint(derived, overrides, tensors, unused, str(root), "BLIP-2")

    @classmethod
    def _from_checkpoint(
        cls, derived: dict[str, Any], overrides: dict[str, Any], tensors: dict[str, torch.Tensor],
        unused: list[str], source: str, kind: str,
    ) -> tuple[SemanticTokenizer, LoadReport]:
        """Build with the settings a checkpoint fixes (`derived`) and the caller's others, then copy its tensors."""
        clash = sorted(set(derived) & set(overrides))
        if clash:
            raise BundleError(f"{clash} come from the {kind} checkpoint and cannot be overridden")
        model = cls(**derived, **overrides)
        report = copy_checkpoint(model, tensors, source)
        report.unused, report.kind = unused, kind
        return model, report

    @classmethod
    def from_seed(
        cls, path: str | os.PathLike, heads: dict[str, int] | None = None, **overrides: Any
    ) -> tuple[SemanticTokenizer, LoadReport]:
        """Build from a SEED tokenizer release in LAVIS layout (`seed_quantizer.pt`, read with
        weights_only=True, or its safetensors conversion; a file or the folder holding it): ViT, causal
        Q-Former, codebook, embedding decoder and the unCLIP image head are copied; the report lists
        what the release lacks (the Q-Former's text path, the contrastive projections, the 77-token
        Reverse Q-Former), which stays random."""
        file = seed_weights_file(Path(path))
        try:
            tensors = read_seed_checkpoint(file)
            ours, unused = seed_tensors(tensors)
            return cls._from_checkpoint(seed_settings(tensors, heads), overrides, ours, unused, str(path), "SEED")
        except BundleError as exc:
            raise BundleError(f"SEED tokenizer checkpoint {file}: {str(exc).removeprefix(f'{path}: ')}") from exc
