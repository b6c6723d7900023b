"""The tokenize pipeline's stages: small callable classes over `dict[str, np.ndarray]` batches.

Each stage has a frozen config, passes through the columns it does not own, and works without
Ray (tests call them directly). The CPU stages (read, decode) live in `read_stages.py`, which does
not import torch; this module holds the model stage and `add_actor_stage`, the adapter that puts a
model stage on a Ray Data dataset as an actor pool (the models loaded once per actor).
Rows are SAMPLE, ERROR or END (see `schemas.py`); encoders touch SAMPLE rows only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from dualtok_core.bundle import DualTokenizer
from dualtok_core.errors import BundleError
from dualtok_core.presets import preset_names
from pipelines import schemas as S
from pipelines.storage import revealed

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

    @property
    def torch_threads(self) -> int:
        """Threads torch uses in a CPU actor: its CPU share, rounded, at least 1 (0.875 -> 1, 3.9 -> 4)."""
        return max(1, round(self.cpus_per_actor))


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
            tokenizer = DualTokenizer.from_pretrained(self.spec, parts=parts,
                                                   storage_options=revealed(self.storage_options) or None)
        for part in parts:
            expected, actual = self.expected_hashes.get(part), tokenizer.info.part_hashes[part]
            if expected is not None and expected != actual:
                raise BundleError(
                    f"{self.spec}: the {part} weights loaded here (hash {actual[:16]}) differ from the driver's "
                    f"({expected[:16]}); nodes run different code or see different bundle files"
                )
        return tokenizer


# ---- model stage ----------------------------------------------------------------------------
_STREAM_COLUMNS = {"guide": S.GUIDE_TOKENS, "semantic": S.SEMANTIC_TOKENS}


class EncodeTokens:
    """IMAGE -> the token columns of every requested stream, both branches in one actor.

    One stage rather than one per branch: the decoded image crosses the object store once (into
    this actor) and never comes back out, and an actor pool splits the CPUs/GPUs by actor count
    instead of by a guess of the branches' relative cost. Only SAMPLE rows are encoded.
    """

    def __init__(self, source: BundleSource, resources: StageResources, streams: tuple[str, ...]) -> None:
        unknown = sorted(set(streams) - set(_STREAM_COLUMNS))
        if unknown or not streams:
            raise ValueError(f"streams must be a non-empty subset of {sorted(_STREAM_COLUMNS)}, got {streams}")
        self.streams = tuple(streams)
        self.device = pick_device(resources.device)
        self.dtype = pick_dtype(resources.dtype, self.device)
        if self.device.type == "cpu":
            torch.set_num_threads(resources.torch_threads)
        self.tokenizer = source.load(self.streams).to(self.device, self.dtype)
        self.encoders = {"guide": self.tokenizer.encode_guide, "semantic": self.tokenizer.encode_semantic}
        self.lengths = {"guide": self.tokenizer.guide_grid**2 if "guide" in self.streams else 0,
                        "semantic": self.tokenizer.num_semantic_tokens if "semantic" in self.streams else 0}
        logger.info("EncodeTokens: loaded %s %s (%s) on %s/%s, %d torch threads", source.spec, "+".join(self.streams),
                    self.tokenizer.fingerprint, self.device, self.dtype, torch.get_num_threads())

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """The batch less IMAGE, plus a token column per stream, typed as `schemas.inflight_table` says."""
        rows = np.flatnonzero(batch[S.ROW_KIND] == S.SAMPLE)
        images = batch[S.IMAGE][rows]  # (N, S, S, 3) uint8, SAMPLE rows only
        out = {k: v for k, v in batch.items() if k != S.IMAGE}  # images stop here: only tokens go on
        for stream in self.streams:
            tokens = np.zeros((len(batch[S.ROW_KIND]), self.lengths[stream]), dtype=np.uint16)
            if len(rows):
                tokens[rows] = self.encoders[stream](images)  # (N, length) uint16
            out[_STREAM_COLUMNS[stream]] = tokens
        return S.inflight_table(out)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# ---- the adapter ---------------------------------------------------------------------------
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
