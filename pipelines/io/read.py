"""The tokenize pipeline's CPU stages: shard URIs -> sample rows -> decoded images.

Kept apart from the model stages (`tokenize/encode.py`, `audit/stages.py`) so that the Ray workers running them import
numpy, PIL and fsspec only: importing torch and the models costs each worker ~370 MiB of RSS and
seconds of CPU, for nothing a read worker uses.

Each stage returns a `pyarrow.Table` built with the explicit in-flight types of `io/schemas.py`, so no
column type depends on what one block happens to hold. A shard is a tar or a Parquet file of images
(`parquet_shards.open_shard`). A shard ends with one END row: a good one carries the sample count and
the object read (size, version, storage retries); a FAILED one (REASON set, SHARD_SAMPLES -1) says
why the shard cannot be committed this run: a shard that cannot be read to its end (STAGE "read") or
a store fault that outlived the retries (STAGE "storage"). Every row carries one in-flight column per
`passthrough` field (`schemas.passthrough_column`): the sample's source field as text, or null.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from dualtok.pipelines.io import schemas as S
from dualtok.pipelines.io.decode import DecodeConfig, DecodeError, decode_image
from dualtok.pipelines.io.parquet_shards import ParquetColumns, ParquetShardReader, open_shard
from dualtok.pipelines.io.shards import Sample, ShardFormatError, ShardLimits, ShardReader, field_text
from dualtok.pipelines.io.storage import StorageFault

logger = logging.getLogger(__name__)

Columns = dict[str, np.ndarray]
Reader = ShardReader | ParquetShardReader  # what `open_shard` gives: a tar's or a Parquet file's


@dataclass(frozen=True)
class ReadShards:
    """One shard URI per input row -> one row per sample, plus an END row per shard.

    `parquet` says which columns of a Parquet shard hold what; `passthrough` names the source fields
    (a tar sample's .json keys, a Parquet row's columns) each row carries as text, null when missing.
    A read that the store fails (`StorageFault`) is retried `storage_retries` times from the start
    of the shard, after `retry_seconds`, doubling up to `max_retry_seconds`; rows already yielded
    are not yielded again. The same object must come back: a shard rewritten mid-read fails.
    """

    storage_options: dict[str, Any] = field(default_factory=dict, hash=False)
    rows_per_batch: int = 64
    limits: ShardLimits = ShardLimits()
    storage_retries: int = 4
    retry_seconds: float = 0.5
    max_retry_seconds: float = 8.0
    parquet: ParquetColumns = ParquetColumns()
    passthrough: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.rows_per_batch < 1 or self.storage_retries < 0 or self.retry_seconds < 0:
            raise ValueError(f"read stage settings out of range: rows_per_batch={self.rows_per_batch}, "
                             f"storage_retries={self.storage_retries}, retry_seconds={self.retry_seconds}")

    def __call__(self, batch: Columns) -> Iterator[pa.Table]:
        for columns in self.columns(batch):
            yield S.inflight_table(columns)

    def columns(self, batch: Columns) -> Iterator[Columns]:
        """The stage's output as numpy columns (what `__call__` types), one shard at a time."""
        for uri, shard in zip(batch[S.SHARD_URI], batch[S.SHARD]):
            yield from self._shard(str(uri), str(shard))

    def _shard(self, uri: str, shard: str) -> Iterator[Columns]:
        passed = _Passed()
        for attempt in range(self.storage_retries + 1):
            reader = open_shard(uri, self.storage_options or None, self.limits, self.parquet, self.passthrough)
            try:
                rest = yield from self._read_once(reader, shard, passed)
            except StorageFault as err:
                if attempt < self.storage_retries:
                    self._wait(shard, err, attempt)
                    continue
                failure = (S.STAGE_STORAGE, f"{err} (gave up after {attempt} retries)")
            except _ShardChanged as err:
                failure = (S.STAGE_STORAGE, str(err))
            except ShardFormatError as err:
                failure = (S.STAGE_READ, str(err))
            else:
                yield _columns([*rest, self._end_row(shard, reader, attempt)])
                return
            yield _columns([self._end_row(shard, reader, attempt, *failure)])
            return

    def _read_once(self, reader: Reader, shard: str, passed: _Passed) -> Generator[Columns, None, list[dict]]:
        """Read the shard from its start: yield full batches of the rows not passed on by an earlier
        try, return the last rows (fewer than a batch)."""
        rows: list[dict[str, Any]] = []
        for sample in reader:
            if passed.version not in (None, reader.version):
                raise _ShardChanged(f"the shard changed while it was read (version {passed.version} -> "
                                    f"{reader.version}) after {passed.samples} samples were passed on")
            if sample.index >= passed.samples:
                rows.append(self._sample_row(sample, shard))
            if len(rows) >= self.rows_per_batch:
                yield _columns(rows)
                passed.samples, passed.version, rows = sample.index + 1, reader.version, []
        return rows

    def _wait(self, shard: str, err: StorageFault, attempt: int) -> None:
        wait = min(self.retry_seconds * 2**attempt, self.max_retry_seconds)
        logger.warning("shard %s: %s; retry %d of %d in %.1f s", shard, err, attempt + 1, self.storage_retries, wait)
        time.sleep(wait)

    def _sample_row(self, sample: Sample, shard: str) -> dict[str, Any]:
        found = sample.image_bytes() if sample.error is None else None
        error = sample.error
        if error is None and found is None:
            present = sorted([*sample.members, *sample.other_members])
            error = f"no image member (members: {', '.join(present) or 'none'})"
        return {
            S.ROW_KIND: S.ERROR if error else S.SAMPLE, S.KEY: sample.key, S.SHARD: shard, S.INDEX: sample.index,
            S.CAPTION: sample.caption if error is None else None, S.IMAGE_BYTES: found[1] if found else b"",
            S.STAGE: S.STAGE_READ if error else "", S.REASON: error or "", S.SHARD_SAMPLES: -1, S.SHARD_BYTES: -1,
            S.SHARD_VERSION: "", S.SHARD_RETRIES: 0,
            **{S.passthrough_column(name): field_text(sample.fields.get(name)) for name in self.passthrough},
        }

    def _end_row(self, shard: str, reader: Reader, retries: int, stage: str = "", reason: str = "") -> dict[str, Any]:
        """The shard's END row: its sample count, or (REASON set) why it failed this run."""
        return {S.ROW_KIND: S.END, S.KEY: None, S.SHARD: shard, S.INDEX: -1, S.CAPTION: None, S.IMAGE_BYTES: b"",
                S.STAGE: stage, S.REASON: reason, S.SHARD_SAMPLES: -1 if reason else reader.samples,
                S.SHARD_BYTES: reader.size, S.SHARD_VERSION: reader.version, S.SHARD_RETRIES: retries,
                **{S.passthrough_column(name): None for name in self.passthrough}}


@dataclass
class _Passed:
    """What earlier tries of one shard passed on: samples below index `samples`, read from `version`."""

    samples: int = 0
    version: str | None = None


class _ShardChanged(RuntimeError):
    """The object was rewritten between two tries: rows already passed on came from the old one."""


def _columns(rows: list[dict[str, Any]]) -> Columns:
    """Rows -> numpy columns: integers as int64, text and bytes as object arrays (typed by `S.inflight_table`)."""
    out: Columns = {}
    for name in rows[0]:
        values = [row[name] for row in rows]
        if S.inflight_type(name) in (pa.string(), pa.large_binary()):
            out[name] = np.empty(len(values), dtype=object)
            out[name][:] = values
        else:
            out[name] = np.asarray(values, dtype=np.int64)
    return out


@dataclass(frozen=True)
class DecodeImages:
    """image_bytes -> IMAGE (S, S, 3) uint8 (and SEMANTIC_IMAGE) + width/height; failures become ERROR rows."""

    config: DecodeConfig = DecodeConfig()

    def __call__(self, batch: Columns) -> pa.Table:
        return S.inflight_table(self.columns(batch))

    def columns(self, batch: Columns) -> Columns:
        """The stage's output as numpy columns (what `__call__` types)."""
        n = len(batch[S.ROW_KIND])
        size = self.config.size
        images = np.zeros((n, size, size, 3), dtype=np.uint8)
        extra = self.config.semantic
        semantic = np.zeros((n, extra.size, extra.size, 3), dtype=np.uint8) if extra is not None else None
        widths, heights = np.zeros(n, dtype=np.int32), np.zeros(n, dtype=np.int32)
        kinds, stages, reasons = batch[S.ROW_KIND].copy(), batch[S.STAGE].copy(), batch[S.REASON].copy()
        for i in np.flatnonzero(kinds == S.SAMPLE):
            try:
                decoded = decode_image(batch[S.IMAGE_BYTES][i], self.config)
            except DecodeError as err:
                kinds[i], stages[i], reasons[i] = S.ERROR, S.STAGE_DECODE, str(err)
                continue
            images[i], widths[i], heights[i] = decoded.pixels, decoded.width, decoded.height
            if semantic is not None:
                semantic[i] = decoded.semantic_pixels
        out = {k: v for k, v in batch.items() if k != S.IMAGE_BYTES}
        out.update({S.ROW_KIND: kinds, S.STAGE: stages, S.REASON: reasons, S.IMAGE: images,
                    S.WIDTH: widths, S.HEIGHT: heights})
        if semantic is not None:
            out[S.SEMANTIC_IMAGE] = semantic
        return out


@dataclass(frozen=True)
class ReadAndDecode:
    """ReadShards then DecodeImages in one call, so raw image bytes never cross the object store."""

    read: ReadShards
    decode: DecodeImages

    def __call__(self, batch: Columns) -> Iterator[pa.Table]:
        for rows in self.read.columns(batch):
            yield S.inflight_table(self.decode.columns(rows))


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
