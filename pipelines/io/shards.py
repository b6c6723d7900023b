"""Reading WebDataset shards as a stream of samples, recording what is wrong instead of failing.

A sample is the run of consecutive tar members that share a key (img2dataset's layout:
`<key>.jpg`, `<key>.txt`, `<key>.json`). Every sample gets an index in its shard, good or bad,
so that `rows + errors == samples in the tar` can be checked per shard. What each input becomes:

- A sample is an error (`Sample.error`, one row) when one of its members is a link, a device or a
  fifo (links are not followed), a sparse file, larger than `ShardLimits.max_member_bytes`, or a
  caption (`.txt`/`.json`) larger than `max_caption_bytes`: caps are checked on the tar header,
  before any byte is read, and the member's data is skipped. Also an error: a member that appears
  twice in a sample, a key that comes back after other keys (WebDataset groups *consecutive*
  members: the first group is the sample, the later members are an error row of their own), a
  member name that is not UTF-8, and a `.json` sidecar that does not parse ("json sidecar: ...",
  whatever the parser raised: invalid UTF-8, invalid JSON, nesting too deep).
- A `.txt` caption is decoded as UTF-8 with invalid bytes replaced; it wins over a `.json`
  sidecar's "caption". Members of other extensions are noted, never read.
- A regular file without an extension, or a member outside the shard's folder, is an error row
  of its own. Directories are no samples: `ShardReader.ignored_members` counts them.
- The tar must be read to its own end-of-archive (a zero block) or the shard fails with
  `ShardFormatError`: a header that is corrupt, junk after a member, or data that stops (even at
  a member boundary) would otherwise end the stream early without a word. Compressed tars (gzip,
  bz2, xz) are read as what they are, whatever their name. When the producer wrote
  `<shard>_stats.json` (img2dataset, `dualtok shards`) or a `<shard>.parquet` index beside the
  tar, a sample count that disagrees with it fails the shard too.
- Anything the store raises (opening, `info`, every read of the handle) is a `StorageFault`, never
  a format error: the caller retries the shard or fails it for this run, never records bad data.
- A `.json` sidecar that parses to an object is kept whole as the sample's `fields` (img2dataset
  writes url, sha256, status, width, height and licence fields there): tokenize's `passthrough`
  copies chosen ones into the corpus (`field_text`).

Parquet files of images are shards too (`parquet_shards.py`); their rows are `Sample`s like these.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import posixpath
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from dualtok.pipelines.io.storage import TAR_SUFFIXES, StorageFault, filesystem, object_version

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm")
CAPTION_EXTENSIONS = ("txt", "json")
_READ_EXTENSIONS = frozenset(IMAGE_EXTENSIONS + CAPTION_EXTENSIONS)  # the members whose bytes are used
# GNU long names and pax headers are read whole by tarfile before the member they describe: a header
# that declares more than this is no name, it is an attempt to make the reader allocate.
_MAX_HEADER_BYTES = 1 << 20
_HEADER_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                 tarfile.SOLARIS_XHDTYPE)
_KINDS = {tarfile.SYMTYPE: "a symlink", tarfile.LNKTYPE: "a hard link", tarfile.CHRTYPE: "a character device",
          tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a fifo"}
_HEADER_PROBLEMS = {tarfile.EmptyHeaderError: "the data stops with no end-of-archive block",
                    tarfile.TruncatedHeaderError: "the data stops inside a header"}
_T = TypeVar("_T")


@dataclass(frozen=True)
class ShardLimits:
    """Caps on what one tar member may make the reader hold, checked on its header before reading."""

    max_member_bytes: int = 64 << 20  # any image or caption member
    max_caption_bytes: int = 64 << 10  # `.txt` and `.json` members

    def __post_init__(self) -> None:
        if self.max_member_bytes < 1 or self.max_caption_bytes < 1:
            raise ValueError(f"shard limits must be >= 1 byte: {self}")


class ShardFormatError(ValueError):
    """The shard cannot be read to its end (a tar to its end-of-archive, a Parquet file to its last
    row), or holds another number of samples than its producer wrote: the shard fails this run (its
    samples so far are not committed)."""


@dataclass
class Sample:
    """One sample of a shard: its members by extension and caption, or the reason it cannot be used."""

    index: int
    key: str | None
    members: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None
    caption: str | None = None
    other_members: list[str] = field(default_factory=list)  # extensions present but not read
    image_member: str | None = None  # the member holding the image when the source names it (a Parquet column)
    fields: dict[str, Any] = field(default_factory=dict)  # the source's fields: a .json sidecar, a Parquet row

    def image_bytes(self) -> tuple[str, bytes] | None:
        for name in (self.image_member,) if self.image_member else IMAGE_EXTENSIONS:
            if name in self.members:
                return name, self.members[name]
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


def text(value: str) -> str:
    """A string Arrow can store: lone surrogates (undecodable bytes of a tar name, JSON escapes such as
    "\\ud800") become U+FFFD instead of failing the whole batch when the column is built."""
    if value.isascii():
        return value
    try:  # a tar name's undecodable bytes, kept by tarfile as surrogate escapes: one U+FFFD a byte
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # other lone surrogates: one U+FFFD per UTF-8 byte they would take
        raw = value.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "replace")


def describe(err: BaseException) -> str:
    """An exception as one short line for a reason column: its type and message."""
    return text(f"{type(err).__name__}: {' '.join(str(err).split())}"[:300])


def field_text(value: Any) -> str | None:
    """A source field as a corpus string: text as it is, bytes as hex, null as null, anything else
    (numbers, booleans, lists, objects, timestamps) as JSON."""
    if value is None or isinstance(value, str):
        return None if value is None else text(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    return text(json.dumps(value, ensure_ascii=False, sort_keys=True, default=str))


def over_cap(what: str, size: int, caption: bool, limits: ShardLimits) -> str | None:
    """Why `what` (an image or caption of `size` bytes) is refused under `limits`, or None."""
    cap, name = ((limits.max_caption_bytes, "max_caption_bytes") if caption
                 else (limits.max_member_bytes, "max_member_bytes"))
    return f"{what} is {size} bytes, over the {cap} byte cap ({name})" if size > cap else None


def iter_samples(uri: str, storage_options: dict[str, Any] | None = None,
                 limits: ShardLimits = ShardLimits()) -> Iterator[Sample]:
    """Stream a shard's samples in tar order (see `ShardReader`)."""
    return iter(ShardReader(uri, storage_options, limits))


class ShardReader:
    """One pass over one shard. Iterating yields its samples in tar order, then checks the tar ended
    at its end-of-archive and agrees with the producer's count; raises `ShardFormatError` or
    `StorageFault` otherwise. `size` and `version` describe the object read (set at open)."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None,
                 limits: ShardLimits = ShardLimits()) -> None:
        self.uri, self.storage_options, self.limits = uri, storage_options, limits
        self.size, self.version = -1, ""
        self.samples = 0  # once iteration ended: samples in the tar
        self.ignored_members = 0  # directories: not samples

    def __iter__(self) -> Iterator[Sample]:
        with stored_object(self.uri, self.storage_options) as (stream, self.size, self.version):
            yield from self._read(stream)
        expected = producer_sample_count(self.uri, self.storage_options)
        if expected is not None and expected[0] != self.samples:
            raise ShardFormatError(f"the tar holds {self.samples} samples but its producer's {expected[1]} "
                                   f"says {expected[0]}")

    def _read(self, stream: StoreHandle) -> Iterator[Sample]:
        groups = _Grouping(self.limits)
        try:
            with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictTarInfo) as tar:  # type: ignore[call-overload]
                for member in tar:
                    yield from groups.add(member, tar)
        except StorageFault:
            raise
        except Exception as err:  # noqa: BLE001 - tarfile raises many types for bytes that are not a tar
            raise ShardFormatError(f"tar ends before its end-of-archive after {groups.next_index} samples: "
                                   f"{describe(err)}") from err
        yield from groups.flush()
        self.samples, self.ignored_members = groups.next_index, groups.ignored


def producer_sample_count(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[int, str] | None:
    """(samples the producer wrote into the tar, which file says so), from `<shard>_stats.json`
    ("successes", else "count") or the `<shard>.parquet` index (rows with status "success"); None
    when the producer wrote neither, or nothing usable (logged: no check is made then)."""
    stem = uri
    for suffix in TAR_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    fs, _ = filesystem(uri, storage_options)
    for sidecar, count in ((f"{stem}_stats.json", _stats_count), (f"{stem}.parquet", _index_count)):
        path = fs._strip_protocol(sidecar)
        if not store_call("looking for", sidecar, lambda: fs.exists(path)):
            continue
        data = store_call("reading", sidecar, lambda: fs.cat_file(path))
        try:
            found = count(data)
        except Exception as err:  # noqa: BLE001 - a producer's file we cannot parse is no reason to fail
            logger.warning("%s cannot be read (%s); the shard's sample count is not checked", sidecar, describe(err))
            return None
        return None if found is None else (found, posixpath.basename(sidecar))
    return None


def _stats_count(data: bytes) -> int | None:
    stats = json.loads(data)
    for key in ("successes", "count"):
        if isinstance(stats, dict) and isinstance(stats.get(key), int):
            return int(stats[key])
    return None


def _index_count(data: bytes) -> int | None:
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data), columns=["status"])
    return sum(1 for status in table["status"].to_pylist() if status == "success")


def store_call(doing: str, uri: str, call: Callable[[], _T]) -> _T:
    """Run one call to the store; whatever it raises is the store's failure, not the data's."""
    try:
        return call()
    except StorageFault:
        raise
    except Exception as err:  # noqa: BLE001 - s3fs, botocore, aiohttp and the OS each raise their own
        raise StorageFault(f"{doing} {uri}: {describe(err)}") from err


@contextlib.contextmanager
def stored_object(uri: str, storage_options: dict[str, Any] | None) -> Iterator[tuple[StoreHandle, int, str]]:
    """(handle, size, version) of the object as it is now, open for reading while the block runs."""
    fs, path = filesystem(uri, storage_options)
    store_call("refreshing the listing of", uri, lambda: fs.invalidate_cache(path))  # info of the object now
    info = store_call("reading the size and version of", uri, lambda: fs.info(path))
    size = info.get("size")
    handle = store_call("opening", uri, lambda: fs.open(path, "rb"))
    try:
        yield StoreHandle(handle, uri), (-1 if size is None else int(size)), object_version(info)
    finally:
        store_call("closing", uri, handle.close)


class StoreHandle:
    """A shard's file handle as a parser (tarfile, pyarrow) sees it: a failing call is a
    `StorageFault`, so that only what the parser itself raises counts as a broken shard. `fault`
    keeps the last one, for parsers that hand on a callback's exception as one of their own."""

    def __init__(self, handle: Any, uri: str) -> None:
        self._handle, self._uri = handle, uri
        self.fault: StorageFault | None = None
        self.closed = False  # pyarrow asks; `stored_object` closes the store's handle after the parser is done

    def read(self, size: int = -1) -> bytes:
        return self._call("reading", lambda: self._handle.read(size))

    def seek(self, offset: int, whence: int = 0) -> int:  # pyarrow reads a Parquet footer first, then its pages
        return self._call("seeking in", lambda: self._handle.seek(offset, whence))

    def tell(self) -> int:
        return self._call("seeking in", self._handle.tell)

    def _call(self, doing: str, call: Callable[[], _T]) -> _T:
        try:
            return store_call(doing, self._uri, call)
        except StorageFault as fault:
            self.fault = fault
            raise


class _StrictTarInfo(tarfile.TarInfo):
    """tarfile's header reader, except that the stream must end with an end-of-archive block.

    `TarFile.next` treats a header it cannot read after the first member (no bytes left, a partial
    block, a bad checksum) as the end of the archive and returns quietly: a truncated or corrupt
    shard would look complete with fewer samples. Only a zero block (`EOFHeaderError`) ends it here.
    """

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        offset = tar.offset
        try:
            buf = tar.fileobj.read(tarfile.BLOCKSIZE)  # type: ignore[union-attr]
            obj = cls.frombuf(buf, tar.encoding, tar.errors)  # type: ignore[arg-type]
        except tarfile.EOFHeaderError:
            raise
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as err:
            if offset == 0:
                raise  # not a tar at all: tarfile says so itself
            raise tarfile.ReadError(_HEADER_PROBLEMS.get(type(err), "corrupt header: {}").format(err)
                                    + f" at byte {offset}") from None
        if obj.type in _HEADER_TYPES and obj.size > _MAX_HEADER_BYTES:
            raise tarfile.ReadError(f"extended header at byte {offset} declares {obj.size} bytes")
        obj.offset = tar.fileobj.tell() - tarfile.BLOCKSIZE  # type: ignore[union-attr]
        return obj._proc_member(tar)  # type: ignore[attr-defined]


class _Grouping:
    """Groups consecutive members into samples; what cannot be used becomes the sample's error."""

    def __init__(self, limits: ShardLimits) -> None:
        self.limits = limits
        self.next_index = 0
        self.ignored = 0
        self.current: Sample | None = None
        self.seen: dict[str, int] = {}  # key -> index of its sample

    def add(self, member: tarfile.TarInfo, tar: tarfile.TarFile) -> Iterator[Sample]:
        if member.isdir():
            self.ignored += 1
            return
        name = member.name[2:] if member.name.startswith("./") else member.name
        parts = split_member_name(name)
        if unsafe_member(name) or parts is None:
            yield from self.flush()
            yield self._alone(name, member)
            return
        key, ext = parts
        if self.current is None or key != self.current.key:
            yield from self.flush()
            self.current = self._start(key)
        sample = self.current
        if sample.error is None:
            sample.error = self._member_problem(name, ext, member, sample)
        if sample.error is None and ext in _READ_EXTENSIONS:
            sample.members[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
        elif ext not in _READ_EXTENSIONS:
            sample.other_members.append(ext)

    def flush(self) -> Iterator[Sample]:
        if self.current is not None:
            sample, self.current = self.current, None
            if sample.error is None:
                sample.caption, sample.fields, sample.error = parse_sidecars(sample.members)
            yield sample

    def _start(self, key: str) -> Sample:
        shown = text(key)
        if key in self.seen:
            return self._new(shown, f"key {shown!r} reappears after other keys (its sample is index "
                                    f"{self.seen[key]}): WebDataset groups consecutive members, so these "
                                    "members were not consecutive with it and are not part of it")
        self.seen[key] = self.next_index
        return self._new(shown, None if shown == key else f"member name {shown!r} is not valid UTF-8")

    def _alone(self, name: str, member: tarfile.TarInfo) -> Sample:
        """An error row of its own: a member outside the shard's folder, or one without an extension."""
        if unsafe_member(name):
            return self._new(None, f"member {text(name)!r} lies outside the shard's folder")
        if member.isfile():
            return self._new(text(name), f"member {text(name)!r} has no extension: it belongs to no sample")
        return self._new(text(name), _kind_problem(text(name), member))

    def _member_problem(self, name: str, ext: str, member: tarfile.TarInfo, sample: Sample) -> str | None:
        shown = text(name)
        if member.issparse():
            return f"member {shown!r} is a sparse file declaring {member.size} bytes: sparse members are refused"
        if not member.isfile():
            return _kind_problem(shown, member)
        if ext not in _READ_EXTENSIONS:
            return None  # never read: no cap applies
        if ext in sample.members:
            return f"member {shown!r} appears twice in the sample"
        problem = over_cap(f"member {shown!r}", member.size, ext in CAPTION_EXTENSIONS, self.limits)
        return None if problem is None else f"{problem}; not read"

    def _new(self, key: str | None, error: str | None) -> Sample:
        sample = Sample(index=self.next_index, key=key, error=error)
        self.next_index += 1
        return sample


def _kind_problem(name: str, member: tarfile.TarInfo) -> str:
    kind = _KINDS.get(member.type, f"a member of tar type {member.type!r}")
    rule = "links are not followed" if member.issym() or member.islnk() else "only regular files are read"
    return f"member {name!r} is {kind}: {rule}"


def parse_sidecars(members: dict[str, bytes]) -> tuple[str | None, dict[str, Any], str | None]:
    """(caption, fields, error) of a sample's members: the caption is the `.txt` (invalid UTF-8
    replaced), else a `.json` sidecar's string "caption"; the fields are the `.json` object (empty
    without one, or when it holds no object). A `.json` that does not parse is the sample's error,
    whatever the parser raised (invalid UTF-8 or JSON, nesting too deep for the recursion limit)."""
    caption, fields = None, {}
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except Exception as err:  # noqa: BLE001 - any parse failure is this sample's, not the job's
            return None, {}, f"json sidecar: {describe(err)}"
        fields = meta if isinstance(meta, dict) else {}
        if isinstance(fields.get("caption"), str):
            caption = text(fields["caption"])
    if "txt" in members:
        caption = members["txt"].decode("utf-8", errors="replace").strip()
    return caption, fields, None
