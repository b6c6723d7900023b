"""Token rows stay where they were encoded: the driver coordinates commits and never holds a row.

    encoder process:  TokenParts    each batch's SAMPLE rows of a shard -> one part file
                                    _parts/<run-id>/<shard>/<first>-<last>-<digest>.parquet; the batch
                                    goes on with one PART row per file instead (its name, its row count)
    driver:           PartCommits   per shard: its part files, ERROR rows, END row; once they account
                                    for the shard's samples, a task commits it
    task/thread:      commit_parts  the parts read back and handed, with the ERROR and END rows, to the
                                    same `CorpusWriter` an in-process commit uses (index order, each
                                    index once, the miscount check, the data and errors files); the
                                    part files are deleted after
    driver:           the marker, written after the lease check: the commit point, as before.

What crosses to the driver per shard is its part names and counts, its ERROR rows and one END
row: a few hundred bytes per batch instead of every token row (docs/scale.md measures both).
Commits run as Ray tasks (`pipeline.RayTasks`), or, on a machine that is the whole cluster and has no
GPU, in threads of the driver (`ThreadTasks`): there the rows never leave the machine either way, a
few images a second arrive, and each job saves starting a worker process for its commits.
A part's name is fixed by the indices of the rows in it, so a batch re-run after an actor died
rewrites the same file; the commit reads each index once whatever was delivered twice. Part
files of a run that died are removed by the next run on the output (it holds the lease).
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from dualtok.pipelines.io import schemas as S
from dualtok.pipelines.io.corpus import CorpusLayout, CorpusWriter, write_marker
from dualtok.pipelines.io.lease import LeaseLostError, read_lease
from dualtok.pipelines.io.outputs import OutputFolder, parquet_bytes
from dualtok.pipelines.io.storage import STORE_ERRORS, StorageFault, read_objects

logger = logging.getLogger(__name__)

PARTS_DIR = "_parts"
_TOKEN_COLUMNS = (S.GUIDE_TOKENS, S.SEMANTIC_TOKENS, S.CAPTION)  # what only SAMPLE rows need


@dataclass(frozen=True)
class TokenParts:
    """Writes a batch's SAMPLE rows to part files (one per shard) in the process that encoded them."""

    layout: CorpusLayout
    run_id: str

    def __call__(self, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The encoder's output columns -> the columns that go on: ERROR and END rows as they were
        (without the token columns), plus one PART row per part file written."""
        kinds, shards = columns[S.ROW_KIND], columns[S.SHARD]
        samples = kinds == S.SAMPLE
        folder = self.layout.folder()  # one store client per batch, not per part
        parts = [self._write(folder, columns, np.flatnonzero(samples & (shards == shard)), str(shard))
                 for shard in sorted({str(s) for s in shards[samples]})]
        kept = np.flatnonzero(~samples)
        out = {name: values[kept] for name, values in columns.items()
               if name not in _TOKEN_COLUMNS and name not in S.INFLIGHT_TENSORS}
        out[S.PART_FILE] = np.array([""] * len(kept), dtype=object)
        out[S.PART_ROWS] = np.zeros(len(kept), dtype=np.int64)
        return _append_parts(out, parts)

    def _write(self, folder: OutputFolder, columns: dict[str, np.ndarray], rows: np.ndarray,
               shard: str) -> tuple[str, str, int, str]:
        indices = np.asarray(columns[S.INDEX][rows], dtype=np.int64)
        digest = hashlib.sha1(np.sort(indices).tobytes()).hexdigest()[:12]
        name = f"{int(indices.min()):08d}-{int(indices.max()):08d}-{digest}.parquet"
        body = parquet_bytes(S.inflight_table({k: v[rows] for k, v in columns.items()}))
        path = folder.path(PARTS_DIR, self.run_id, shard, name)
        try:
            # A plain write, not a commit (no temporary name, no fsync): a part is read only after its
            # PART row, which is sent after the write returns; a retried batch rewrites the same name.
            if isinstance(folder.fs, LocalFileSystem):
                folder.fs.makedirs(folder.fs._parent(path), exist_ok=True)
            folder.fs.pipe_file(path, body)
        except STORE_ERRORS as err:  # the shard fails this run; the next run redoes it
            return shard, name, 0, f"writing token part {path} failed: {type(err).__name__}: {err}"
        return shard, name, len(rows), ""


def _append_parts(out: dict[str, np.ndarray], parts: list[tuple[str, str, int, str]]) -> dict[str, np.ndarray]:
    """`out` plus one PART row per (shard, file, rows, reason); its other columns empty."""
    if not parts:
        return out
    n = len(parts)
    values = {S.ROW_KIND: np.full(n, S.PART, dtype=np.int8), S.SHARD: np.array([p[0] for p in parts], dtype=object),
              S.PART_FILE: np.array([p[1] for p in parts], dtype=object),
              S.PART_ROWS: np.array([p[2] for p in parts], dtype=np.int64),
              S.REASON: np.array([p[3] for p in parts], dtype=object),
              S.STAGE: np.array([S.STAGE_STORAGE if p[3] else "" for p in parts], dtype=object)}
    merged = {}
    for name, column in out.items():
        extra = values.get(name)
        if extra is None:
            numeric = column.dtype.kind in "iu"
            extra = np.full(n, -1, dtype=column.dtype) if numeric else np.array([None] * n, dtype=object)
        merged[name] = np.concatenate([column, extra.astype(column.dtype, copy=False)])
    return merged


def check_lease(output: str, run_id: str, storage_options: dict[str, Any] | None) -> None:
    """Raise `LeaseLostError` unless `run_id` holds the output's lease now (a commit task's check
    before it writes; the driver renews the lease and checks again before each marker)."""
    try:
        holder = read_lease(output, storage_options or None)
    except STORE_ERRORS:
        return  # unreachable now: the driver's check before the marker decides
    if holder is None or holder.get("run_id") != run_id:
        who = f"run {holder.get('run_id')}" if holder else "nobody"
        raise LeaseLostError(f"the output {output} is no longer this run's: its lease is held by {who}")


def commit_parts(layout: CorpusLayout, shard: str, shard_uri: str, run_id: str, parts: list[str],
                 rows: dict[str, np.ndarray], leased: bool = True) -> dict[str, Any]:
    """Commit one shard from its part files and its ERROR and END `rows`, without its marker (checking
    first, when `leased`, that the run still holds the output's lease). Returns {"marker": ...} for the
    caller to write, {"failed": reason}, or {"lost": reason}."""
    guard = (lambda: check_lease(layout.output, run_id, layout.storage_options)) if leased else None
    writer = CorpusWriter(layout, {shard: shard_uri}, run_id, guard=guard, write_marker=False)
    folder = layout.folder()
    try:
        paths = [folder.path(PARTS_DIR, run_id, shard, name) for name in parts]
        bodies = read_objects(folder.fs, paths)
        for path in paths:
            writer.add(S.inflight_columns(pq.read_table(io.BytesIO(bodies[path]))))
        markers = writer.add(rows)
    except STORE_ERRORS as err:
        return {"failed": f"{S.STAGE_STORAGE}: reading token parts failed: {type(err).__name__}: {err}"}
    except LeaseLostError as err:
        return {"lost": str(err)}
    if shard in writer.failed:
        return {"failed": writer.failed[shard]}
    if not markers:
        missing = writer.pending[shard].miscount() if shard in writer.pending else None
        return {"failed": f"{S.STAGE_READ}: {missing or 'the parts do not account for the samples'}"}
    try:
        folder.fs.rm(folder.path(PARTS_DIR, run_id, shard), recursive=True)
    except STORE_ERRORS as err:  # leftovers are removed by the next run
        logger.warning("could not remove the token parts of %s: %s", shard, err)
    return {"marker": markers[0]}


class Tasks(Protocol):
    """Where commits run: Ray tasks (`pipeline.RayTasks`) or the driver's threads (`ThreadTasks`)."""

    def submit(self, fn: Callable[..., dict[str, Any]], *args: Any) -> Any: ...
    def ready(self, handles: list[Any], wait: bool) -> list[Any]: ...
    def result(self, handle: Any) -> dict[str, Any]: ...
    def close(self) -> None: ...


def task_failed(err: BaseException) -> dict[str, Any]:
    """The outcome of a commit whose task or thread died or raised: its shard fails, not the run."""
    first = (str(err).splitlines() or [""])[0][:300]
    return {"failed": f"{S.STAGE_STORAGE}: the commit task failed: {type(err).__name__}: {first}"}


class ThreadTasks:
    """Commits in threads of this process (the store calls release the GIL)."""

    def __init__(self, workers: int = 4) -> None:
        self.pool = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dualtok-commit")

    def submit(self, fn: Callable[..., dict[str, Any]], *args: Any) -> futures.Future:
        return self.pool.submit(fn, *args)

    def ready(self, handles: list[futures.Future], wait: bool) -> list[futures.Future]:
        if wait and handles:
            futures.wait(handles, return_when=futures.FIRST_COMPLETED)
        return [h for h in handles if h.done()]

    def result(self, handle: futures.Future) -> dict[str, Any]:
        try:
            return handle.result()
        except Exception as err:  # as a Ray task's error: the shard fails and the next run redoes it
            return task_failed(err)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class _ShardParts:
    parts: dict[str, int] = field(default_factory=dict)  # part file -> rows
    rows: list[dict[str, np.ndarray]] = field(default_factory=list)  # ERROR and END rows, as they came
    errors: set[int] = field(default_factory=set)
    expected: int | None = None
    retries: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def complete(self) -> bool:
        return self.expected is not None and sum(self.parts.values()) + len(self.errors) >= self.expected


class PartCommits:
    """The driver's side: which part files, ERROR rows and END row each shard has; commits a whole
    shard in a task and writes its marker after the lease check. The attributes a run's summary reads
    are `CorpusWriter`'s: done, failed, pending, storage_retries."""

    def __init__(self, layout: CorpusLayout, shard_uris: dict[str, str], run_id: str, tasks: Tasks,
                 guard: Callable[[], None] | None = None, max_inflight: int = 16) -> None:
        self.layout, self.shard_uris, self.run_id, self.tasks = layout, shard_uris, run_id, tasks
        self.guard, self.max_inflight = guard, max_inflight
        self.pending: dict[str, _ShardParts] = {}
        self.done: dict[str, dict[str, Any]] = {}
        self.failed: dict[str, str] = {}
        self.storage_retries: dict[str, int] = {}
        self.ready: list[str] = []  # whole shards waiting for a commit slot
        self.inflight: dict[Any, str] = {}  # task handle -> shard
        self.out = layout.folder()

    def add(self, batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        """Take one batch of ERROR, END and PART rows; returns the markers committed meanwhile."""
        shards = batch[S.SHARD]
        busy = set(self.failed) | set(self.done) | set(self.inflight.values()) | set(self.ready)
        for shard in sorted({str(s) for s in shards} - busy):
            self._take(shard, batch, np.flatnonzero(shards == shard))
        return self._collect(wait=False)

    def finish(self) -> list[dict[str, Any]]:
        """Wait for every commit started; returns their markers."""
        markers = []
        while self.inflight or self.ready:
            markers += self._collect(wait=True)
        return markers

    def _take(self, shard: str, batch: dict[str, np.ndarray], rows: np.ndarray) -> None:
        state = self.pending.setdefault(shard, _ShardParts())
        kinds = batch[S.ROW_KIND][rows]
        for i in rows[kinds == S.PART]:
            if batch[S.REASON][i]:
                return self._fail(shard, f"{S.STAGE_STORAGE}: {batch[S.REASON][i]}")
            state.parts[str(batch[S.PART_FILE][i])] = int(batch[S.PART_ROWS][i])
        others = rows[kinds != S.PART]
        if len(others):
            state.rows.append({name: values[others] for name, values in batch.items()})
        for i in rows[kinds == S.ERROR]:
            state.errors.add(int(batch[S.INDEX][i]))
        for i in rows[kinds == S.END]:
            state.retries = int(batch[S.SHARD_RETRIES][i])
            if batch[S.REASON][i]:
                return self._fail(shard, f"{batch[S.STAGE][i]}: {batch[S.REASON][i]}")
            state.expected = int(batch[S.SHARD_SAMPLES][i])
        if state.complete:
            self.ready.append(shard)

    def _collect(self, wait: bool) -> list[dict[str, Any]]:
        while self.ready and len(self.inflight) < self.max_inflight:
            self._start(self.ready.pop(0))
        markers = []
        for handle in self.tasks.ready(list(self.inflight), wait=wait and bool(self.inflight)):
            marker = self._finish(self.inflight.pop(handle), self.tasks.result(handle))
            if marker is not None:
                markers.append(marker)
        return markers

    def _start(self, shard: str) -> None:
        state = self.pending[shard]
        rows = {name: np.concatenate([r[name] for r in state.rows]) for name in state.rows[0]} if state.rows else {}
        handle = self.tasks.submit(commit_parts, self.layout, shard, self.shard_uris.get(shard, ""), self.run_id,
                                   sorted(state.parts), rows, self.guard is not None)
        self.inflight[handle] = shard

    def _finish(self, shard: str, outcome: dict[str, Any]) -> dict[str, Any] | None:
        state = self.pending.pop(shard)
        self.storage_retries[shard] = state.retries
        if "lost" in outcome:
            raise LeaseLostError(outcome["lost"])
        if "failed" in outcome:
            self._fail(shard, outcome["failed"])
            return None
        marker = outcome["marker"]
        if self.guard is not None:
            self.guard()
        try:
            write_marker(self.out, marker)
        except StorageFault as fault:  # the files stay without a marker: the next run rewrites them
            self._fail(shard, f"{S.STAGE_STORAGE}: commit failed: {fault}")
            return None
        self.done[shard] = marker
        return marker

    def _fail(self, shard: str, reason: str) -> None:
        state = self.pending.pop(shard, None)
        if state is not None:
            self.storage_retries[shard] = state.retries
        self.failed[shard] = reason
        logger.warning("shard %s failed this run, not committed (the next run redoes it): %s", shard, reason)

    def clear(self, all_runs: bool = False) -> None:
        """Remove this run's part files (all runs': at the start of a run, under its lease)."""
        path = self.out.path(PARTS_DIR) if all_runs else self.out.path(PARTS_DIR, self.run_id)
        try:
            if self.out.fs.exists(path):
                self.out.fs.rm(path, recursive=True)
        except STORE_ERRORS as err:
            logger.warning("could not remove the token parts under %s: %s", path, err)
