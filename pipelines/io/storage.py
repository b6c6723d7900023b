"""fsspec paths, so that local folders, file://, s3:// (any endpoint) and gs:// are one code path.

Listing input shards (prefix, glob, brace pattern, list file) and committing an output object
whole: one PUT on object stores, write-then-rename on local disks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
from botocore.exceptions import BotoCoreError
from braceexpand import braceexpand
from fsspec.implementations.local import LocalFileSystem

from dualtok.pipelines.config import SecretStr, secret

logger = logging.getLogger(__name__)

# gzip-compressed shards are read as a stream too (`r|*`); `shard_id` strips every suffix.
# A Parquet file of images is a shard too (io/parquet_shards.py), except the index img2dataset and
# `dualtok shards` write beside a tar under the tar's name (`00000.parquet` next to `00000.tar`).
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")
PARQUET_SUFFIX = ".parquet"
SHARD_SUFFIXES = (*TAR_SUFFIXES, PARQUET_SUFFIX)
_GLOB_CHARS = "*?["
# What a store raises when it, not the data, fails: s3fs turns S3 error responses into OSError
# subclasses, but hands on botocore's own errors (a connection that could not be made or was
# dropped, after its retries) as they are. Both mean "try again later", never "bad data".
STORE_ERRORS: tuple[type[BaseException], ...] = (OSError, BotoCoreError)
# Transient store errors (throttling, 5xx, dropped connections) are retried inside botocore with
# exponential backoff and jitter; "adaptive" also slows the client down while the store throttles.
_S3_PROTOCOLS = ("s3", "s3a")
_S3_RETRIES = {"max_attempts": 10, "mode": "adaptive"}


class InputListingError(ValueError):
    """Input patterns that match no shard, or a list file that cannot be read."""


class StorageFault(OSError):
    """The store failed (throttling, 5xx, a reset connection, denied or vanished object), not the
    data: the unit of work fails for this run and is redone by the next, never recorded as bad data."""


def object_version(info: dict[str, Any]) -> str:
    """What identifies one version of an object, from `fs.info`/`fs.find(detail=True)`: the ETag on
    object stores, the modification time (ns) and size on local disks. A rewritten shard changes it."""
    for key in ("ETag", "etag", "md5Hash", "generation"):
        if info.get(key):
            return str(info[key]).strip('"')
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    return f"mtime:{int(float(mtime or 0) * 1e9)}:size:{info.get('size', -1)}"


def read_objects(fs: fsspec.AbstractFileSystem, paths: list[str]) -> dict[str, bytes]:
    """Whole small objects (markers, token parts, caption sidecars; none empty), read concurrently
    on async stores, one GET each. `start=0` is what keeps it one: without a range, s3fs looks each
    object's size up first (to split large reads), which is a HEAD per object or, once a listing of
    the folder is cached, a scan of that listing per object: quadratic, 80 % of a cold start-up over
    10^5 markers (docs/scale.md). An empty object would be refused (HTTP 416) rather than read."""
    return fs.cat(paths, start=0) if paths else {}


def filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of a URI. S3 clients retry transient errors with backoff (`_S3_RETRIES`)
    unless the user chose a retry policy (`config_kwargs.retries`, or AWS_MAX_ATTEMPTS/AWS_RETRY_MODE)."""
    options = revealed(storage_options)
    if fsspec.core.split_protocol(uri)[0] in _S3_PROTOCOLS:
        options = _with_s3_retries(options)
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path


def revealed(storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """The options as the store client needs them: every `SecretStr` (at any depth) unwrapped.
    Call it only where fsspec/s3fs takes the options, so nothing else ever holds the plain value."""

    def unwrap(value: Any) -> Any:
        if isinstance(value, SecretStr):
            return value.reveal()
        if isinstance(value, dict):
            return {k: unwrap(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(unwrap(v) for v in value)
        return value

    return unwrap(dict(storage_options or {}))


def _with_s3_retries(options: dict[str, Any]) -> dict[str, Any]:
    config = dict(options.get("config_kwargs") or {})
    if "retries" in config or os.environ.keys() & {"AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"}:
        return options  # the user's policy wins
    config["retries"] = dict(_S3_RETRIES)
    return {**options, "config_kwargs": config}


def _describe(err: BaseException) -> str:
    """An exception as one line: its type and message (no traceback, no request headers)."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"[:500]


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI or local path with '/' (object stores have no os.sep)."""
    return posixpath.join(uri.rstrip("/"), *parts) if "://" in uri else os.path.join(uri, *parts)


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path as returned by `fs.find`/`glob` back to a URI other processes can open."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


@dataclass(frozen=True)
class ShardObject:
    """One input shard as the listing saw it: a commit marker records `size` and `version`, so a
    shard rewritten after its commit is seen as changed and redone."""

    uri: str
    size: int
    version: str  # `object_version`: the ETag on object stores, mtime + size on local disks


def list_shard_objects(inputs: list[str], storage_options: dict[str, Any] | None = None) -> list[ShardObject]:
    """Expand inputs (prefixes, globs, {a..b} braces, @list files) into the shards they name, sorted by
    URI, each once, with its size and version from the same listing (no request per shard, except
    for shards named one by one). A store that fails to list raises `StorageFault` naming the input."""
    found: dict[str, ShardObject] = {}
    for item in inputs:
        if item.startswith("@"):
            listed = list_shard_objects(_read_list_file(item[1:], storage_options), storage_options)
            found.update((obj.uri, obj) for obj in listed)
            continue
        for pattern in braceexpand(item):
            found.update((obj.uri, obj) for obj in _expand_one(pattern, storage_options))
    indexes = _tar_indexes(found)
    for index in indexes:
        del found[index]
    if indexes:
        logger.info("%d listed .parquet files are the index of a tar beside them, not shards (e.g. %s)",
                    len(indexes), indexes[0])
    if not found:
        raise InputListingError(f"no shards ({', '.join(SHARD_SUFFIXES)}) match the inputs {inputs}")
    return [found[uri] for uri in sorted(found)]


def _tar_indexes(uris: dict[str, ShardObject]) -> list[str]:
    """The listed `.parquet` files that are the index of a listed tar of the same name, not shards."""
    stems = {uri[: -len(suffix)] for uri in uris for suffix in TAR_SUFFIXES if uri.endswith(suffix)}
    return [uri for uri in uris if uri.endswith(PARQUET_SUFFIX) and uri[: -len(PARQUET_SUFFIX)] in stems]


def list_shards(inputs: list[str], storage_options: dict[str, Any] | None = None) -> list[str]:
    """Expand inputs (prefixes, globs, {a..b} braces, @list files) into sorted, unique shard URIs."""
    return [obj.uri for obj in list_shard_objects(inputs, storage_options)]


def _expand_one(pattern: str, storage_options: dict[str, Any] | None) -> list[ShardObject]:
    fs, path = filesystem(pattern, storage_options)
    try:
        if any(ch in path for ch in _GLOB_CHARS):
            return _shard_objects(fs, fs.glob(path, detail=True))
        if path.endswith(SHARD_SUFFIXES):
            return [_named_shard(fs, path, pattern)]
        if fs.isdir(path):
            return _folder_shards(fs, path, pattern)
        exists = fs.exists(path)
    except InputListingError:
        raise
    except STORE_ERRORS as err:
        raise StorageFault(f"listing input {pattern} failed: {_describe(err)}") from err
    if not exists:
        raise InputListingError(f"input {pattern} does not exist")
    raise InputListingError(f"input {pattern} is a file but not a shard ({', '.join(SHARD_SUFFIXES)}): give shards, "
                            "a folder/prefix, a glob or an @list file")


def _folder_shards(fs: fsspec.AbstractFileSystem, path: str, pattern: str) -> list[ShardObject]:
    """The shards under a folder/prefix; none is an error (a wrong prefix, not an empty night)."""
    shards = _shard_objects(fs, fs.find(path, detail=True))
    if not shards:
        raise InputListingError(f"no .tar or .parquet shards under {pattern}")
    return shards


def _named_shard(fs: fsspec.AbstractFileSystem, path: str, pattern: str) -> ShardObject:
    try:
        info = fs.info(path)
    except FileNotFoundError as err:
        raise InputListingError(f"input shard {pattern} does not exist") from err
    return ShardObject(full_uri(fs, path), _size(info), object_version(info))


def _size(info: dict[str, Any]) -> int:
    return int(info.get("size") or -1)  # as the read stage records it (`shards.ShardReader`)


def _shard_objects(fs: fsspec.AbstractFileSystem, listing: dict[str, dict[str, Any]]) -> list[ShardObject]:
    return [ShardObject(full_uri(fs, p), _size(info), object_version(info))
            for p, info in sorted(listing.items())
            if p.endswith(SHARD_SUFFIXES) and info.get("type", "file") != "directory"]


def _read_list_file(uri: str, storage_options: dict[str, Any] | None) -> list[str]:
    fs, path = filesystem(uri, storage_options)
    try:
        text = fs.cat_file(path).decode()
    except FileNotFoundError as err:
        raise InputListingError(f"shard list file {uri} does not exist") from err
    except STORE_ERRORS as err:
        raise StorageFault(f"reading shard list file {uri} failed: {_describe(err)}") from err
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


class ShardIdentityError(InputListingError):
    """An input shard without an unambiguous id: outside the corpus's input root, or an id that
    another shard already has (in this listing, or in the marker a run committed)."""


def shard_id(uri: str, root: str) -> str:
    """A stable, file-name-safe id for a shard: its path under `root`, '/' -> '__', no suffix.

    `root` is the corpus's input root (`dualtok.pipelines.io.shard_ids`), fixed once per corpus, so the
    id does not depend on which other shards a run lists. A shard outside the root has no id."""
    if root and not root.endswith("/"):
        root += "/"  # "s3://b/day" must not hold "s3://b/day1/..."
    if not uri.startswith(root):
        raise ShardIdentityError(f"shard {uri} is not under the input root {root}: its id would be ambiguous")
    rel = uri[len(root):].strip("/")
    for suffix in SHARD_SUFFIXES:
        if rel.endswith(suffix):
            rel = rel[: -len(suffix)]
            break
    return rel.replace("/", "__") or "shard"


def common_root(uris: list[str]) -> str:
    """The longest common folder prefix of the shard URIs, ending in '/' ('' if they share none)."""
    prefix = posixpath.commonprefix(uris)
    return prefix[: prefix.rfind("/") + 1] if "/" in prefix else ""


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Make `path` hold `data` only if nothing is there yet; True if this call created it.

    One conditional write, so two writers racing for a name cannot both win: on local disks a
    complete temporary file hard-linked to `path` (the link fails if the name exists, and a reader
    never sees a partial file); on object stores a PUT with `If-None-Match: *` (S3 answers 412).
    After a lost response and a client retry a caller may see False for its own write: callers
    read the object back and compare it with what they wrote."""
    if not isinstance(fs, LocalFileSystem):
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True
    tmp = _local_temp_copy(path, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True


def commit_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Make `path` hold `data`, never a partial file: rename on local disks, one PUT elsewhere.
    A write the store still refuses after its retries raises `StorageFault` naming the path."""
    try:
        _write_whole(fs, path, data)
    except STORE_ERRORS as err:
        raise StorageFault(f"writing {path} failed: {_describe(err)}") from err


def _write_whole(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    if isinstance(fs, LocalFileSystem):
        os.replace(_local_temp_copy(path, data), path)
    else:
        fs.pipe_file(path, data)  # S3/GCS PUT: the object appears whole or not at all


def _local_temp_copy(path: str, data: bytes) -> str:
    """`data` in a synced temporary file beside `path` (same file system: rename and link work)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return tmp


@dataclass(frozen=True)
class StorageConfig:
    """Object-store access. Credentials normally come from the standard AWS chain (env vars,
    profile, instance/service-account role); `key`/`secret` exist for stores without one. They stay
    `SecretStr`s inside `storage_options()` (so every plan, stage and Ray Train run state holding
    the options shows "***") and are revealed only where the store client is built
    (`dualtok.pipelines.io.storage.filesystem`)."""

    endpoint_url: str | None = None  # any S3-compatible endpoint (MinIO, R2, a loopback moto server)
    region: str | None = None  # the store's region; None: the AWS chain's (env, profile, instance)
    profile: str | None = None  # a named profile from ~/.aws/config
    anon: bool = False  # unsigned requests (public buckets)
    key: SecretStr | None = secret()  # access key id, for stores without a role or profile (never logged)
    secret: SecretStr | None = secret()  # secret access key (shown as *** everywhere)

    def __post_init__(self) -> None:
        for name in ("key", "secret"):  # built in code with a plain string: wrap it all the same
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, SecretStr(getattr(self, name)))

    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs keyword arguments, credentials still wrapped; empty when the defaults apply."""
        options: dict[str, Any] = {}
        client: dict[str, Any] = {}
        if self.endpoint_url:
            client["endpoint_url"] = self.endpoint_url
        if self.region:
            client["region_name"] = self.region
        if client:
            options["client_kwargs"] = client
        if self.profile:
            options["profile"] = self.profile
        if self.anon:
            options["anon"] = True
        if self.key or self.secret:
            options.update(key=self.key, secret=self.secret)
        return options


@contextlib.contextmanager
def local_copy(uri: str, storage_options: dict[str, Any] | None = None) -> Iterator[Path]:
    """A local folder holding `uri`'s files while the block runs: the path itself, or a temporary
    download of the object prefix, removed afterwards."""
    from dualtok_core.errors import BundleError

    if "://" not in uri or uri.startswith("file://"):
        path = Path(uri.removeprefix("file://"))
        if not path.is_dir():
            raise BundleError(f"folder {uri} does not exist")
        yield path
        return
    fs, root = filesystem(uri, storage_options)
    if not fs.isdir(root):
        raise BundleError(f"folder {uri} does not exist")
    with tempfile.TemporaryDirectory(prefix="dualtok-asset-") as target:
        fs.get(root.rstrip("/") + "/", str(target) + "/", recursive=True)
        yield Path(target)
