"""Write WebDataset shards in img2dataset's layout from a folder of images or a table of paths.

Layout, per shard `NNNNN.tar` under the output prefix (any fsspec URI):
- tar members per sample: `<key>.<ext>` (the image), `<key>.txt` (only when a caption exists),
  `<key>.json` (key, caption, width, height, original_width, original_height, source, status);
- `NNNNN.parquet` beside it: one row per input, failed ones included (`schemas.SHARD_INDEX_SCHEMA`);
- `NNNNN_stats.json` beside it: counts, failures by reason, and the input digest. It is written
  last, so it marks the shard as finished: a rerun skips shards whose stats carry the same digest.

Keys follow img2dataset's `compute_key`: `(10**d) * shard_id + index`, zero-padded to `d + 5`
digits, with `d = ceil(log10(samples_per_shard))` (the default 10000 gives `000000000`). A failed
input keeps its key, so keys depend only on the input's position.

Each shard appears whole or not at all: the tar is built in a local temporary file with fixed
member metadata (mtime 0, uid/gid 0, mode 0o644), so the same input gives byte-identical shards,
then committed with `os.replace` (local) or one `put_file` (remote; S3 makes the object visible
only once the single PUT or the multipart upload completes). The sidecars are small and go up in
one `pipe_file` each.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import posixpath
import tarfile
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from PIL import Image, UnidentifiedImageError

from dualtok_core.errors import DualtokError
from dualtok.pipelines.io.decode import to_rgb_or_gray
from dualtok.pipelines.io import schemas as S
from dualtok.pipelines.config import ConfigError
from dualtok.pipelines.io.outputs import parquet_bytes
from dualtok.pipelines.io.storage import commit_bytes, full_uri, read_objects

logger = logging.getLogger(__name__)

ImageHandling = Literal["keep", "jpeg"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
# PIL format -> member extension for images=keep. MPO is how PIL names many camera JPEGs.
KEEP_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff"}
SHARD_DIGITS = 5  # img2dataset's default oom_shard_count
DEFAULT_PATH_COLUMN = "path"
DEFAULT_CAPTION_COLUMN = "caption"
STATUS_SUCCESS = "success"
STATUS_FAILED = "failed_to_open"

@dataclass(frozen=True)
class ImageSource:
    """One input image: a URI to read, or bytes already in memory (then `uri` is only a label)."""

    uri: str
    caption: str | None = None
    data: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ShardWriterConfig:
    samples_per_shard: int = 10000
    images: ImageHandling = "keep"  # keep: original bytes as they are; jpeg: re-encode
    jpeg_quality: int = 95
    shard_pattern: str = "{:05d}.tar"
    workers: int = 2  # shards written at once (threads; PIL and the fs release the GIL)
    overwrite: bool = False  # False: skip shards whose stats say they were made from this input

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise ConfigError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.images not in ("keep", "jpeg"):
            raise ConfigError(f"images must be 'keep' or 'jpeg', got {self.images!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"jpeg_quality must lie in [1, 100], got {self.jpeg_quality}")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        try:
            first, second = self.shard_pattern.format(0), self.shard_pattern.format(1)
        except (IndexError, KeyError, ValueError) as err:
            raise ConfigError(f"shard_pattern {self.shard_pattern!r} must format one integer: {err}") from err
        if first == second or not first.endswith(".tar") or "/" in first:
            raise ConfigError(
                f"shard_pattern {self.shard_pattern!r} must give a distinct file name ending in .tar per shard"
            )


@dataclass(frozen=True)
class ShardWriteSummary:
    output: str
    shards: tuple[str, ...]  # URIs of every shard of this input, skipped ones included
    samples: int  # inputs seen
    successes: int
    failed: int
    failures: dict[str, int]  # reason -> count
    skipped_shards: int  # already finished by an earlier run with the same input


@dataclass(frozen=True)
class _ShardResult:
    uri: str
    count: int
    successes: int
    failures: dict[str, int]
    skipped: bool


class _UnsupportedFormat(Exception):
    """An image PIL reads but that images=keep cannot store under a WebDataset extension."""


def sample_key(shard_id: int, index: int, samples_per_shard: int) -> str:
    """img2dataset's key for sample `index` of shard `shard_id`."""
    digits = math.ceil(math.log10(samples_per_shard))
    return f"{(10**digits) * shard_id + index:0{digits + SHARD_DIGITS}d}"


def write_shards(
    sources: list[ImageSource],
    output: str,
    config: ShardWriterConfig | None = None,
    storage_options: dict[str, Any] | None = None,
) -> ShardWriteSummary:
    """Write `sources`, in order, into shards under `output`; bad inputs become failed rows."""
    config = config or ShardWriterConfig()
    if not sources:
        raise DualtokError(f"no image sources to write to {output}")
    options = dict(storage_options or {})
    fs, root = fsspec.core.url_to_fs(output, **options)
    fs.makedirs(root, exist_ok=True)
    per_shard = config.samples_per_shard
    groups = [sources[start : start + per_shard] for start in range(0, len(sources), per_shard)]

    def write_one(shard_id: int) -> _ShardResult:
        return _write_shard(fs, root, output, shard_id, groups[shard_id], config, options)

    with ThreadPoolExecutor(max_workers=config.workers) as pool:
        results = list(pool.map(write_one, range(len(groups))))
    failures: Counter[str] = Counter()
    for result in results:
        failures.update(result.failures)
    summary = ShardWriteSummary(
        output=output,
        shards=tuple(r.uri for r in results),
        samples=sum(r.count for r in results),
        successes=sum(r.successes for r in results),
        failed=sum(failures.values()),
        failures=dict(sorted(failures.items())),
        skipped_shards=sum(r.skipped for r in results),
    )
    logger.info(
        "%d shards under %s (%d skipped): %d samples, %d written, %d failed",
        len(results), output, summary.skipped_shards, summary.samples, summary.successes, summary.failed,
    )
    return summary


def _write_shard(
    fs: fsspec.AbstractFileSystem,
    root: str,
    output: str,
    shard_id: int,
    sources: list[ImageSource],
    config: ShardWriterConfig,
    options: dict[str, Any],
) -> _ShardResult:
    name = config.shard_pattern.format(shard_id)
    stem = name[: -len(".tar")]
    uri = f"{output.rstrip('/')}/{name}"
    stats_path = f"{root}/{stem}_stats.json"
    digest = _input_digest(sources, config)
    if not config.overwrite:
        done = _finished_stats(fs, stats_path, digest)
        if done is not None:
            logger.info("shard %s is already written from this input; skipping it", uri)
            return _ShardResult(uri, done["count"], done["successes"], done["failures"], skipped=True)
    rows = _commit_tar(fs, f"{root}/{name}", shard_id, sources, config, options)
    failures = Counter(row["reason"] for row in rows if row["status"] != STATUS_SUCCESS)
    stats = {
        "shard": stem,
        "count": len(rows),
        "successes": len(rows) - sum(failures.values()),
        "failed": sum(failures.values()),
        "failures": dict(sorted(failures.items())),
        "input_digest": digest,
        "config": dataclasses.asdict(config),
    }
    commit_bytes(fs, f"{root}/{stem}.parquet", _index_parquet(rows))
    # The stats file goes last: its presence with this digest is what marks the shard finished.
    commit_bytes(fs, stats_path, json.dumps(stats, indent=2, sort_keys=True).encode())
    return _ShardResult(uri, stats["count"], stats["successes"], stats["failures"], skipped=False)


def _commit_tar(
    fs: fsspec.AbstractFileSystem,
    path: str,
    shard_id: int,
    sources: list[ImageSource],
    config: ShardWriterConfig,
    options: dict[str, Any],
) -> list[dict[str, Any]]:
    """Build the shard's tar in a local temporary file, then commit it whole; return its index rows."""
    rows: list[dict[str, Any]] = []
    local = isinstance(fs, LocalFileSystem)
    directory, name = posixpath.split(path)
    # Locally the temporary file sits beside the shard so os.replace is an atomic rename; its
    # leading dot keeps it out of `*.tar` globs while it grows.
    fd, tmp_path = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory if local else None)
    try:
        with os.fdopen(fd, "wb") as tmp, tarfile.open(fileobj=tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for index, source in enumerate(sources):
                key = sample_key(shard_id, index, config.samples_per_shard)
                rows.append(_add_sample(tar, key, source, config, options))
        if local:
            os.replace(tmp_path, path)
        else:
            fs.put_file(tmp_path, path)  # one PUT, or a multipart upload S3 shows only once complete
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    return rows


def _add_sample(
    tar: tarfile.TarFile, key: str, source: ImageSource, config: ShardWriterConfig, options: dict[str, Any]
) -> dict[str, Any]:
    """Add one sample's members to `tar`; return its index row (with a reason when it failed)."""
    row: dict[str, Any] = {"key": key, "caption": source.caption, "width": None, "height": None,
                           "source": source.uri, "status": STATUS_FAILED, "error_message": None, "reason": None}
    try:
        raw = _read_source(source, options)
    except (FileNotFoundError, IsADirectoryError, PermissionError, ValueError) as err:
        # Only "this input is not there / not readable / not a URI" is the input's fault; other
        # errors (network, credentials, a missing fsspec backend) propagate, so the shard is not
        # committed and a rerun redoes it.
        return _failed(row, _read_failure_reason(err), err)
    try:
        payload, ext, width, height = _prepare_image(raw, config)
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad bytes; each is this input's fault
        return _failed(row, _decode_failure_reason(err), err)
    row.update(width=width, height=height, status=STATUS_SUCCESS)
    meta = {"key": key, "caption": source.caption, "width": width, "height": height,
            "original_width": width, "original_height": height, "source": source.uri, "status": STATUS_SUCCESS}
    members = {ext: payload, "json": json.dumps(meta, sort_keys=True).encode()}
    if source.caption is not None:
        members["txt"] = source.caption.encode("utf-8")
    for member_ext in sorted(members):  # webdataset's TarWriter order: extensions sorted
        add_tar_member(tar, f"{key}.{member_ext}", members[member_ext])
    return row


def add_tar_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    """A regular file member with no clock, owner or mode of its own: the same payloads give the same tar."""
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


def _read_source(source: ImageSource, options: dict[str, Any]) -> bytes:
    if source.data is not None:
        return source.data
    if not source.uri:
        raise FileNotFoundError("empty path")
    with fsspec.open(source.uri, "rb", **options) as handle:
        return handle.read()


def _prepare_image(raw: bytes, config: ShardWriterConfig) -> tuple[bytes, str, int, int]:
    """(payload, extension, width, height) after a full decode, so broken files fail here."""
    with Image.open(io.BytesIO(raw)) as image:
        image.load()
        if config.images == "keep":
            ext = KEEP_EXTENSIONS.get(image.format or "")
            if ext is None:
                raise _UnsupportedFormat(f"{image.format} cannot be kept as it is; use images=jpeg")
            return raw, ext, image.width, image.height
        rgb = to_rgb_or_gray(image).convert("RGB")  # the one normaliser decoding uses too
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=config.jpeg_quality)
    return buffer.getvalue(), "jpg", rgb.width, rgb.height


def _failed(row: dict[str, Any], reason: str, err: Exception) -> dict[str, Any]:
    row.update(reason=reason, error_message=f"{type(err).__name__}: {err}")
    logger.debug("sample %s (%s) failed: %s", row["key"], row["source"], row["error_message"])
    return row


def _read_failure_reason(err: Exception) -> str:
    if isinstance(err, (FileNotFoundError, IsADirectoryError)):
        return "missing_file"
    if isinstance(err, PermissionError):
        return "unreadable_file"
    return "bad_uri"


def _decode_failure_reason(err: Exception) -> str:
    if isinstance(err, UnidentifiedImageError):
        return "not_an_image"
    if isinstance(err, Image.DecompressionBombError):
        return "decompression_bomb"
    if isinstance(err, _UnsupportedFormat):
        return "unsupported_format"
    return "broken_image"


def _input_digest(sources: list[ImageSource], config: ShardWriterConfig) -> str:
    """What a shard was made from: sources, captions, in-memory bytes, and the byte-relevant config."""
    digest = hashlib.sha256()
    digest.update(json.dumps([config.samples_per_shard, config.images, config.jpeg_quality]).encode())
    for source in sources:
        data_hash = hashlib.sha256(source.data).hexdigest() if source.data is not None else None
        digest.update(json.dumps([source.uri, source.caption, data_hash]).encode())
    return digest.hexdigest()


def _finished_stats(fs: fsspec.AbstractFileSystem, stats_path: str, digest: str) -> dict[str, Any] | None:
    if not fs.exists(stats_path):
        return None
    stats = json.loads(fs.cat_file(stats_path))
    if stats.get("input_digest") != digest:
        logger.warning("%s was written from another input; rewriting that shard", stats_path)
        return None
    return stats


def _index_parquet(rows: list[dict[str, Any]]) -> bytes:
    columns = {name: [row[name] for row in rows] for name in S.SHARD_INDEX_SCHEMA.names}
    return parquet_bytes(pa.Table.from_pydict(columns, schema=S.SHARD_INDEX_SCHEMA))


def sources_from_folder(path: str, storage_options: dict[str, Any] | None = None) -> list[ImageSource]:
    """Every image under `path` (recursive, sorted), captioned by a sidecar `<name>.txt` if any.

    Hidden files and folders (names starting with ".", e.g. macOS `._x.jpg`) are left out.
    """
    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    if not fs.isdir(root):
        raise DualtokError(f"{path} is not a folder")
    listed = {f: info for f, info in fs.find(root, detail=True).items() if not _hidden(posixpath.relpath(f, root))}
    files = sorted(listed)
    images = [f for f in files if posixpath.splitext(f)[1].lower() in IMAGE_SUFFIXES]
    if not images:
        raise DualtokError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {path}")
    sidecars = {img: posixpath.splitext(img)[0] + ".txt" for img in images}
    wanted = sorted({txt for txt in sidecars.values() if txt in listed})
    # one concurrent batch of single GETs on async stores (`read_objects`: no per-object size lookup,
    # which scans the cached listing once per sidecar); an empty sidecar, legitimate here, is not read
    texts = {txt: b"" for txt in wanted if not listed[txt].get("size")}
    texts.update(read_objects(fs, [txt for txt in wanted if txt not in texts]))
    sources = []
    for img in images:
        text = texts.get(sidecars[img])
        caption = text.decode("utf-8", errors="replace").strip() if text is not None else ""
        sources.append(ImageSource(uri=full_uri(fs, img), caption=caption or None))
    logger.info("%d images under %s, %d with captions", len(sources), path, len(wanted))
    return sources


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def sources_from_table(
    path: str,
    path_column: str = DEFAULT_PATH_COLUMN,
    caption_column: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> list[ImageSource]:
    """Image sources listed in a Parquet or CSV table, in row order.

    `caption_column=None` uses a "caption" column when the table has one; a named column must
    exist. Relative paths are resolved against the table's own folder (paths may be fsspec URIs).
    """
    fs, table_path = fsspec.core.url_to_fs(path, **(storage_options or {}))
    table = _read_table(fs, table_path, path)
    if path_column not in table.column_names:
        raise DualtokError(f"{path} has no path column {path_column!r}; its columns: {', '.join(table.column_names)}")
    if caption_column is not None and caption_column not in table.column_names:
        raise DualtokError(
            f"{path} has no caption column {caption_column!r}; its columns: {', '.join(table.column_names)}"
        )
    if caption_column is None and DEFAULT_CAPTION_COLUMN in table.column_names:
        caption_column = DEFAULT_CAPTION_COLUMN
    paths = table.column(path_column).cast(pa.string()).to_pylist()
    captions = table.column(caption_column).cast(pa.string()).to_pylist() if caption_column else [None] * len(paths)
    local = isinstance(fs, LocalFileSystem)
    base = os.path.dirname(table_path) if local else posixpath.dirname(full_uri(fs, table_path))
    sources = [
        ImageSource(uri=_resolve(p, base, local), caption=c if c else None) for p, c in zip(paths, captions)
    ]
    logger.info("%d image paths in %s (captions from %s)", len(sources), path, caption_column or "nowhere")
    return sources


def _read_table(fs: fsspec.AbstractFileSystem, table_path: str, path: str) -> pa.Table:
    suffix = posixpath.splitext(table_path)[1].lower()
    if suffix not in (".parquet", ".csv"):
        raise DualtokError(f"{path}: a path list must be a .parquet or .csv file")
    with fs.open(table_path, "rb") as handle:
        return pq.read_table(handle) if suffix == ".parquet" else pacsv.read_csv(handle)


def _resolve(value: str | None, base: str, local: bool) -> str:
    if not value:
        return ""  # recorded as a failed sample ("empty path"), not a crash
    if "://" in value or os.path.isabs(value):
        return value
    return os.path.join(base, value) if local else f"{base}/{value}"
