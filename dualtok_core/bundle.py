"""`DualTokenizer`: one facade over the three branches, and the bundle that holds them.

A bundle is a directory (local, or any fsspec URI such as s3://) with one folder per part and a
`bundle.json` that names the preset, where each part's weights came from, and the fingerprint
(hash of every part's config and weights). Pipelines load only the parts a stage needs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dualtok_core import diffusion, guide, semantic
from dualtok_core.checkpoints import RANDOM_INIT
from dualtok_core.errors import BundleError, require_safetensors
from dualtok_core.imaging import check_token_ids, check_uint8_images, to_model_input, to_uint8
from dualtok_core.presets import PARTS, build_parts, check_compatible, get_preset

logger = logging.getLogger(__name__)

BUNDLE_SCHEMA_VERSION = 1
# Safetensors only: a pickle part is refused before loading (`require_safetensors`), and the
# loaders themselves are told never to fall back to one.
_LOADERS = {
    "guide": functools.partial(guide.GuideVQModel.from_pretrained, use_safetensors=True),
    "semantic": functools.partial(semantic.SemanticTokenizer.from_pretrained, use_safetensors=True),
    "diffusion": diffusion.DiffusionReconstructor.from_pretrained,  # its three loads pass use_safetensors
}


@dataclass
class BundleInfo:
    """What `bundle.json` records: enough to trace any output back to the weights that made it."""

    preset: str | None
    sources: dict[str, str]  # part -> "random-init (...)" or where the weights came from
    part_hashes: dict[str, str] = field(default_factory=dict)  # part -> sha256 of config + weights
    schema_version: int = BUNDLE_SCHEMA_VERSION

    @property
    def fingerprint(self) -> str:
        joined = json.dumps(dict(sorted(self.part_hashes.items())), sort_keys=True)
        return hashlib.sha256(joined.encode()).hexdigest()[:16]

    @property
    def untrained_parts(self) -> list[str]:
        return sorted(p for p, src in self.sources.items() if src.startswith(RANDOM_INIT))


@dataclass(frozen=True)
class Tokens:
    guide: np.ndarray | None  # (B, h*w) uint16
    semantic: np.ndarray | None  # (B, 32) uint16


def module_hash(module: torch.nn.Module) -> str:
    """sha256 over the module's config and every tensor (name, dtype, shape, bytes)."""
    digest = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        # '_'-keys are diffusers' bookkeeping (library version, a set of defaulted names in
        # hash-seed order): not what the model is, and not stable across processes.
        public = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        digest.update(json.dumps(public, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class DualTokenizer:
    """Images <-> (guide ids, semantic ids); any subset of the three parts may be loaded."""

    def __init__(self, parts: dict[str, torch.nn.Module], info: BundleInfo) -> None:
        check_compatible(parts)
        self.parts = parts
        self.info = info
        for name, module in parts.items():
            if name not in info.part_hashes:
                info.part_hashes[name] = module_hash(module)
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, seed: int = 0, parts: tuple[str, ...] = PARTS) -> "DualTokenizer":
        """Random-initialised parts of a named preset (say so wherever their output is shown)."""
        preset = get_preset(name)
        built = build_parts(preset, seed=seed, parts=parts)
        sources = {p: f"{RANDOM_INIT} (preset {name}, seed {seed})" for p in built}
        return cls(built, BundleInfo(preset=name, sources=sources))

    @classmethod
    def from_pretrained(
        cls,
        uri: str | os.PathLike,
        parts: tuple[str, ...] = PARTS,
        storage_options: dict[str, Any] | None = None,
        verify: bool = True,
    ) -> "DualTokenizer":
        """Load a bundle from a local folder or an fsspec URI; `verify` re-hashes the weights."""
        local = _stage_locally(str(uri), parts, storage_options)
        info = read_bundle_info(local)
        loaded = {}
        for part in parts:
            folder = local / part
            if not folder.is_dir():
                raise BundleError(f"bundle {uri} has no {part!r} part (expected folder {part}/)")
            require_safetensors(folder, f"bundle {uri}: part")
            loaded[part] = _LOADERS[part](str(folder)).eval()
            if verify and part in info.part_hashes:
                actual = module_hash(loaded[part])
                if actual != info.part_hashes[part]:
                    raise BundleError(f"bundle {uri}: {part} weights do not match the hash in bundle.json")
        kept = BundleInfo(
            preset=info.preset,
            sources={p: info.sources.get(p, str(uri)) for p in parts},
            part_hashes={p: h for p, h in info.part_hashes.items() if p in parts},
        )
        return cls(loaded, kept)

    def save_pretrained(self, uri: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> None:
        """Write every loaded part plus bundle.json to a local folder or an fsspec URI."""
        uri = str(uri)
        if _is_local(uri):
            self._save_local(Path(_strip_file(uri)))
            return
        import fsspec

        with tempfile.TemporaryDirectory() as tmp:
            self._save_local(Path(tmp))
            fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
            fs.put(tmp.rstrip("/") + "/", root.rstrip("/") + "/", recursive=True)

    def _save_local(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        for name, module in self.parts.items():
            module.save_pretrained(str(path / name))
        (path / "bundle.json").write_text(json.dumps(asdict(self.info), indent=2, sort_keys=True))

    # ---- properties ---------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.info.fingerprint

    def part(self, name: str) -> torch.nn.Module:
        if name not in self.parts:
            raise BundleError(f"this DualTokenizer was loaded without its {name!r} part (has {sorted(self.parts)})")
        return self.parts[name]

    @property
    def guide_grid(self) -> int:
        return int(self.part("guide").config.grid_size)

    @property
    def guide_size(self) -> int:
        return int(self.part("guide").config.guide_size)

    @property
    def guide_vocab(self) -> int:
        return int(self.part("guide").config.num_vq_embeddings)

    @property
    def semantic_vocab(self) -> int:
        return int(self.part("semantic").config.codebook_size)

    @property
    def num_semantic_tokens(self) -> int:
        return int(self.part("semantic").config.num_queries)

    def to(self, device: str | torch.device, dtype: torch.dtype = torch.float32) -> "DualTokenizer":
        self.device, self.dtype = torch.device(device), dtype
        for module in self.parts.values():
            module.to(self.device)
            current = next(module.parameters()).dtype
            if current != dtype:  # diffusers warns on any dtype cast, so cast only when it changes
                module.to(dtype)
        return self

    # ---- tokenize / detokenize ----------------------------------------------------------
    @torch.inference_mode()
    def encode_guide(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 (B, H, W, 3) -> guide ids (B, h*w) uint16."""
        model = self.part("guide")
        x = to_model_input(check_uint8_images(images), model.config.image_size, self.device, self.dtype)
        return model.encode(x).to("cpu").numpy().astype(np.uint16)

    @torch.inference_mode()
    def encode_semantic(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 (B, H, W, 3) -> semantic ids (B, 32) uint16."""
        model = self.part("semantic")
        x = to_model_input(check_uint8_images(images), model.config.image_size, self.device, self.dtype)
        return model.encode(x).to("cpu").numpy().astype(np.uint16)

    def tokenize(self, images: np.ndarray | torch.Tensor) -> Tokens:
        """uint8 (B, H, W, 3) -> both token streams (whichever parts are loaded)."""
        check_uint8_images(images)
        return Tokens(
            guide=self.encode_guide(images) if "guide" in self.parts else None,
            semantic=self.encode_semantic(images) if "semantic" in self.parts else None,
        )

    @torch.inference_mode()
    def guide_images(self, guide_ids: np.ndarray | torch.Tensor) -> np.ndarray:
        """Guide ids (B, h*w) -> the low-res guide images, uint8 (B, g, g, 3)."""
        ids = check_token_ids(guide_ids, self.guide_grid**2, self.guide_vocab, "guide")
        return to_uint8(self.part("guide").decode(ids.to(self.device)))

    @torch.inference_mode()
    def generation_embeddings(self, semantic_ids: np.ndarray | torch.Tensor) -> torch.Tensor:
        ids = check_token_ids(semantic_ids, self.num_semantic_tokens, self.semantic_vocab, "semantic")
        return self.part("semantic").generation_embeddings(ids.to(self.device))  # (B, 77, D)

    @torch.inference_mode()
    def detokenize(
        self,
        guide_ids: np.ndarray | torch.Tensor,
        semantic_ids: np.ndarray | torch.Tensor,
        *,
        size: int = 256,
        steps: int = diffusion.DEFAULT_STEPS,
        strength: float = diffusion.DEFAULT_STRENGTH,
        guidance: float = diffusion.DEFAULT_GUIDANCE,
        seed: int = 0,
        inversion_condition: str = "unconditional",
    ) -> np.ndarray:
        """Re-render full images from both streams (paper sec. 3.3): uint8 (B, size, size, 3)."""
        gids = check_token_ids(guide_ids, self.guide_grid**2, self.guide_vocab, "guide").to(self.device)
        cond = self.generation_embeddings(semantic_ids)
        if cond.shape[0] != gids.shape[0]:
            raise BundleError(f"{gids.shape[0]} guide rows but {cond.shape[0]} semantic rows")
        guide_img = self.part("guide").decode(gids)  # (B, 3, g, g)
        out = self.part("diffusion").reconstruct(
            guide_img, cond, size=size, steps=steps, strength=strength, guidance=guidance,
            seed=seed, inversion_condition=inversion_condition,
        )
        return to_uint8(out)

    @torch.inference_mode()
    def generate_from_semantic(
        self, semantic_ids: np.ndarray | torch.Tensor, *, size: int = 256, steps: int = diffusion.DEFAULT_STEPS,
        guidance: float = diffusion.DEFAULT_GUIDANCE, seed: int = 0,
    ) -> np.ndarray:
        """The semantic-only baseline (SEED/LaVIT): pure noise, semantic condition only."""
        cond = self.generation_embeddings(semantic_ids)
        return to_uint8(self.part("diffusion").generate(cond, size=size, steps=steps, guidance=guidance, seed=seed))


def read_bundle_info(local: Path) -> BundleInfo:
    meta = local / "bundle.json"
    if not meta.is_file():
        raise BundleError(f"{local} is not a dualtok bundle: bundle.json is missing")
    data = json.loads(meta.read_text())
    if data.get("schema_version") != BUNDLE_SCHEMA_VERSION:
        raise BundleError(f"{meta}: schema_version {data.get('schema_version')} is not {BUNDLE_SCHEMA_VERSION}")
    return BundleInfo(**data)


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _strip_file(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def _stage_locally(uri: str, parts: tuple[str, ...], storage_options: dict[str, Any] | None) -> Path:
    """A local folder with the bundle: the path itself, or a download of the needed parts."""
    if _is_local(uri):
        return Path(_strip_file(uri))
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    root = root.rstrip("/")
    if not fs.exists(f"{root}/bundle.json"):
        raise BundleError(f"{uri} is not a dualtok bundle: bundle.json is missing")
    target = Path(tempfile.mkdtemp(prefix="dualtok-bundle-"))
    fs.get(f"{root}/bundle.json", str(target / "bundle.json"))
    for part in parts:
        if not fs.exists(f"{root}/{part}"):
            raise BundleError(f"bundle {uri} has no {part!r} part (expected folder {part}/)")
        fs.get(f"{root}/{part}/", str(target / part) + "/", recursive=True)
    logger.info("staged bundle %s (%s) in %s", uri, ",".join(parts), target)
    return target
