"""The tokenize pipeline's CPU stages: shard URIs -> sample rows -> decoded images.

Kept apart from the model stages (`stages.py`) so that the Ray workers running them import
numpy, PIL and fsspec only: importing torch and the models costs each worker ~370 MiB of RSS and
seconds of CPU, for nothing a read worker uses.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines import schemas as S
from pipelines.decode import DecodeConfig, DecodeError, decode_image
from pipelines.shards import iter_samples


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
    """ReadShards then DecodeImages in one call, so raw image bytes never cross the object store."""

    read: ReadShards
    decode: DecodeImages

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for rows in self.read(batch):
            yield self.decode(rows)


# ---- the adapter ---------------------------------------------------------------------------
def add_read_stage(ds: Any, read: ReadShards, decode: DecodeImages, num_cpus: float, max_actors: int) -> Any:
    """Put the read stage on a dataset as a pool of 1..`max_actors` long-lived actors, one shard
    per call.

    Actors, not tasks: with one task per shard, a task worker idles between shards, Ray kills
    idle workers after ~1 s and starts a fresh one for the next task, and each start re-imports
    Ray Data, pyarrow and s3fs (~2 CPU-s): 15 worker starts for 16 shards, 5 % of the machine in
    the benchmark (docs/benchmarks.md). An actor pool also keeps Ray Data from fusing decoding into
    the encoder actors, where it would run serially with the models instead of beside them.
    """
    from ray.data import ActorPoolStrategy

    return ds.map_batches(ReadAndDecode, fn_constructor_kwargs={"read": read, "decode": decode},
                          batch_size=1, num_cpus=num_cpus, compute=ActorPoolStrategy(min_size=1, max_size=max_actors))
