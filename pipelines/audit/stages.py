"""The audit pipeline's stages. One Ray row is one *slice* of the sample (the unit of work).

    FetchOriginals (CPU tasks): the slice's source samples, read by (shard, index), decoded
      -> Reconstruct (actor pool, GPU when given): every variant of every good row
      -> ScoreReconstruction (actor pool): metrics, PNGs beside the report, the slice's tables.

A slice travels as one `payload` of row-aligned arrays (`pack`/`unpack`, numpy's npz without
pickle). Keeping a slice whole inside one call fixes which images share a forward pass, so a
rerun reproduces every number exactly. Stages mark bad rows (status, stage, reason) and go on.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from dualtok_core.diffusion import DEFAULT_GUIDANCE, DEFAULT_STEPS, DEFAULT_STRENGTH
from dualtok_core.errors import DualtokError
from dualtok_core.imaging import check_token_ids, resize_float, to_uint8
from dualtok_core.presets import PARTS
from dualtok.pipelines.io import schemas as S
from dualtok.pipelines.io.decode import DecodeConfig, DecodeError, decode_image
from dualtok.pipelines.io.parquet_shards import open_shard
from dualtok.pipelines.io.shards import ShardFormatError
from dualtok.pipelines.actors import BundleSource, StageResources, pick_device, pick_dtype
from dualtok.pipelines.io.storage import filesystem

logger = logging.getLogger(__name__)

PAYLOAD = "payload"
OK, FAILED = 0, 1
STAGE_FETCH, STAGE_RECONSTRUCT, STAGE_SCORE = "fetch", "reconstruct", "score"
VariantKind = Literal["dual", "semantic-only", "guide-upsampled"]
MAIN_GUIDE = ""  # the bundle's own guide branch, as opposed to an extra guide bundle


def pack(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def unpack(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


@dataclass(frozen=True)
class VariantSpec:
    """One way of re-rendering an image, as the report's rows name them."""

    name: str  # dual, semantic-only, guide-upsampled, dual-g32, guide-upsampled-g32, ...
    kind: VariantKind
    guide: str | None  # MAIN_GUIDE, an extra guide's name (g32), or None (semantic-only)
    guide_size: int  # 0 without a guide
    num_guide_tokens: int
    num_semantic_tokens: int
    diffusion: str | None = None  # an extra diffusion branch's name (unclip); None: the bundle's own

    @property
    def guide_image(self) -> str | None:
        """Payload/file name of the guide image this variant starts from."""
        if self.guide is None:
            return None
        return "guide" if self.guide == MAIN_GUIDE else f"guide-{self.guide}"


@dataclass(frozen=True)
class RenderSettings:
    """Reconstruction settings shared by every variant."""

    size: int = 256  # output size of every reconstruction (and of the originals it is compared with)
    steps: int = DEFAULT_STEPS  # DDIM steps of the whole schedule; dual runs int(strength * steps) of them
    strength: float = DEFAULT_STRENGTH
    guidance: float = DEFAULT_GUIDANCE
    seed: int = 0
    inversion_condition: str = "unconditional"
    chunk: int = 4  # images per forward pass


def image_path(shard: str, index: int, name: str) -> str:
    """Where an image of a sampled row lives, relative to the audit's output."""
    return f"images/{shard}/{index:09d}/{name}.png"


def fail_rows(payload: dict[str, np.ndarray], rows: np.ndarray, stage: str, reason: str) -> None:
    payload["status"][rows] = FAILED
    payload["stage"][rows] = stage
    payload["reason"][rows] = reason


def _slice_batches(batch: dict[str, np.ndarray], work: Any) -> dict[str, np.ndarray]:
    """Apply `work(slice, payload) -> payload` to every slice row of a Ray batch."""
    payloads = np.empty(len(batch[S.SLICE]), dtype=object)
    for i, (name, data) in enumerate(zip(batch[S.SLICE], batch[PAYLOAD])):
        payloads[i] = pack(work(str(name), unpack(data)))
    return {S.SLICE: batch[S.SLICE], PAYLOAD: payloads}


# ---- 1. originals -----------------------------------------------------------------------------
@dataclass(frozen=True)
class FetchOriginals:
    """Reads each slice's samples from their source shards and decodes them at the output size."""

    size: int
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _slice_batches(batch, self._fetch)

    def _fetch(self, slice_name: str, payload: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(payload[S.KEY])
        payload["original"] = np.zeros((n, self.size, self.size, 3), dtype=np.uint8)
        for uri in np.unique(payload[S.SHARD_URI]):
            rows = np.flatnonzero(payload[S.SHARD_URI] == uri)
            self._fetch_shard(str(uri), rows, payload)
        logger.info("slice %s: %d originals, %d bad", slice_name, int((payload["status"] == OK).sum()),
                    int((payload["status"] != OK).sum()))
        return payload

    def _fetch_shard(self, uri: str, rows: np.ndarray, payload: dict[str, np.ndarray]) -> None:
        if not uri:
            fail_rows(payload, rows, STAGE_FETCH, "no source shard is known for this corpus shard (give sources=...)")
            return
        fs, path = filesystem(uri, self.storage_options or None)
        if not fs.exists(path):
            fail_rows(payload, rows, STAGE_FETCH, f"source shard {uri} does not exist")
            return
        wanted = {int(payload[S.INDEX][r]): int(r) for r in rows}
        last = max(wanted)
        try:
            for sample in open_shard(uri, self.storage_options or None):  # a tar, or a Parquet file of images
                row = wanted.pop(sample.index, None)
                if row is not None:
                    self._take(sample, row, payload)
                if sample.index >= last or not wanted:
                    break
        except ShardFormatError as err:  # the shard breaks before the wanted samples
            fail_rows(payload, np.array(list(wanted.values()), dtype=np.int64), STAGE_FETCH,
                      f"source shard {uri} unreadable: {err}")
            return
        for index, row in wanted.items():
            fail_rows(payload, np.array([row]), STAGE_FETCH, f"source shard {uri} has no sample at index {index}")

    def _decode_config(self) -> DecodeConfig:
        # The tokenize job already accepted these images under its own limits; only the
        # decompression-bomb check stays, a too-small side is no reason to skip an audit row.
        return DecodeConfig(size=self.size, min_side=1)

    def _take(self, sample: Any, row: int, payload: dict[str, np.ndarray]) -> None:
        rows = np.array([row])
        expected = str(payload[S.KEY][row])
        if sample.error is not None:
            fail_rows(payload, rows, STAGE_FETCH, f"source sample unreadable: {sample.error}")
        elif sample.key != expected:
            fail_rows(payload, rows, STAGE_FETCH,
                  f"source shard changed: index {sample.index} holds key {sample.key!r}, the corpus has {expected!r}")
        elif (found := sample.image_bytes()) is None:
            fail_rows(payload, rows, STAGE_FETCH, "source sample has no image member")
        else:
            try:
                payload["original"][row] = decode_image(found[1], self._decode_config()).pixels
            except DecodeError as err:
                fail_rows(payload, rows, "decode", str(err))


# ---- 2. reconstruction ------------------------------------------------------------------------
def chunk_seed(seed: int, slice_name: str, chunk: int) -> int:
    """The noise seed of one chunk: fixed by the audit seed and the chunk's place in the sample."""
    digest = hashlib.blake2b(f"{seed}|{slice_name}|{chunk}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


class Reconstruct:
    """Every variant of every good row of a slice; one DualTokenizer (and extra guides) per actor."""

    def __init__(self, source: BundleSource, guides: dict[str, BundleSource], variants: tuple[VariantSpec, ...],
                 render: RenderSettings, resources: StageResources,
                 diffusions: dict[str, BundleSource] | None = None) -> None:
        self.device = pick_device(resources.device)
        self.dtype = pick_dtype(resources.dtype, self.device)
        if self.device.type == "cpu":
            torch.set_num_threads(resources.torch_threads)
        self.variants, self.render = variants, render
        self.tokenizer = source.load(PARTS).to(self.device, self.dtype)
        used = sorted({v.guide for v in variants if v.guide not in (None, MAIN_GUIDE)})
        self.guides = {name: guides[name].load(("guide",)).to(self.device, self.dtype) for name in used}
        wanted = sorted({v.diffusion for v in variants if v.diffusion is not None})
        self.diffusions = {name: (diffusions or {})[name].load(("semantic", "diffusion")).to(self.device, self.dtype)
                           for name in wanted}
        logger.info("Reconstruct: %s (%s) + %d extra guide(s) on %s/%s", source.spec, self.tokenizer.fingerprint,
                    len(self.guides), self.device, self.dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _slice_batches(batch, self._reconstruct)

    def _reconstruct(self, slice_name: str, payload: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, size = len(payload[S.KEY]), self.render.size
        for v in self.variants:
            payload[f"recon.{v.name}"] = np.zeros((n, size, size, 3), dtype=np.uint8)
            payload[f"seconds.{v.name}"] = np.zeros(n, dtype=np.float64)
            if v.guide_image is not None:
                payload[v.guide_image] = np.zeros((n, v.guide_size, v.guide_size, 3), dtype=np.uint8)
        good = np.flatnonzero(payload["status"] == OK)
        for number, start in enumerate(range(0, len(good), self.render.chunk)):
            rows = good[start : start + self.render.chunk]
            try:
                self._chunk(payload, rows, chunk_seed(self.render.seed, slice_name, number))
            except DualtokError as err:  # tokens this bundle cannot render: those rows, not the audit
                fail_rows(payload, rows, STAGE_RECONSTRUCT, f"{type(err).__name__}: {err}")
        return payload

    @torch.inference_mode()
    def _chunk(self, payload: dict[str, np.ndarray], rows: np.ndarray, seed: int) -> None:
        for v in self.variants:
            started = time.perf_counter()
            images, guide = self._variant(v, payload, rows, seed)
            payload[f"recon.{v.name}"][rows] = images
            payload[f"seconds.{v.name}"][rows] = (time.perf_counter() - started) / len(rows)
            if guide is not None:
                payload[v.guide_image][rows] = guide

    def _variant(self, v: VariantSpec, payload: dict[str, np.ndarray], rows: np.ndarray,
                 seed: int) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 (B, size, size, 3) reconstructions, and the uint8 guide images they started from."""
        r = self.render
        semantic = payload[S.SEMANTIC_TOKENS][rows]  # (B, 32) uint16
        renderer = self.tokenizer if v.diffusion is None else self.diffusions[v.diffusion]
        if v.kind == "semantic-only":
            return renderer.generate_from_semantic(semantic, size=r.size, steps=r.steps,
                                                   guidance=r.guidance, seed=seed), None
        if v.kind == "dual" and v.guide == MAIN_GUIDE and v.diffusion is None:  # exactly the facade's detokenize
            guide_ids = payload[S.GUIDE_TOKENS][rows]
            images = self.tokenizer.detokenize(guide_ids, semantic, size=r.size, steps=r.steps, strength=r.strength,
                                               guidance=r.guidance, seed=seed,
                                               inversion_condition=r.inversion_condition)
            return images, self.tokenizer.guide_images(guide_ids)
        guide = self._guide(v, payload, rows)  # (B, 3, g, g) float in [0, 1]
        if v.kind == "guide-upsampled":
            return to_uint8(resize_float(guide, r.size).clamp(0.0, 1.0)), to_uint8(guide)
        cond = renderer.condition(semantic)  # (B, 77, D), or (B, E) for an unCLIP branch
        out = renderer.part("diffusion").reconstruct(
            guide, cond, size=r.size, steps=r.steps, strength=r.strength, guidance=r.guidance, seed=seed,
            inversion_condition=r.inversion_condition,
        )  # (B, 3, size, size)
        return to_uint8(out), to_uint8(guide)

    def _guide(self, v: VariantSpec, payload: dict[str, np.ndarray], rows: np.ndarray) -> torch.Tensor:
        """The decoded guide: from the corpus's guide ids, or from re-encoding the original."""
        if v.guide == MAIN_GUIDE:
            model, ids = self.tokenizer, payload[S.GUIDE_TOKENS][rows]
        else:
            model = self.guides[v.guide]
            ids = model.encode_guide(payload["original"][rows])  # (B, h*w) uint16
        checked = check_token_ids(ids, model.guide_grid**2, model.guide_vocab, "guide")
        return model.part("guide").decode(checked.to(self.device))  # (B, 3, g, g)
