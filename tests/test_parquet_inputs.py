"""Parquet files of images as input shards, and source fields passed through to the corpus.

Real files throughout: Parquet written with pyarrow in img2dataset's layout (`key`, a `jpg` binary
column, `txt`, `url`, `sha256`, `status`, `error_message`, ...) and in HF datasets' (an `image`
struct {bytes, path}, `text`), beside a tar of the same photos with img2dataset's `.json` sidecars.
First the read stage called directly (layouts, hostile cells, seeded mutants of image cells, files
that cannot be read to their end, a store fault mid-file), then the real tokenize job on a local
Ray cluster: tokens equal to the tar's, passthrough values, errors with their reasons, a truncated
file failed and redone by the next run without duplicates, a changed passthrough list refused.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dualtok.jobs.cli import main as cli
from dualtok.pipelines.config import ConfigError, load_config
from dualtok.pipelines.io import schemas as S
from dualtok.pipelines.io.decode import DecodeConfig, decode_image
from dualtok.pipelines.io.parquet_shards import ParquetColumns
from dualtok.pipelines.io.read import ReadShards
from dualtok.pipelines.io.shards import ShardLimits
from dualtok.pipelines.io.storage import list_shards
from dualtok.pipelines.tokenize.config import TokenizeConfig
from tests.conftest import tokens_in
from tests.shard_factory import IMAGE_FORMATS, encode, mutate, photo_images, tar_bytes
from tests.test_hostile_input import DECODE_REASONS, end_rows, read_and_decode, read_losing_the_object

pytestmark = pytest.mark.timeout(300)

PASSTHROUGH = ("url", "sha256", "license")


def parquet_bytes(rows: list[dict], schema: pa.Schema | None = None, row_group_size: int = 3) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer, row_group_size=row_group_size)
    return buffer.getvalue()


def img2dataset_row(key: str, image: bytes | None, caption: str | None, status: str = "success",
                    error: str | None = None) -> dict:
    """One row as img2dataset's parquet output writes it: the image in a column named after its format."""
    return {"key": key, "jpg": image, "txt": caption, "caption": caption, "url": f"https://example.com/{key}.jpg",
            "status": status, "error_message": error, "width": 256 if image else None,
            "sha256": hashlib.sha256(image).hexdigest() if image else None, "license": "CC-BY-4.0"}


IMG2DATASET_SCHEMA = pa.schema([("key", pa.string()), ("jpg", pa.binary()), ("txt", pa.string()),
                                ("caption", pa.string()), ("url", pa.string()), ("status", pa.string()),
                                ("error_message", pa.string()), ("width", pa.int64()), ("sha256", pa.string()),
                                ("license", pa.string())])
HF_SCHEMA = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                       ("text", pa.string()), ("license", pa.string())])


def hf_row(image: bytes | None, caption: str, path: str | None = "photo.jpg") -> dict:
    """One row of an HF datasets `Image()` column as `datasets` stores it in Parquet."""
    return {"image": {"bytes": image, "path": path}, "text": caption, "license": "CC0"}


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    return [encode(p, quality=90) for p in photo_images(5, seed=11)]


# ---- the read stage ------------------------------------------------------------------------------
def test_both_layouts_become_samples_with_keys_captions_and_fields(tmp_path, jpegs):
    (tmp_path / "i2d.parquet").write_bytes(parquet_bytes(
        [img2dataset_row(f"k{i}", data, f"photo {i}") for i, data in enumerate(jpegs[:3])]
        + [img2dataset_row("k3", None, None, "failed_to_download", "HTTP 404")], IMG2DATASET_SCHEMA))
    (tmp_path / "hf.parquet").write_bytes(parquet_bytes([hf_row(d, f"hf {i}") for i, d in enumerate(jpegs[:2])]
                                                        + [hf_row(None, "by path", "img/7.png")], HF_SCHEMA))
    read = ReadShards(rows_per_batch=2, passthrough=("url", "width", "license", "absent"))
    rows = read_and_decode({"i2d": str(tmp_path / "i2d.parquet"), "hf": str(tmp_path / "hf.parquet")}, read)

    ends = end_rows(rows)
    assert (ends["i2d"][S.SHARD_SAMPLES], ends["hf"][S.SHARD_SAMPLES]) == (4, 3)
    assert ends["i2d"][S.SHARD_BYTES] == (tmp_path / "i2d.parquet").stat().st_size
    samples = rows[S.ROW_KIND] != S.END
    got = {(s, k): (kind, c, reason, url, width, lic) for s, k, kind, c, reason, url, width, lic in zip(
        *(rows[n][samples] for n in (S.SHARD, S.KEY, S.ROW_KIND, S.CAPTION, S.REASON)),
        *(rows[S.passthrough_column(n)][samples] for n in ("url", "width", "license")))}
    assert got[("i2d", "k1")] == (S.SAMPLE, "photo 1", "", "https://example.com/k1.jpg", "256", "CC-BY-4.0")
    assert got[("i2d", "k3")] == (S.ERROR, None, "no image in column 'jpg' (status 'failed_to_download', "
                                  "error_message 'HTTP 404')", "https://example.com/k3.jpg", None, "CC-BY-4.0")
    # no key column: the row number; fields the file lacks are null, never an error
    assert got[("hf", "1")] == (S.SAMPLE, "hf 1", "", None, None, "CC0")
    assert got[("hf", "2")][2] == "the image struct in column 'image' has no bytes (path 'img/7.png'): images stored by path are not read"
    assert all(v is None for v in rows[S.passthrough_column("absent")])
    sample_rows = np.flatnonzero(rows[S.ROW_KIND] == S.SAMPLE)
    expected = decode_image(jpegs[1], DecodeConfig(size=32)).pixels
    assert any(np.array_equal(rows[S.IMAGE][i], expected) for i in sample_rows if rows[S.SHARD][i] == "i2d")


def test_configured_columns_win_and_a_wrong_one_fails_the_shard_naming_it(tmp_path, jpegs):
    schema = pa.schema([("id", pa.int64()), ("photo", pa.large_binary()), ("alt", pa.large_string()),
                        ("caption", pa.string()), ("jpg", pa.string())])
    rows = [{"id": 10 + i, "photo": d, "alt": f"alt {i}", "caption": "not this", "jpg": "not an image column"}
            for i, d in enumerate(jpegs[:2])]
    (tmp_path / "own.parquet").write_bytes(parquet_bytes(rows, schema))
    uri = {"own": str(tmp_path / "own.parquet")}
    chosen = ReadShards(parquet=ParquetColumns(image_column="photo", caption_column="alt", key_column="id"))
    out = read_and_decode(uri, chosen)
    assert out[S.KEY][:2].tolist() == ["10", "11"] and out[S.CAPTION][:2].tolist() == ["alt 0", "alt 1"]
    assert (out[S.ROW_KIND][:2] == S.SAMPLE).all()

    for columns, reason in [
        (ParquetColumns(), "no image column: none of jpg, jpeg, png, webp, image, img is a binary column or an image "
                           "struct {bytes, path} (columns: id, photo, alt, caption, jpg); set parquet.image_column"),
        (ParquetColumns(image_column="picture"), "parquet.image_column 'picture' is not a column of this file"),
        (ParquetColumns(image_column="alt"), "parquet.image_column 'alt' is large_string, which cannot hold images"),
        (ParquetColumns(image_column="photo", caption_column="id"), "parquet.caption_column 'id' is int64"),
        (ParquetColumns(image_column="photo", key_column="nokey"), "parquet.key_column 'nokey' is not a column"),
    ]:
        end = end_rows(read_and_decode(uri, ReadShards(parquet=columns)))["own"]
        assert (end[S.STAGE], end[S.SHARD_SAMPLES]) == (S.STAGE_READ, -1)
        assert str(end[S.REASON]).startswith(reason), end[S.REASON]


def test_hostile_cells_are_error_rows_with_their_reasons(tmp_path, jpegs):
    rows = [img2dataset_row("ok", jpegs[0], "fine"),
            img2dataset_row("empty", b"", "zero bytes"),
            img2dataset_row("big", b"\xff" * 300_001, "over the member cap"),
            img2dataset_row("longcap", jpegs[0], "x" * 70_000),
            img2dataset_row("garbage", b"GIF89a" + bytes(range(256)) * 4, "junk"),
            img2dataset_row("nullcap", jpegs[1], None)]
    rows[2]["key"], rows[4]["key"] = None, "12345"  # a null key is the row number
    (tmp_path / "h.parquet").write_bytes(parquet_bytes(rows, IMG2DATASET_SCHEMA))
    out = read_and_decode({"h": str(tmp_path / "h.parquet")}, ReadShards(limits=ShardLimits(max_member_bytes=300_000)))
    samples = out[S.ROW_KIND] != S.END
    found = dict(zip(out[S.KEY][samples], zip(out[S.STAGE][samples], out[S.REASON][samples])))
    assert found["ok"] == ("", "") and found["nullcap"] == ("", "")
    assert found["empty"] == (S.STAGE_DECODE, "empty image member (0 bytes)")
    assert found["2"] == (S.STAGE_READ, "the image in column 'jpg' is 300001 bytes, over the 300000 byte cap "
                                        "(max_member_bytes)")
    assert found["longcap"] == (S.STAGE_READ, "the caption in column 'caption' is 70000 bytes, over the 65536 byte "
                                              "cap (max_caption_bytes)")
    assert found["12345"][0] == S.STAGE_DECODE and found["12345"][1].startswith(DECODE_REASONS)
    assert out[S.INDEX][samples].tolist() == list(range(6))


def test_seeded_mutants_of_image_cells_each_become_a_row_or_a_decode_error(tmp_path):
    rng = np.random.default_rng(7)
    photo = photo_images(1, seed=7)[0]
    rows, kinds = [], []
    for ext, (fmt, options) in IMAGE_FORMATS.items():
        valid = encode(photo, fmt, **options)
        for i in range(25):
            kind, data = mutate(valid, rng) if i % 5 else ("garbage", rng.bytes(int(rng.integers(0, 4096))))
            rows.append({"key": f"{ext}{i:02d}_{kind}", "image": {"bytes": data, "path": f"{i}.{ext}"}})
            kinds.append(kind)
    (tmp_path / "fuzz.parquet").write_bytes(parquet_bytes(rows, row_group_size=16))
    out = read_and_decode({"fuzz": str(tmp_path / "fuzz.parquet")}, ReadShards(rows_per_batch=9))

    kinds_out = out[S.ROW_KIND]
    assert end_rows(out)["fuzz"][S.SHARD_SAMPLES] == len(rows) == int((kinds_out != S.END).sum())
    assert out[S.KEY][kinds_out != S.END].tolist() == [r["key"] for r in rows]  # each row once, in order
    bad = np.flatnonzero(kinds_out == S.ERROR)
    assert set(out[S.STAGE][bad]) == {S.STAGE_DECODE}
    assert all(str(r).startswith(DECODE_REASONS) for r in out[S.REASON][bad])
    assert 0.3 * len(rows) < len(bad) < len(rows)  # a mutation breaks many files, not all
    garbage = [i for i, k in enumerate(kinds) if k == "garbage"]
    assert all(kinds_out[i] == S.ERROR for i in garbage)


def _cut(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flip_pages(data: bytes) -> bytes:
    """Garbage over the row groups' pages; the footer (and its row count) stays intact."""
    out = bytearray(data)
    out[8 : len(data) // 2] = np.random.default_rng(3).bytes(len(data) // 2 - 8)
    return bytes(out)


FILE_ANOMALIES = {
    "cut in half": (_cut, "Parquet file cannot be read to its end after 0 rows: ArrowInvalid: Parquet magic bytes "
                          "not found in footer"),
    "footer cut off": (lambda d: d[:-9], "Parquet file cannot be read to its end after 0 rows: "),
    "not Parquet": (lambda d: np.random.default_rng(1).bytes(3000), "Parquet file cannot be read to its end after 0 rows"),
    "empty file": (lambda d: b"", "Parquet file cannot be read to its end after 0 rows: ArrowInvalid: Parquet file size is 0"),
    "pages overwritten": (_flip_pages, "Parquet file cannot be read to its end after "),
    "a tar named .parquet": (lambda d: tar_bytes([("a.jpg", b"x")]), "Parquet file cannot be read to its end after 0 rows"),
}


@pytest.mark.parametrize("anomaly", sorted(FILE_ANOMALIES))
def test_a_parquet_file_not_read_to_its_end_fails_the_shard(tmp_path, jpegs, anomaly):
    build, reason = FILE_ANOMALIES[anomaly]
    whole = parquet_bytes([img2dataset_row(f"k{i}", d, "c") for i, d in enumerate(jpegs)], IMG2DATASET_SCHEMA, 2)
    (tmp_path / "x.parquet").write_bytes(build(whole))
    (tmp_path / "ok.parquet").write_bytes(whole)
    ends = end_rows(read_and_decode({"x": str(tmp_path / "x.parquet"), "ok": str(tmp_path / "ok.parquet")}))
    assert (ends["x"][S.STAGE], ends["x"][S.SHARD_SAMPLES]) == (S.STAGE_READ, -1)
    assert str(ends["x"][S.REASON]).startswith(reason), ends["x"][S.REASON]
    assert (ends["ok"][S.REASON], ends["ok"][S.SHARD_SAMPLES]) == ("", 5)  # the next shard reads as usual


def test_a_store_fault_mid_file_is_retried_without_passing_a_row_twice(s3):
    fs, bucket = s3.filesystem(), s3.new_bucket()
    path = f"{bucket}/in/a.parquet"
    rng = np.random.default_rng(5)  # more rows than the reader decodes at a time, so that it reads on after a yield
    images = [encode(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)) for _ in range(150)]
    data = parquet_bytes([img2dataset_row(f"k{i}", d, "c") for i, d in enumerate(images)], IMG2DATASET_SCHEMA, 50)
    fs.pipe_file(path, data)
    rows, calls = read_losing_the_object(s3, fs, path, lambda: fs.pipe_file(path, data))  # restored on the retry
    end = end_rows(rows)["a"]
    assert calls == 1 and end[S.SHARD_RETRIES] == 1
    assert rows[S.INDEX][rows[S.ROW_KIND] == S.SAMPLE].tolist() == list(range(150))  # each index once, in order
    assert (end[S.REASON], end[S.SHARD_SAMPLES], end[S.SHARD_BYTES]) == ("", 150, len(data))


def test_listing_takes_parquet_shards_but_not_a_tars_index(tmp_path):
    for name in ("00000.tar", "00000.parquet", "00000_stats.json", "00001.tar.gz", "00001.parquet", "photos.parquet"):
        (tmp_path / name).write_bytes(b"x")
    names = [uri.rsplit("/", 1)[1] for uri in list_shards([str(tmp_path)])]
    assert names == ["00000.tar", "00001.tar.gz", "photos.parquet"]
    assert [u.rsplit("/", 1)[1] for u in list_shards([f"{tmp_path}/*.parquet"])] == ["00000.parquet", "00001.parquet",
                                                                                      "photos.parquet"]


@pytest.mark.parametrize("names, message", [
    (["url", "caption"], "passthrough column 'caption' clashes with the corpus's own column 'caption'"),
    (["width"], "passthrough column 'width' clashes with the corpus's own column 'width'"),
    (["reason"], "passthrough column 'reason' clashes with the errors table's own column 'reason'"),
    (["url", "url"], "passthrough names 'url' more than once"),
])
def test_passthrough_names_that_clash_are_refused_at_start_up(names, message):
    overrides = ["inputs=x.tar", "output=out", "bundle=tiny", *(f"passthrough={n}" for n in names)]
    with pytest.raises(ConfigError, match=message):
        load_config(TokenizeConfig, overrides=overrides)


def test_an_audit_fetches_its_originals_from_a_parquet_source(tmp_path, jpegs):
    from dualtok.pipelines.audit.stages import FAILED, OK, FetchOriginals

    (tmp_path / "c.parquet").write_bytes(parquet_bytes([hf_row(d, f"hf {i}") for i, d in enumerate(jpegs[:3])], HF_SCHEMA))
    payload = {S.KEY: np.array(["2", "0", "1"]), S.INDEX: np.array([2, 0, 0]),
               S.SHARD_URI: np.array([str(tmp_path / "c.parquet")] * 3), "status": np.zeros(3, np.int8),
               "stage": np.full(3, "", "<U32"), "reason": np.full(3, "", "<U1024")}
    out = FetchOriginals(size=32)._fetch("c", payload)
    assert out["status"].tolist() == [OK, OK, FAILED]
    assert "index 0 holds key '0', the corpus has '1'" in out["reason"][2]
    np.testing.assert_array_equal(out["original"][0], decode_image(jpegs[2], DecodeConfig(size=32, min_side=1)).pixels)


# ---- the real pipeline ---------------------------------------------------------------------------
def write_inputs(root, jpegs: list[bytes]) -> dict[str, bytes]:
    """The same photos as a tar (img2dataset's .json sidecars), an img2dataset parquet and an HF parquet,
    plus the good parquet cut short; returns the whole bytes of the cut file."""
    root.mkdir()
    members = []
    for i, data in enumerate(jpegs):
        key = f"{i:09d}"
        meta = {"key": key, "url": f"https://example.com/{key}.jpg", "sha256": hashlib.sha256(data).hexdigest(),
                "status": "success", "width": 256, "license": "CC-BY-4.0"}
        if i == 2:
            del meta["license"]  # a field one sidecar lacks is null in that row
        members += [(f"{key}.jpg", data), (f"{key}.txt", f"photo {i}".encode()), (f"{key}.json", json.dumps(meta).encode())]
    (root / "a.tar").write_bytes(tar_bytes(members))
    rows = [img2dataset_row(f"{i:09d}", d, f"photo {i}") for i, d in enumerate(jpegs)]
    rows += [img2dataset_row("failed", None, None, "failed_to_download", "timeout"),
             img2dataset_row("corrupt", jpegs[0][:400], "cut JPEG")]
    (root / "b.parquet").write_bytes(parquet_bytes(rows, IMG2DATASET_SCHEMA))
    (root / "c.parquet").write_bytes(parquet_bytes([hf_row(d, f"photo {i}") for i, d in enumerate(jpegs)], HF_SCHEMA))
    whole = parquet_bytes(rows[:3], IMG2DATASET_SCHEMA)
    (root / "d.parquet").write_bytes(whole[: len(whole) - 20])
    return {"d.parquet": whole}


def tokenize(inputs, output, *extra: str) -> int:
    # one encoder actor: these runs are about inputs and columns, not pool sizing
    return cli(["--log-level", "WARNING", "tokenize", f"inputs={inputs}", f"output={output}", "bundle=tiny",
                "encoder.batch_size=8", "encoder.actors=1", *extra])


@pytest.fixture(scope="module")
def first_run(ray_session, tmp_path_factory, jpegs) -> dict:
    """One run over the tar, the two Parquet layouts and a Parquet file cut short, with passthrough."""
    inputs = tmp_path_factory.mktemp("parquet-run") / "in"
    whole = write_inputs(inputs, jpegs)
    out = inputs / "corpus"  # under the inputs' prefix: a rerun must not take the corpus's files for shards
    code = tokenize(inputs, out, f"passthrough=[{','.join(PASSTHROUGH)}]")
    markers = {p.stem: json.loads(p.read_text()) for p in (out / "_committed").glob("*.json")}
    # what the run wrote, read now: the rerun test changes the corpus
    return {"inputs": inputs, "out": out, "whole": whole, "code": code, "markers": markers,
            "manifest": json.loads((out / "manifest.json").read_text()), "data": pq.read_table(out / "data"),
            "errors": pq.read_table(out / "errors"), "schema": pq.read_schema(out / "data" / "b.parquet")}


def test_parquet_and_tar_inputs_tokenize_alike_and_carry_their_source_fields(first_run, tiny, jpegs):
    assert first_run["code"] == 3  # d.parquet is cut short: that shard fails, the others commit
    failed = first_run["manifest"]["this_run"]["shards_failed"]
    assert list(failed) == ["d"] and failed["d"].startswith(
        "read: Parquet file cannot be read to its end after 0 rows: ArrowInvalid: Parquet magic bytes not found")

    table = first_run["data"]
    assert table.column_names == [S.KEY, S.SHARD, S.INDEX, S.CAPTION, S.WIDTH, S.HEIGHT, S.GUIDE_TOKENS,
                                  S.SEMANTIC_TOKENS, *PASSTHROUGH]
    assert S.read_metadata(first_run["schema"])["passthrough"] == list(PASSTHROUGH)
    rows = {(r[S.SHARD], r[S.KEY]): r for r in table.to_pylist()}
    assert sorted(rows) == sorted([(s, f"{i:09d}") for s in "ab" for i in range(5)] + [("c", str(i)) for i in range(5)])
    pixels = np.stack([decode_image(d, DecodeConfig(size=256)).pixels for d in jpegs])
    expected = tokens_in(tiny, pixels, S.read_metadata(first_run["schema"])["dtype"])
    for i, data in enumerate(jpegs):
        key = f"{i:09d}"
        for shard_key in (("a", key), ("b", key), ("c", str(i))):  # the same photo in each layout: the same tokens
            row = rows[shard_key]
            assert row[S.GUIDE_TOKENS] == expected.guide[i].tolist() and row[S.SEMANTIC_TOKENS] == expected.semantic[i].tolist()
            assert row[S.CAPTION] == f"photo {i}" and row[S.INDEX] == i
        for shard in "ab":  # from the tar's .json sidecars and from the parquet's columns alike
            assert rows[(shard, key)]["url"] == f"https://example.com/{key}.jpg"
            assert rows[(shard, key)]["sha256"] == hashlib.sha256(data).hexdigest()
        assert rows[("a", key)]["license"] == (None if i == 2 else "CC-BY-4.0")
        assert (rows[("c", str(i))]["url"], rows[("c", str(i))]["license"]) == (None, "CC0")  # no url column: null

    errors = {(e[S.SHARD], e[S.KEY]): e for e in first_run["errors"].to_pylist()}
    assert sorted(errors) == [("b", "corrupt"), ("b", "failed")]
    assert errors[("b", "failed")][S.REASON] == "no image in column 'jpg' (status 'failed_to_download', error_message 'timeout')"
    assert errors[("b", "failed")]["url"] == "https://example.com/failed.jpg"  # a failed row is traceable too
    assert errors[("b", "corrupt")][S.STAGE] == S.STAGE_DECODE and errors[("b", "corrupt")][S.INDEX] == 6
    markers = first_run["markers"]
    assert sorted(markers) == ["a", "b", "c"] and markers["b"]["passthrough"] == list(PASSTHROUGH)
    assert (markers["b"]["samples"], markers["b"]["rows"], markers["b"]["errors"]) == (7, 5, 2)


def test_a_rerun_redoes_the_failed_file_only_and_refuses_another_passthrough_list(first_run, capsys):
    inputs, out, markers = first_run["inputs"], first_run["out"], first_run["markers"]
    (inputs / "d.parquet").write_bytes(first_run["whole"]["d.parquet"])  # the file, whole this time
    # another passthrough list on this corpus: refused before anything is written
    assert tokenize(inputs, out, "passthrough=[url]") == 2
    assert ("the corpus's committed shards have passthrough columns ['url', 'sha256', 'license'], this run asks for "
            "['url']") in capsys.readouterr().err
    assert sorted(p.stem for p in (out / "_committed").iterdir()) == sorted(markers)

    # the rerun with the corpus's list redoes the repaired shard only; every sample once
    assert tokenize(inputs, out, f"passthrough=[{','.join(PASSTHROUGH)}]") == 0
    after = {p.stem: json.loads(p.read_text()) for p in (out / "_committed").glob("*.json")}
    assert {k: after[k] for k in markers} == markers and (after["d"]["rows"], after["d"]["errors"]) == (3, 0)
    keys = [(r[S.SHARD], r[S.KEY]) for r in pq.read_table(out / "data").to_pylist()]
    assert len(keys) == len(set(keys)) == 18
