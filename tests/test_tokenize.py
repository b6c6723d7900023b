"""The tokenize pipeline end to end: loopback S3 in, loopback S3 out, on a local Ray cluster."""

from __future__ import annotations

import dataclasses
import gzip
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dualtok.jobs.cli import main as cli
from dualtok.pipelines.io import schemas as S
from dualtok.pipelines.actors import native_bf16_cpu
from dualtok.pipelines.io.decode import DecodeConfig, decode_image
from tests.conftest import tokens_in
from tests.shard_factory import encode, photo_images, sample_members, tar_bytes

pytestmark = pytest.mark.timeout(600)


def write_good_shards(fs, prefix: str, shards: int, per_shard: int, seed: int = 0) -> dict[str, bytes]:
    """Shards in img2dataset's layout; returns key -> JPEG bytes."""
    images = photo_images(shards * per_shard, seed=seed)
    by_key = {}
    for s in range(shards):
        members = []
        for i in range(per_shard):
            key = f"{s:05d}{i:04d}"
            data = encode(images[s * per_shard + i], quality=90)
            by_key[key] = data
            members += sample_members(key, data, f"photo {key}")
            members.append((f"{key}.json", json.dumps({"key": key}).encode()))
        fs.pipe_file(f"{prefix}/{s:05d}.tar", tar_bytes(members))
        fs.pipe_file(f"{prefix}/{s:05d}_stats.json", b"{}")
    return by_key


def read_corpus(fs, prefix: str):
    fs.invalidate_cache()  # s3fs caches listings; the job wrote from other processes
    files = sorted(p for p in fs.find(f"{prefix}/data") if p.endswith(".parquet"))
    return pq.ParquetDataset(files, filesystem=fs).read()


def read_errors(fs, prefix: str):
    fs.invalidate_cache()
    files = sorted(p for p in fs.find(f"{prefix}/errors") if p.endswith(".parquet"))
    return pq.ParquetDataset(files, filesystem=fs).read()


def test_s3_to_s3_every_sample_accounted_and_tokens_match(ray_session, s3, tiny):
    fs = s3.filesystem()
    bucket = s3.new_bucket()
    by_key = write_good_shards(fs, f"{bucket}/shards", shards=3, per_shard=5)
    # commits in Ray tasks, as on a cluster (this one-node cluster would commit in the driver's threads)
    assert cli(["tokenize", f"inputs=s3://{bucket}/shards/{{00000..00002}}.tar", f"output=s3://{bucket}/corpus",
                "bundle=tiny", "encoder.batch_size=4", "commits=tasks"]) == 0

    table = read_corpus(fs, f"{bucket}/corpus")
    assert table.num_rows == 15 and len(set(table[S.KEY].to_pylist())) == 15
    assert table.schema.field(S.GUIDE_TOKENS).type == S.corpus_schema(64, 32, {}).field(S.GUIDE_TOKENS).type
    meta = S.read_metadata(pq.read_schema(fs.open(f"{bucket}/corpus/data/00000.parquet")))
    # the fingerprint covers the parts that made the tokens; per-part hashes let audits match bundles
    encoders = {part: tiny.info.part_hashes[part] for part in ("guide", "semantic")}  # tokenize loads these two
    assert meta["bundle_fingerprint"] == dataclasses.replace(tiny.info, part_hashes=encoders).fingerprint
    assert meta["part_hashes"] == encoders and meta["untrained_parts"]

    keys = table[S.KEY].to_pylist()
    pixels = np.stack([decode_image(by_key[k], DecodeConfig(size=256)).pixels for k in keys])
    # `auto` on a new corpus: bfloat16 where this CPU computes it natively, float32 elsewhere
    assert meta["dtype"] == ("bfloat16" if native_bf16_cpu() else "float32")
    expected = tokens_in(tiny, pixels, meta["dtype"])
    np.testing.assert_array_equal(np.stack(table[S.GUIDE_TOKENS].to_numpy(zero_copy_only=False)), expected.guide)
    np.testing.assert_array_equal(np.stack(table[S.SEMANTIC_TOKENS].to_numpy(zero_copy_only=False)), expected.semantic)
    assert table[S.CAPTION].to_pylist() == [f"photo {k}" for k in keys]

    manifest = json.loads(fs.cat_file(f"{bucket}/corpus/manifest.json"))
    assert manifest["corpus"]["rows"] + manifest["corpus"]["errors"] == manifest["corpus"]["samples"] == 15
    assert "dualtok-test-secret-value" not in json.dumps(manifest)
    # the run left every marker, its own included, in the index at the version the store lists:
    # the next start-up reads none of them
    from dualtok.pipelines.io.corpus import MARKER_INDEX, MARKERS_DIR
    from dualtok.pipelines.io.outputs import OutputFolder

    out = OutputFolder(f"s3://{bucket}/corpus", s3.storage_options)
    index = out.read_json_gz(MARKER_INDEX)["markers"]
    assert {rel: entry["version"] for rel, entry in index.items()} == out.listed_versions(MARKERS_DIR)
    assert len(index) == 3

    # rerun: nothing redone; a new shard is picked up incrementally
    markers_before = {p: fs.cat_file(p) for p in fs.find(f"{bucket}/corpus/_committed")}
    write_good_shards(fs, f"{bucket}/more", shards=1, per_shard=3, seed=7)
    fs.copy(f"{bucket}/more/00000.tar", f"{bucket}/shards/00003.tar")
    assert cli(["tokenize", f"inputs=s3://{bucket}/shards/", f"output=s3://{bucket}/corpus", "bundle=tiny",
                "encoder.actors=1"]) == 0
    assert {p: fs.cat_file(p) for p in markers_before} == markers_before
    assert read_corpus(fs, f"{bucket}/corpus").num_rows == 18


def test_corpus_reads_in_polars_duckdb_and_hf_datasets(ray_session, tmp_path):
    import datasets
    import duckdb
    import polars as pl

    shards = tmp_path / "shards"
    shards.mkdir()
    images = photo_images(4, seed=3)
    members = sum((sample_members(f"k{i}", encode(im), None) for i, im in enumerate(images)), [])
    (shards / "a.tar").write_bytes(tar_bytes(members))
    out = tmp_path / "corpus"
    assert cli(["tokenize", f"inputs={shards}", f"output={out}", "bundle=tiny", "streams=guide", "encoder.actors=1"]) == 0
    frame = pl.read_parquet(str(out / "data" / "*.parquet"))
    assert frame.height == 4 and frame.schema[S.GUIDE_TOKENS] == pl.Array(pl.UInt16, 64)
    assert S.SEMANTIC_TOKENS not in frame.columns and frame[S.CAPTION].null_count() == 4
    rows = duckdb.sql(f"select key, len(guide_tokens) from '{out}/data/*.parquet' order by key").fetchall()
    assert rows == [(f"k{i}", 64) for i in range(4)]
    hf = datasets.load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    assert len(hf) == 4 and len(hf[0][S.GUIDE_TOKENS]) == 64
    assert sorted(hf[S.KEY]) == [f"k{i}" for i in range(4)]


# ---- bad input ------------------------------------------------------------------------------
def _odd_images() -> list[tuple[str, bytes, str]]:
    """(name, bytes, ext) of images that must be normalised, not rejected."""
    base = photo_images(1, seed=5)[0]
    pil = Image.fromarray(base)
    sixteen = (np.asarray(pil.convert("L")).astype(np.uint16) * 257)
    return [
        ("cmyk", encode(pil.convert("CMYK"), "JPEG"), "jpg"),
        ("gray16", encode(Image.fromarray(sixteen), "PNG"), "png"),
        ("palette", encode(pil.convert("P"), "PNG"), "png"),
        ("alpha", encode(pil.convert("RGBA"), "PNG"), "png"),
        ("gray", encode(pil.convert("L"), "JPEG"), "jpg"),
        ("webp", encode(pil, "WEBP"), "webp"),
    ]


def test_bad_input_becomes_error_rows_with_reasons(ray_session, tmp_path):
    good = encode(photo_images(1, seed=9)[0])
    bomb = encode(Image.new("L", (9000, 8000)), "PNG")  # 72 Mpx, a few KB compressed
    members = [*sample_members("000", good, "fine")]
    members += [("001.jpg", b"this is not an image at all")]
    members += [("002.jpg", b"")]
    members += [("003.png", bomb)]
    members += [("004.png", encode(Image.new("RGB", (8, 8))))]
    members += [("005.jpg", good[: len(good) // 2])]  # truncated JPEG data
    members += [("006.txt", b"caption without an image")]
    members += [("../escape/007.jpg", good)]
    members += [("008.jpg", good), ("009.jpg", good), ("008.txt", b"again")]  # 008 reappears: duplicate
    for name, data, ext in _odd_images():
        members.append((f"odd_{name}.{ext}", data))
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "bad.tar").write_bytes(tar_bytes(members))
    truncated = tar_bytes(sample_members("t0", good, None) + sample_members("t1", good, None))
    (shards / "cut.tar").write_bytes(truncated[: len(truncated) - len(good) // 2 - 1024])
    out = tmp_path / "corpus"
    # the cut tar cannot be read to its end: that shard fails this run (exit 3), the other commits
    assert cli(["tokenize", f"inputs={shards}/*.tar", f"output={out}", "bundle=tiny", "streams=guide",
                "encoder.actors=1"]) == 3

    rows = pq.read_table(out / "data").to_pylist()
    errors = pq.read_table(out / "errors").to_pylist()
    reasons = {(e[S.SHARD], e[S.KEY]): (e[S.STAGE], e[S.REASON]) for e in errors}
    good_keys = {(r[S.SHARD], r[S.KEY]) for r in rows}
    assert {("bad", "000"), ("bad", "009")} <= good_keys and not any(shard == "cut" for shard, _ in good_keys)
    assert {("bad", f"odd_{n}") for n, _, _ in _odd_images()} <= good_keys
    assert reasons[("bad", "001")][1].startswith("not a readable image")
    assert reasons[("bad", "002")][1].startswith("empty image member")
    assert reasons[("bad", "003")][1].startswith("decompression bomb")
    assert reasons[("bad", "004")][1].startswith("image too small")
    assert reasons[("bad", "005")][0] == "decode" and "corrupt image data" in reasons[("bad", "005")][1]
    assert reasons[("bad", "006")][1].startswith("no image member")
    assert reasons[("bad", None)][1].startswith("member '../escape/007.jpg' lies outside")
    assert reasons[("bad", "008")][1].startswith("key '008' reappears after other keys")
    assert not [p for p in (out / "_committed").glob("*.json") if json.loads(p.read_text())["shard_uri"].endswith("cut.tar")]
    markers = [json.loads(p.read_text()) for p in (out / "_committed").glob("*.json")]
    for marker in markers:
        assert marker["rows"] + marker["errors"] == marker["samples"]
    assert sum(m["samples"] for m in markers) == len(rows) + len(errors)


def _writer_batch(rows: list[tuple[str, str, int]], shard_samples: dict[str, int] | None = None) -> dict:
    """A pipeline batch of (kind, shard, index) rows as the encoder stage hands it to the driver;
    tokens are derived from the index so that a row's content can be checked."""
    n = len(rows)

    def objects(values):
        array = np.empty(n, dtype=object)
        array[:] = values
        return array

    kinds = [k for k, _, _ in rows]
    indices = np.array([i for _, _, i in rows], dtype=np.int64)
    return {
        S.ROW_KIND: np.array(kinds), S.SHARD: objects([s for _, s, _ in rows]), S.INDEX: indices,
        S.KEY: objects([f"{s}-{i}" if k != S.END else None for k, s, i in rows]),
        # Ray hands an all-null string column over as floats: a caption is a str, None or NaN
        S.CAPTION: objects([f"c{i}" if i % 2 else float("nan") for i in indices]),
        S.WIDTH: np.full(n, 640, np.int32), S.HEIGHT: np.full(n, 480, np.int32),
        S.GUIDE_TOKENS: (indices[:, None] * 10 + np.arange(4)).astype(np.uint16),
        S.SEMANTIC_TOKENS: (indices[:, None] * 100 + np.arange(2)).astype(np.uint16),
        S.STAGE: objects([S.STAGE_DECODE if k == S.ERROR else "" for k in kinds]),
        S.REASON: objects([f"broken {i}" if k == S.ERROR else "" for k, _, i in rows]),
        S.SHARD_SAMPLES: np.array([(shard_samples or {}).get(s, -1) if k == S.END else -1 for k, s, _ in rows]),
        S.SHARD_BYTES: np.full(n, 10240), S.SHARD_VERSION: objects(["v1"] * n), S.SHARD_RETRIES: np.zeros(n, np.int64),
    }


def test_corpus_writer_commits_each_sample_once_in_index_order(tmp_path):
    from dualtok.pipelines.io.corpus import CorpusLayout, CorpusWriter

    layout = CorpusLayout(str(tmp_path / "corpus"), 4, 2, {"bundle_fingerprint": "f0"})
    writer = CorpusWriter(layout, {"a": "file:///a.tar", "b": "file:///b.tar"}, "run-1")
    first = _writer_batch([(S.SAMPLE, "a", 2), (S.ERROR, "a", 1)])
    assert writer.add(first) == []
    assert writer.add(first) == []  # re-delivered after a retried task: nothing counts twice
    # one batch spanning two shards; index 1 now arrives as a SAMPLE (a retry that succeeded)
    assert writer.add(_writer_batch([(S.SAMPLE, "a", 0), (S.SAMPLE, "a", 1), (S.ERROR, "a", 3),
                                     (S.SAMPLE, "b", 0)])) == []
    markers = writer.add(_writer_batch([(S.END, "a", -1), (S.END, "b", -1)], {"a": 4, "b": 1}))
    assert [(m["shard"], m["samples"], m["rows"], m["errors"]) for m in markers] == [("a", 4, 3, 1), ("b", 1, 1, 0)]

    table = pq.read_table(tmp_path / "corpus" / "data" / "a.parquet")
    assert table[S.INDEX].to_pylist() == [0, 1, 2] and table[S.KEY].to_pylist() == ["a-0", "a-1", "a-2"]
    assert table[S.CAPTION].to_pylist() == [None, "c1", None]
    assert table[S.GUIDE_TOKENS].to_pylist()[2] == [20, 21, 22, 23]
    assert table[S.SEMANTIC_TOKENS].to_pylist()[1] == [100, 101]
    assert table.schema == S.corpus_schema(4, 2, {"bundle_fingerprint": "f0"})
    errors = pq.read_table(tmp_path / "corpus" / "errors" / "a.parquet")
    assert errors[S.INDEX].to_pylist() == [3] and errors[S.REASON].to_pylist() == ["broken 3"]
    assert writer.pending == {} and sorted(writer.done) == ["a", "b"]


def test_shard_with_no_decodable_image_commits_an_empty_data_file(tmp_path):
    from dualtok.pipelines.io.corpus import CorpusLayout, CorpusWriter

    writer = CorpusWriter(CorpusLayout(str(tmp_path / "corpus"), 4, 2, {}), {}, "run-1")
    [marker] = writer.add(_writer_batch([(S.ERROR, "a", 0), (S.END, "a", -1)], {"a": 1}))
    assert (marker["rows"], marker["errors"]) == (0, 1)
    assert pq.read_table(tmp_path / "corpus" / "data" / "a.parquet").num_rows == 0


def test_encoder_stage_tokens_only_sample_rows_and_drops_images(tiny, one_thread):
    from dualtok.pipelines.actors import BundleSource, StageResources
    from dualtok.pipelines.tokenize.encode import EncodeTokens

    # the stage sets torch's thread count, as it does in an actor; `one_thread` restores it afterwards

    images = np.stack([decode_image(encode(p), DecodeConfig(size=256)).pixels for p in photo_images(3, seed=4)])
    batch = {S.ROW_KIND: np.array([S.SAMPLE, S.ERROR, S.SAMPLE, S.END]), S.INDEX: np.arange(4),
             S.IMAGE: np.concatenate([images, np.zeros((1, 256, 256, 3), np.uint8)])}
    stage = EncodeTokens(BundleSource("tiny"), StageResources(), streams=("guide", "semantic"))
    out = S.inflight_columns(stage(batch))  # the stage returns a typed table, as Ray Data gets it
    assert S.IMAGE not in out  # decoded images never travel past the encoder
    expected = tiny.tokenize(images[[0, 2]])
    np.testing.assert_array_equal(out[S.GUIDE_TOKENS][[0, 2]], expected.guide)
    np.testing.assert_array_equal(out[S.SEMANTIC_TOKENS][[0, 2]], expected.semantic)
    assert not out[S.GUIDE_TOKENS][[1, 3]].any() and out[S.GUIDE_TOKENS].dtype == np.uint16
    guide_only = EncodeTokens(BundleSource("tiny"), StageResources(), streams=("guide",))(batch)
    assert S.SEMANTIC_TOKENS not in guide_only.column_names
    with pytest.raises(ValueError, match="streams must be a non-empty subset"):
        EncodeTokens(BundleSource("tiny"), StageResources(), streams=("pixels",))


def test_the_corpus_dtype_is_the_corpus_own_else_the_hardware_native_one(monkeypatch):
    import dualtok.pipelines.actors as actors
    from dualtok.pipelines.actors import StageResources
    from dualtok.pipelines.config import ConfigError
    from dualtok.pipelines.tokenize.pipeline import corpus_dtype

    gpu = StageResources(gpus_per_actor=1.0)
    for native in (True, False):
        monkeypatch.setattr(actors, "native_bf16_cpu", lambda: native)
        assert corpus_dtype(StageResources(), {}, "error") == ("bfloat16" if native else "float32")
        assert corpus_dtype(gpu, {}, "error") == "bfloat16"  # GPUs: always
        assert corpus_dtype(StageResources(device="cuda"), {}, "error") == "bfloat16"
        assert corpus_dtype(StageResources(dtype="float16"), {}, "error") == "float16"  # set: kept
    # a corpus keeps its own, on any hardware; markers from before markers recorded it count for nothing
    made = {"a": {"dtype": "float32"}, "b": {}}
    assert corpus_dtype(gpu, made, "error") == "float32"
    with pytest.raises(ConfigError, match="tokenized in float32, this run computes in bfloat16"):
        corpus_dtype(StageResources(dtype="bfloat16"), made, "error")
    assert corpus_dtype(StageResources(dtype="bfloat16"), made, "keep") == "bfloat16"
    # two recorded (a corpus kept across a change): `auto` is the hardware's, which one of them refuses
    mixed = {"a": {"dtype": "float32"}, "b": {"dtype": "bfloat16"}}
    with pytest.raises(ConfigError, match="tokenized in float32"):
        corpus_dtype(gpu, mixed, "error")


def test_native_bf16_is_what_the_cpu_flags_say():
    from pathlib import Path

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to compare with")
    flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
    assert native_bf16_cpu() == bool(flags & {"avx512_bf16", "amx_bf16"})


@pytest.mark.parametrize("cpus", [1, 2, 3, 16, 64])
def test_cpu_node_resources_fill_the_machine_without_oversubscribing_it(cpus):
    from dualtok.pipelines.tokenize.config import cpu_node_resources

    read_cpus, encoder = cpu_node_resources(cpus)
    reserved = read_cpus + encoder.actors * encoder.cpus_per_actor
    assert reserved <= max(cpus, 1.0) + 1e-9  # a local Ray of `cpus` CPUs schedules every stage
    assert encoder.actors * encoder.torch_threads <= max(cpus, 1)  # torch threads never exceed the cores
    if cpus <= 4:  # one single-threaded actor per core
        assert (encoder.actors, encoder.torch_threads) == (cpus, 1)
    else:  # each actor holds both branches: memory caps the count, more threads use the rest
        assert encoder.actors == 4 and encoder.actors * encoder.torch_threads >= cpus - 1


def test_marker_index_saves_reads_but_the_markers_stay_the_truth(tmp_path, caplog):
    """A run reads only the markers whose listed version its index lacks; a rewritten, new or deleted
    marker, or a damaged index, still gives exactly the markers on the store."""
    from dualtok.pipelines.io.corpus import MARKER_INDEX, MARKERS_DIR, CorpusLayout

    layout = CorpusLayout(str(tmp_path / "corpus"), 4, 2, {})
    out = layout.folder()
    markers = {f"s{i}": {"shard": f"s{i}", "rows": i} for i in range(5)}
    for sid, marker in markers.items():
        out.write_json(marker, MARKERS_DIR, f"{sid}.json")
    versions, read = layout.committed_listed()
    assert read == markers and sorted(versions) == sorted(markers)
    assert layout.compact_markers(versions, read, written={}, failed={"s3"}) == 4  # failed this run: not kept
    assert "s3.json" not in out.read_json_gz(MARKER_INDEX)["markers"]
    # a run's own markers go into the index at the version the store lists (one more listing)
    out.write_json({"shard": "s3", "rows": 33}, MARKERS_DIR, "s3.json")
    assert layout.compact_markers(versions, read, written={"s3": {"shard": "s3", "rows": 33}}, failed=set()) == 5
    assert out.read_json_gz(MARKER_INDEX)["markers"]["s3.json"]["version"] == out.listed_versions(MARKERS_DIR)["s3.json"]
    assert layout.committed()["s3"]["rows"] == 33
    out.write_json(markers["s3"], MARKERS_DIR, "s3.json")
    versions, read = layout.committed_listed()
    assert layout.compact_markers(versions, read, written={}, failed=set()) == 5
    # the index serves unchanged markers: an entry edited in the index (only) shows through
    index = out.read_json_gz(MARKER_INDEX)
    index["markers"]["s1.json"]["marker"]["rows"] = 99
    out.write(gzip.compress(json.dumps(index).encode()), MARKER_INDEX)
    assert layout.committed()["s1"]["rows"] == 99
    # ...but a marker rewritten on the store, a new one and a deleted one are read from the store
    out.write_json({"shard": "s2", "rows": 22}, MARKERS_DIR, "s2.json")
    out.write_json({"shard": "s5", "rows": 5}, MARKERS_DIR, "s5.json")
    (tmp_path / "corpus" / MARKERS_DIR / "s4.json").unlink()
    found = layout.committed()
    assert sorted(found) == ["s0", "s1", "s2", "s3", "s5"] and found["s2"]["rows"] == 22 and found["s5"]["rows"] == 5
    # a damaged index is ignored, not trusted
    out.write(b"not gzip", MARKER_INDEX)
    with caplog.at_level("WARNING"):
        assert layout.committed() == {**{k: v for k, v in markers.items() if k != "s4"},
                                      "s2": {"shard": "s2", "rows": 22}, "s5": {"shard": "s5", "rows": 5}}
    assert "ignoring the unreadable index" in caplog.text


def test_token_rows_committed_from_part_files_equal_an_in_process_commit(tmp_path):
    """The driver sees part names, errors and END rows only; the commit task's files are what the
    in-process writer writes from the same rows, re-delivered batches and a retried index included."""
    from dualtok.pipelines.io.corpus import CorpusLayout, CorpusWriter
    from dualtok.pipelines.io.token_parts import PARTS_DIR, PartCommits, ThreadTasks, TokenParts

    batches = [_writer_batch([(S.SAMPLE, "a", 2), (S.ERROR, "a", 1)]),
               _writer_batch([(S.SAMPLE, "a", 2), (S.ERROR, "a", 1)]),  # re-delivered
               _writer_batch([(S.SAMPLE, "a", 0), (S.SAMPLE, "a", 1), (S.ERROR, "a", 3), (S.SAMPLE, "b", 0)]),
               _writer_batch([(S.END, "a", -1), (S.END, "b", -1), (S.ERROR, "c", 0), (S.END, "c", -1)],
                             {"a": 4, "b": 1, "c": 1})]
    direct = CorpusWriter(CorpusLayout(str(tmp_path / "direct"), 4, 2, {"bundle_fingerprint": "f0"}), {}, "run-1")
    for batch in batches:
        direct.add(batch)
    layout = CorpusLayout(str(tmp_path / "parts"), 4, 2, {"bundle_fingerprint": "f0"})
    parts, commits = TokenParts(layout, "run-1"), PartCommits(layout, {}, "run-1", ThreadTasks())
    slim = [S.inflight_columns(S.inflight_table(parts(batch))) for batch in batches]  # as Ray hands them over
    assert all(S.GUIDE_TOKENS not in b and S.SAMPLE not in b[S.ROW_KIND] for b in slim)  # no token row
    assert slim[1][S.PART_FILE].tolist() == slim[0][S.PART_FILE].tolist()  # same rows, same part file
    markers = [m for b in slim for m in commits.add(b)] + commits.finish()
    assert sorted(m["shard"] for m in markers) == sorted(direct.done) == ["a", "b", "c"]
    for shard in ("a", "b", "c"):
        for folder in ("data", "errors"):
            assert pq.read_table(tmp_path / "parts" / folder / f"{shard}.parquet").equals(
                pq.read_table(tmp_path / "direct" / folder / f"{shard}.parquet"))
        written = json.loads((tmp_path / "parts" / "_committed" / f"{shard}.json").read_text())
        ignore = ("seconds", "committed_at")
        assert {k: v for k, v in written.items() if k not in ignore} == \
            {k: v for k, v in direct.done[shard].items() if k not in ignore}
    assert not (tmp_path / "parts" / PARTS_DIR / "run-1" / "a").exists()  # parts removed once committed

    # a shard whose rows do not add up is not committed; nor is one whose part the store lost
    bad = PartCommits(layout, {}, "run-2", ThreadTasks())
    parts2 = TokenParts(layout, "run-2")
    bad.add(S.inflight_columns(S.inflight_table(parts2(_writer_batch([(S.SAMPLE, "d", 0), (S.SAMPLE, "d", 2)])))))
    lost = S.inflight_columns(S.inflight_table(parts2(_writer_batch([(S.SAMPLE, "e", 0)]))))
    for path in (tmp_path / "parts" / PARTS_DIR / "run-2" / "e").iterdir():
        path.unlink()
    bad.add(lost)
    bad.add(S.inflight_columns(S.inflight_table(parts2(_writer_batch([(S.END, "d", -1), (S.END, "e", -1)],
                                                                     {"d": 2, "e": 1})))))
    bad.finish()
    assert sorted(bad.failed) == ["d", "e"] and not bad.done
    assert bad.failed["d"].startswith("read: rows + errors (2 + 0) do not account for the 2 samples")
    assert bad.failed["e"].startswith("storage: reading token parts failed")
    threads = ThreadTasks()  # a commit that raises fails its shard, as a Ray task's error does
    outcome = threads.result(threads.submit(lambda: {"marker": 1 / 0}))
    threads.close()
    assert outcome["failed"].startswith("storage: the commit task failed: ZeroDivisionError: division by zero")
