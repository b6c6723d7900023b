"""Which corpus rows an audit looks at: a seeded sample, read streaming from the corpus files.

Each committed corpus row gets a 64-bit hash of (seed, shard, index_in_shard). A fraction keeps
the rows whose hash falls below `fraction * 2**64`; a size keeps the `size` smallest hashes
(bottom-k). Either way the sample depends only on the seed and on which rows exist, never on file
order, worker count or timing, and memory is bounded by the sample, not by the corpus. The
sample is then cut into fixed slices (the audit's unit of work) in (shard, index) order.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dualtok_core.errors import DualtokError
from dualtok.pipelines.io import schemas as S
from dualtok.pipelines.io.corpus import CorpusLayout
from dualtok.pipelines.io.storage import filesystem, join

logger = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1


class CorpusReadError(DualtokError):
    """A corpus URI without committed shards, or whose files disagree with its markers."""


@dataclass(frozen=True)
class SampleSpec:
    """How many rows to audit: exactly one of `size` and `fraction`, and the seed."""

    size: int | None = None
    fraction: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.size is None) == (self.fraction is None):
            raise ValueError("give exactly one of sample_size and sample_fraction")
        if self.size is not None and self.size < 1:
            raise ValueError(f"sample_size must be >= 1, got {self.size}")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"sample_fraction must lie in (0, 1], got {self.fraction}")


def committed_markers(corpus: str, storage_options: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """shard id -> commit marker of every shard the corpus holds (uncommitted files are ignored)."""
    layout = CorpusLayout(corpus, None, None, {}, storage_options or {})
    markers = layout.committed()
    if not markers:
        raise CorpusReadError(f"{corpus} holds no committed shards (no _committed/*.json): is it a dualtok corpus?")
    return markers


def corpus_metadata(corpus: str, markers: dict[str, dict[str, Any]], storage_options: dict[str, Any] | None,
                    required: bool = True) -> dict[str, Any]:
    """The dualtok metadata of the corpus's first non-empty data file (bundle, grid, vocab sizes);
    {} for a corpus without a single row unless `required`."""
    for shard in sorted(markers):
        if markers[shard]["rows"]:
            fs, path = filesystem(join(corpus, markers[shard]["data_file"]), storage_options)
            with fs.open(path, "rb") as handle:
                return S.read_metadata(pq.read_schema(handle))
    if not required:
        return {}
    raise CorpusReadError(f"{corpus}: every committed shard is empty; there is nothing to audit")


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A strong 64-bit mix (Steele et al.), vectorised; uint64 arithmetic wraps as intended."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def row_hashes(shard: str, indices: np.ndarray, seed: int) -> np.ndarray:
    """(N,) uint64 hash per row of one shard: independent of anything but (seed, shard, index)."""
    digest = hashlib.blake2b(f"{seed}|{shard}".encode(), digest_size=8).digest()
    base = np.uint64(int.from_bytes(digest, "little"))
    with np.errstate(over="ignore"):
        return splitmix64(base ^ splitmix64(indices.astype(np.uint64)))


def _read_columns(corpus: str, marker: dict[str, Any], columns: list[str] | None,
                  storage_options: dict[str, Any] | None) -> pa.Table:
    fs, path = filesystem(join(corpus, marker["data_file"]), storage_options)
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle, columns=columns)


def select_rows(corpus: str, markers: dict[str, dict[str, Any]], spec: SampleSpec,
                storage_options: dict[str, Any] | None) -> dict[str, np.ndarray]:
    """Pass 1 over (shard, index) only: shard id -> sorted indices of the sampled rows."""
    threshold = None if spec.fraction is None else min(int(spec.fraction * 2**64), _MASK64)
    kept_hash, kept_shard, kept_index = np.zeros(0, np.uint64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    shards = sorted(s for s in markers if markers[s]["rows"])
    for position, shard in enumerate(shards):
        indices = _read_columns(corpus, markers[shard], [S.INDEX], storage_options)[S.INDEX].to_numpy().astype(np.int64)
        hashes = row_hashes(shard, indices, spec.seed)
        if threshold is not None:
            keep = hashes < np.uint64(threshold)
            hashes, indices = hashes[keep], indices[keep]
        kept_hash = np.concatenate([kept_hash, hashes])
        kept_shard = np.concatenate([kept_shard, np.full(len(indices), position, np.int64)])
        kept_index = np.concatenate([kept_index, indices])
        if spec.size is not None and len(kept_hash) > spec.size:
            # bottom-k by (hash, shard, index): ties cannot make the sample depend on read order
            order = np.lexsort((kept_index, kept_shard, kept_hash))[: spec.size]
            kept_hash, kept_shard, kept_index = kept_hash[order], kept_shard[order], kept_index[order]
    return {shards[p]: np.sort(kept_index[kept_shard == p]) for p in np.unique(kept_shard)}


def read_rows(corpus: str, markers: dict[str, dict[str, Any]], chosen: dict[str, np.ndarray],
              storage_options: dict[str, Any] | None) -> pa.Table:
    """The full corpus rows of shard id -> indices, sorted by (shard, index_in_shard)."""
    tables = []
    for shard in sorted(chosen):
        if shard not in markers:
            raise CorpusReadError(f"{corpus} no longer holds shard {shard} (its commit marker is gone)")
        table = _read_columns(corpus, markers[shard], None, storage_options)
        mask = pc.is_in(table[S.INDEX], value_set=pa.array(np.asarray(chosen[shard]), pa.int32()))
        picked = table.filter(mask).sort_by(S.INDEX)
        if picked.num_rows != len(chosen[shard]):
            raise CorpusReadError(f"{corpus}: shard {shard} lacks sampled rows; was it re-tokenized?")
        tables.append(picked.replace_schema_metadata(None))
    if not tables:
        raise CorpusReadError(f"the sample of {corpus} is empty: raise sample_fraction or use sample_size")
    return pa.concat_tables(tables, promote_options="default")


def assign_slices(sample: pa.Table, slice_size: int) -> pa.Table:
    """Prepend the slice column: consecutive runs of `slice_size` rows, named 00000, 00001, ..."""
    if slice_size < 1:
        raise ValueError(f"slice_size must be >= 1, got {slice_size}")
    names = [f"{i // slice_size:05d}" for i in range(sample.num_rows)]
    return sample.add_column(0, S.SLICE, pa.array(names, pa.string()))
