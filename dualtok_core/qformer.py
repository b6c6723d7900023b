"""Q-Former building blocks of the semantic branch (Branch II), on transformers' BLIP-2 modules.

- Config builders turn the plain dicts kept in `SemanticTokenizer`'s config into
  `Blip2VisionConfig` / `Blip2QFormerConfig`.
- `causal_query_mask` and `run_queries` make transformers' bidirectional `Blip2QFormerModel`
  the *Causal* Q-Former of SEED: query i attends to queries 0..i in self-attention, and to every
  ViT token in cross-attention.
- `run_text` runs text through the same Q-Former's self-attention layers (no cross-attention), as
  `Blip2ForImageTextRetrieval` does for its contrastive text features.
- `read_blip2_checkpoint` reads the ViT / Q-Former tensors of a BLIP-2 checkpoint in transformers
  format, without reading the language model's tensors.

How transformers 5.x applies the self-attention mask (checked in `modeling_blip_2.py` and
`masking_utils.py`): `Blip2QFormerModel.forward` passes `attention_mask` through
`create_bidirectional_mask`, which returns a 4-D tensor unchanged. The eager kernel *adds* it to
the attention scores and SDPA takes a float mask as an additive bias too, so the mask must be
additive (0 where allowed, a large negative number where not), never boolean: a boolean mask
would be added as 0/1 by the eager kernel. Cross-attention layers replace the mask with
`encoder_attention_mask`; leaving that None keeps cross-attention unmasked.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Blip2Config, Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

from dualtok_core.checkpoints import LoadReport, read_tensors
from dualtok_core.errors import BundleError, DualtokError, TokenInputError

logger = logging.getLogger(__name__)

# BLIP-2's (= OpenAI CLIP's) normalisation of [0, 1] RGB input.
BLIP2_MEAN = (0.48145466, 0.4578275, 0.40821073)
BLIP2_STD = (0.26862954, 0.26130258, 0.27577711)

# The config keys the semantic branch keeps; anything else in a BLIP-2 config is not ours to copy.
VISION_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size",
    "hidden_act", "layer_norm_eps", "qkv_bias", "attention_dropout", "initializer_range",
)
QFORMER_KEYS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings", "layer_norm_eps",
    "cross_attention_frequency", "vocab_size", "pad_token_id", "initializer_range",
)
# Blip2VisionConfig's own initializer_range is 1e-10, which makes a random ViT ignore its input.
_RANDOM_INIT_STD = 0.02


def _check_keys(values: dict[str, Any], allowed: tuple[str, ...], name: str) -> None:
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise DualtokError(f"{name} has unknown key(s) {unknown}; allowed keys are {list(allowed)}")


def vision_config_from(values: dict[str, Any], image_size: int, attn_implementation: str) -> Blip2VisionConfig:
    """The ViT's config; image_size comes from the tokenizer's own `image_size`."""
    _check_keys(values, VISION_KEYS, "vision_config")
    kwargs = {"initializer_range": _RANDOM_INIT_STD, **values}
    return Blip2VisionConfig(image_size=image_size, attn_implementation=attn_implementation, **kwargs)


def qformer_config_from(
    values: dict[str, Any], encoder_hidden_size: int, text_input: bool, attn_implementation: str
) -> Blip2QFormerConfig:
    """A Q-Former's config; its cross-attention width is the width of what it attends to."""
    _check_keys(values, QFORMER_KEYS, "qformer_config")
    return Blip2QFormerConfig(
        encoder_hidden_size=encoder_hidden_size,
        use_qformer_text_input=text_input,
        attn_implementation=attn_implementation,
        **values,
    )


def causal_query_mask(num_queries: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive (1, 1, Q, Q) mask: 0 on and below the diagonal, the dtype's minimum above it."""
    allowed = torch.ones(num_queries, num_queries, dtype=torch.bool, device=device).tril()
    mask = torch.zeros(num_queries, num_queries, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]  # (1, 1, Q, Q)


def run_queries(
    qformer: Blip2QFormerModel, queries: torch.Tensor, encoder_states: torch.Tensor, causal: bool
) -> torch.Tensor:
    """Learned queries (B, Q, D) cross-attending to encoder_states (B, T, E) -> (B, Q, D)."""
    mask = None
    if causal:
        # The Q-Former runs in its LayerNorm's dtype (transformers keeps it fp32 in mixed precision).
        mask = causal_query_mask(queries.shape[1], qformer.layernorm.weight.dtype, queries.device)
    out = qformer(
        query_embeds=queries,
        query_length=queries.shape[1],
        attention_mask=mask,
        encoder_hidden_states=encoder_states,
        encoder_attention_mask=None,  # cross-attention sees every ViT token
    )
    return out.last_hidden_state  # (B, Q, D)


def check_text_ids(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, config: Blip2QFormerConfig
) -> torch.Tensor:
    """Validate Q-Former text ids (B, L) and return the (B, L) attention mask (all ones if None)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.ndim != 2:
        raise TokenInputError(f"text input_ids must be an integer tensor (B, L), got {_describe(input_ids)}")
    if input_ids.shape[1] > config.max_position_embeddings:
        raise TokenInputError(
            f"text is {input_ids.shape[1]} tokens long; the Q-Former has {config.max_position_embeddings} positions"
        )
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= config.vocab_size):
        raise TokenInputError(
            f"text input_ids must lie in [0, {config.vocab_size}) (the Q-Former's vocab_size); got values in "
            f"[{int(input_ids.min())}, {int(input_ids.max())}]: does the text tokenizer match the model?"
        )
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise TokenInputError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}"
        )
    return attention_mask


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def run_text(
    qformer: Blip2QFormerModel,
    embeddings: Blip2TextEmbeddings,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """Text through the Q-Former's self-attention and text FFN (query_length=0) -> [CLS] state (B, D)."""
    embedded = embeddings(input_ids=input_ids)  # (B, L, D)
    out = qformer(query_embeds=embedded, query_length=0, attention_mask=attention_mask)
    return out.last_hidden_state[:, 0]  # (B, D)


# ---- BLIP-2 checkpoints in transformers format ------------------------------------------------

# checkpoint key prefix -> SemanticTokenizer parameter prefix. `embeddings.` and the projections
# exist in Blip2ForImageTextRetrieval checkpoints (BLIP-2 stage 1, what SEED starts from).
BLIP2_PREFIXES = {
    "vision_model.": "vision_model.",
    "qformer.": "qformer.",
    "query_tokens": "query_tokens",
    "embeddings.": "text_embeddings.",
    "vision_projection.": "vision_proj.",
    "text_projection.": "text_proj.",
}


def blip2_config(path: Path) -> Blip2Config:
    if not (path / "config.json").is_file():
        raise BundleError(f"{path} is not a BLIP-2 checkpoint folder: it has no config.json")
    config = Blip2Config.from_pretrained(str(path))
    if config.model_type != "blip-2":
        raise BundleError(f"{path}/config.json is a {config.model_type!r} config, not a BLIP-2 one")
    return config


def read_blip2_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our-name -> tensor for the ViT / Q-Former parts of a BLIP-2 checkpoint, and the unused prefixes."""
    tensors, dropped = read_tensors(path, "model", _our_name, what="BLIP-2 weights")
    return tensors, sorted({key.split(".")[0] for key in dropped})


def _our_name(key: str) -> str | None:
    for prefix, ours in BLIP2_PREFIXES.items():
        if key == prefix or (prefix.endswith(".") and key.startswith(prefix)):
            return ours + key[len(prefix) :]
    return None


def copy_checkpoint(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> LoadReport:
    """Copy checkpoint tensors into same-named parameters/buffers; every shape must agree."""
    own = dict(model.named_parameters())
    own.update(model.named_buffers())
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise BundleError(f"{source}: checkpoint tensors with no counterpart in the model: {unknown[:8]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if tuple(own[name].shape) != tuple(tensor.shape):
                raise BundleError(
                    f"{source}: {name} is {tuple(tensor.shape)} in the checkpoint, "
                    f"{tuple(own[name].shape)} in the model"
                )
            own[name].copy_(tensor.to(own[name].dtype))
    params = [name for name, _ in model.named_parameters()]
    report = LoadReport(source=source, names=params, loaded=[n for n in params if n in tensors], part="semantic")
    logger.info("from %s: copied %s; random %s", source, report.loaded_parts, report.random_parts)
    return report
