"""Corpus statistics without reconstruction: what LLM data teams check before pretraining.

One streaming pass with pyarrow over the committed corpus files (record batches, so memory is
bounded by the batch, the codebooks and `HashCounts`' buffer, whatever the corpus size):
rows, samples and errors (by stage and by reason), caption coverage and image sizes, and per
token stream: the code histogram, codebook usage, perplexity (exp of the code entropy), dead
codes, and duplicate token sequences (also for both streams joined). Duplicates are found by a
64-bit hash of each sequence, counted exactly by `HashCounts`: past a buffer of 16 M hashes (128 MB)
the hashes spill to local temp files partitioned by their top 8 bits, and each partition is counted
alone, so the driver holds ~1/256 of them at once (1B rows x 3 streams: ~24 GB on local disk, ~100 MB
in memory). The only error is the hash's: two different sequences share a 64-bit hash with
probability ~n^2/2^65 (1B rows: ~3 % chance of one false duplicate in the whole corpus). The keys of
the most repeated sequences come from a second pass.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dualtok.pipelines.io import schemas as S
from dualtok.pipelines.audit.sample import committed_markers, corpus_metadata, splitmix64
from dualtok.pipelines.io.storage import filesystem, join

logger = logging.getLogger(__name__)

STREAMS = {"guide": (S.GUIDE_TOKENS, "guide_vocab"), "semantic": (S.SEMANTIC_TOKENS, "semantic_vocab")}
JOINT = "guide+semantic"
_BATCH_ROWS = 65536
_EXAMPLE_KEYS = 5
_MAX_BUFFERED_HASHES = 1 << 24  # 128 MB of hashes per stream before they spill to disk
_PARTITION_BITS = 8


def sequence_hashes(tokens: np.ndarray) -> np.ndarray:
    """(N, L) integer tokens -> (N,) uint64 hash of each row's whole sequence."""
    h = np.full(tokens.shape[0], tokens.shape[1], dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(tokens.shape[1]):
            h = splitmix64(h ^ tokens[:, j].astype(np.uint64))
    return h


def combine_hashes(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return splitmix64(a ^ splitmix64(b))


class HashCounts:
    """Exact counts of 64-bit hashes in bounded memory: hashes are buffered, and past `max_buffered`
    written to temp files partitioned by their top `_PARTITION_BITS` bits (a hash's copies all land in
    one partition), so counting reads one partition at a time."""

    def __init__(self, max_buffered: int = _MAX_BUFFERED_HASHES) -> None:
        self.max_buffered = max_buffered
        self.total = 0
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._dir: Path | None = None

    def add(self, hashes: np.ndarray) -> None:
        self._buffer.append(np.asarray(hashes, dtype=np.uint64))
        self._buffered += len(hashes)
        self.total += len(hashes)
        if self._buffered > self.max_buffered:
            self._spill()

    @property
    def spilled(self) -> bool:
        return self._dir is not None

    def _spill(self) -> None:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="dualtok-hashes-"))
        hashes = np.concatenate(self._buffer)
        part = hashes >> np.uint64(64 - _PARTITION_BITS)
        order = np.argsort(part, kind="stable")
        bounds = np.searchsorted(part[order], np.arange((1 << _PARTITION_BITS) + 1))
        for p in np.flatnonzero(np.diff(bounds)):
            with open(self._dir / f"{p:03d}.u64", "ab") as handle:
                hashes[order[bounds[p]:bounds[p + 1]]].tofile(handle)
        self._buffer, self._buffered = [], 0

    def partitions(self) -> Iterator[np.ndarray]:
        """Each partition's hashes (all of them in one array when nothing was spilled)."""
        if self._dir is None:
            yield np.concatenate(self._buffer) if self._buffer else np.zeros(0, np.uint64)
            return
        if self._buffer:
            self._spill()
        for path in sorted(self._dir.iterdir()):
            yield np.fromfile(path, dtype=np.uint64)

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


@dataclass
class StreamCounter:
    """Code counts and sequence hashes of one token stream (or of the joined streams)."""

    vocab: int
    counts: np.ndarray = field(init=False)
    hashes: HashCounts = field(default_factory=HashCounts)

    def __post_init__(self) -> None:
        self.counts = np.zeros(self.vocab, dtype=np.int64)

    def add(self, tokens: np.ndarray | None, hashes: np.ndarray) -> None:
        if tokens is not None:
            self.counts += np.bincount(tokens.reshape(-1), minlength=self.vocab)[: self.vocab]
        self.hashes.add(hashes)

    def result(self, with_codes: bool, top_duplicates: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if with_codes:
            out.update(codebook_stats(self.counts))
        unique_total = groups = 0
        top_h, top_c = np.zeros(0, np.uint64), np.zeros(0, np.int64)
        try:
            for hashes in self.hashes.partitions():
                unique, counts = np.unique(hashes, return_counts=True)
                repeated = counts > 1
                unique_total += int(unique.size)
                groups += int(repeated.sum())
                top_h = np.concatenate([top_h, unique[repeated]])
                top_c = np.concatenate([top_c, counts[repeated]])
                keep = np.lexsort((top_h, -top_c))[:top_duplicates]  # most repeated first, ties by hash
                top_h, top_c = top_h[keep], top_c[keep]
        finally:
            self.hashes.close()
        out["sequences"] = int(self.hashes.total)
        out["unique_sequences"] = unique_total
        out["duplicate_rows"] = int(self.hashes.total - unique_total)  # rows that repeat an earlier row
        out["duplicate_groups"] = groups
        out["_top_hashes"] = [(int(h), int(c)) for h, c in zip(top_h, top_c)]
        return out


def corpus_fingerprint(markers: dict[str, dict[str, Any]]) -> str:
    """16 hex digits naming the committed corpus: its shards, their rows and errors, the input objects
    they were read from and the bundle. Any shard committed, redone or changed changes it, so a report
    or a training run can say which corpus it saw."""
    fields = ("rows", "errors", "samples", "shard_version", "shard_bytes", "bundle_fingerprint", "data_bytes")
    identity = [[sid, *(markers[sid].get(k) for k in fields)] for sid in sorted(markers)]
    return hashlib.sha256(json.dumps(identity, default=str).encode()).hexdigest()[:16]


def codebook_stats(counts: np.ndarray) -> dict[str, Any]:
    """Usage, perplexity and dead codes of one codebook from its code counts."""
    total = int(counts.sum())
    used = int((counts > 0).sum())
    p = counts[counts > 0] / max(total, 1)
    entropy = float(-(p * np.log(p)).sum()) if total else 0.0
    top = np.argsort(-counts, kind="stable")[:20]
    return {
        "vocab": int(counts.size), "tokens": total, "codes_used": used, "usage": used / counts.size,
        "perplexity": float(np.exp(entropy)), "entropy_bits": entropy / np.log(2),
        "dead_codes": int(counts.size - used), "histogram": counts.tolist(),
        "top_codes": [{"code": int(c), "count": int(counts[c])} for c in top if counts[c] > 0],
    }


def _batches(corpus: str, markers: dict[str, dict[str, Any]], columns: list[str],
             storage_options: dict[str, Any] | None) -> Iterator[pa.RecordBatch]:
    for shard in sorted(markers):
        if not markers[shard]["rows"]:
            continue
        fs, path = filesystem(join(corpus, markers[shard]["data_file"]), storage_options)
        with fs.open(path, "rb") as handle:
            yield from pq.ParquetFile(handle).iter_batches(batch_size=_BATCH_ROWS, columns=columns)


def _token_array(batch: pa.RecordBatch, column: str) -> np.ndarray:
    values = batch.column(column)
    return values.flatten().to_numpy(zero_copy_only=False).reshape(len(values), -1)


def _errors(corpus: str, markers: dict[str, dict[str, Any]], storage_options: dict[str, Any] | None) -> dict[str, Any]:
    by_stage: dict[str, int] = {}
    by_reason: dict[str, int] = {}
    total = 0
    for shard in sorted(markers):
        if not markers[shard]["errors"]:
            continue
        fs, path = filesystem(join(corpus, markers[shard]["errors_file"]), storage_options)
        with fs.open(path, "rb") as handle:
            table = pq.read_table(handle, columns=[S.STAGE, S.REASON])
        total += table.num_rows
        # the label the commit markers use: "<stage>: <reason up to its first colon>"
        heads = pc.list_element(pc.split_pattern(table[S.REASON], ":", max_splits=1), 0)
        labels = pc.binary_join_element_wise(table[S.STAGE], heads, ": ")
        for name, groups in ((S.STAGE, table[S.STAGE]), ("reason", labels)):
            target = by_stage if name == S.STAGE else by_reason
            for entry in pc.value_counts(groups).to_pylist():
                target[entry["values"]] = target.get(entry["values"], 0) + entry["counts"]
    return {"errors": total, "by_stage": dict(sorted(by_stage.items())),
            "by_reason": dict(sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0])))}


def corpus_statistics(corpus: str, storage_options: dict[str, Any] | None = None,
                      top_duplicates: int = 10) -> dict[str, Any]:
    """Every number `dualtok stats` reports, as plain data (the stats.json document)."""
    markers = committed_markers(corpus, storage_options)
    meta = corpus_metadata(corpus, markers, storage_options, required=False)  # no rows: no token streams
    present = {name: (column, int(meta[vocab])) for name, (column, vocab) in STREAMS.items() if vocab in meta}
    counters = {name: StreamCounter(vocab) for name, (_, vocab) in present.items()}
    if len(present) == 2:
        counters[JOINT] = StreamCounter(0)
    columns = [S.CAPTION, S.WIDTH, S.HEIGHT] + [column for column, _ in present.values()]
    rows = captioned = 0
    sizes = {"width": [np.inf, 0, 0], "height": [np.inf, 0, 0]}  # min, max, sum
    for batch in _batches(corpus, markers, columns, storage_options):
        rows += batch.num_rows
        captioned += batch.num_rows - batch.column(S.CAPTION).null_count
        for name, column in (("width", S.WIDTH), ("height", S.HEIGHT)):
            values = batch.column(column).to_numpy()
            sizes[name] = [min(sizes[name][0], values.min()), max(sizes[name][1], values.max()),
                           sizes[name][2] + int(values.sum())]
        _hash_batch(batch, present, counters)
    streams = {name: counter.result(name != JOINT, top_duplicates) for name, counter in counters.items()}
    if any(s["_top_hashes"] for s in streams.values()):
        _attach_duplicate_keys(corpus, markers, present, streams, storage_options)
    for entry in streams.values():
        entry.pop("_top_hashes")
        entry.setdefault("top_duplicates", [])
    samples = sum(int(m["samples"]) for m in markers.values())
    return {
        "kind": "corpus-stats", "corpus": corpus, "corpus_fingerprint": corpus_fingerprint(markers),
        "bundle_fingerprint": meta.get("bundle_fingerprint"),
        "preset": meta.get("preset"), "untrained_parts": meta.get("untrained_parts", []),
        "shards": len(markers), "samples": samples, "rows": rows, **_errors(corpus, markers, storage_options),
        "caption_coverage": captioned / rows if rows else None,
        "image_sizes": {k: {"min": int(v[0]) if rows else None, "max": int(v[1]), "mean": v[2] / rows if rows else None}
                        for k, v in sizes.items()},
        "streams": streams,
        "per_shard": {sid: {k: m[k] for k in ("samples", "rows", "errors")} for sid, m in sorted(markers.items())},
    }


def _hash_batch(batch: pa.RecordBatch, present: dict[str, tuple[str, int]],
                counters: dict[str, StreamCounter] | None) -> dict[str, np.ndarray]:
    """Sequence hashes of one record batch per stream (and joined); counted into `counters` if given."""
    hashes = {}
    for name, (column, _) in present.items():
        tokens = _token_array(batch, column)  # (N, L) uint16
        hashes[name] = sequence_hashes(tokens)
        if counters is not None:
            counters[name].add(tokens, hashes[name])
    if len(present) == 2:
        hashes[JOINT] = combine_hashes(hashes["guide"], hashes["semantic"])
        if counters is not None:
            counters[JOINT].add(None, hashes[JOINT])
    return hashes


def _attach_duplicate_keys(corpus: str, markers: dict[str, dict[str, Any]], present: dict[str, tuple[str, int]],
                           streams: dict[str, dict[str, Any]], storage_options: dict[str, Any] | None) -> None:
    """Second pass: example keys of the most repeated sequences of each stream."""
    wanted = {name: {h: [] for h, _ in s["_top_hashes"]} for name, s in streams.items()}
    columns = [S.KEY, S.SHARD] + [column for column, _ in present.values()]
    for batch in _batches(corpus, markers, columns, storage_options):
        keys, shards = batch.column(S.KEY).to_pylist(), batch.column(S.SHARD).to_pylist()
        for name, hashes in _hash_batch(batch, present, None).items():
            found = wanted[name]
            for i in np.flatnonzero(np.isin(hashes, np.fromiter(found, dtype=np.uint64, count=len(found)))):
                examples = found[int(hashes[i])]
                if len(examples) < _EXAMPLE_KEYS:
                    examples.append(f"{shards[i]}/{keys[i]}")
    for name, entry in streams.items():
        entry["top_duplicates"] = [{"count": count, "examples": wanted[name][h]} for h, count in entry["_top_hashes"]]
