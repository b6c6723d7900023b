"""Named, versioned presets: `tiny` (tests), `small` (CPU demo and benchmarks), `paper`.

The constructor kwargs of each branch live beside the branch (`guide.PRESETS`, ...); this module
names the combinations, checks that the branches agree with each other (the Reverse Q-Former's
output width is the UNet's cross-attention width), and builds them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dualtok_core.errors import BundleError

if TYPE_CHECKING:
    import torch

# The branch modules (torch, diffusers, transformers) load on first use: the names, parts and
# version here are what job configs and plans read, and those stay light.

PRESET_VERSION = 1
PARTS = ("guide", "semantic", "diffusion")


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    guide: dict[str, Any]
    semantic: dict[str, Any]
    diffusion: dict[str, Any]

    def kwargs(self, part: str) -> dict[str, Any]:
        return copy.deepcopy(getattr(self, part))


_DESCRIPTIONS = {
    "tiny": "test-sized widths; a tokenize + detokenize takes seconds on a CPU",
    "small": "the paper's structure at reduced widths; a 2-core CPU tokenizes several images/s",
    "paper": "the paper's shapes: MoVQ-width guide branch, EVA ViT-g + BERT-base Q-Former, SD 1.x",
}


def get_preset(name: str) -> Preset:
    from dualtok_core import diffusion, guide, semantic

    if name not in _DESCRIPTIONS:
        raise BundleError(f"unknown preset {name!r}; presets are: {', '.join(_DESCRIPTIONS)}")
    return Preset(
        name=name,
        description=_DESCRIPTIONS[name],
        guide=copy.deepcopy(guide.PRESETS[name]),
        semantic=copy.deepcopy(semantic.PRESETS[name]),
        diffusion=copy.deepcopy(diffusion.PRESETS[name]),
    )


def preset_names() -> tuple[str, ...]:
    return tuple(_DESCRIPTIONS)


def build_parts(preset: Preset, seed: int = 0, parts: tuple[str, ...] = PARTS) -> dict[str, torch.nn.Module]:
    """Random-initialised branches of a preset; the same seed gives the same weights."""
    import torch

    unknown = set(parts) - set(PARTS)
    if unknown:
        raise BundleError(f"unknown bundle part(s) {sorted(unknown)}; parts are {PARTS}")
    built: dict[str, torch.nn.Module] = {}
    threads = torch.get_num_threads()
    # torch's CPU random init draws differently with different thread counts; one thread makes
    # a preset's weights the same on every machine and in every Ray actor.
    torch.set_num_threads(1)
    try:
        _build_into(built, preset, seed, parts)
    finally:
        torch.set_num_threads(threads)
    check_compatible(built)
    return {name: module.eval() for name, module in built.items()}


def _build_into(built: dict[str, torch.nn.Module], preset: Preset, seed: int, parts: tuple[str, ...]) -> None:
    import torch

    from dualtok_core import diffusion, guide, semantic

    for offset, part in enumerate(PARTS):
        if part not in parts:
            continue
        torch.manual_seed(seed * 1000 + offset)
        if part == "guide":
            built[part] = guide.GuideVQModel(**preset.kwargs("guide"))
        elif part == "semantic":
            built[part] = semantic.SemanticTokenizer(**preset.kwargs("semantic"))
        else:
            built[part] = diffusion.DiffusionReconstructor.build_random(preset.kwargs("diffusion"), seed=seed)


def check_compatible(parts: dict[str, torch.nn.Module]) -> None:
    """The semantic branch's condition must fit the UNet: generation embeddings its cross-attention,
    or (an unCLIP UNet) image embeddings its class-label projection."""
    if "semantic" in parts and "diffusion" in parts and getattr(parts["diffusion"], "kind", "text") == "unclip":
        config, wanted = parts["semantic"].config, parts["diffusion"].embed_dim
        if config.image_head is None or config.image_embed_dim != wanted:
            have = "no image-embedding head" if config.image_head is None else f"{config.image_embed_dim}-d"
            raise BundleError(
                f"the unCLIP UNet is conditioned on {wanted}-d image embeddings, but the semantic branch makes "
                f"{have} (a SEED tokenizer's unCLIP head makes them)"
            )
    elif "semantic" in parts and "diffusion" in parts:
        gen_dim = parts["semantic"].config.gen_dim
        cross = parts["diffusion"].cross_attention_dim
        if gen_dim != cross:
            raise BundleError(
                f"semantic generation embeddings are {gen_dim} wide but the UNet cross-attends to {cross}"
            )


def parameter_counts(name: str) -> dict[str, int]:
    """Parameter count per branch, built on the meta device (no memory, no weights)."""
    import torch

    with torch.device("meta"):
        built = build_parts(get_preset(name))
    return {part: sum(p.numel() for p in module.parameters()) for part, module in built.items()}
