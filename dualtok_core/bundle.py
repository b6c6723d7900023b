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
import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dualtok_core import diffusion, guide, semantic, unclip
from dualtok_core.checkpoints import RANDOM_INIT
from dualtok_core.errors import BundleError, require_safetensors
from dualtok_core.imaging import check_token_ids, check_uint8_images, is_pil_input, pil_batch, to_model_input, to_uint8
from dualtok_core.preprocess import Preprocess
from dualtok_core.presets import PARTS, build_parts, check_compatible, get_preset

logger = logging.getLogger(__name__)

BUNDLE_SCHEMA_VERSION = 1
# Safetensors only: a pickle part is refused before loading (`require_safetensors`), and the
# loaders themselves are told never to fall back to one.
# low_cpu_mem_usage=False: diffusers' default wants `accelerate` and logs a paragraph per load without it.
_LOADERS = {
    "guide": functools.partial(guide.GuideVQModel.from_pretrained, use_safetensors=True, low_cpu_mem_usage=False),
    "semantic": functools.partial(semantic.SemanticTokenizer.from_pretrained, use_safetensors=True,
                                  low_cpu_mem_usage=False),
    "diffusion": unclip.load_reconstructor,  # SD's layout or unCLIP's; its loads pass use_safetensors
}


@dataclass
class BundleInfo:
    """What `bundle.json` records: enough to trace any output back to the weights that made it."""

    preset: str | None
    sources: dict[str, str]  # part -> "random-init (...)" or where the weights came from
    part_hashes: dict[str, str] = field(default_factory=dict)  # part -> sha256 of config + weights
    schema_version: int = BUNDLE_SCHEMA_VERSION
    # How trained weights were made, where a whole recipe made them (`dualtok recipe`): the recipe,
    # the data, the code version. Informational: not part of the fingerprint.
    provenance: dict[str, Any] = field(default_factory=dict)

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
        # Settings added after bundles were released hash as if absent while at their defaults, so an
        # existing bundle keeps its fingerprint (`_HASH_NEUTRAL_DEFAULTS` of the part's class).
        neutral = getattr(type(module), "_HASH_NEUTRAL_DEFAULTS", {})
        public = {k: v for k, v in dict(config).items()
                  if not k.startswith("_") and not (k in neutral and v == neutral[k])}
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
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = True,
    ) -> "DualTokenizer":
        """Load a bundle, as diffusers and transformers load models, from:

        - a local folder;
        - an fsspec URI (s3://, gs://, ...): downloaded once into `cache_dir` (default
          `$DUALTOK_CACHE` or ~/.cache/dualtok/bundles), keyed by the URI and its bundle.json, so
          every later load, in any process or actor on the machine, reads the local copy and a
          rewritten bundle gets a fresh entry;
        - a Hugging Face Hub repo id (`org/name`, `revision`: a branch, tag or commit), resolved by
          huggingface_hub in its cache; with `local_files_only` (the default) nothing is downloaded.

        `verify` re-hashes the weights against bundle.json (in the stored dtype, before any cast);
        `torch_dtype` and `device` then place the parts as `.to` does."""
        resolved = _resolve_hub_id(str(uri), revision, local_files_only)
        with _staged(resolved, parts, storage_options, cache_dir) as local:
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
            provenance=info.provenance,
        )
        tokenizer = cls(loaded, kept)
        if torch_dtype is not None or device is not None:
            tokenizer.to(device, torch_dtype)
        return tokenizer

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

    def to(self, device: str | torch.device | torch.dtype | None = None,
           dtype: torch.dtype | None = None) -> "DualTokenizer":
        """Move every part, like `nn.Module.to`: `.to("cuda")` keeps the dtype, `.to(torch.bfloat16)`
        keeps the device, `.to("cuda", torch.bfloat16)` changes both."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        self.device = torch.device(device) if device is not None else self.device
        self.dtype = dtype if dtype is not None else self.dtype
        dtype = self.dtype
        for module in self.parts.values():
            module.to(self.device)
            current = next(module.parameters()).dtype
            if current != dtype:
                # nn.Module's own cast: diffusers' `to` only adds a warning on every dtype cast, even
                # for a model with no module to keep in float32 (ours have none)
                kept = getattr(module, "_keep_in_fp32_modules", None)
                if kept:
                    logger.warning("%s: casting to %s, its %s too", type(module).__name__, dtype, kept)
                torch.nn.Module.to(module, dtype)
        return self

    # ---- tokenize / detokenize ----------------------------------------------------------
    def preprocess(self, part: str) -> Preprocess:
        """How `part` cuts its square input from an image (its config's input_fit / input_interpolation)."""
        config = self.part(part).config
        return Preprocess(int(config.image_size), config.input_fit, config.input_interpolation)

    def _as_batch(self, images: Any, part: str) -> Any:
        """PIL input becomes a uint8 batch for `part`. A branch with the default preprocessing (centre
        crop, bicubic) gets the shared crop at the largest input size of the loaded encoders, as the
        tokenize pipeline's decode stage makes it; any other is cut from the image directly."""
        if not is_pil_input(images):
            return images
        own = self.preprocess(part)
        if (own.fit, own.interpolation) == ("center_crop", "bicubic"):
            return pil_batch(images, Preprocess(_input_size_of(self.parts)))
        return pil_batch(images, own)

    def _model_input(self, images: Any, part: str) -> torch.Tensor:
        own = self.preprocess(part)
        return to_model_input(check_uint8_images(self._as_batch(images, part)), own.size, self.device, self.dtype,
                              own.fit, own.interpolation)

    @torch.inference_mode()
    def encode_guide(self, images: Any) -> np.ndarray:
        """uint8 (B, H, W, 3), or PIL image(s) -> guide ids (B, h*w) uint16."""
        return self.part("guide").encode(self._model_input(images, "guide")).to("cpu").numpy().astype(np.uint16)

    @torch.inference_mode()
    def encode_semantic(self, images: Any) -> np.ndarray:
        """uint8 (B, H, W, 3), or PIL image(s) -> semantic ids (B, 32) uint16."""
        return self.part("semantic").encode(self._model_input(images, "semantic")).to("cpu").numpy().astype(np.uint16)

    def tokenize(self, images: Any) -> Tokens:
        """uint8 (B, H, W, 3) array or tensor, a PIL image, or a list of PIL images of any sizes ->
        both token streams (whichever parts are loaded), each cut as its branch's `preprocess` says."""
        if not is_pil_input(images):
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

    @property
    def diffusion_kind(self) -> str:
        """What conditions the bundle's UNet: "text" (77 x D embeddings) or "unclip" (one image embedding)."""
        return getattr(self.part("diffusion"), "kind", "text")

    @torch.inference_mode()
    def condition(self, semantic_ids: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Semantic ids -> the diffusion branch's condition: generation embeddings (B, 77, D), or for an
        unCLIP branch the image embeddings (B, E) of SEED's decoding head."""
        if self.diffusion_kind != "unclip":
            return self.generation_embeddings(semantic_ids)
        ids = check_token_ids(semantic_ids, self.num_semantic_tokens, self.semantic_vocab, "semantic")
        return self.part("semantic").image_embeddings(ids.to(self.device))  # (B, E)

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
        cond = self.condition(semantic_ids)
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
        cond = self.condition(semantic_ids)
        return to_uint8(self.part("diffusion").generate(cond, size=size, steps=steps, guidance=guidance, seed=seed))


def _input_size_of(parts: dict[str, torch.nn.Module]) -> int:
    return max(int(m.config.image_size) for n, m in parts.items() if n in ("guide", "semantic"))


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


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _resolve_hub_id(uri: str, revision: str | None, local_files_only: bool = True) -> str:
    """`uri` itself, or for `org/name` that is no local folder, its snapshot in the Hugging Face
    cache (HF_HUB_CACHE / HF_HOME). With `local_files_only` nothing is downloaded: a missing
    snapshot is an error that says how to fetch it."""
    if not _is_local(uri) or Path(_strip_file(uri)).exists() or not _REPO_ID.match(uri):
        return uri
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(uri, revision=revision, local_files_only=local_files_only)
    except LocalEntryNotFoundError as err:
        raise BundleError(
            f"{uri} is not a folder here, and the Hugging Face cache ({constants.HF_HUB_CACHE}) holds no "
            f"snapshot of it{f' at {revision}' if revision else ''}; dualtok downloads nothing at run time: "
            f"fetch it first (`hf download {uri}`) or give a path or URI"
        ) from err


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("DUALTOK_CACHE"):
        return Path(os.environ["DUALTOK_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dualtok" / "bundles"


@contextlib.contextmanager
def _staged(uri: str, parts: tuple[str, ...], storage_options: dict[str, Any] | None,
            cache_dir: str | os.PathLike | None = None) -> Iterator[Path]:
    """A local folder with the bundle: the path itself, or the bundle's entry in the local cache,
    filled with the parts it lacks. Each part is downloaded into a temporary folder beside the entry
    and renamed into place whole, so concurrent loads (one per actor) never see half a part; the
    one that renames first wins and the others drop their copy."""
    if _is_local(uri):
        local = Path(_strip_file(uri))
        if not local.exists():
            raise BundleError(f"bundle {uri} does not exist")
        yield local
        return
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    root = root.rstrip("/")
    if not fs.exists(f"{root}/bundle.json"):
        raise BundleError(f"{uri} is not a dualtok bundle: bundle.json is missing")
    info = fs.cat_file(f"{root}/bundle.json")  # names every part's hash: a rewritten bundle is another entry
    entry = _cache_root(cache_dir) / hashlib.sha256(uri.rstrip("/").encode() + b"\0" + info).hexdigest()[:24]
    entry.mkdir(parents=True, exist_ok=True)
    for part in parts:
        if (entry / part).is_dir():
            continue
        if not fs.exists(f"{root}/{part}"):
            raise BundleError(f"bundle {uri} has no {part!r} part (expected folder {part}/)")
        with tempfile.TemporaryDirectory(prefix=f".{part}-", dir=entry) as tmp:
            fs.get(f"{root}/{part}/", f"{tmp}/{part}/", recursive=True)
            with contextlib.suppress(OSError):  # another load put the part there first
                os.rename(f"{tmp}/{part}", entry / part)
        logger.info("cached %s part %s in %s", uri, part, entry)
    if not (entry / "bundle.json").is_file():
        _write_atomically(entry / "bundle.json", info)
    yield entry


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
