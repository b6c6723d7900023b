"""fsspec paths, so that local folders, file://, s3:// (any endpoint) and gs:// are one code path.

Listing input shards (prefix, glob, brace pattern, list file) and committing an output object
whole: one PUT on object stores, write-then-rename on local disks.
"""

from __future__ import annotations

import logging
import os
import posixpath
import uuid
from typing import Any

import fsspec
from braceexpand import braceexpand
from fsspec.implementations.local import LocalFileSystem

logger = logging.getLogger(__name__)

SHARD_SUFFIXES = (".tar",)
_GLOB_CHARS = "*?["


class InputListingError(ValueError):
    """Input patterns that match no shard, or a list file that cannot be read."""


def filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return fs, path


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI or local path with '/' (object stores have no os.sep)."""
    return posixpath.join(uri.rstrip("/"), *parts) if "://" in uri else os.path.join(uri, *parts)


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path as returned by `fs.find`/`glob` back to a URI other processes can open."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def list_shards(inputs: list[str], storage_options: dict[str, Any] | None = None) -> list[str]:
    """Expand inputs (prefixes, globs, {a..b} braces, @list files) into sorted, unique shard URIs."""
    found: list[str] = []
    for item in inputs:
        if item.startswith("@"):
            found.extend(list_shards(_read_list_file(item[1:], storage_options), storage_options))
            continue
        for pattern in braceexpand(item):
            found.extend(_expand_one(pattern, storage_options))
    unique = sorted(set(found))
    if not unique:
        raise InputListingError(f"no .tar shards match the inputs {inputs}")
    return unique


def _expand_one(pattern: str, storage_options: dict[str, Any] | None) -> list[str]:
    fs, path = filesystem(pattern, storage_options)
    if any(ch in path for ch in _GLOB_CHARS):
        return [full_uri(fs, p) for p in sorted(fs.glob(path)) if p.endswith(SHARD_SUFFIXES)]
    if path.endswith(SHARD_SUFFIXES):
        if not fs.exists(path):
            raise InputListingError(f"input shard {pattern} does not exist")
        return [full_uri(fs, path)]
    if fs.isdir(path):
        return [full_uri(fs, p) for p in sorted(fs.find(path)) if p.endswith(SHARD_SUFFIXES)]
    raise InputListingError(f"input {pattern} is neither a .tar shard, a folder/prefix, nor a glob")


def _read_list_file(uri: str, storage_options: dict[str, Any] | None) -> list[str]:
    fs, path = filesystem(uri, storage_options)
    try:
        text = fs.cat_file(path).decode()
    except FileNotFoundError as err:
        raise InputListingError(f"shard list file {uri} does not exist") from err
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def shard_id(uri: str, root: str) -> str:
    """A stable, file-name-safe id for a shard: its path under the common input root, no suffix."""
    rel = uri[len(root):] if uri.startswith(root) else uri.split("://", 1)[-1]
    rel = rel.strip("/")
    for suffix in SHARD_SUFFIXES:
        if rel.endswith(suffix):
            rel = rel[: -len(suffix)]
    return rel.replace("/", "__") or "shard"


def common_root(uris: list[str]) -> str:
    """The longest common folder prefix of the shard URIs (ids are paths under it)."""
    prefix = posixpath.commonprefix(uris)
    return prefix[: prefix.rfind("/") + 1] if "/" in prefix else ""


def commit_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Make `path` hold `data`, never a partial file: rename on local disks, one PUT elsewhere."""
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)  # S3/GCS PUT: the object appears whole or not at all
