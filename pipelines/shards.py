"""Reading WebDataset shards as a stream of samples, recording what is wrong instead of failing.

A sample is the run of consecutive tar members that share a key (img2dataset's layout:
`<key>.jpg`, `<key>.txt`, `<key>.json`). Every sample gets an index in its shard, good or bad,
so that `rows + errors == samples read` can be checked per shard.
"""

from __future__ import annotations

import json
import logging
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pipelines.storage import filesystem

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm")
_METADATA_EXTENSIONS = {"txt", "json", "cls", "url", "parquet"}


@dataclass
class Sample:
    """One sample of a shard: its members by extension, or the reason it cannot be used."""

    index: int
    key: str | None
    members: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None

    @property
    def caption(self) -> str | None:
        if "txt" in self.members:
            return self.members["txt"].decode("utf-8", errors="replace").strip()
        if "json" in self.members:
            try:
                meta = json.loads(self.members["json"])
            except (ValueError, UnicodeDecodeError):
                return None
            caption = meta.get("caption") if isinstance(meta, dict) else None
            return caption if isinstance(caption, str) else None
        return None

    def image_bytes(self) -> tuple[str, bytes] | None:
        for ext in IMAGE_EXTENSIONS:
            if ext in self.members:
                return ext, self.members[ext]
        return None


def split_member_name(name: str) -> tuple[str, str] | None:
    """'dir/000123.jpg' -> ('dir/000123', 'jpg'); the key ends at the basename's first dot."""
    folder, base = posixpath.split(name)
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    return posixpath.join(folder, stem) if folder else stem, ext.lower()


def unsafe_member(name: str) -> bool:
    """Members outside the shard's folder: absolute paths or any '..' component."""
    return name.startswith("/") or ".." in name.split("/") or "\\" in name


def iter_samples(uri: str, storage_options: dict[str, Any] | None = None) -> Iterator[Sample]:
    """Stream a shard's samples in tar order. Broken parts become samples with `error` set."""
    fs, path = filesystem(uri, storage_options)
    state = _GroupState()
    try:
        with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|") as tar:
            for member in tar:
                yield from state.add(member, tar)
    except (tarfile.TarError, EOFError, OSError) as err:
        yield from state.flush()
        yield Sample(index=state.next_index, key=None,
                     error=f"truncated or corrupt tar after {state.next_index} samples: {type(err).__name__}: {err}")
        state.next_index += 1
        return
    yield from state.flush()


class _GroupState:
    """Groups consecutive members by key; a key seen before in the shard is a duplicate."""

    def __init__(self) -> None:
        self.next_index = 0
        self.current: Sample | None = None
        self.seen: set[str] = set()

    def add(self, member: tarfile.TarInfo, tar: tarfile.TarFile) -> Iterator[Sample]:
        if not member.isfile():
            return
        name = member.name[2:] if member.name.startswith("./") else member.name
        if unsafe_member(name):
            yield from self.flush()
            yield self._new(None, f"member {name!r} lies outside the shard's folder")
            return
        parts = split_member_name(name)
        if parts is None:
            return  # a member without an extension belongs to no sample (e.g. a README)
        key, ext = parts
        if self.current is None or key != self.current.key:
            yield from self.flush()
            if key in self.seen:
                self.current = self._new(key, f"duplicate key {key!r}: the shard has it twice")
            else:
                self.current = self._new(key, None)
            self.seen.add(key)
        data = tar.extractfile(member).read()  # type: ignore[union-attr]
        if ext in self.current.members and self.current.error is None:
            self.current.error = f"member {name!r} appears twice in the sample"
        self.current.members[ext] = data

    def flush(self) -> Iterator[Sample]:
        if self.current is not None:
            sample, self.current = self.current, None
            yield sample

    def _new(self, key: str | None, error: str | None) -> Sample:
        sample = Sample(index=self.next_index, key=key, error=error)
        self.next_index += 1
        return sample
