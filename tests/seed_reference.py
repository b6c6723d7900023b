"""SEED's tokenizer as its authors run it, for tests: the reference that dualtok's ids must equal.

Written from AILab-CVC/SEED's code (models/seed_qformer/: `eva_vit.py`, `qformer_causual.py`,
`qformer_quantizer.py`, `vit.py`; SEED_Tokenizer/lavis/models/blip2_models/
`blip2_qformer_codebook_all_image.py` for SEED-1), module names and all, so that `state_dict()`
has the released key layout. Only the inference path is kept: no dropout, no text path, no losses.

- EVA ViT: q_bias / v_bias with a zero key bias, scale applied to q, no final norm; `ln_vision`
  is a plain nn.LayerNorm (eps 1e-5).
- The causal BERT Q-Former: BERT post-norm layers, cross-attention every `cross_attention_freq`
  layers, the query FFN (`intermediate_query` / `output_query`); its self-attention mask is causal
  exactly when it sees 32 queries (`is_casual = query_embeds.shape[1] == 32`), as (1 - tril) * -10000.
- VectorQuantizer2: the nearest code in squared Euclidean distance, z^2 + e^2 - 2 z.e.
- timm blocks (`blocks`, `blocks_image`): pre-norm, qkv with bias, 12 heads.
- `get_codebook_entry`: codes -> pos_embed_image + blocks_image -> image_down MLP (SEED-LLaMA) or a
  one-query Reverse Q-Former (SEED-1) -> distill_image_proj.

`save_seed_checkpoint` writes the state dict with torch.save, the ViT's conv / linear tensors in
fp16 as LAVIS's `convert_weights_to_fp16` leaves them (vit_precision="fp16"), everything else fp32.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class EvaAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (C // self.heads) ** -0.5, qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, -1))


class TimmAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] @ qkv[1].transpose(-2, -1)) * (C // self.heads) ** -0.5
        return self.proj((attn.softmax(dim=-1) @ qkv[2]).transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """EVA's block (EvaAttention) or timm's (TimmAttention): pre-norm, eps 1e-6."""

    def __init__(self, dim: int, heads: int, hidden: int, eva: bool) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = EvaAttention(dim, heads) if eva else TimmAttention(dim, heads)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class EvaViT(nn.Module):
    def __init__(self, image_size: int, patch: int, dim: int, depth: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2 + 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, hidden, eva=True) for _ in range(depth))

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x


class BertSelfAttention(nn.Module):
    def __init__(self, dim: int, source: int) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(source, dim), nn.Linear(source, dim)


class BertOutput(nn.Module):
    def __init__(self, inner: int, dim: int) -> None:
        super().__init__()
        self.dense, self.LayerNorm = nn.Linear(inner, dim), nn.LayerNorm(dim, eps=1e-12)


class BertAttention(nn.Module):
    def __init__(self, dim: int, source: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.add_module("self", BertSelfAttention(dim, source))
        self.output = BertOutput(dim, dim)

    def forward(self, h, mask, encoder=None):
        attention = self._modules["self"]
        source = h if encoder is None else encoder
        B, N, C = h.shape

        def split(t):
            return t.view(B, t.shape[1], self.heads, -1).permute(0, 2, 1, 3)

        q, k, v = split(attention.query(h)), split(attention.key(source)), split(attention.value(source))
        scores = q @ k.transpose(-1, -2) / (C // self.heads) ** 0.5
        if mask is not None:
            scores = scores + mask
        context = (scores.softmax(dim=-1) @ v).permute(0, 2, 1, 3).reshape(B, N, C)
        return self.output.LayerNorm(self.output.dense(context) + h)


class BertLayer(nn.Module):
    def __init__(self, dim: int, source: int, heads: int, inner: int, cross: bool) -> None:
        super().__init__()
        self.attention = BertAttention(dim, dim, heads)
        if cross:
            self.crossattention = BertAttention(dim, source, heads)
        self.intermediate_query = nn.Module()
        self.intermediate_query.dense = nn.Linear(dim, inner)
        self.output_query = BertOutput(inner, dim)

    def forward(self, h, mask, encoder):
        h = self.attention(h, mask)
        if hasattr(self, "crossattention"):
            h = self.crossattention(h, None, encoder)  # the ViT tokens all count (image_atts are ones)
        inner = F.gelu(self.intermediate_query.dense(h))
        return self.output_query.LayerNorm(self.output_query.dense(inner) + h)


class Bert(nn.Module):
    def __init__(self, dim: int, source: int, layers: int, heads: int, inner: int, cross_freq: int) -> None:
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.LayerNorm = nn.LayerNorm(dim, eps=1e-12)
        self.embeddings.register_buffer("position_ids", torch.arange(512).expand((1, -1)))
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            BertLayer(dim, source, heads, inner, cross=i % cross_freq == 0) for i in range(layers)
        )

    def forward(self, queries, encoder):
        h = self.embeddings.LayerNorm(queries)
        mask = None
        if queries.shape[1] == 32:  # LAVIS's causal BERT: causal exactly for 32 queries
            mask = (1.0 - torch.ones(32, 32).tril()) * -10000.0
        for layer in self.encoder.layer:
            h = layer(h, mask, encoder)
        return h


class QformerHolder(nn.Module):
    def __init__(self, bert: Bert) -> None:
        super().__init__()
        self.bert = bert


class SeedReference(nn.Module):
    """`head`: "mlp" (SEED-LLaMA's seed_quantizer.pt) or "qformer" (SEED-1)."""

    def __init__(self, head: str = "mlp", vision: int = 176, vision_layers: int = 2, width: int = 48,
                 qformer_layers: int = 2, codes: int = 64, code_dim: int = 8, blocks: int = 2,
                 image_dim: int = 24) -> None:
        super().__init__()
        self.head = head
        self.visual_encoder = EvaViT(224, 16, vision, vision_layers, vision // 88, 96)
        self.ln_vision = nn.LayerNorm(vision)  # eps 1e-5
        self.Qformer = QformerHolder(Bert(width, vision, qformer_layers, 12, 96, cross_freq=2))
        self.query_tokens = nn.Parameter(torch.zeros(1, 32, width))
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(codes, code_dim)
        self.encode_task_layer = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, code_dim))
        self.decode_task_layer = nn.Sequential(nn.Linear(code_dim, code_dim), nn.Tanh(), nn.Linear(code_dim, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 32, width))
        self.blocks = nn.ModuleList(Block(width, 12, 4 * width, eva=False) for _ in range(blocks))
        self.pos_embed_image = nn.Parameter(torch.zeros(1, 32, width))
        self.blocks_image = nn.ModuleList(Block(width, 12, 4 * width, eva=False) for _ in range(blocks))
        if head == "mlp":
            self.image_down = nn.Sequential(
                nn.Linear(width, 256, bias=False), nn.ReLU(), nn.Linear(256, 128, bias=False), nn.ReLU(),
                nn.Linear(128, 32, bias=False),
            )
            self.distill_image_proj = nn.Linear(32 * 32, image_dim)
        else:
            self.Reverse_Qformer = QformerHolder(Bert(width, width, 2, 12, 96, cross_freq=2))
            self.reverse_tokens = nn.Parameter(torch.zeros(1, 1, width))
            self.distill_image_proj = nn.Linear(width, image_dim)

    def randomize(self, seed: int) -> SeedReference:
        """Every tensor random and distinct (norms near 1), so a swapped or skipped tensor shows."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in self.named_parameters():
                noise = torch.randn(param.shape, generator=generator)
                if "norm" in name.lower() and name.endswith("weight"):
                    param.copy_(1 + 0.1 * noise)
                elif name == "quantize.embedding.weight":
                    param.copy_(0.5 * noise)  # a trained codebook's spread: no near-ties
                else:
                    fan_in = param.shape[-1] if param.ndim > 1 else 16
                    param.copy_(noise / fan_in**0.5)
        return self

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images (B, 3, 224, 224) -> SEED's processor's normalisation."""
        mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return (images - mean) / std

    @torch.no_grad()
    def get_codebook_indices(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (ids (B, 32), the causal embeddings (B, 32, D))."""
        embeds = self.ln_vision(self.visual_encoder(self.pixels(images)))
        causal = self.Qformer.bert(self.query_tokens.expand(embeds.shape[0], -1, -1), embeds)
        z = self.encode_task_layer(causal).reshape(-1, self.quantize.embedding.weight.shape[1])
        codes = self.quantize.embedding.weight
        distance = z.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * z @ codes.t()
        return distance.argmin(dim=1).reshape(embeds.shape[0], -1), causal

    @torch.no_grad()
    def reconstruct(self, ids: torch.Tensor) -> torch.Tensor:
        """recon_s: the decoded causal embeddings (B, 32, D) the codebook stage trains against."""
        x = self.decode_task_layer(self.quantize.embedding(ids)) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x

    @torch.no_grad()
    def get_codebook_entry(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, 32) -> the unCLIP image embedding (B, image_dim)."""
        x = self.decode_task_layer(self.quantize.embedding(ids)) + self.pos_embed_image
        for block in self.blocks_image:
            x = block(x)
        if self.head == "mlp":
            return self.distill_image_proj(self.image_down(x).reshape(x.shape[0], -1))
        out = self.Reverse_Qformer.bert(self.reverse_tokens.expand(x.shape[0], -1, -1), x)
        return self.distill_image_proj(out).squeeze(1)


def released_dtypes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ViT's conv / linear weights and biases in fp16 (LAVIS's convert_weights_to_fp16)."""
    def half(name: str) -> bool:
        return name.startswith("visual_encoder.") and any(
            part in name for part in ("patch_embed.proj.", "attn.qkv.", "attn.proj.", "mlp.fc1.", "mlp.fc2.")
        )
    return {name: tensor.half() if half(name) else tensor for name, tensor in state.items()}


def save_seed_checkpoint(path: Path, head: str = "mlp", seed: int = 3) -> SeedReference:
    """A tiny SEED checkpoint in the released layout; returns the reference holding exactly its values."""
    model = SeedReference(head).randomize(seed)
    state = released_dtypes(model.state_dict())
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    model.load_state_dict({name: tensor.float() if tensor.is_floating_point() else tensor
                           for name, tensor in state.items()})  # the reference runs on the saved values
    return model.eval()
