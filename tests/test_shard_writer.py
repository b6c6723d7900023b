"""Shard writer: img2dataset's layout on real files and on a loopback S3 endpoint (moto's server)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from fsspec.spec import AbstractFileSystem
from PIL import Image

from dualtok_core.errors import DualtokError
from dualtok.jobs.cli import main as cli_main
from dualtok.pipelines.config import ConfigError
from dualtok.pipelines.shards.photos import encode_jpeg, sample_photos, write_sample_shards
from dualtok.pipelines.shards.writer import (
    ShardWriterConfig,
    sample_key,
    sources_from_folder,
    sources_from_table,
    write_shards,
)

pytestmark = pytest.mark.timeout(120)


def _png_bytes(image: np.ndarray, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _webp_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="WEBP", quality=80)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photos() -> list[tuple[str, np.ndarray, str]]:
    # Quarter-size copies keep the PNG/WebP encoding in the fixtures cheap.
    return [(key, np.ascontiguousarray(image[::4, ::4]), caption) for key, image, caption in sample_photos(6, seed=1)]


@pytest.fixture
def image_folder(tmp_path: Path, photos) -> tuple[Path, dict[str, tuple[bytes, str | None]]]:
    """A nested folder of jpg/png/webp files; returns it and {relative path: (bytes, caption)}."""
    root = tmp_path / "images"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    files = {
        "a.jpg": (encode_jpeg(photos[0][1]), photos[0][2]),
        "b.png": (_png_bytes(photos[1][1]), None),  # no sidecar: no caption, no .txt member
        "sub/c.webp": (_webp_bytes(photos[2][1]), "a caption with ünïcode"),
        "sub/deeper/d.JPEG": (encode_jpeg(photos[3][1]), photos[3][2]),
        "sub/e.png": (_png_bytes(photos[4][1], "RGBA"), photos[4][2]),
    }
    for rel, (data, caption) in files.items():
        (root / rel).write_bytes(data)
        if caption is not None:
            (root / rel).with_suffix(".txt").write_text(caption + "\n")
    (root / "b.txt").write_text(" \n")  # a blank sidecar is no caption
    (root / ".hidden" / "x.jpg").write_bytes(encode_jpeg(photos[5][1]))  # left out
    (root / "notes.md").write_text("not an image suffix: ignored")
    return root, files


def _read_samples(urls: list[str]) -> list[dict]:
    return list(wds.WebDataset(urls, shardshuffle=False))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sample_key_follows_img2dataset():
    assert sample_key(0, 0, 10000) == "000000000"
    assert sample_key(3, 17, 10000) == "000030017"
    assert sample_key(12, 5, 3) == "000125"
    assert sample_key(2, 99, 100) == "0000299"


def test_folder_round_trip(tmp_path: Path, image_folder):
    root, files = image_folder
    sources = sources_from_folder(str(root))
    assert [os.path.relpath(s.uri, root) for s in sources] == sorted(files)
    summary = write_shards(sources, str(tmp_path / "out"), ShardWriterConfig(samples_per_shard=2))
    assert summary.shards == tuple(str(tmp_path / "out" / f"{i:05d}.tar") for i in range(3))
    assert (summary.samples, summary.successes, summary.failed) == (5, 5, 0)

    samples = _read_samples(list(summary.shards))
    assert [s["__key__"] for s in samples] == ["000000", "000001", "000010", "000011", "000020"]
    by_source = {os.path.relpath(json.loads(s["json"])["source"], root): s for s in samples}
    assert set(by_source) == set(files)
    expected_ext = {"a.jpg": "jpg", "b.png": "png", "sub/c.webp": "webp", "sub/deeper/d.JPEG": "jpg",
                    "sub/e.png": "png"}
    for rel, (data, caption) in files.items():
        sample = by_source[rel]
        assert sample[expected_ext[rel]] == data  # images=keep: the original bytes, untouched
        meta = json.loads(sample["json"])
        assert meta["caption"] == caption
        assert (meta["width"], meta["height"]) == Image.open(io.BytesIO(data)).size
        assert meta["key"] == sample["__key__"] and meta["status"] == "success"
        if caption is None:
            assert "txt" not in sample
        else:
            assert sample["txt"].decode() == caption


def test_siblings_and_failures(tmp_path: Path, image_folder):
    root, files = image_folder
    (root / "broken.jpg").write_bytes(b"this is text, not a jpeg")
    truncated = files["a.jpg"][0][: len(files["a.jpg"][0]) // 3]
    (root / "cut.png").write_bytes(_png_bytes(np.zeros((200, 200, 3), np.uint8))[:60] + truncated[:10])
    sources = sources_from_folder(str(root))
    sources.insert(1, type(sources[0])(uri=str(root / "gone.jpg"), caption="missing"))
    out = tmp_path / "out"
    summary = write_shards(sources, str(out), ShardWriterConfig(samples_per_shard=4))
    assert (summary.samples, summary.successes, summary.failed) == (8, 5, 3)
    assert summary.failures == {"broken_image": 1, "missing_file": 1, "not_an_image": 1}

    stats = [json.loads((out / f"{i:05d}_stats.json").read_text()) for i in range(2)]
    assert [(s["count"], s["successes"], s["failed"]) for s in stats] == [(4, 2, 2), (4, 3, 1)]
    index = pa.concat_tables([pq.read_table(out / f"{i:05d}.parquet") for i in range(2)])
    assert index.column_names == ["key", "caption", "width", "height", "source", "status", "error_message"]
    rows = index.to_pylist()
    assert [r["key"] for r in rows] == ["000000", "000001", "000002", "000003", "000010", "000011", "000012", "000013"]
    failed = {os.path.basename(r["source"]): r for r in rows if r["status"] != "success"}
    assert set(failed) == {"gone.jpg", "broken.jpg", "cut.png"}
    assert all(r["status"] == "failed_to_open" and r["error_message"] and r["width"] is None for r in failed.values())
    # Failed inputs keep their keys but put nothing in the tar; every other key is there.
    tar_keys = [s["__key__"] for s in _read_samples([str(out / "00000.tar"), str(out / "00001.tar")])]
    assert tar_keys == [r["key"] for r in rows if r["status"] == "success"]


def test_odd_rows_of_a_path_list_become_failures(tmp_path: Path, photos):
    gif = tmp_path / "anim.gif"
    Image.fromarray(photos[0][1]).convert("P").save(gif, format="GIF")
    (tmp_path / "ok.jpg").write_bytes(encode_jpeg(photos[1][1]))
    table = pa.table({"path": ["", "nosuch-protocol://bucket/x.jpg", "anim.gif", "ok.jpg"]})
    pq.write_table(table, tmp_path / "list.parquet")
    sources = sources_from_table(str(tmp_path / "list.parquet"))
    kept = write_shards(sources, str(tmp_path / "keep"))
    assert kept.failures == {"bad_uri": 1, "missing_file": 1, "unsupported_format": 1}
    assert kept.successes == 1
    reencoded = write_shards(sources, str(tmp_path / "jpeg"), ShardWriterConfig(images="jpeg"))
    assert reencoded.failures == {"bad_uri": 1, "missing_file": 1} and reencoded.successes == 2
    samples = _read_samples(list(reencoded.shards))
    assert [s["__key__"] for s in samples] == ["000000002", "000000003"]
    assert Image.open(io.BytesIO(samples[0]["jpg"])).size == Image.open(gif).size


def test_parquet_and_csv_path_lists(tmp_path: Path, image_folder):
    root, files = image_folder
    rels = sorted(files)
    captions = [f"caption {i}" for i in range(len(rels))]
    pq.write_table(pa.table({"path": rels, "caption": captions}), root / "list.parquet")
    absolute = [str(root / rel) for rel in rels]
    pacsv.write_csv(pa.table({"file": absolute, "text": ["x", "", "z", "w", "v"]}), root / "list.csv")

    from_parquet = sources_from_table(str(root / "list.parquet"))  # relative paths: against the table's folder
    assert [s.uri for s in from_parquet] == absolute
    assert [s.caption for s in from_parquet] == captions
    from_csv = sources_from_table(f"file://{root}/list.csv", path_column="file", caption_column="text")
    assert [s.caption for s in from_csv] == ["x", None, "z", "w", "v"]

    summary = write_shards(from_csv, str(tmp_path / "csv_out"), ShardWriterConfig(samples_per_shard=10))
    samples = _read_samples(list(summary.shards))
    assert [s.get("txt", b"").decode() for s in samples] == ["x", "", "z", "w", "v"]
    assert summary.successes == 5

    with pytest.raises(DualtokError, match="no path column 'path'.*file, text"):
        sources_from_table(str(root / "list.csv"))
    with pytest.raises(DualtokError, match="no caption column 'title'"):
        sources_from_table(str(root / "list.parquet"), caption_column="title")


def test_same_input_gives_identical_bytes(tmp_path: Path, image_folder):
    root, _ = image_folder
    sources = sources_from_folder(str(root))
    for mode in ("keep", "jpeg"):
        config = ShardWriterConfig(samples_per_shard=3, images=mode, jpeg_quality=80)
        first = write_shards(sources, str(tmp_path / f"{mode}1"), config)
        second = write_shards(sources, str(tmp_path / f"{mode}2"), config)
        for a, b in zip(first.shards, second.shards):
            assert _sha256(Path(a)) == _sha256(Path(b))
    with tarfile.open(tmp_path / "jpeg1" / "00000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:5]] == ["000000.jpg", "000000.json", "000000.txt", "000001.jpg", "000001.json"]
    with tarfile.open(tmp_path / "keep1" / "00000.tar") as tar:  # extensions sorted, as webdataset's TarWriter
        assert tar.getnames()[3:5] == ["000001.json", "000001.png"]
    assert {(m.mtime, m.uid, m.gid, m.mode, m.uname) for m in members} == {(0, 0, 0, 0o644, "")}
    # jpeg mode re-encodes every format (RGBA included) to RGB JPEG
    jpeg_samples = _read_samples([str(p) for p in sorted((tmp_path / "jpeg1").glob("*.tar"))])
    assert [sorted(k for k in s if not k.startswith("__")) for s in jpeg_samples][1] == ["jpg", "json"]
    decoded = [Image.open(io.BytesIO(s["jpg"])) for s in jpeg_samples]
    assert {(im.format, im.mode) for im in decoded} == {("JPEG", "RGB")}


def test_rerun_skips_finished_shards_and_redoes_missing(tmp_path: Path, image_folder):
    root, _ = image_folder
    sources = sources_from_folder(str(root))
    out = tmp_path / "out"
    config = ShardWriterConfig(samples_per_shard=2)
    first = write_shards(sources, str(out), config)
    digests = {p.name: _sha256(p) for p in out.iterdir()}
    (out / "00001_stats.json").unlink()  # as if the run died before committing shard 1
    (out / "00001.tar").unlink()
    again = write_shards(sources, str(out), config)
    assert again.skipped_shards == 2 and again.successes == first.successes == 5
    assert {p.name: _sha256(p) for p in out.iterdir()} == digests
    recaptioned = [*sources[:4], dataclasses.replace(sources[4], caption="a new caption")]
    changed = write_shards(recaptioned, str(out), config)  # shard 2's input changed: rewritten
    assert changed.skipped_shards == 2
    assert [s["txt"] for s in _read_samples([str(out / "00002.tar")])] == [b"a new caption"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


class _UnreachableFileSystem(AbstractFileSystem):
    """A store whose every read fails the way a dropped connection does (not the input's fault)."""

    protocol = "unreachable"

    def _open(self, path, mode="rb", **kwargs):
        raise ConnectionResetError(f"connection reset while reading {path}")


def test_a_store_failure_stops_the_shard_and_leaves_no_partial_tar(tmp_path: Path, image_folder):
    fsspec.register_implementation("unreachable", _UnreachableFileSystem, clobber=True)
    root, _ = image_folder
    sources = sources_from_folder(str(root))  # 5 images: shard 0 holds 3, shard 1 holds 2
    broken = [*sources[:4], dataclasses.replace(sources[4], uri="unreachable://store/e.png")]
    out = tmp_path / "out"
    config = ShardWriterConfig(samples_per_shard=3, workers=1)
    with pytest.raises(ConnectionResetError):
        write_shards(broken, str(out), config)
    assert sorted(p.name for p in out.iterdir()) == ["00000.parquet", "00000.tar", "00000_stats.json"]
    rerun = write_shards(sources, str(out), config)  # the store is back: only shard 1 is written
    assert (rerun.skipped_shards, rerun.successes) == (1, 5)
    assert len(_read_samples(list(rerun.shards))) == 5


def test_sample_photos_distinct_and_deterministic():
    photos = sample_photos(20, seed=3)
    hashes = [hashlib.sha256(img.tobytes() + str(img.shape).encode()).hexdigest() for _, img, _ in photos]
    assert len(set(hashes)) == 20
    assert len({key for key, _, _ in photos}) == 20
    again = sample_photos(20, seed=3)
    assert all(np.array_equal(a[1], b[1]) and a[0] == b[0] and a[2] == b[2] for a, b in zip(photos, again))
    prefix = sample_photos(9, seed=3)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(prefix, photos))
    other = sample_photos(20, seed=4)
    assert not np.array_equal(other[10][1], photos[10][1])  # variants follow the seed
    for _, image, caption in photos:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert 160 <= min(image.shape[:2]) and max(image.shape[:2]) <= 640
    assert sum(img.shape[0] != img.shape[1] for _, img, _ in photos) >= 10
    assert photos[1][2] == "a photo of a cat" and photos[9][2].startswith("a photo of a cat (crop 1")


def test_write_to_s3_appears_whole(s3):
    bucket = s3.new_bucket()
    output = f"s3://{bucket}/corpus/shards"
    summary = write_sample_shards(output, count=10, per_shard=4, seed=0, storage_options=s3.storage_options)
    assert summary.shards == tuple(f"{output}/{i:05d}.tar" for i in range(3))
    fs = s3.filesystem()
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{bucket}/corpus/shards"))
    assert names == sorted(f"{i:05d}{suffix}" for i in range(3) for suffix in (".tar", ".parquet", "_stats.json"))
    expected = sample_photos(10, seed=0)
    keys = []
    for uri in summary.shards:
        with tarfile.open(fileobj=io.BytesIO(fs.cat_file(uri))) as tar:  # a whole, valid tar
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        keys += sorted({name.split(".")[0] for name in members})
        for name, data in members.items():
            if name.endswith(".jpg"):
                index = json.loads(members[name[:-4] + ".json"])["source"]
                photo = next(p for p in expected if f"skimage.data:{p[0]}" == index)
                assert data == encode_jpeg(photo[1])
    assert keys == ["000000", "000001", "000002", "000003", "000010", "000011", "000012", "000013", "000020", "000021"]
    # The env (AWS_ENDPOINT_URL) alone reaches the endpoint too, and a rerun skips all shards.
    rerun = write_sample_shards(output, count=10, per_shard=4, seed=0)
    assert rerun.skipped_shards == 3


def test_s3_folder_source(s3, image_folder):
    root, files = image_folder
    bucket = s3.new_bucket()
    fs = s3.filesystem()
    fs.put(str(root) + "/", f"{bucket}/images/", recursive=True)
    fs.pipe(f"{bucket}/images/b.txt", b"")  # an empty sidecar (a ranged read of it would be refused): no caption
    sources = sources_from_folder(f"s3://{bucket}/images", s3.storage_options)
    assert [s.uri for s in sources] == [f"s3://{bucket}/images/{rel}" for rel in sorted(files)]
    assert [s.caption for s in sources] == [files[rel][1] for rel in sorted(files)]
    summary = write_shards(sources, f"s3://{bucket}/out", ShardWriterConfig(samples_per_shard=10), s3.storage_options)
    assert summary.successes == 5
    with tarfile.open(fileobj=io.BytesIO(fs.cat_file(summary.shards[0]))) as tar:
        assert tar.extractfile("000003.txt").read().decode() == files["sub/deeper/d.JPEG"][1]


def test_cli_shards(tmp_path: Path, image_folder, s3, capsys):
    root, _ = image_folder
    out = tmp_path / "cli"
    assert cli_main(["shards", "--from-folder", str(root), "--output", str(out), "--per-shard", "2",
                     "--images", "jpeg", "--quality", "70"]) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert "5 samples: 5 written, 0 failed" in capsys.readouterr().out
    bucket = s3.new_bucket()
    assert cli_main(["shards", "--sample-photos", "5", "--output", f"s3://{bucket}/demo", "--per-shard", "5",
                     "--endpoint-url", s3.url]) == 0
    printed = capsys.readouterr().out
    assert "1 shards in s3://" in printed and "5 samples: 5 written" in printed
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in printed
    assert s3.filesystem().exists(f"{bucket}/demo/00000_stats.json")
    assert cli_main(["shards", "--from-folder", str(out), "--output", str(tmp_path / "x")]) == 2
    assert f"no images (.jpg, .jpeg, .png, .webp, .bmp, .tif, .tiff) under {out}" in capsys.readouterr().err
    assert cli_main(["shards", "--from-folder", str(root), "--output", str(tmp_path / "x"), "--per-shard", "0"]) == 2
    assert "samples_per_shard must be >= 1, got 0" in capsys.readouterr().err


def test_bad_config_and_empty_inputs_are_named(tmp_path: Path):
    with pytest.raises(ConfigError, match="samples_per_shard"):
        ShardWriterConfig(samples_per_shard=0)
    with pytest.raises(ConfigError, match="shard_pattern"):
        ShardWriterConfig(shard_pattern="shard.tar")
    with pytest.raises(ConfigError, match="images"):
        ShardWriterConfig(images="png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DualtokError, match="no images"):
        sources_from_folder(str(tmp_path / "empty"))
    with pytest.raises(DualtokError, match="no image sources"):
        write_shards([], str(tmp_path / "out"))


@pytest.mark.parametrize("peak", [200, 60000])
def test_16_bit_gray_reencoded_to_jpeg_reads_like_the_original(tmp_path: Path, peak):
    """Shards re-encode with the normaliser tokenize decodes with: a 16-bit gray image holding
    only 8-bit values (peak 200) stays as bright as it is, not divided by 256 into black."""
    from dualtok.pipelines.io.decode import DecodeConfig, decode_image
    from dualtok.pipelines.shards.writer import ImageSource

    ramp = np.linspace(0, peak, 64 * 64, dtype=np.float64).reshape(64, 64).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")  # mode I;16
    original = buffer.getvalue()
    assert Image.open(io.BytesIO(original)).mode.startswith("I")
    summary = write_shards([ImageSource("ramp.png", "a ramp", data=original)], str(tmp_path / "out"),
                           ShardWriterConfig(images="jpeg", jpeg_quality=95))
    (sample,) = _read_samples(list(summary.shards))
    config = DecodeConfig(size=64)
    direct = decode_image(original, config).pixels.astype(int)
    via_shard = decode_image(sample["jpg"], config).pixels.astype(int)
    assert direct.max() > 150  # peak 200 -> 200, peak 60000 -> 234
    assert np.abs(direct - via_shard).mean() < 2.0
