"""Assemble a `DualTokenizer` from released checkpoints, part by part.

- guide: a Kandinsky 2.2 MoVQ folder (diffusers `VQModel`, spatial norm) -> `GuideVQModel.from_movq`;
  every tensor whose shape fits is copied, the deeper encoder's extra blocks stay random.
- semantic: a BLIP-2 folder (transformers format) -> `SemanticTokenizer.from_blip2`; the ViT and
  Q-Former are copied, SEED's codebook, embedding decoder and Reverse Q-Former stay random.
- semantic, instead: a SEED tokenizer release (`seed_quantizer.pt`, LAVIS layout) ->
  `SemanticTokenizer.from_seed`; ViT, causal Q-Former, codebook, embedding decoder and the unCLIP
  image head are copied, so its ids are SEED's; the 77-token Reverse Q-Former stays random.
- diffusion: a Stable Diffusion 1.x folder (diffusers format), loaded whole.

A part without a checkpoint is random-initialised from the preset exactly as `from_preset` builds
it. A checkpoint fixes its part's widths and depths; the preset gives everything the checkpoint
does not define (guide size, SEED codebook and decoder shapes, generation width). Each part's
`bundle.json` source says where its tensors came from and which stayed random: a part with any
random tensor is marked `random-init`, since its tokens mean nothing until it is trained.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from dualtok_core.bundle import BundleInfo, DualTokenizer
from dualtok_core.checkpoints import LoadReport, random_prefixes, tensor_names
from dualtok_core.diffusion import DiffusionReconstructor
from dualtok_core.errors import BundleError
from dualtok_core.guide import GuideVQModel
from dualtok_core.presets import PARTS, Preset, build_parts, check_compatible, get_preset
from dualtok_core.qformer import blip2_config
from dualtok_core.semantic import SemanticTokenizer
from dualtok_core.unclip import is_unclip_folder, load_reconstructor

logger = logging.getLogger(__name__)

# What each part is loaded from, as reports and bundle.json name it.
# GuideVQModel settings a MoVQ checkpoint fixes (`from_movq` reads them from its config.json).
MOVQ_KEYS = frozenset({
    "encoder_block_out_channels", "decoder_block_out_channels", "layers_per_block", "latent_channels",
    "num_vq_embeddings", "vq_embed_dim", "norm_num_groups",
})
# SemanticTokenizer settings a BLIP-2 checkpoint fixes (`from_blip2` refuses overrides of them).
BLIP2_KEYS = frozenset({"image_size", "vision_config", "qformer_config", "num_queries", "image_text_dim"})
# ... and those a SEED checkpoint fixes (`from_seed`).
SEED_KEYS = frozenset({
    "image_size", "vision_config", "vision_post_norm_eps", "qformer_config", "num_queries", "causal_queries",
    "codebook_size", "codebook_dim", "decoder_layers", "decoder_heads", "image_head", "image_embed_dim",
    "image_qformer_config",
})
# The semantic tensors an image's ids depend on (the Q-Former's text FFNs excepted, see `_tokenizing`).
TOKENIZING = ("vision_model.", "query_tokens", "qformer.", "quantizer.project_in.", "quantizer.codebook.")
CONTRASTIVE = ("vision_proj.weight", "text_proj.weight")
# BLIP-2's and SEED's processors resize the whole image to 224 x 224 (bicubic), cropping nothing: a
# semantic branch loaded from their weights sees images that way unless told otherwise.
REFERENCE_FIT = "resize"
# The weight files of the three SD parts dualtok keeps (safetensors only: pickles are never read).
_SD_WEIGHTS = {"vae": "diffusion_pytorch_model", "unet": "diffusion_pytorch_model", "text_encoder": "model"}


def _report(part: str, origin: str | None, names: list[str], loaded: list[str], **extra: Any) -> LoadReport:
    return LoadReport(source=origin, names=list(names), loaded=sorted(loaded), part=part, **extra)


@contextlib.contextmanager
def _seeded(seed: int, part: str) -> Iterator[None]:
    """The random init of a part's leftover tensors: reproducible, on any thread count, and without
    reseeding the caller's generator (same seed scheme as `presets.build_parts`)."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + PARTS.index(part))
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


# ---- per-part loaders ---------------------------------------------------------------------------


def load_guide(
    path: str | Path, preset: Preset, overrides: dict[str, Any], origin: str, seed: int
) -> tuple[GuideVQModel, LoadReport]:
    """MoVQ's widths, depth and codebook; the preset's sizes; then `overrides`. Misfits stay random."""
    settings = {key: value for key, value in preset.kwargs("guide").items() if key not in MOVQ_KEYS}
    with _seeded(seed, "guide"):
        model, movq = GuideVQModel.from_movq(path, **{**settings, **overrides})
    report = _report(
        "guide", origin, list(model.state_dict()), movq.loaded,
        mismatched=dict(movq.mismatched), unused=list(movq.unused),
    )
    return model.eval(), report


def load_semantic(
    path: str | Path, preset: Preset, origin: str, seed: int, fit: str = REFERENCE_FIT
) -> tuple[SemanticTokenizer, LoadReport]:
    """BLIP-2's ViT and Q-Former shapes; SEED's codebook, decoder and Reverse Q-Former from the preset."""
    settings = {key: value for key, value in preset.kwargs("semantic").items() if key not in BLIP2_KEYS}
    settings["input_fit"] = fit
    with _seeded(seed, "semantic"):
        model, blip = SemanticTokenizer.from_blip2(path, **settings)
    report = _report("semantic", origin, list(model.state_dict()), blip.loaded, unused=list(blip.unused))
    report.notes = semantic_notes(report)
    return model.eval(), report


def load_seed(
    path: str | Path, preset: Preset, origin: str, seed: int, fit: str = REFERENCE_FIT
) -> tuple[SemanticTokenizer, LoadReport]:
    """A SEED release's ViT, causal Q-Former, codebook, decoders and unCLIP head; the preset gives what
    the release lacks (the 77-token Reverse Q-Former's shapes, the contrastive width)."""
    settings = {key: value for key, value in preset.kwargs("semantic").items() if key not in SEED_KEYS}
    settings["input_fit"] = fit
    with _seeded(seed, "semantic"):
        model, loaded = SemanticTokenizer.from_seed(path, **settings)
    report = _report("semantic", origin, list(model.state_dict()), loaded.loaded, unused=list(loaded.unused),
                     kind="SEED")
    report.notes = semantic_notes(report)
    return model.eval(), report


def _tokenizing(name: str) -> bool:
    text_ffn = name.startswith("qformer.") and (".intermediate." in name or ".output." in name)
    return name.startswith(TOKENIZING) and not text_ffn


def semantic_notes(report: LoadReport) -> list[str]:
    """What a semantic load means for its ids and for the `qformer` stage, in words."""
    random = set(report.left_random)
    tokenizing = [name for name in report.names if _tokenizing(name)]
    untrained = sorted(set(tokenizing) & random)
    notes = []
    if untrained:
        notes.append("its semantic ids mean nothing until trained: random "
                     + ", ".join(random_prefixes(tokenizing, set(untrained))))
    else:
        notes.append("every tensor that makes its semantic ids came from the checkpoint")
    if any(name in random for name in CONTRASTIVE):
        notes.append(
            "WARNING: the contrastive projections (vision_proj, text_proj) stay random: a stage-2 BLIP-2 such as "
            "blip2-opt-2.7b lacks them; start the qformer stage from the stage-1 retrieval checkpoint "
            "(Salesforce/blip2-itm-vit-g), as SEED does"
        )
    return notes


def load_diffusion(path: str | Path, origin: str) -> tuple[DiffusionReconstructor, LoadReport]:
    """The whole SD 1.x (or stable unCLIP) folder; the report compares our tensors with the names in its
    safetensors."""
    root = Path(path)
    weights = {**_SD_WEIGHTS, **({"image_normalizer": "diffusion_pytorch_model"} if is_unclip_folder(root) else {})}
    in_files = {part: tensor_names(root / part, stem, "released weights") for part, stem in weights.items()}
    # fp32 whatever the release stores: a bundle's parts share one dtype (`DualTokenizer.to` casts later).
    model = load_reconstructor(root, dtype=torch.float32)
    names = [name for name in model.state_dict() if name.split(".")[0] in weights]
    loaded = [name for name in names if name.partition(".")[2] in in_files[name.split(".")[0]]]
    ours = set(names)
    unused = sorted(f"{part}.{key}" for part, keys in in_files.items() for key in keys if f"{part}.{key}" not in ours)
    kind = "Stable unCLIP" if model.kind == "unclip" else ""
    return model, _report("diffusion", origin, names, loaded, unused=unused, kind=kind)


# ---- cross-branch checks, before any weights are read -------------------------------------------


def check_checkpoint_widths(preset: Preset, blip2: str | Path | None, stable_diffusion: str | Path | None) -> None:
    """Refuse, by their configs alone, checkpoints whose widths the preset's other settings cannot take."""
    semantic = preset.kwargs("semantic")
    if blip2 is not None:
        width = int(blip2_config(Path(blip2)).qformer_config.hidden_size)
        heads = int(semantic["decoder_heads"])
        if width % heads:
            raise BundleError(
                f"BLIP-2 checkpoint {blip2}: its Q-Former is {width} wide, which preset {preset.name}'s embedding "
                f"decoder cannot split into {heads} heads (decoder_heads); use a preset whose decoder_heads "
                f"divides {width}"
            )
    if stable_diffusion is not None and is_unclip_folder(stable_diffusion):
        return  # an unCLIP UNet is conditioned on image embeddings: `check_compatible` checks the assembled parts
    if stable_diffusion is not None:
        config_file = Path(stable_diffusion) / "unet" / "config.json"
        if not config_file.is_file():
            raise BundleError(
                f"{stable_diffusion} is not a Stable Diffusion folder in diffusers format: no unet/config.json"
            )
        cross = int(json.loads(config_file.read_text())["cross_attention_dim"])
        if cross != int(semantic["gen_dim"]):
            raise BundleError(
                f"Stable Diffusion checkpoint {stable_diffusion}: its UNet cross-attends to {cross}-wide text "
                f"features, but preset {preset.name}'s semantic branch makes {semantic['gen_dim']}-wide generation "
                "embeddings (gen_dim); SD 1.x is 768 wide (the paper preset), SD 2.x's 1024 does not fit"
            )


def _check_guide_overrides(overrides: dict[str, Any] | None) -> dict[str, Any]:
    overrides = dict(overrides or {})
    accepted = set(inspect.signature(GuideVQModel.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise BundleError(f"unknown guide setting(s) {unknown}; GuideVQModel takes {sorted(accepted)}")
    return overrides


# ---- the bundle -----------------------------------------------------------------------------------


def assemble_bundle(
    preset: str,
    *,
    blip2: str | Path | None,
    movq: str | Path | None,
    stable_diffusion: str | Path | None,
    seed_tokenizer: str | Path | None = None,
    semantic_fit: str = REFERENCE_FIT,
    seed: int = 0,
    guide_overrides: dict[str, Any] | None = None,
    origins: dict[str, str] | None = None,
) -> tuple[DualTokenizer, dict[str, LoadReport]]:
    """Each part from its released checkpoint folder when given, else random-init from `preset`.

    `guide_overrides` are GuideVQModel settings applied last (e.g. `guide_size=32`); tensors they
    reshape stay random and are reported. `origins` names each part's checkpoint in the reports and
    `bundle.json` when the folders are local copies (part -> URI); the default is the folder path.
    """
    spec = get_preset(preset)
    if blip2 is not None and seed_tokenizer is not None:
        raise BundleError("give one semantic checkpoint: a BLIP-2 folder or a SEED tokenizer, not both")
    overrides = _check_guide_overrides(guide_overrides)
    check_checkpoint_widths(spec, blip2, stable_diffusion)
    folders = {"guide": movq, "semantic": blip2 if seed_tokenizer is None else seed_tokenizer,
               "diffusion": stable_diffusion}
    names = {part: str((origins or {}).get(part, folder)) for part, folder in folders.items()}

    random_parts = tuple(part for part in PARTS if folders[part] is None)
    parts: dict[str, torch.nn.Module] = {}
    if random_parts:
        # The preset as `from_preset` builds it (same seeds, same weights), with the guide overrides.
        parts.update(build_parts(replace(spec, guide={**spec.guide, **overrides}), seed=seed, parts=random_parts))
    reports = {part: _report(part, None, list(parts[part].state_dict()), []) for part in random_parts}
    if movq is not None:
        parts["guide"], reports["guide"] = load_guide(movq, spec, overrides, names["guide"], seed)
    if blip2 is not None:
        parts["semantic"], reports["semantic"] = load_semantic(blip2, spec, names["semantic"], seed, semantic_fit)
    if seed_tokenizer is not None:
        parts["semantic"], reports["semantic"] = load_seed(seed_tokenizer, spec, names["semantic"], seed, semantic_fit)
    if stable_diffusion is not None:
        parts["diffusion"], reports["diffusion"] = load_diffusion(stable_diffusion, names["diffusion"])
    check_compatible(parts)
    parts = {part: parts[part] for part in PARTS}  # the bundle's part order, whatever loaded first
    sources = {part: reports[part].provenance(preset, seed) for part in PARTS}
    for part in PARTS:
        logger.info("%s: %s", part, reports[part].summary())
    return DualTokenizer(parts, BundleInfo(preset=preset, sources=sources)), {p: reports[p] for p in PARTS}
