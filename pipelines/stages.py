"""The tokenize pipeline's stages: small callable classes over `dict[str, np.ndarray]` batches.

Each stage has a frozen config, passes through the columns it does not own, and works without
Ray (tests call them directly). `add_stage` is the one adapter that puts a stage on a Ray Data
dataset: CPU tasks for reading/decoding, an actor pool (one model per actor) for encoders.
Rows are SAMPLE, ERROR or END (see `schemas.py`); encoders touch SAMPLE rows only.
"""

from __future__ import annotations

import abc
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dualtok_core.bundle import DualTokenizer
from dualtok_core.errors import BundleError
from dualtok_core.presets import preset_names
from pipelines import schemas as S
from pipelines.decode import DecodeConfig, DecodeError, decode_image
from pipelines.shards import iter_samples

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageResources:
    """Resources of one stage; encoder stages run as an actor pool of `actors`..`max_actors`."""

    batch_size: int = 16
    actors: int = 1
    max_actors: int | None = None
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    device: str = "auto"  # auto: cuda when the actor has a GPU, else cpu
    dtype: str = "auto"  # auto: bfloat16 on cuda, float32 on cpu

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.actors < 1 or (self.max_actors is not None and self.max_actors < self.actors):
            raise ValueError(f"stage resources out of range: {self}")


@dataclass(frozen=True)
class BundleSource:
    """Where the models come from: a preset name (random weights) or a bundle path/URI."""

    spec: str
    seed: int = 0
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    # part -> hash the driver saw; an actor whose weights differ (other code or files on its node) stops
    expected_hashes: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    @property
    def is_preset(self) -> bool:
        return self.spec in preset_names()

    def load(self, parts: tuple[str, ...]) -> DualTokenizer:
        if self.is_preset:
            tokenizer = DualTokenizer.from_preset(self.spec, seed=self.seed, parts=parts)
        else:
            tokenizer = DualTokenizer.from_pretrained(self.spec, parts=parts, storage_options=self.storage_options or None)
        for part in parts:
            expected, actual = self.expected_hashes.get(part), tokenizer.info.part_hashes[part]
            if expected is not None and expected != actual:
                raise BundleError(
                    f"{self.spec}: the {part} weights loaded here (hash {actual[:16]}) differ from the driver's "
                    f"({expected[:16]}); nodes run different code or see different bundle files"
                )
        return tokenizer


# ---- CPU stages -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ReadShards:
    """One shard URI per input row -> one row per sample, plus an END row per shard."""

    storage_options: dict[str, Any] = field(default_factory=dict, hash=False)
    rows_per_batch: int = 64

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for uri, shard in zip(batch[S.SHARD_URI], batch[S.SHARD]):
            rows: list[dict[str, Any]] = []
            count = 0
            for sample in iter_samples(str(uri), self.storage_options or None):
                rows.append(_sample_row(sample, str(shard)))
                count += 1
                if len(rows) >= self.rows_per_batch:
                    yield _columns(rows)
                    rows = []
            rows.append(_end_row(str(shard), count))
            yield _columns(rows)


def _sample_row(sample: Any, shard: str) -> dict[str, Any]:
    found = sample.image_bytes() if sample.error is None else None
    error = sample.error
    if error is None and found is None:
        error = f"no image member (members: {', '.join(sorted(sample.members)) or 'none'})"
    stage = S.STAGE_READ if error else ""
    return {
        S.ROW_KIND: S.ERROR if error else S.SAMPLE, S.KEY: sample.key, S.SHARD: shard, S.INDEX: sample.index,
        S.CAPTION: sample.caption if sample.error is None else None,
        "image_bytes": found[1] if found else b"", S.STAGE: stage, S.REASON: error or "", S.SHARD_SAMPLES: -1,
    }


def _end_row(shard: str, count: int) -> dict[str, Any]:
    return {S.ROW_KIND: S.END, S.KEY: None, S.SHARD: shard, S.INDEX: -1, S.CAPTION: None,
            "image_bytes": b"", S.STAGE: "", S.REASON: "", S.SHARD_SAMPLES: count}


def _columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name in rows[0]:
        values = [row[name] for row in rows]
        if isinstance(values[0], (int, np.integer)) and all(isinstance(v, (int, np.integer)) for v in values):
            out[name] = np.asarray(values, dtype=np.int64)
        else:
            array = np.empty(len(values), dtype=object)
            array[:] = values
            out[name] = array
    return out


@dataclass(frozen=True)
class DecodeImages:
    """image_bytes -> IMAGE (S, S, 3) uint8 + width/height; failures become ERROR rows."""

    config: DecodeConfig = DecodeConfig()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch[S.ROW_KIND])
        size = self.config.size
        images = np.zeros((n, size, size, 3), dtype=np.uint8)
        widths, heights = np.zeros(n, dtype=np.int32), np.zeros(n, dtype=np.int32)
        kinds, stages, reasons = batch[S.ROW_KIND].copy(), batch[S.STAGE].copy(), batch[S.REASON].copy()
        for i in np.flatnonzero(kinds == S.SAMPLE):
            try:
                decoded = decode_image(batch["image_bytes"][i], self.config)
            except DecodeError as err:
                kinds[i], stages[i], reasons[i] = S.ERROR, S.STAGE_DECODE, str(err)
                continue
            images[i], widths[i], heights[i] = decoded.pixels, decoded.width, decoded.height
        out = {k: v for k, v in batch.items() if k != "image_bytes"}
        out.update({S.ROW_KIND: kinds, S.STAGE: stages, S.REASON: reasons, S.IMAGE: images,
                    S.WIDTH: widths, S.HEIGHT: heights})
        return out


@dataclass(frozen=True)
class ReadAndDecode:
    """ReadShards then DecodeImages in one task, so raw image bytes never cross the object store."""

    read: ReadShards
    decode: DecodeImages

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for rows in self.read(batch):
            yield self.decode(rows)


# ---- model stages ---------------------------------------------------------------------------
class _EncodeTokens(abc.ABC):
    """Shared body of the encoder stages: load one branch once per actor, encode SAMPLE rows."""

    part = ""
    column = ""

    def __init__(self, source: BundleSource, resources: StageResources) -> None:
        self.device = pick_device(resources.device)
        self.dtype = pick_dtype(resources.dtype, self.device)
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(resources.cpus_per_actor)))
        self.tokenizer = source.load((self.part,)).to(self.device, self.dtype)
        self.length = self._length()
        logger.info("%s: loaded %s (%s) on %s/%s", type(self).__name__, source.spec,
                    self.tokenizer.fingerprint, self.device, self.dtype)

    @abc.abstractmethod
    def _length(self) -> int:
        """Tokens per image of this stream."""

    @abc.abstractmethod
    def _encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, S, S, 3) -> (B, length) uint16."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        kinds = batch[S.ROW_KIND]
        tokens = np.zeros((len(kinds), self.length), dtype=np.uint16)
        rows = np.flatnonzero(kinds == S.SAMPLE)
        if len(rows):
            tokens[rows] = self._encode(batch[S.IMAGE][rows])
        out = dict(batch)
        out[self.column] = tokens
        return out


class EncodeGuideTokens(_EncodeTokens):
    """IMAGE -> guide_tokens (h*w uint16) with the guide VQ-VAE."""

    part, column = "guide", S.GUIDE_TOKENS

    def _length(self) -> int:
        return self.tokenizer.guide_grid**2

    def _encode(self, images: np.ndarray) -> np.ndarray:
        return self.tokenizer.encode_guide(images)


class EncodeSemanticTokens(_EncodeTokens):
    """IMAGE -> semantic_tokens (32 uint16) with the SEED tokenizer."""

    part, column = "semantic", S.SEMANTIC_TOKENS

    def _length(self) -> int:
        return self.tokenizer.num_semantic_tokens

    def _encode(self, images: np.ndarray) -> np.ndarray:
        return self.tokenizer.encode_semantic(images)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# ---- the adapters ------------------------------------------------------------------------
def add_cpu_stage(ds: Any, stage: Any, num_cpus: float, batch_size: int) -> Any:
    """Put a CPU stage on a dataset as tasks that Ray Data never fuses into a downstream actor.

    With equal CPU requests Ray Data would fuse these tasks into the encoder actors, and decoding
    would then run serially with model work on the actor instead of overlapping with it. A
    `ray_remote_args_fn` is what keeps an operator out of fusion (ray.data operator_fusion).
    """
    return ds.map_batches(stage, batch_size=batch_size, num_cpus=num_cpus,
                          ray_remote_args_fn=functools.partial(_task_args, num_cpus))


def _task_args(num_cpus: float) -> dict[str, Any]:
    return {"num_cpus": num_cpus}


def add_actor_stage(ds: Any, stage_cls: type, resources: StageResources, **constructor_kwargs: Any) -> Any:
    """Put an encoder stage on a dataset as an actor pool holding one model per actor."""
    from ray.data import ActorPoolStrategy

    pool = ActorPoolStrategy(min_size=resources.actors, max_size=resources.max_actors or resources.actors)
    return ds.map_batches(
        stage_cls,
        fn_constructor_kwargs={**constructor_kwargs, "resources": resources},
        batch_size=resources.batch_size,
        compute=pool,
        num_gpus=resources.gpus_per_actor or None,
        num_cpus=resources.cpus_per_actor,
        # Ray Data's actor pools already default to max_restarts=-1 and max_task_retries=-1:
        # a lost actor is replaced and its batches retried; the corpus writer drops re-deliveries.
    )
