"""SEED's released tokenizers in the semantic branch: their checkpoint layout and their unCLIP head.

SEED (arXiv 2307.08041) and SEED-LLaMA (arXiv 2310.01218, AILab-CVC/SEED `seed_quantizer.pt`) ship
their tokenizer as one LAVIS-layout state dict:

  visual_encoder.*  EVA ViT-g/14 (39 blocks, q_bias / v_bias, no final norm) -> vision_model.*
  ln_vision.*       LayerNorm (eps 1e-5, not the ViT's 1e-6)                  -> vision_model.post_layernorm.*
  query_tokens      32 learned queries                                        -> query_tokens
  Qformer.bert.*    BERT-base, query path only; the 32 queries attend causally -> qformer.*
  encode_task_layer.{0,2} / quantize.embedding / decode_task_layer.{0,2}      -> quantizer.*
  pos_embed, blocks.*   4 timm blocks reconstructing the causal embeddings     -> decoder.*
  pos_embed_image, blocks_image.*  + the head to a 1024-d CLIP ViT-H image embedding, which
  conditions stable-diffusion-2-1-unclip:
      SEED-LLaMA: image_down.{0,2,4} (768-256-128-32 MLP, no bias) + distill_image_proj (32*32 -> 1024)
      SEED-1:     Reverse_Qformer.bert.* with 1 reverse_tokens query + distill_image_proj (768 -> 1024)
                                                                              -> image_embedding_head.*

What the layout does not say (attention heads) is SEED's own fixed choice: EVA-g's 88-wide heads,
12 heads in BERT-base and in SEED's blocks. The text path of the Q-Former (word / position
embeddings, the text FFNs), the contrastive projections and the paper's 77-token Reverse
Q-Former are not in the release and stay random; `LoadReport` says so.

A `.pt` file is read with `torch.load(weights_only=True)`, which unpickles tensors and plain
containers only and never runs code from the file; a `.safetensors` conversion reads the same.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import Blip2QFormerModel

from dualtok_core.errors import BundleError
from dualtok_core.qformer import run_queries

logger = logging.getLogger(__name__)

# SEED's fixed head counts: EVA ViT-g/14 has 1408 // 88 = 16 heads; BERT-base and SEED's blocks 12.
EVA_HEAD_DIM = 88
BERT_HEADS = 12
SEED_BLOCK_HEADS = 12
# LAVIS's ln_vision is a plain nn.LayerNorm; the EVA blocks use 1e-6, BERT 1e-12.
LN_VISION_EPS = 1e-5
SEED_WEIGHT_NAMES = ("seed_quantizer.safetensors", "seed_quantizer.pt", "model.safetensors")
IMAGE_HEADS = ("mlp", "qformer")  # SEED-LLaMA's image_down MLP, SEED-1's one-query Reverse Q-Former
_MLP_WIDTHS = (256, 128, 32)  # SEED-LLaMA's image_down

# LAVIS name -> ours, applied in order (the first match wins); \1 is the rest of the name.
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"visual_encoder\.patch_embed\.proj\.(.*)", r"vision_model.embeddings.patch_embedding.\1"),
    (r"visual_encoder\.blocks\.(\d+)\.norm1\.(.*)", r"vision_model.encoder.layers.\1.layer_norm1.\2"),
    (r"visual_encoder\.blocks\.(\d+)\.norm2\.(.*)", r"vision_model.encoder.layers.\1.layer_norm2.\2"),
    (r"visual_encoder\.blocks\.(\d+)\.attn\.qkv\.weight", r"vision_model.encoder.layers.\1.self_attn.qkv.weight"),
    (r"visual_encoder\.blocks\.(\d+)\.attn\.proj\.(.*)", r"vision_model.encoder.layers.\1.self_attn.projection.\2"),
    (r"visual_encoder\.blocks\.(\d+)\.mlp\.(fc[12])\.(.*)", r"vision_model.encoder.layers.\1.mlp.\2.\3"),
    (r"ln_vision\.(.*)", r"vision_model.post_layernorm.\1"),
    (r"query_tokens$", "query_tokens"),
    (r"Qformer\.bert\.(.*)", r"qformer.\1"),
    (r"encode_task_layer\.(.*)", r"quantizer.project_in.\1"),
    (r"decode_task_layer\.(.*)", r"quantizer.project_out.\1"),
    (r"quantize\.embedding\.weight$", "quantizer.codebook.weight"),
    (r"pos_embed$", "decoder.position"),
    (r"blocks\.(.*)", r"decoder.blocks.\1"),
    (r"pos_embed_image$", "image_embedding_head.decoder.position"),
    (r"blocks_image\.(.*)", r"image_embedding_head.decoder.blocks.\1"),
    (r"image_down\.(.*)", r"image_embedding_head.down.\1"),
    (r"distill_image_proj\.(.*)", r"image_embedding_head.proj.\1"),
    (r"reverse_tokens$", "image_embedding_head.queries"),
    (r"Reverse_Qformer\.bert\.(.*)", r"image_embedding_head.qformer.\1"),
)
# Inside a LAVIS BERT (-> transformers' Blip2QFormerModel) and a timm block (-> nn.TransformerEncoderLayer).
_BERT_RENAMES = (
    (r"embeddings\.LayerNorm\.(.*)", r"layernorm.\1"),
    (r"(encoder\.layer\.\d+\.(?:attention|crossattention))\.self\.(.*)", r"\1.attention.\2"),
    (r"(encoder\.layer\.\d+\..*)", r"\1"),
)
_BLOCK_RENAMES = (
    (r"(\d+)\.attn\.qkv\.weight", r"\1.self_attn.in_proj_weight"),
    (r"(\d+)\.attn\.qkv\.bias", r"\1.self_attn.in_proj_bias"),
    (r"(\d+)\.attn\.proj\.(.*)", r"\1.self_attn.out_proj.\2"),
    (r"(\d+)\.mlp\.fc1\.(.*)", r"\1.linear1.\2"),
    (r"(\d+)\.mlp\.fc2\.(.*)", r"\1.linear2.\2"),
    (r"(\d+)\.(norm[12]\..*)", r"\1.\2"),
)
# Prefixes whose every tensor takes part in tokenizing or decoding: none may go unmapped.
_COMPUTING = ("visual_encoder.", "ln_vision.", "blocks.", "blocks_image.", "encode_task_layer.", "decode_task_layer.")
# Text embeddings of a LAVIS Q-Former, where a checkpoint keeps them (SEED's do not).
_TEXT_EMBEDDINGS = re.compile(r"Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\.weight")


class SeedImageHead(nn.Module):
    """SEED's path from quantized codes to a CLIP image embedding (the unCLIP condition).

    codes projected to the Q-Former width (B, Q, D) -> learned positions + blocks (B, Q, D) ->
    `mlp`: per-query 256-128-32 MLP, flattened, Linear -> (B, dim);
    `qformer`: one learned query cross-attending to the Q tokens, Linear -> (B, dim).
    """

    def __init__(self, kind: str, decoder: nn.Module, width: int, num_queries: int, dim: int,
                 qformer: Blip2QFormerModel | None = None) -> None:
        super().__init__()
        if kind not in IMAGE_HEADS:
            raise BundleError(f"unknown image head {kind!r}; SEED's are {list(IMAGE_HEADS)}")
        self.kind = kind
        self.decoder = decoder
        if kind == "mlp":
            a, b, c = _MLP_WIDTHS
            self.down = nn.Sequential(
                nn.Linear(width, a, bias=False), nn.ReLU(), nn.Linear(a, b, bias=False), nn.ReLU(),
                nn.Linear(b, c, bias=False),
            )
            self.proj = nn.Linear(num_queries * c, dim)
        else:
            if qformer is None:
                raise BundleError("the qformer image head needs its Q-Former")
            self.qformer = qformer
            config = qformer.config
            self.queries = nn.Parameter(torch.randn(1, 1, config.hidden_size) * config.initializer_range)
            self.proj = nn.Linear(qformer.config.hidden_size, dim)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        x = self.decoder(codes)  # (B, Q, D)
        if self.kind == "mlp":
            return self.proj(self.down(x).flatten(1))  # (B, Q*32) -> (B, dim)
        queries = self.queries.expand(x.shape[0], -1, -1)  # (B, 1, Dr)
        return self.proj(run_queries(self.qformer, queries, x, causal=False)[:, 0])  # (B, dim)


# ---- reading a release ----------------------------------------------------------------------------


def seed_weights_file(path: Path) -> Path:
    """The weights file of a SEED release: `path` itself, or the first of SEED_WEIGHT_NAMES in it."""
    if path.is_file():
        return path
    if path.is_dir():
        for name in SEED_WEIGHT_NAMES:
            if (path / name).is_file():
                return path / name
        raise BundleError(f"{path} holds none of {list(SEED_WEIGHT_NAMES)}: not a SEED tokenizer release")
    raise BundleError(f"SEED tokenizer checkpoint {path} does not exist")


def read_seed_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a SEED checkpoint, by its LAVIS name. Pickles are read with weights_only=True."""
    file = seed_weights_file(path)
    try:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as handle:
                state: Any = {key: handle.get_tensor(key) for key in handle.keys()}
        else:
            state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, a pickle of objects, a foreign format: all say the same
        raise BundleError(
            f"not a readable SEED checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
            "A .pt is read with torch.load(weights_only=True), which refuses pickled objects other than tensors; "
            "convert such a file where you trust it: "
            "safetensors.torch.save_file(torch.load(f, weights_only=False), 'seed_quantizer.safetensors')"
        ) from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # LAVIS training checkpoints wrap the state dict
    if not isinstance(state, dict):
        raise BundleError(f"it holds a {type(state).__name__}, not a state dict of tensors")
    odd = sorted(key for key, value in state.items() if not isinstance(value, torch.Tensor))
    if odd:
        raise BundleError(f"entries that are not tensors: {odd[:5]}")
    return state


def _require(tensors: dict[str, torch.Tensor], name: str, ndim: int) -> torch.Tensor:
    if name not in tensors:
        raise BundleError(f"not in the released layout: it has no {name}")
    tensor = tensors[name]
    if tensor.ndim != ndim:
        raise BundleError(f"{name} is {tuple(tensor.shape)}, expected a {ndim}-d tensor")
    return tensor


def _indices(tensors: dict[str, torch.Tensor], prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for key in tensors if (m := pattern.match(key))})


def _layers(tensors: dict[str, torch.Tensor], prefix: str) -> int:
    found = _indices(tensors, prefix)
    if not found or found != list(range(len(found))):
        raise BundleError(f"{prefix}.<i> layers are {found or 'missing'}, expected 0..n-1")
    return len(found)


def _cross_attention_frequency(tensors: dict[str, torch.Tensor], bert: str, layers: int) -> int:
    cross = {i for i in range(layers) if f"{bert}.encoder.layer.{i}.crossattention.self.query.weight" in tensors}
    for frequency in range(1, layers + 1):
        if cross == {i for i in range(layers) if i % frequency == 0}:
            return frequency
    raise BundleError(f"{bert} has cross-attention in layers {sorted(cross)}, not every k-th layer")


def _bert_config(tensors: dict[str, torch.Tensor], bert: str, heads: int) -> dict[str, Any]:
    layers = _layers(tensors, f"{bert}.encoder.layer")
    width = _require(tensors, f"{bert}.embeddings.LayerNorm.weight", 1).shape[0]
    inner = _require(tensors, f"{bert}.encoder.layer.0.intermediate_query.dense.weight", 2).shape[0]
    words = tensors.get(f"{bert}.embeddings.word_embeddings.weight")
    positions = tensors.get(f"{bert}.embeddings.position_embeddings.weight")
    return dict(
        hidden_size=int(width), num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=int(inner),
        cross_attention_frequency=_cross_attention_frequency(tensors, bert, layers),
        vocab_size=int(words.shape[0]) if words is not None else 30522,  # bert-base-uncased's, as LAVIS
        max_position_embeddings=int(positions.shape[0]) if positions is not None else 512,
        layer_norm_eps=1e-12, hidden_act="gelu",
    )


def seed_settings(tensors: dict[str, torch.Tensor], heads: dict[str, int] | None = None) -> dict[str, Any]:
    """The SemanticTokenizer settings a SEED checkpoint fixes, read from its tensor shapes.

    `heads` overrides SEED's head counts ({"vision": n, "qformer": n, "decoder": n}), for a variant
    trained with other ones; the shapes cannot tell."""
    heads = dict(heads or {})
    unknown = sorted(set(heads) - {"vision", "qformer", "decoder"})
    if unknown:
        raise BundleError(f"unknown head override(s) {unknown}; give vision, qformer or decoder")
    cls = _require(tensors, "visual_encoder.cls_token", 3)
    patch = _require(tensors, "visual_encoder.patch_embed.proj.weight", 4)
    positions = _require(tensors, "visual_encoder.pos_embed", 3).shape[1]
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise BundleError(f"visual_encoder.pos_embed has {positions} positions, not 1 + a square grid")
    width = int(cls.shape[-1])
    vision_heads = heads.get("vision", max(1, width // EVA_HEAD_DIM))
    vision = dict(
        hidden_size=width,
        intermediate_size=int(_require(tensors, "visual_encoder.blocks.0.mlp.fc1.weight", 2).shape[0]),
        num_hidden_layers=_layers(tensors, "visual_encoder.blocks"),
        num_attention_heads=vision_heads, patch_size=int(patch.shape[-1]), qkv_bias=True, layer_norm_eps=1e-6,
        hidden_act="gelu",
    )
    queries = _require(tensors, "query_tokens", 3)
    codebook = _require(tensors, "quantize.embedding.weight", 2)
    settings: dict[str, Any] = dict(
        image_size=grid * int(patch.shape[-1]),
        vision_config=vision,
        vision_post_norm_eps=LN_VISION_EPS,
        qformer_config=_bert_config(tensors, "Qformer.bert", heads.get("qformer", BERT_HEADS)),
        num_queries=int(queries.shape[1]),
        causal_queries=int(queries.shape[1]) == 32,  # LAVIS's causal BERT masks exactly when it sees 32 queries
        codebook_size=int(codebook.shape[0]),
        codebook_dim=int(codebook.shape[1]),
        decoder_layers=_layers(tensors, "blocks"),
        decoder_heads=heads.get("decoder", SEED_BLOCK_HEADS),
    )
    proj = tensors.get("distill_image_proj.weight")
    if "image_down.0.weight" in tensors and proj is not None:
        settings.update(image_head="mlp", image_embed_dim=int(proj.shape[0]))
    elif "reverse_tokens" in tensors and proj is not None:
        settings.update(
            image_head="qformer", image_embed_dim=int(proj.shape[0]),
            image_qformer_config=_bert_config(
                tensors, "Reverse_Qformer.bert", heads.get("qformer", BERT_HEADS)
            ),
        )
    return settings


def _rename(key: str) -> str | None:
    for pattern, replacement in _RENAMES:
        match = re.fullmatch(pattern, key)
        if match is None:
            continue
        ours = match.expand(replacement)
        if ours.startswith(("qformer.", "image_embedding_head.qformer.")):
            head, _, rest = ours.partition("qformer.")
            renamed = _apply(_BERT_RENAMES, rest)
            return f"{head}qformer.{renamed}" if renamed else None
        if ".blocks." in ours and not ours.startswith("vision_model."):
            head, _, rest = ours.partition(".blocks.")
            renamed = _apply(_BLOCK_RENAMES, rest)
            return f"{head}.blocks.{renamed}" if renamed else None
        return ours
    return None


def _apply(rules: tuple[tuple[str, str], ...], name: str) -> str | None:
    for pattern, replacement in rules:
        match = re.fullmatch(pattern, name)
        if match is not None:
            return match.expand(replacement)
    return None


def seed_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(our name -> tensor, LAVIS names nothing takes). EVA's q_bias / v_bias become one qkv bias
    (q, zeros, v), as the EVA attention computes it."""
    ours: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    for key, tensor in tensors.items():
        bias = re.fullmatch(r"visual_encoder\.blocks\.(\d+)\.attn\.([qv])_bias", key)
        if bias is not None:
            if bias.group(2) == "q":
                v = tensors.get(f"visual_encoder.blocks.{bias.group(1)}.attn.v_bias")
                if v is None:
                    raise BundleError(f"{key} has no matching v_bias")
                qkv = torch.cat([tensor.float(), torch.zeros_like(v, dtype=torch.float32), v.float()])
                ours[f"vision_model.encoder.layers.{bias.group(1)}.self_attn.qkv.bias"] = qkv
            continue
        name = _rename(key) if not _TEXT_EMBEDDINGS.fullmatch(key) else _text_embedding_name(key)
        if name is None and key.startswith(_COMPUTING):
            # e.g. EVA's layer scale (gamma_1) or relative position bias: skipping it would change the ids
            raise BundleError(f"{key}: a tensor of the tokenizer's forward pass that dualtok cannot map")
        if name is None:
            unused.append(key)
        else:
            ours[name] = tensor
    return ours, sorted(unused)


def _text_embedding_name(key: str) -> str:
    return "text_embeddings." + key.removeprefix("Qformer.bert.embeddings.")
