"""Hostile input on the read side: no sample stops a job, every sample is a row or an
error row, and a tar that cannot be read to its end fails its shard instead of committing short.

First a fast layer that calls the stages directly (hundreds of seeded image mutants, every tar
member anomaly, every tar-level anomaly, store faults on the loopback S3), then the real tokenize
pipeline on a local Ray cluster over fuzz shards, where per shard `rows + errors` must equal the
samples the test put in the tar.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import logging
import subprocess
import sys
import tarfile
import tracemalloc
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dualtok.pipelines.io import schemas as S
from dualtok.pipelines.io.decode import DecodeConfig, DecodeError, decode_image
from dualtok.pipelines.io.read import DecodeImages, ReadShards
from dualtok.pipelines.io.shards import ShardLimits, ShardReader
from tests.shard_factory import (
    IMAGE_FORMATS, blocks_tar, encode, members_blocks, mutate, photo_images, png_with_ztxt,
    sample_members, sparse_member, special_member, tar_bytes,
)

pytestmark = pytest.mark.timeout(600)

DECODE_REASONS = ("not a readable image: ", "corrupt image data: ", "decompression bomb: ", "image too small: ",
                  "decoded image too large: ", "empty image member")
SMALL = DecodeConfig(size=32)  # the decode layer's work does not depend on the output size


@pytest.fixture(scope="module")
def good_jpeg() -> bytes:
    return encode(photo_images(1, seed=9)[0], quality=80)


def shard_batch(uris: dict[str, str]) -> dict[str, np.ndarray]:
    """The read stage's input: one row per shard (id -> URI)."""
    return {S.SHARD: np.array(list(uris), dtype=object), S.SHARD_URI: np.array(list(uris.values()), dtype=object)}


def read_and_decode(uris: dict[str, str], read: ReadShards = ReadShards(rows_per_batch=7),
                    decode: DecodeImages = DecodeImages(SMALL)) -> dict[str, np.ndarray]:
    """Both CPU stages called as Ray calls them (typed tables in, numpy batches out), rows concatenated."""
    parts = [S.inflight_columns(decode(S.inflight_columns(table))) for table in read(shard_batch(uris))]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def end_rows(rows: dict[str, np.ndarray]) -> dict[str, dict[str, object]]:
    ends = np.flatnonzero(rows[S.ROW_KIND] == S.END)
    return {str(rows[S.SHARD][i]): {name: rows[name][i] for name in rows if name != S.IMAGE} for i in ends}


# ---- images: seeded mutations -----------------------------------------------------------------
def mutant_members(seed: int, per_format: int) -> list[tuple[str, bytes]]:
    """`per_format` seeded mutants of one valid photo in each of JPEG/PNG/WEBP/GIF/TIFF, one sample each."""
    rng = np.random.default_rng(seed)
    photo = photo_images(1, seed=seed)[0]
    members = []
    for ext, (fmt, options) in IMAGE_FORMATS.items():
        valid = encode(photo, fmt, **options)
        for i in range(per_format):
            kind, data = mutate(valid, rng)
            members.append((f"{ext}{seed:02d}{i:03d}_{kind}.{ext}", data))
    return members


def test_seeded_image_mutants_each_become_a_row_or_a_decode_error(tmp_path):
    members = mutant_members(seed=1, per_format=60)
    (tmp_path / "fuzz.tar").write_bytes(tar_bytes(members))
    rows = read_and_decode({"fuzz": str(tmp_path / "fuzz.tar")})

    kinds = rows[S.ROW_KIND]
    assert end_rows(rows)["fuzz"][S.SHARD_SAMPLES] == len(members) == int((kinds != S.END).sum())
    assert sorted(rows[S.INDEX][kinds != S.END].tolist()) == list(range(len(members)))
    good, bad = np.flatnonzero(kinds == S.SAMPLE), np.flatnonzero(kinds == S.ERROR)
    assert (rows[S.WIDTH][good] >= 16).all() and (rows[S.HEIGHT][good] >= 16).all()
    assert set(rows[S.STAGE][bad]) == {S.STAGE_DECODE}
    assert all(str(r).startswith(DECODE_REASONS) for r in rows[S.REASON][bad])
    # the mutants reach every kind of failure the issue saw escape: Pillow's OSError at open
    # ("could not create decoder object", "Truncated File Read"), SyntaxError, and its bomb error
    types = {str(r).split(": ")[1] for r in rows[S.REASON][bad]}
    assert {"OSError", "UnidentifiedImageError", "SyntaxError"} <= types
    assert 0.3 * len(members) < len(bad) < 0.95 * len(members)  # a mutation breaks many files, not all


@pytest.mark.parametrize("name, data, reason", [
    ("half WEBP", lambda p: encode(p, "WEBP")[: len(encode(p, "WEBP")) // 2],
     "not a readable image: OSError: could not create decoder object"),
    ("JPEG cut in its header", lambda p: encode(p)[:300], "not a readable image: OSError: Truncated File Read"),
    ("PNG with a 2 MB zTXt chunk", lambda p: png_with_ztxt(p, 2_000_000),
     "not a readable image: ValueError: Decompressed data too large"),
    ("EPS (Ghostscript) is not opened", lambda p: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n",
     "not a readable image: UnidentifiedImageError"),
])
def test_inputs_that_escaped_before_are_decode_errors(name, data, reason):
    with pytest.raises(DecodeError) as caught:
        decode_image(data(photo_images(1, seed=2)[0]), SMALL)
    assert str(caught.value).startswith(reason), name


def test_16_bit_8000x8000_png_decodes_within_its_caps(tmp_path):
    pixels = np.broadcast_to((np.arange(8000) * 8).astype(np.uint16), (8000, 8000))  # a 16-bit ramp
    path = tmp_path / "big16.png"
    Image.fromarray(pixels).save(path)
    assert path.stat().st_size < 1_000_000
    # in a fresh process, so that its peak RSS is the decode's own. Its peak is read from VmHWM, which
    # belongs to the process's own address space: getrusage's ru_maxrss survives exec and reports
    # the pytest process's size when the child was forked from it.
    script = (
        "import re, sys, numpy as np\n"
        "from dualtok.pipelines.io.decode import DecodeConfig, decode_image, DecodeError\n"
        f"data = open({str(path)!r}, 'rb').read()\n"
        "out = decode_image(data, DecodeConfig(size=64))\n"
        "try:\n"
        "    decode_image(data, DecodeConfig(size=64, max_decoded_bytes=100_000_000))\n"
        "except DecodeError as err:\n"
        "    print(err)\n"
        "print(out.width, out.height, int(out.pixels.min()), int(out.pixels.max()),"
        " re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    capped, measured = done.stdout.strip().splitlines()
    assert capped == ("decoded image too large: 8000x8000 in mode I;16 takes 128000000 bytes > limit 100000000 "
                      "(max_decoded_bytes)")
    width, height, low, high, max_rss_kb = (int(v) for v in measured.split())
    assert (width, height) == (8000, 8000) and low < 20 and high > 220  # the full 16-bit range scaled to 8 bits
    assert max_rss_kb < 1_000_000  # < 1 GB (the float64 path took 1.25 GB)


def test_sixteen_bit_scaling_is_exact_integer_rounding():
    from dualtok.pipelines.io.decode import _to_uint8

    values = np.array([0, 1, 128, 129, 257, 32767, 32768, 65534, 65535], dtype=np.uint16)
    expected = np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(_to_uint8(values), expected)
    np.testing.assert_array_equal(_to_uint8(np.array([-5, 0, 200, 255], np.int32)), [0, 0, 200, 255])
    np.testing.assert_array_equal(_to_uint8(np.array([np.nan, -1.0, 12.7, 300.0], np.float32)), [0, 0, 12, 255])


# ---- tar members: every one accounted for -------------------------------------------------------
@dataclass
class Built:
    """A shard built by the test, and what the read stage must make of it, row by row."""

    blocks: list[bytes] = field(default_factory=list)
    rows: list[tuple[str | None, str | None]] = field(default_factory=list)  # (key, read-stage reason prefix)

    def add(self, blocks: list[bytes], *rows: tuple[str | None, str | None]) -> None:
        self.blocks += blocks
        self.rows += rows

    @property
    def samples(self) -> int:
        return len(self.rows)


def hostile_members(good: bytes) -> Built:
    """Every member anomaly a crawl holds, each next to good samples; directories are no samples."""
    b = Built()
    b.add(members_blocks(sample_members("ok0", good, "a photo")), ("ok0", None))
    b.add([special_member("sym.jpg", tarfile.SYMTYPE, "ok0.jpg")],
          ("sym", "member 'sym.jpg' is a symlink: links are not followed"))
    b.add([*members_blocks([("hard.txt", b"caption")]), special_member("hard.jpg", tarfile.LNKTYPE, "ok0.jpg")],
          ("hard", "member 'hard.jpg' is a hard link: links are not followed"))
    b.add([special_member("fifo.jpg", tarfile.FIFOTYPE)], ("fifo", "member 'fifo.jpg' is a fifo: only regular"))
    b.add([special_member("dev.png", tarfile.CHRTYPE)], ("dev", "member 'dev.png' is a character device"))
    b.add([special_member("folder", tarfile.DIRTYPE), special_member("folder/sub", tarfile.DIRTYPE)])
    b.add(members_blocks([("README", b"not a sample")]), ("README", "member 'README' has no extension"))
    b.add([sparse_member("sparse.jpg", b"\xff" * 512, 1_500_000_000)],
          ("sparse", "member 'sparse.jpg' is a sparse file declaring 1500000000 bytes: sparse members are refused"))
    b.add(members_blocks([("big.jpg", b"\0" * 300_001)]),
          ("big", "member 'big.jpg' is 300001 bytes, over the 300000 byte cap (max_member_bytes)"))
    b.add(members_blocks(sample_members("longcap", good, "x" * 70_000)),
          ("longcap", "member 'longcap.txt' is 70000 bytes, over the 65536 byte cap (max_caption_bytes)"))
    b.add(members_blocks([("badjson.jpg", good), ("badjson.json", b'{"caption": "unterminated')]),
          ("badjson", "json sidecar: JSONDecodeError"))
    b.add(members_blocks([("deep.jpg", good), ("deep.json", b"[" * 30_000)]), ("deep", "json sidecar: RecursionError"))
    b.add(members_blocks([("deeper.jpg", good), ("deeper.json", b"[" * 200_000)]),
          ("deeper", "member 'deeper.json' is 200000 bytes, over the 65536 byte cap"))
    b.add(members_blocks([("latin.jpg", good), ("latin.json", b'{"caption": "caf\xe9"}')]),
          ("latin", "json sidecar: UnicodeDecodeError"))
    b.add(members_blocks([("badtxt.jpg", good), ("badtxt.txt", b"caf\xe9 \xff")]), ("badtxt", None))
    b.add(members_blocks([("lone.jpg", good), ("lone.json", b'{"caption": "x \\ud800 y"}')]), ("lone", None))
    b.add(members_blocks([("dup.jpg", good), ("mid.jpg", good), ("dup.txt", b"late caption")]),
          ("dup", None), ("mid", None), ("dup", "key 'dup' reappears after other keys (its sample is index"))
    b.add(members_blocks([("twice.jpg", good), ("twice.jpg", good)]),
          ("twice", "member 'twice.jpg' appears twice in the sample"))
    b.add(members_blocks([("bad\udcff.jpg", good)]), ("bad\ufffd", "member name 'bad\ufffd' is not valid UTF-8"))
    b.add(members_blocks([("../escape.jpg", good)]), (None, "member '../escape.jpg' lies outside the shard's folder"))
    b.add(members_blocks([("noimg.txt", b"words only"), ("noimg.cls", b"3")]),
          ("noimg", "no image member (members: cls, txt)"))
    b.add(members_blocks([("extra.jpg", good), ("extra.cls", b"3"), ("extra.url", b"http://x")]), ("extra", None))
    return b


LIMITS = ShardLimits(max_member_bytes=300_000)


def test_every_member_anomaly_is_one_row_with_its_reason(tmp_path, good_jpeg):
    built = hostile_members(good_jpeg)
    (tmp_path / "hostile.tar").write_bytes(blocks_tar(built.blocks))
    tracemalloc.start()
    rows = read_and_decode({"h": str(tmp_path / "hostile.tar")}, ReadShards(rows_per_batch=5, limits=LIMITS))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64 << 20  # the 1.5 GB sparse member and the capped members were never read

    assert end_rows(rows)["h"][S.SHARD_SAMPLES] == built.samples
    samples = np.flatnonzero(rows[S.ROW_KIND] != S.END)
    assert rows[S.INDEX][samples].tolist() == list(range(built.samples))
    for i, (key, reason) in zip(samples, built.rows):
        assert rows[S.KEY][i] == key
        if reason is None:
            assert (rows[S.ROW_KIND][i], rows[S.REASON][i]) == (S.SAMPLE, ""), key
        else:
            assert rows[S.ROW_KIND][i] == S.ERROR and rows[S.STAGE][i] == S.STAGE_READ, key
            assert str(rows[S.REASON][i]).startswith(reason), (key, rows[S.REASON][i])
    captions = dict(zip(rows[S.KEY][samples], rows[S.CAPTION][samples]))
    assert captions["ok0"] == "a photo" and captions["badtxt"] == "caf\ufffd \ufffd"
    assert captions["lone"] == "x \ufffd\ufffd\ufffd y" and captions["dup"] is None  # the late .txt is not its

    reader = ShardReader(str(tmp_path / "hostile.tar"), limits=LIMITS)
    assert sum(1 for _ in reader) == built.samples and reader.ignored_members == 2  # the two directories


# ---- tars that cannot be read to their end ------------------------------------------------------
def five_samples(good: bytes) -> list[bytes]:
    return members_blocks([(f"s{i}.jpg", good) for i in range(5)])


def corrupt_header(block: bytes) -> bytes:
    return b"X" + block[1:]  # the name changes, the checksum does not


TAR_ANOMALIES = {
    "corrupt header after member 2": (lambda b: blocks_tar([*b[:2], corrupt_header(b[2]), *b[3:]]),
                                      "after 2 samples: ReadError: corrupt header: bad checksum at byte "),
    "cut at a member boundary": (lambda b: b"".join(b[:3]),
                                 "after 3 samples: ReadError: the data stops with no end-of-archive block at byte "),
    "junk after member 4": (lambda b: b"".join(b[:4]) + np.random.default_rng(0).bytes(4096),
                            "after 4 samples: ReadError: corrupt header: "),
    "cut inside a member's data": (lambda b: b"".join(b[:2]) + b[2][:2000], "ReadError: unexpected end of data"),
    "cut inside a header": (lambda b: b"".join(b[:2]) + b[2][:300],
                            "after 2 samples: ReadError: the data stops inside a header at byte "),
    "not a tar": (lambda b: np.random.default_rng(1).bytes(3000), "after 0 samples: ReadError: "),
    "an empty file": (lambda b: b"", "after 0 samples: ReadError: empty file"),
}


@pytest.mark.parametrize("anomaly", sorted(TAR_ANOMALIES))
def test_a_tar_not_read_to_its_end_fails_the_shard(tmp_path, good_jpeg, anomaly):
    build, reason = TAR_ANOMALIES[anomaly]
    (tmp_path / "x.tar").write_bytes(build(five_samples(good_jpeg)))
    (tmp_path / "ok.tar").write_bytes(blocks_tar(five_samples(good_jpeg)))
    rows = read_and_decode({"x": str(tmp_path / "x.tar"), "ok": str(tmp_path / "ok.tar")})
    ends = end_rows(rows)
    assert ends["x"][S.STAGE] == S.STAGE_READ and ends["x"][S.SHARD_SAMPLES] == -1
    assert str(ends["x"][S.REASON]).startswith("tar ends before its end-of-archive after ")
    assert reason in str(ends["x"][S.REASON]), ends["x"][S.REASON]
    assert ends["x"][S.SHARD_BYTES] == (tmp_path / "x.tar").stat().st_size
    # the next shard of the same call is read as usual
    assert (ends["ok"][S.REASON], ends["ok"][S.SHARD_SAMPLES]) == ("", 5)


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress], ids=["gzip", "bz2"])
def test_a_compressed_tar_named_tar_is_read_as_what_it_is(tmp_path, good_jpeg, compress):
    (tmp_path / "z.tar").write_bytes(compress(tar_bytes(sample_members("k", good_jpeg, "c") * 1
                                                        + [(f"m{i}.jpg", good_jpeg) for i in range(4)])))
    rows = read_and_decode({"z": str(tmp_path / "z.tar")})
    assert end_rows(rows)["z"][S.SHARD_SAMPLES] == 5 and end_rows(rows)["z"][S.REASON] == ""
    assert (rows[S.ROW_KIND] == S.SAMPLE).sum() == 5 and "c" in rows[S.CAPTION].tolist()


def index_parquet(statuses: list[str]) -> bytes:
    rows = [{"key": f"s{i}", "caption": None, "width": 1, "height": 1, "source": "x", "status": status,
             "error_message": None} for i, status in enumerate(statuses)]
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=S.SHARD_INDEX_SCHEMA), buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("sidecar, content, failure", [
    ("x_stats.json", json.dumps({"count": 6, "successes": 4}).encode(),
     "the tar holds 5 samples but its producer's x_stats.json says 4"),
    ("x.parquet", index_parquet(["success"] * 6 + ["failed"]), "the tar holds 5 samples but its producer's x.parquet says 6"),
    ("x_stats.json", json.dumps({"count": 7, "successes": 5}).encode(), None),
    ("x.parquet", index_parquet(["success"] * 5 + ["failed"] * 2), None),
    ("x_stats.json", b"{}", None),  # no count in it: nothing to check
    ("x_stats.json", b"{not json", None),  # unreadable: logged, nothing to check
])
def test_a_sample_count_other_than_the_producers_fails_the_shard(tmp_path, good_jpeg, sidecar, content, failure):
    (tmp_path / "x.tar").write_bytes(blocks_tar(five_samples(good_jpeg)))
    (tmp_path / sidecar).write_bytes(content)
    end = end_rows(read_and_decode({"x": str(tmp_path / "x.tar")}))["x"]
    if failure is None:
        assert (end[S.REASON], end[S.SHARD_SAMPLES]) == ("", 5)
    else:
        assert (end[S.STAGE], end[S.REASON], end[S.SHARD_SAMPLES]) == (S.STAGE_READ, failure, -1)


# ---- store faults ------------------------------------------------------------------------------
def s3_options(s3) -> dict:
    # no read-ahead cache: every read of the handle is a request, so a fault lands mid-shard
    return {**s3.storage_options, "default_cache_type": "none"}


def test_a_shard_deleted_between_listing_and_reading_fails_as_a_storage_fault(s3, good_jpeg):
    from dualtok.pipelines.io.storage import list_shards

    fs, bucket = s3.filesystem(), s3.new_bucket()
    fs.pipe_file(f"{bucket}/in/a.tar", blocks_tar(five_samples(good_jpeg)))
    [uri] = list_shards([f"s3://{bucket}/in/"], s3.storage_options)
    fs.rm(f"{bucket}/in/a.tar")
    read = ReadShards(s3.storage_options, storage_retries=2, retry_seconds=0.01)
    [table] = list(read(shard_batch({"a": uri})))
    end = S.inflight_columns(table)
    assert end[S.ROW_KIND].tolist() == [S.END] and end[S.STAGE][0] == S.STAGE_STORAGE
    assert end[S.SHARD_SAMPLES][0] == -1 and end[S.SHARD_RETRIES][0] == 2
    assert "FileNotFoundError" in end[S.REASON][0] and "gave up after 2 retries" in end[S.REASON][0]
    assert "dualtok-test-secret-value" not in end[S.REASON][0]


class _OnRetry(logging.Handler):
    """Runs `action` when the read stage announces a retry, before it waits: the store is put right
    (or changed) between two tries at a known point instead of at a guessed time."""

    def __init__(self, action) -> None:
        super().__init__(logging.WARNING)
        self.action, self.calls = action, 0

    def emit(self, record: logging.LogRecord) -> None:
        if "retry" in record.getMessage():
            self.calls += 1
            self.action()


def read_losing_the_object(s3, fs, path: str, on_retry) -> tuple[dict[str, np.ndarray], int]:
    """The read stage over s3://`path`, the object deleted after the first batch it passes on and
    `on_retry` run when the stage announces its retry: (rows, retries announced)."""
    handler = _OnRetry(on_retry)
    logging.getLogger("dualtok.pipelines.io.read").addHandler(handler)
    try:
        read = ReadShards(s3_options(s3), rows_per_batch=2, storage_retries=3, retry_seconds=0.01)
        batches = []
        for columns in read.columns(shard_batch({"a": f"s3://{path}"})):
            batches.append(columns)
            if len(batches) == 1:
                fs.rm(path)  # the object goes away while the stage is part-way through it
    finally:
        logging.getLogger("dualtok.pipelines.io.read").removeHandler(handler)
    return {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}, handler.calls


@pytest.mark.parametrize("rewrite", [False, True], ids=["restored", "rewritten"])
def test_a_fault_mid_shard_is_retried_without_passing_a_row_twice(s3, good_jpeg, rewrite):
    fs, bucket = s3.filesystem(), s3.new_bucket()
    path = f"{bucket}/in/a.tar"
    original = tar_bytes([(f"s{i}.jpg", good_jpeg) for i in range(6)])
    fs.pipe_file(path, original)
    changed = tar_bytes([(f"s{i}.jpg", good_jpeg) for i in range(7)])
    rows, calls = read_losing_the_object(s3, fs, path, lambda: fs.pipe_file(path, changed if rewrite else original))
    end = end_rows(rows)["a"]
    assert calls == 1 and end[S.SHARD_RETRIES] == 1
    samples = rows[S.INDEX][rows[S.ROW_KIND] == S.SAMPLE].tolist()
    if rewrite:  # rows 0-1 came from the first object: the shard cannot be finished from the second
        assert samples == [0, 1] and end[S.STAGE] == S.STAGE_STORAGE
        assert str(end[S.REASON]).startswith("the shard changed while it was read")
    else:
        assert samples == list(range(6))  # each index once, in order
        assert (end[S.REASON], end[S.SHARD_SAMPLES], end[S.SHARD_BYTES]) == ("", 6, len(original))
        assert end[S.SHARD_VERSION] == fs.info(path)["ETag"].strip('"')


# ---- explicit Arrow types ----------------------------------------------------------------------
def test_blocks_without_captions_merge_with_blocks_with_captions(tmp_path, good_jpeg):
    (tmp_path / "with.tar").write_bytes(tar_bytes(sample_members("w", good_jpeg, "words")))
    (tmp_path / "without.tar").write_bytes(tar_bytes(sample_members("n", good_jpeg, None)))
    tables = [DecodeImages(SMALL)(S.inflight_columns(t))
              for uri in ("with", "without") for t in ReadShards()(shard_batch({uri: str(tmp_path / f"{uri}.tar")}))]
    assert all(t.schema == tables[0].schema for t in tables)  # nothing inferred from the values
    merged = pa.concat_tables(tables)
    assert merged.schema.field(S.CAPTION).type == pa.string()
    assert merged[S.CAPTION].to_pylist() == ["words", None, None, None]
    with pytest.raises(KeyError, match="no Arrow type"):
        S.inflight_table({"pixels": np.zeros(2)})
    with pytest.raises(TypeError, match="uint8"):
        S.inflight_table({S.IMAGE: np.zeros((2, 4, 4, 3), np.float32)})


# ---- the real pipeline -------------------------------------------------------------------------
def write_fuzz_shards(root, good: bytes) -> dict[str, tuple[int, str | None]]:
    """Shards for a pipeline run: file name -> (samples in the tar, or the failure reason's start)."""
    root.mkdir()
    hostile = hostile_members(good)
    expected: dict[str, tuple[int, str | None]] = {}
    for seed in (3, 4):
        members = mutant_members(seed, per_format=3)
        (root / f"fuzz{seed}.tar").write_bytes(tar_bytes(members))
        expected[f"fuzz{seed}.tar"] = (len(members), None)
    (root / "hostile.tar").write_bytes(blocks_tar(hostile.blocks))
    expected["hostile.tar"] = (hostile.samples, None)
    (root / "good.tar").write_bytes(tar_bytes(sum((sample_members(f"g{i}", good, f"photo {i}") for i in range(3)), [])))
    expected["good.tar"] = (3, None)
    (root / "nocaps.tar").write_bytes(tar_bytes([(f"n{i}.jpg", good) for i in range(2)]))
    expected["nocaps.tar"] = (2, None)
    (root / "cut.tar").write_bytes(b"".join(five_samples(good)[:3]))
    expected["cut.tar"] = (-1, "read: tar ends before its end-of-archive after 3 samples")
    return expected


def run_pipeline(inputs: str, output: str, batch_size: int, read_actors: int, **image):
    from dualtok.pipelines.tokenize.config import ImageConfig, TokenizeConfig, plan_from_config
    from dualtok.pipelines.actors import StageResources
    from dualtok.pipelines.tokenize.pipeline import run_tokenize

    config = TokenizeConfig(inputs=[inputs], output=output, bundle="tiny", streams="guide",
                            encoder=StageResources(batch_size=batch_size), read_actors=read_actors,
                            read_cpus=0.5, image=ImageConfig(**image))
    return run_tokenize(plan_from_config(config))


def committed_counts(fs, output: str) -> dict[str, dict]:
    """shard file name -> marker, with the data/errors files' own indices checked against it."""
    out = {}
    for path in fs.find(f"{output}/_committed"):
        marker = json.loads(fs.cat_file(path))
        data = pq.read_table(fs.open(f"{output}/{marker['data_file']}"))[S.INDEX].to_pylist()
        errors = pq.read_table(fs.open(f"{output}/{marker['errors_file']}"))[S.INDEX].to_pylist()
        assert sorted(data + errors) == list(range(marker["samples"])), marker["shard"]
        assert (len(data), len(errors)) == (marker["rows"], marker["errors"])
        out[marker["shard_uri"].rsplit("/", 1)[-1]] = marker
    return out


@pytest.mark.slow
@pytest.mark.parametrize("batch_size, read_actors", [(1, 2), (3, 1), (64, 2)])
def test_the_pipeline_finishes_on_fuzz_shards_and_every_sample_is_counted(ray_session, tmp_path, good_jpeg,
                                                                          batch_size, read_actors):
    import fsspec

    expected = write_fuzz_shards(tmp_path / "shards", good_jpeg)
    output = str(tmp_path / "corpus")
    summary = run_pipeline(str(tmp_path / "shards"), output, batch_size, read_actors, max_member_bytes=300_000)

    markers = committed_counts(fsspec.filesystem("file"), output)
    for name, (samples, failure) in expected.items():
        if failure is None:
            assert markers[name]["samples"] == samples, name
            assert markers[name]["rows"] + markers[name]["errors"] == samples, name
        else:
            assert name not in markers
            [reason] = [r for shard, r in summary.shards_failed.items() if name.removesuffix(".tar") in shard]
            assert reason.startswith(failure), reason
    assert summary.shards_committed == len(expected) - 1 and len(summary.shards_failed) == 1
    assert summary.images + summary.errors == sum(s for s, f in expected.values() if f is None)
    table = pq.read_table(f"{output}/data")
    captions = dict(zip(table[S.KEY].to_pylist(), table[S.CAPTION].to_pylist()))
    assert captions["g1"] == "photo 1" and captions["n0"] is None and captions["lone"] == "x \ufffd\ufffd\ufffd y"


@pytest.mark.slow
@pytest.mark.parametrize("store", ["disk", "s3"])
def test_shards_with_and_without_captions_finish_together(ray_session, s3, tmp_path, good_jpeg, store):
    with_captions = tar_bytes(sum((sample_members(f"c{i}", good_jpeg, f"caption {i}") for i in range(3)), []))
    without = tar_bytes([(f"n{i}.jpg", good_jpeg) for i in range(3)])
    if store == "s3":
        fs, bucket = s3.filesystem(), s3.new_bucket()
        root = f"s3://{bucket}"
    else:
        import fsspec

        fs, root = fsspec.filesystem("file", auto_mkdir=True), str(tmp_path)
    fs.pipe_file(f"{root}/shards/a.tar", with_captions)
    fs.pipe_file(f"{root}/shards/b.tar", without)
    # batch size 2: a batch spans the two shards, a block holds captions of one kind only
    summary = run_pipeline(f"{root}/shards/", f"{root}/corpus", batch_size=2, read_actors=1)
    assert (summary.shards_committed, summary.shards_failed, summary.images) == (2, {}, 6)
    if store == "s3":
        fs.invalidate_cache()
    files = sorted(p for p in fs.find(f"{root}/corpus/data") if p.endswith(".parquet"))
    table = pa.concat_tables([pq.read_table(fs.open(p)) for p in files])
    captions = dict(zip(table[S.KEY].to_pylist(), table[S.CAPTION].to_pylist()))
    assert captions == {**{f"c{i}": f"caption {i}" for i in range(3)}, **{f"n{i}": None for i in range(3)}}
