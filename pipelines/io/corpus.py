"""The token corpus on storage: per-shard files committed whole, markers, and the manifest.

Layout under the output URI:
    data/<shard-id>.parquet        corpus rows of one input shard (schemas.corpus_schema)
    errors/<shard-id>.parquet      errors of that shard (schemas.errors_schema)
    _committed/<shard-id>.json     written last: the shard is done (counts, bundle, passthrough columns,
                                   files, and the size and version of the input read: a changed input
                                   is redone)
    _committed_index.json.gz       the markers compacted at the end of each run (a cache: a run reads only
                                   the markers whose listed version differs from it)
    manifest.json                  the latest run's resolved config, versions, totals (not per shard)
    runs/<run-id>.json             every run's manifest, kept
A shard without a marker is not done; a rerun rewrites its files under the same names, so the
corpus never holds a sample twice.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from dualtok.pipelines.io.outputs import OutputFolder, count_reasons, parquet_bytes, reason_label
from dualtok.pipelines.io import schemas as S
from dualtok.pipelines.io.storage import StorageFault, join

logger = logging.getLogger(__name__)

DATA_DIR, ERRORS_DIR, MARKERS_DIR, RUNS_DIR = "data", "errors", "_committed", "runs"
MARKER_INDEX = "_committed_index.json.gz"
# Token columns are incompressible ids: dictionary encoding only adds bytes, zstd keeps them ~raw.
# Passthrough columns (licences repeat) are dictionary-encoded too; pyarrow falls back where it does not pay.
_DICTIONARY_COLUMNS = [S.KEY, S.SHARD, S.CAPTION]
# Parquet stores uint16 as INT32: PLAIN + zstd leaves uniform ids ~8.5 % over the raw uint16 payload;
# delta bit-packing brings them to ~0.86x (docs/benchmarks.md), and every reader still reads them.
_TOKEN_ENCODING = {f"{S.GUIDE_TOKENS}.list.element": "DELTA_BINARY_PACKED",
                   f"{S.SEMANTIC_TOKENS}.list.element": "DELTA_BINARY_PACKED"}


@dataclass
class _PendingShard:
    """One shard's rows so far: SAMPLE rows as the column slices they arrived in (no per-row
    objects: the driver handles every row of the corpus), ERROR rows (rare) one by one."""

    chunks: list[dict[str, np.ndarray]] = field(default_factory=list)
    samples: set[int] = field(default_factory=set)  # indices of SAMPLE rows received
    errors: dict[int, dict[str, Any]] = field(default_factory=dict)
    expected: int | None = None
    source: dict[str, Any] = field(default_factory=dict)  # what the END row says of the object read
    failed: str | None = None  # why the shard failed this run: it is not committed
    started: float = field(default_factory=time.monotonic)

    @property
    def complete(self) -> bool:
        return self.expected is not None and len(self.samples) + len(self.errors) >= self.expected

    def add(self, batch: dict[str, np.ndarray], rows: np.ndarray, columns: dict[str, str],
            passthrough: tuple[str, ...]) -> None:
        """Take a batch's rows of this shard; `columns`: corpus column -> the in-flight column holding it."""
        kinds = batch[S.ROW_KIND][rows]
        for i in rows[kinds == S.END]:
            self._end(batch, int(i))
        if self.failed:
            return
        sample_rows = rows[kinds == S.SAMPLE]
        if len(sample_rows):
            self.chunks.append({name: batch[source][sample_rows] for name, source in columns.items()})
            for index in batch[S.INDEX][sample_rows].tolist():
                self.samples.add(index)
                self.errors.pop(index, None)  # a retried batch succeeded where an earlier try failed
        for i in rows[kinds == S.ERROR]:
            index = int(batch[S.INDEX][i])
            if index not in self.samples:
                self.errors[index] = _error_row(batch, i, passthrough)

    def _end(self, batch: dict[str, np.ndarray], i: int) -> None:
        """An END row: the shard's sample count and the object it was read from, or why it failed."""
        self.source["storage_retries"] = int(batch[S.SHARD_RETRIES][i])
        if batch[S.REASON][i]:
            self.failed = f"{batch[S.STAGE][i]}: {batch[S.REASON][i]}"
            return
        self.expected = int(batch[S.SHARD_SAMPLES][i])
        self.source.update(shard_bytes=int(batch[S.SHARD_BYTES][i]), shard_version=str(batch[S.SHARD_VERSION][i]))

    def miscount(self) -> str | None:
        """Why the rows do not add up to the tar's samples (each index 0..samples-1 once), or None."""
        accounted = self.samples | self.errors.keys()
        if len(self.samples) + len(self.errors) == self.expected and accounted == set(range(self.expected or 0)):
            return None
        return (f"rows + errors ({len(self.samples)} + {len(self.errors)}) do not account for the "
                f"{self.expected} samples in the tar one each")

    def table(self, schema: pa.Schema) -> pa.Table:
        """SAMPLE rows in index order, each index once (a batch re-delivered after a retried task
        carries the same rows again)."""
        if not self.chunks:
            return schema.empty_table()
        merged = {name: np.concatenate([c[name] for c in self.chunks]) for name in self.chunks[0]}
        _, first = np.unique(merged[S.INDEX], return_index=True)  # sorted by index, first delivery
        arrays = []
        for f in schema:
            values = merged[f.name][first]
            if pa.types.is_fixed_size_list(f.type):
                flat = pa.array(np.ascontiguousarray(values, dtype=np.uint16).reshape(-1), pa.uint16())
                arrays.append(pa.FixedSizeListArray.from_arrays(flat, f.type.list_size))
            elif f.type == pa.string() and f.nullable:  # the caption and the passthrough columns
                arrays.append(pa.array([_text_or_none(v) for v in values], f.type))
            else:
                arrays.append(pa.array(values.tolist() if values.dtype == object else values, f.type))
        return pa.Table.from_arrays(arrays, schema=schema)


@dataclass(frozen=True)
class CorpusLayout:
    """Where a corpus's files live; token widths, passthrough columns and metadata fix its schema."""

    output: str
    guide_len: int | None
    semantic_len: int | None
    metadata: dict[str, Any]
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False)
    passthrough: tuple[str, ...] = ()  # source fields copied into every row, in this order

    def path(self, *parts: str) -> str:
        return join(self.output, *parts)

    def folder(self) -> OutputFolder:
        return OutputFolder(self.output, self.storage_options)

    def committed(self) -> dict[str, dict[str, Any]]:
        """Markers of the shards already done: shard id -> marker (one listing; see `OutputFolder.markers`)."""
        return self.committed_listed()[1]

    def committed_listed(self) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
        """(shard id -> the marker's listed version, shard id -> marker)."""
        versions, markers = self.folder().markers_listed(MARKERS_DIR, MARKER_INDEX)
        by_shard = {rel: marker["shard"] for rel, marker in markers.items()}
        return ({by_shard[rel]: v for rel, v in versions.items() if rel in by_shard},
                {marker["shard"]: marker for marker in markers.values()})

    def compact_markers(self, versions: dict[str, str], committed: dict[str, dict[str, Any]],
                        written: dict[str, dict[str, Any]], failed: set[str]) -> int:
        """Rewrite the marker index with every marker a run knows: those it read at its start
        (`versions`, `committed`) and those it `written`, so that the next start-up reads none of them.
        The versions of its own markers come from one more listing when it wrote any (~1 request per
        1,000 markers; the run holds the output's lease, so nobody else wrote markers since). Shards
        that `failed` this run are left out: the next run reads their markers, if any, from the store.
        An entry is only ever used where the store still lists that version, so a version that
        does not match (a marker missing from the listing) costs a read, never a wrong marker."""
        if written:
            listed = self.folder().listed_versions(MARKERS_DIR)
            versions = {**versions, **{sid: listed[f"{sid}.json"] for sid in written if f"{sid}.json" in listed}}
        markers = {**committed, **written}
        keep = {f"{sid}.json": v for sid, v in versions.items() if sid not in failed and sid in markers}
        return self.folder().write_marker_index(MARKERS_DIR, MARKER_INDEX, keep,
                                                {f"{sid}.json": m for sid, m in markers.items()})


class CorpusWriter:
    """Collects the rows of each shard as they stream in and commits a shard once it is whole.

    A shard FAILS for this run (never committed; the next run redoes it) when its END row says so
    (a storage fault, a tar that cannot be read to its end), when its rows do not add up to its
    samples, or when the store refuses its commit. `failed` holds why; the run goes on with the others.
    """

    def __init__(self, layout: CorpusLayout, shard_uris: dict[str, str], run_id: str,
                 guard: Callable[[], None] | None = None, write_marker: bool = True) -> None:
        self.layout = layout
        self.write_marker = write_marker  # False: a commit task writes the files, its caller the marker
        self.guard = guard  # called before each commit; raises to stop the run (a lost output lease)
        self.shard_uris = shard_uris
        self.run_id = run_id
        self.pending: dict[str, _PendingShard] = {}
        self.done: dict[str, dict[str, Any]] = {}
        self.failed: dict[str, str] = {}
        self.storage_retries: dict[str, int] = {}  # per shard: store retries its read took (END rows)
        self.out = layout.folder()
        self.schema = S.corpus_schema(layout.guide_len, layout.semantic_len, layout.metadata, layout.passthrough)
        self.errors_schema = S.errors_schema(layout.passthrough)
        # corpus column -> the in-flight column that carries it
        self.columns = {name: S.passthrough_column(name) if name in layout.passthrough else name
                        for name in self.schema.names}

    def add(self, batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        """Take one batch of rows; returns the markers of shards this batch completed."""
        shards = batch[S.SHARD]
        # rows of a shard already failed or committed this run (a re-delivered batch) change nothing
        touched = sorted({str(s) for s in shards} - self.failed.keys() - self.done.keys())
        for shard in touched:
            rows = np.flatnonzero(shards == shard)
            pending = self.pending.setdefault(shard, _PendingShard())
            pending.add(batch, rows, self.columns, self.layout.passthrough)
            if pending.failed:
                self._fail(shard, pending.failed)
        ready = [shard for shard in touched if shard in self.pending and self.pending[shard].complete]
        return [marker for marker in map(self.commit, ready) if marker is not None]

    def commit(self, shard: str) -> dict[str, Any] | None:
        """Write data, then errors, then the marker: the marker's presence means all are whole.
        Returns the marker, or None when the shard failed instead (see `failed`)."""
        pending = self.pending[shard]
        miscount = pending.miscount()
        if miscount:
            self._fail(shard, f"{S.STAGE_READ}: {miscount}")
            return None
        table = pending.table(self.schema)
        errors = [pending.errors[i] for i in sorted(pending.errors)]
        data = _parquet_bytes(table, [*_DICTIONARY_COLUMNS, *self.layout.passthrough], _TOKEN_ENCODING)
        err = _parquet_bytes(pa.Table.from_pylist(errors, schema=self.errors_schema), True, None)
        marker = self._marker(shard, pending, table.num_rows, errors, len(data))
        if marker["rows"] + marker["errors"] != marker["samples"]:  # `miscount` makes this hold
            raise RuntimeError(f"shard {shard}: the marker would not add up: {marker}")
        if self.guard is not None:
            self.guard()
        try:
            self._write(shard, data, err, marker)
        except StorageFault as fault:
            # its files may stay without a marker: the next run rewrites them under the same names
            self._fail(shard, f"{S.STAGE_STORAGE}: commit failed: {fault}")
            return None
        del self.pending[shard]
        self.storage_retries[shard] = pending.source.get("storage_retries", 0)
        self.done[shard] = marker
        return marker

    def _write(self, shard: str, data: bytes, errors: bytes, marker: dict[str, Any]) -> None:
        for directory, body in ((DATA_DIR, data), (ERRORS_DIR, errors)):
            self.out.write(body, directory, f"{shard}.parquet")
        if self.write_marker:
            write_marker(self.out, marker)  # last: the commit

    def _marker(self, shard: str, pending: _PendingShard, rows: int, errors: list[dict[str, Any]],
                data_bytes: int) -> dict[str, Any]:
        """The commit marker. `shard_bytes`/`shard_version` pin the input object read: a later run
        that lists a different size or version redoes the shard."""
        return {
            "shard": shard, "shard_uri": self.shard_uris.get(shard, ""), "samples": pending.expected,
            "rows": rows, "errors": len(errors),
            "errors_by_reason": _reasons(errors), "run_id": self.run_id,
            "bundle_fingerprint": self.layout.metadata.get("bundle_fingerprint"),
            "dtype": self.layout.metadata.get("dtype"),  # what the encoders computed in
            "passthrough": list(self.layout.passthrough),
            "shard_bytes": pending.source["shard_bytes"], "shard_version": pending.source["shard_version"],
            "storage_retries": pending.source.get("storage_retries", 0),
            "data_file": f"{DATA_DIR}/{shard}.parquet", "data_bytes": data_bytes,
            "errors_file": f"{ERRORS_DIR}/{shard}.parquet", "seconds": round(time.monotonic() - pending.started, 3),
            "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def _fail(self, shard: str, reason: str) -> None:
        pending = self.pending.pop(shard, None)
        if pending is not None:
            self.storage_retries[shard] = pending.source.get("storage_retries", 0)
        self.failed[shard] = reason
        logger.warning("shard %s failed this run, not committed (the next run redoes it): %s", shard, reason)


def write_marker(out: OutputFolder, marker: dict[str, Any]) -> None:
    out.write(json.dumps(marker, indent=1).encode(), MARKERS_DIR, f"{marker['shard']}.json")


def _text_or_none(value: Any) -> str | None:
    """Ray turns an all-null string column into floats (NaN); a caption is a str or nothing."""
    return value if isinstance(value, str) else None


def _error_row(batch: dict[str, np.ndarray], i: int, passthrough: tuple[str, ...]) -> dict[str, Any]:
    return {S.KEY: _text_or_none(batch[S.KEY][i]), S.SHARD: str(batch[S.SHARD][i]),
            S.INDEX: int(batch[S.INDEX][i]), S.STAGE: str(batch[S.STAGE][i]), S.REASON: str(batch[S.REASON][i]),
            **{name: _text_or_none(batch[S.passthrough_column(name)][i]) for name in passthrough}}


def _reasons(errors: list[dict[str, Any]]) -> dict[str, int]:
    return count_reasons(reason_label(row[S.STAGE], row[S.REASON]) for row in errors)


def _parquet_bytes(table: pa.Table, use_dictionary: bool | list[str], encoding: dict[str, str] | None) -> bytes:
    encoding = {k: v for k, v in (encoding or {}).items() if k.split(".")[0] in table.column_names}
    return parquet_bytes(table, use_dictionary=use_dictionary, write_statistics=[S.INDEX],
                         column_encoding=encoding or None)
