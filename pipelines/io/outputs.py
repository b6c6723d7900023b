"""What every pipeline's output shares: a folder (local or any fsspec URI) written by whole-object
commits, JSON markers and records read back fresh, run ids, Parquet bytes, and error counts by
reason. The token corpus (`io/corpus.py`), an audit (`audit/plan.py`) and a training run
(`train/state.py`) are each a layout of named files over one `OutputFolder`.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import platform
import time
import uuid
from collections.abc import Iterable, Mapping
from importlib import metadata as importlib_metadata
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dualtok.pipelines.io.storage import commit_bytes, filesystem, join, read_objects

logger = logging.getLogger(__name__)


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

    def markers(self, folder: str, key: str, index: str | None = None) -> dict[str, dict[str, Any]]:
        """Every JSON marker under `folder`, by its `key` field (a shard's or a slice's id).

        One listing (paginated: ~1 request per 1000 markers) gives every marker's size and version
        (ETag, or mtime on a local disk). With `index`, a compacted copy of the markers as a run left
        them (`write_marker_index`), only markers whose listed version the index does not hold are
        read; the rest are read concurrently, one GET each (`storage.read_objects`). The
        markers stay the truth: the index only saves reading ones that did not change."""
        _, found = self.markers_listed(folder, index)
        return {marker[key]: marker for marker in found.values()}

    def markers_listed(self, folder: str, index: str | None) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
        """(relative path -> listed version, relative path -> marker) of the markers under `folder`."""
        listed = self.listed_versions(folder)
        root = self.path(folder)
        cached = (self.read_json_gz(index) or {}).get("markers", {}) if index else {}
        known = {rel: entry["marker"] for rel, entry in cached.items() if listed.get(rel) == entry.get("version")}
        fetch = [f"{root}/{rel}" for rel in listed if rel not in known]
        bodies = read_objects(self.fs, fetch)
        read = {_relative(path, root): json.loads(body) for path, body in bodies.items()}
        return listed, {**known, **read}

    def listed_versions(self, folder: str) -> dict[str, str]:
        """relative path -> listed version of every JSON marker under `folder`: one listing, no reads."""
        self.fs.invalidate_cache()
        root = self.path(folder)
        if not self.fs.exists(root):
            return {}
        return {_relative(path, root): _version(info) for path, info in self.fs.find(root, detail=True).items()
                if path.endswith(".json")}

    def write_marker_index(self, folder: str, index: str, versions: Mapping[str, str],
                           markers: Mapping[str, dict[str, Any]]) -> int:
        """Compact markers into `index` (gzip JSON): for each relative path in `versions` (its version
        as a listing gave it) whose marker the caller has, both. No listing here: the caller passes the
        versions it listed. Returns the markers kept."""
        entries = {rel: {"version": version, "marker": markers[rel]}
                   for rel, version in versions.items() if rel in markers}
        body = json.dumps({"format": 1, "folder": folder, "markers": entries}, separators=(",", ":")).encode()
        self.write(gzip.compress(body, compresslevel=6, mtime=0), index)
        return len(entries)

    def read_json_gz(self, *parts: str) -> Any | None:
        """The gzip JSON object at `parts`, or None when there is none or it cannot be read (an index
        is a cache: a damaged one is ignored, and rebuilt by the next run)."""
        path = self.path(*parts)
        try:
            return json.loads(gzip.decompress(self.fs.cat_file(path))) if self.fs.exists(path) else None
        except (OSError, EOFError, ValueError) as err:
            logger.warning("ignoring the unreadable index %s: %s", path, err)
            return None


def _relative(path: str, root: str) -> str:
    return path[len(root.rstrip("/")) + 1 :] if path.startswith(root.rstrip("/") + "/") else path


def _version(info: Mapping[str, Any]) -> str:
    """What changes when an object is rewritten: its size and its ETag (object stores) or mtime (disks)."""
    stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or info.get("created")
    return f"{info.get('size')}:{stamp}"
