"""What every pipeline's output shares: a folder (local or any fsspec URI) written by whole-object
commits, JSON markers and records read back fresh, run ids, Parquet bytes, and error counts by
reason. The token corpus (`io/corpus.py`), an audit (`audit/plan.py`) and a training run
(`train/state.py`) are each a layout of named files over one `OutputFolder`.
"""

from __future__ import annotations

import io
import json
import platform
import time
import uuid
from collections.abc import Iterable, Mapping
from importlib import metadata as importlib_metadata
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dualtok.pipelines.io.storage import commit_bytes, filesystem, join


def new_run_id() -> str:
    """A run's id: its UTC start time, sortable, and a random suffix (two runs in one second differ)."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


_PACKAGES = ("dualtok", "torch", "ray", "diffusers", "transformers", "pyarrow", "numpy", "pillow")


def package_versions() -> dict[str, str]:
    """The versions every run record states: Python and the packages that decide the bytes written."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def parquet_bytes(table: pa.Table, **options: Any) -> bytes:
    """`table` as one zstd-compressed Parquet file in memory, to be committed whole."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", **options)
    return buffer.getvalue()


def reason_label(stage: str, reason: str) -> str:
    """How an error row is counted: its stage and the reason's kind (the text before the first ':')."""
    return f"{stage}: {reason.split(':')[0]}"


def by_count(counts: Mapping[str, int]) -> dict[str, int]:
    """Most frequent first, then by name: the order every summary prints reasons in."""
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def count_reasons(labels: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    return by_count(counts)


def merge_counts(parts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for part in parts:
        for label, count in part.items():
            counts[label] = counts.get(label, 0) + count
    return by_count(counts)


class OutputFolder:
    """One output's root: paths under it, whole-object commits, and JSON read back without stale
    listings (other processes write here)."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None) -> None:
        self.root = root
        self.fs, _ = filesystem(root, storage_options or None)

    def uri(self, *parts: str) -> str:
        return join(self.root, *parts)

    def path(self, *parts: str) -> str:
        """The path as the file system takes it (no protocol)."""
        return self.fs._strip_protocol(self.uri(*parts))

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def write(self, data: bytes, *parts: str) -> None:
        commit_bytes(self.fs, self.path(*parts), data)

    def write_json(self, record: Any, *parts: str) -> None:
        self.write(json.dumps(record, indent=2, sort_keys=True, default=str).encode(), *parts)

    def read_json(self, *parts: str) -> Any | None:
        """The JSON object at `parts`, or None when there is none."""
        self.fs.invalidate_cache()
        path = self.path(*parts)
        return json.loads(self.fs.cat_file(path)) if self.fs.exists(path) else None

    def markers(self, folder: str, key: str) -> dict[str, dict[str, Any]]:
        """Every JSON marker under `folder`, by its `key` field (a shard's or a slice's id)."""
        self.fs.invalidate_cache()
        root = self.path(folder)
        if not self.fs.exists(root):
            return {}
        found = (json.loads(self.fs.cat_file(p)) for p in self.fs.find(root) if p.endswith(".json"))
        return {marker[key]: marker for marker in found}
