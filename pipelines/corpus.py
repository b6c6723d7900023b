"""The token corpus on storage: per-shard files committed whole, markers, and the manifest.

Layout under the output URI:
    data/<shard-id>.parquet        corpus rows of one input shard (schemas.corpus_schema)
    errors/<shard-id>.parquet      errors of that shard (schemas.ERRORS_SCHEMA)
    _committed/<shard-id>.json     written last: the shard is done (counts, bundle, files)
    manifest.json                  the latest run's resolved config, versions, totals
    runs/<run-id>.json             every run's manifest, kept
A shard without a marker is not done; a rerun rewrites its files under the same names, so the
corpus never holds a sample twice.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import schemas as S
from pipelines.storage import commit_bytes, filesystem, join

logger = logging.getLogger(__name__)

DATA_DIR, ERRORS_DIR, MARKERS_DIR, RUNS_DIR = "data", "errors", "_committed", "runs"
# Token columns are incompressible ids: dictionary encoding only adds bytes, zstd keeps them ~raw.
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
    started: float = field(default_factory=time.monotonic)

    @property
    def complete(self) -> bool:
        return self.expected is not None and len(self.samples) + len(self.errors) >= self.expected

    def add(self, batch: dict[str, np.ndarray], rows: np.ndarray, columns: list[str]) -> None:
        kinds = batch[S.ROW_KIND][rows]
        for i in rows[kinds == S.END]:
            self.expected = int(batch[S.SHARD_SAMPLES][i])
        sample_rows = rows[kinds == S.SAMPLE]
        if len(sample_rows):
            self.chunks.append({name: batch[name][sample_rows] for name in columns})
            for index in batch[S.INDEX][sample_rows].tolist():
                self.samples.add(index)
                self.errors.pop(index, None)  # a retried batch succeeded where an earlier try failed
        for i in rows[kinds == S.ERROR]:
            index = int(batch[S.INDEX][i])
            if index not in self.samples:
                self.errors[index] = _error_row(batch, i)

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
            elif f.name == S.CAPTION:
                arrays.append(pa.array([_text_or_none(v) for v in values], f.type))
            else:
                arrays.append(pa.array(values.tolist() if values.dtype == object else values, f.type))
        return pa.Table.from_arrays(arrays, schema=schema)


@dataclass(frozen=True)
class CorpusLayout:
    """Where a corpus's files live; token widths and metadata fix its schema."""

    output: str
    guide_len: int | None
    semantic_len: int | None
    metadata: dict[str, Any]
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False)

    def path(self, *parts: str) -> str:
        return join(self.output, *parts)

    def committed(self) -> dict[str, dict[str, Any]]:
        """Markers of the shards already done: shard id -> marker."""
        fs, root = filesystem(self.path(MARKERS_DIR), self.storage_options or None)
        if not fs.exists(root):
            return {}
        markers = {}
        for path in fs.find(root):
            if path.endswith(".json"):
                marker = json.loads(fs.cat_file(path))
                markers[marker["shard"]] = marker
        return markers


class CorpusWriter:
    """Collects the rows of each shard as they stream in and commits a shard once it is whole."""

    def __init__(self, layout: CorpusLayout, shard_uris: dict[str, str], run_id: str) -> None:
        self.layout = layout
        self.shard_uris = shard_uris
        self.run_id = run_id
        self.pending: dict[str, _PendingShard] = {}
        self.done: dict[str, dict[str, Any]] = {}
        self.fs, _ = filesystem(layout.output, layout.storage_options or None)
        self.schema = S.corpus_schema(layout.guide_len, layout.semantic_len, layout.metadata)

    def add(self, batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        """Take one batch of rows; returns the markers of shards this batch completed."""
        shards = batch[S.SHARD]
        touched = sorted({str(s) for s in shards})
        for shard in touched:
            rows = np.flatnonzero(shards == shard)
            self.pending.setdefault(shard, _PendingShard()).add(batch, rows, self.schema.names)
        return [self.commit(shard) for shard in touched if self.pending[shard].complete]

    def commit(self, shard: str) -> dict[str, Any]:
        """Write data, then errors, then the marker: the marker's presence means all are whole."""
        pending = self.pending.pop(shard)
        table = pending.table(self.schema)
        errors = [pending.errors[i] for i in sorted(pending.errors)]
        data = _parquet_bytes(table, _DICTIONARY_COLUMNS, _TOKEN_ENCODING)
        err = _parquet_bytes(pa.Table.from_pylist(errors, schema=S.ERRORS_SCHEMA), True, None)
        data_path = self.layout.path(DATA_DIR, f"{shard}.parquet")
        errors_path = self.layout.path(ERRORS_DIR, f"{shard}.parquet")
        commit_bytes(self.fs, _fs_path(self.fs, data_path), data)
        commit_bytes(self.fs, _fs_path(self.fs, errors_path), err)
        marker = {
            "shard": shard, "shard_uri": self.shard_uris.get(shard, ""), "samples": pending.expected,
            "rows": table.num_rows, "errors": len(errors),
            "errors_by_reason": _reasons(errors), "run_id": self.run_id,
            "bundle_fingerprint": self.layout.metadata.get("bundle_fingerprint"),
            "data_file": f"{DATA_DIR}/{shard}.parquet", "data_bytes": len(data),
            "errors_file": f"{ERRORS_DIR}/{shard}.parquet", "seconds": round(time.monotonic() - pending.started, 3),
            "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        marker_path = self.layout.path(MARKERS_DIR, f"{shard}.json")
        commit_bytes(self.fs, _fs_path(self.fs, marker_path), json.dumps(marker, indent=1).encode())
        self.done[shard] = marker
        return marker


def _fs_path(fs: Any, uri: str) -> str:
    return fs._strip_protocol(uri)


def _text_or_none(value: Any) -> str | None:
    """Ray turns an all-null string column into floats (NaN); a caption is a str or nothing."""
    return value if isinstance(value, str) else None


def _error_row(batch: dict[str, np.ndarray], i: int) -> dict[str, Any]:
    return {S.KEY: _text_or_none(batch[S.KEY][i]), S.SHARD: str(batch[S.SHARD][i]),
            S.INDEX: int(batch[S.INDEX][i]), S.STAGE: str(batch[S.STAGE][i]), S.REASON: str(batch[S.REASON][i])}


def _reasons(errors: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in errors:
        label = f"{row[S.STAGE]}: {row[S.REASON].split(':')[0]}"
        counts[label] = counts.get(label, 0) + 1
    return counts


def _parquet_bytes(table: pa.Table, use_dictionary: bool | list[str], encoding: dict[str, str] | None) -> bytes:
    buffer = io.BytesIO()
    encoding = {k: v for k, v in (encoding or {}).items() if k.split(".")[0] in table.column_names}
    pq.write_table(table, buffer, compression="zstd", use_dictionary=use_dictionary, write_statistics=[S.INDEX],
                   column_encoding=encoding or None)
    return buffer.getvalue()
