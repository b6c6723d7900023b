"""Storage faults never commit a shard: transient ones are retried, persistent ones fail the shard for
this run (the others commit, the job exits 3) and the next run redoes it; a changed input is redone.

The pipeline runs for real (local Ray, moto S3 on loopback) behind `tests/fault_proxy.py`, a loopback
proxy that answers chosen requests with 503 SlowDown, 500, 403, a reset connection or a slow body.
Every corpus is compared with a clean run's, read back from real Parquet files.
"""

from __future__ import annotations

import dataclasses
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dualtok.jobs.cli import main as cli
from dualtok.pipelines.tokenize.config import TokenizeConfig, plan_from_config
from dualtok.pipelines.io import schemas as S
from dualtok.pipelines.io.corpus import CorpusLayout, CorpusWriter
from dualtok.pipelines.actors import StageResources
from dualtok.pipelines.io.storage import (InputListingError, ShardObject, StorageFault, filesystem, list_shard_objects,
                               list_shards, object_version)
from dualtok.pipelines.tokenize.pipeline import _still_committed, run_tokenize
from tests.conftest import S3_TEST_ENV
from tests.fault_proxy import Fault, FaultProxy
from tests.shard_factory import encode, photo_images, sample_members, tar_bytes
from tests.test_tokenize import _writer_batch

pytestmark = pytest.mark.timeout(600)

SHARDS, PER_SHARD = 3, 3
FAST_RETRIES = {"retries": {"max_attempts": 2, "mode": "standard"}}  # a persistent fault fails fast


def write_shards(fs, prefix: str, count: int, seed: int, key_prefix: str = "") -> None:
    images = photo_images(count * PER_SHARD, seed=seed)
    for s in range(count):
        members = []
        for i in range(PER_SHARD):
            key = f"{key_prefix}{s:05d}{i:04d}"
            members += sample_members(key, encode(images[s * PER_SHARD + i], quality=90), f"photo {key}")
        fs.pipe_file(f"{prefix}/{s:05d}.tar", tar_bytes(members))


def make_plan(inputs: str, output: str, endpoint: str, config_kwargs: dict | None = None):
    config = TokenizeConfig(inputs=[inputs], output=output, bundle="tiny", streams="guide",
                            encoder=StageResources(batch_size=4))
    options = {"client_kwargs": {"endpoint_url": endpoint}}
    if config_kwargs:
        options["config_kwargs"] = config_kwargs
    return dataclasses.replace(plan_from_config(config), storage_options=options)


def read_corpus(fs, prefix: str) -> pa.Table:
    fs.invalidate_cache()  # the job wrote from other processes
    files = sorted(p for p in fs.find(f"{prefix}/data") if p.endswith(".parquet"))
    return pq.ParquetDataset(files, filesystem=fs).read().sort_by(S.KEY)


def markers(fs, prefix: str) -> dict[str, dict]:
    fs.invalidate_cache()
    return {json.loads(fs.cat_file(p))["shard"]: json.loads(fs.cat_file(p)) for p in fs.find(f"{prefix}/_committed")}


def assert_same_as_clean(fs, prefix: str, clean: pa.Table) -> None:
    table = read_corpus(fs, prefix)
    keys = table[S.KEY].to_pylist()
    assert len(keys) == len(set(keys)) == SHARDS * PER_SHARD  # no sample twice, none skipped
    assert table.select(clean.column_names).equals(clean)  # same keys, captions, sizes and tokens
    committed = markers(fs, prefix)
    assert sorted(committed) == ["00000", "00001", "00002"]
    assert all(m["rows"] + m["errors"] == m["samples"] == PER_SHARD for m in committed.values())


@pytest.fixture(scope="module")
def bucket(s3) -> str:
    name = s3.new_bucket()
    write_shards(s3.filesystem(), f"{name}/shards", SHARDS, seed=21)
    return name


@pytest.fixture(scope="module")
def clean(ray_session, s3, bucket) -> pa.Table:
    """The corpus a run without faults makes (straight to moto, no proxy)."""
    summary = run_tokenize(make_plan(f"s3://{bucket}/shards/", f"s3://{bucket}/clean", s3.url))
    assert (summary.shards_committed, summary.shards_failed) == (SHARDS, {})
    table = read_corpus(s3.filesystem(), f"{bucket}/clean")
    assert table.num_rows == SHARDS * PER_SHARD
    return table


@pytest.fixture
def proxy(s3):
    with FaultProxy(s3.url) as proxy:
        yield proxy


# ---- the pipeline behind the proxy ----------------------------------------------------------
@pytest.mark.slow
def test_transient_store_errors_are_retried_and_rows_equal_a_clean_run(s3, bucket, clean, proxy):
    faults = [
        proxy.add(Fault("GET", r"/shards/00000\.tar$", "slowdown")),
        proxy.add(Fault("GET", r"/shards/00001\.tar$", "internal")),
        proxy.add(Fault("GET", r"/shards/00002\.tar$", "reset")),
        proxy.add(Fault("GET", r"/shards/00000\.tar$", "slow", after=1, chunk=8192, delay=0.02)),
        proxy.add(Fault("PUT", r"/transient/_committed/00001\.json$", "slowdown")),  # the commit retries too
    ]
    # the default retry policy (`storage.filesystem`): no config_kwargs
    summary = run_tokenize(make_plan(f"s3://{bucket}/shards/", f"s3://{bucket}/transient", proxy.url))
    assert [f.fired for f in faults] == [1, 1, 1, 1, 1], [(f.kind, f.path, f.seen) for f in faults]
    assert (summary.shards_committed, summary.shards_failed, summary.errors) == (SHARDS, {}, 0)
    fs = s3.filesystem()
    assert_same_as_clean(fs, f"{bucket}/transient", clean)
    manifest = json.loads(fs.cat_file(f"{bucket}/transient/manifest.json"))
    assert manifest["this_run"]["shards_failed"] == {}
    assert manifest["this_run"]["storage_retries"] == summary.storage_retries


@pytest.mark.slow
def test_persistent_fault_fails_only_that_shard_and_the_next_run_redoes_it(s3, bucket, clean, proxy, capsys):
    fs, out = s3.filesystem(), f"{bucket}/persistent"
    broken = proxy.add(Fault("GET", r"/shards/00001\.tar$", "internal", times=None))
    summary = run_tokenize(make_plan(f"s3://{bucket}/shards/", f"s3://{out}", proxy.url, FAST_RETRIES))
    assert summary.shards_committed == 2 and list(summary.shards_failed) == ["00001"]
    assert summary.shards_failed["00001"].startswith("storage: ") and "internal error" in summary.shards_failed["00001"]
    assert broken.fired >= 2 and summary.storage_retries >= 1  # the read stage retried the shard
    assert sorted(markers(fs, out)) == ["00000", "00002"]  # never committed as "bad data"
    manifest = json.loads(fs.cat_file(f"{out}/manifest.json"))
    assert list(manifest["this_run"]["shards_failed"]) == ["00001"] and manifest["corpus"]["shards"] == 2

    # the CLI: access denied on the same shard -> exit 3, the shard and the reason printed, no secret
    proxy.clear()
    denied = proxy.add(Fault("GET", r"/shards/00001\.tar$", "denied", times=None))
    argv = ["tokenize", f"inputs=s3://{bucket}/shards/", f"output=s3://{out}", "bundle=tiny", "streams=guide",
            "encoder.batch_size=4", "encoder.actors=1", f"storage.endpoint_url={proxy.url}"]
    assert cli(argv) == 3
    printed = capsys.readouterr().out
    assert "1 shards were not committed" in printed and "00001: storage:" in printed and "Access Denied" in printed
    assert denied.fired >= 1 and S3_TEST_ENV["AWS_SECRET_ACCESS_KEY"] not in printed

    proxy.clear()  # the store recovers: the next run commits the shard, and only that one
    assert cli(argv) == 0
    assert "1 shards committed, 2 already done" in capsys.readouterr().out
    assert_same_as_clean(fs, out, clean)


@pytest.mark.slow
def test_marker_put_failing_after_the_data_file_is_redone_next_run(s3, bucket, clean, proxy):
    fs, out = s3.filesystem(), f"{bucket}/putfail"
    marker_put = proxy.add(Fault("PUT", r"/putfail/_committed/00000\.json$", "internal", times=None))
    summary = run_tokenize(make_plan(f"s3://{bucket}/shards/", f"s3://{out}", proxy.url, FAST_RETRIES))
    assert marker_put.fired >= 1 and list(summary.shards_failed) == ["00000"]
    assert "commit failed" in summary.shards_failed["00000"] and summary.shards_committed == 2
    fs.invalidate_cache()
    assert fs.exists(f"{out}/data/00000.parquet") and not fs.exists(f"{out}/_committed/00000.json")

    proxy.clear()
    rerun = run_tokenize(make_plan(f"s3://{bucket}/shards/", f"s3://{out}", proxy.url, FAST_RETRIES))
    assert (rerun.shards_committed, rerun.shards_skipped, rerun.shards_failed) == (1, 2, {})
    assert_same_as_clean(fs, out, clean)


@pytest.mark.slow
def test_shard_rewritten_after_its_commit_is_redone(ray_session, s3):
    fs, bucket = s3.filesystem(), s3.new_bucket()
    write_shards(fs, f"{bucket}/in", 2, seed=31)
    plan = make_plan(f"s3://{bucket}/in/", f"s3://{bucket}/out", s3.url)
    assert run_tokenize(plan).shards_committed == 2
    first = markers(fs, f"{bucket}/out")
    assert first["00001"]["shard_version"] == object_version(fs.info(f"{bucket}/in/00001.tar"))

    write_shards(fs, f"{bucket}/new", 2, seed=32, key_prefix="n")  # other samples, other keys
    fs.copy(f"{bucket}/new/00001.tar", f"{bucket}/in/00001.tar")
    fs.invalidate_cache()
    rerun = run_tokenize(plan)
    assert (rerun.shards_committed, rerun.shards_skipped) == (1, 1)
    after = markers(fs, f"{bucket}/out")
    assert after["00000"] == first["00000"]  # unchanged input: untouched
    assert after["00001"]["shard_version"] == object_version(fs.info(f"{bucket}/in/00001.tar"))
    assert after["00001"]["shard_version"] != first["00001"]["shard_version"]
    keys = read_corpus(fs, f"{bucket}/out")[S.KEY].to_pylist()
    # the old rows of 00001 are gone (its file was rewritten under the same name), the new ones are in
    assert sorted(keys) == sorted([f"00000{i:04d}" for i in range(PER_SHARD)] + [f"n00001{i:04d}" for i in range(PER_SHARD)])


# ---- listing --------------------------------------------------------------------------------
def test_listing_finds_gzip_shards_with_sizes_and_versions(tmp_path):
    for name in ("a.tar", "b.tar.gz", "c.tgz", "notes.txt", "d.tar.bz2"):
        (tmp_path / name).write_bytes(b"x" * (len(name) + 1))
    listed = list_shard_objects([str(tmp_path)])
    assert [o.uri.rsplit("/", 1)[1] for o in listed] == ["a.tar", "b.tar.gz", "c.tgz"]
    assert [o.size for o in listed] == [6, 9, 6]
    assert listed[0].version == object_version(filesystem(str(tmp_path / "a.tar"))[0].info(str(tmp_path / "a.tar")))
    assert list_shards([f"{tmp_path}/*.tgz"]) == [str(tmp_path / "c.tgz")]
    (tmp_path / "a.tar").write_bytes(b"y" * 60)  # rewritten: another version
    assert list_shard_objects([str(tmp_path / "a.tar")])[0].version != listed[0].version
    with pytest.raises(InputListingError, match="gone.tar does not exist"):
        list_shard_objects([str(tmp_path / "gone.tar")])


def test_listing_that_the_store_refuses_is_a_storage_fault_naming_the_input(s3, proxy):
    bucket = s3.new_bucket()
    write_shards(s3.filesystem(), f"{bucket}/in", 1, seed=1)
    options = {"client_kwargs": {"endpoint_url": proxy.url}, "config_kwargs": FAST_RETRIES}
    listed = list_shard_objects([f"s3://{bucket}/in/"], options)
    assert [(o.uri, o.size) for o in listed] == [(f"s3://{bucket}/in/00000.tar", s3.filesystem().size(f"{bucket}/in/00000.tar"))]
    proxy.add(Fault("GET", rf"^/{bucket}/?$", "denied", times=None))  # ListObjectsV2 on the bucket
    proxy.add(Fault("HEAD", rf"^/{bucket}/", "denied", times=None))
    with pytest.raises(StorageFault, match=rf"listing input s3://{bucket}/in/ failed: PermissionError"):
        list_shard_objects([f"s3://{bucket}/in/"], dict(options, skip_instance_cache=True))


def test_s3_clients_get_a_retry_policy_unless_the_user_set_one(monkeypatch):
    for name in ("AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
        monkeypatch.delenv(name, raising=False)
    fs, _ = filesystem("s3://bucket/x", {"skip_instance_cache": True})
    assert fs.config_kwargs["retries"]["mode"] == "adaptive" and fs.config_kwargs["retries"]["max_attempts"] > 3
    fs, _ = filesystem("s3://bucket/x", {"config_kwargs": {"retries": {"max_attempts": 1}}, "skip_instance_cache": True})
    assert fs.config_kwargs["retries"] == {"max_attempts": 1}
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "7")  # botocore's own setting: left to botocore
    fs, _ = filesystem("s3://bucket/x", {"skip_instance_cache": True})
    assert "retries" not in fs.config_kwargs


# ---- the writer, without Ray ----------------------------------------------------------------
def _end(shard: str, samples: int, reason: str = "", retries: int = 0) -> dict:
    batch = _writer_batch([(S.END, shard, -1)], {shard: -1 if reason else samples})
    batch[S.REASON][0], batch[S.STAGE][0] = reason, S.STAGE_STORAGE if reason else ""
    batch[S.SHARD_RETRIES][0] = retries
    return batch


def test_writer_drops_a_failed_shard_and_ignores_its_later_rows(tmp_path):
    writer = CorpusWriter(CorpusLayout(str(tmp_path / "c"), 4, 2, {}), {}, "run-1")
    assert writer.add(_writer_batch([(S.SAMPLE, "a", 0), (S.SAMPLE, "b", 0)])) == []
    assert writer.add(_end("a", 0, "reading s3://x/a.tar: SlowDown (gave up after 4 retries)", retries=4)) == []
    assert writer.failed == {"a": "storage: reading s3://x/a.tar: SlowDown (gave up after 4 retries)"}
    # a late row, then a (re-delivered) good END row of the failed shard: nothing commits it
    assert writer.add(_writer_batch([(S.SAMPLE, "a", 1)])) == []
    assert writer.add(_end("a", 2)) == []
    [marker] = writer.add(_end("b", 1, retries=1))
    assert (marker["shard"], marker["rows"], marker["samples"], marker["storage_retries"]) == ("b", 1, 1, 1)
    assert (marker["shard_bytes"], marker["shard_version"]) == (10240, "v1")
    assert writer.pending == {} and writer.storage_retries == {"a": 4, "b": 1}
    assert sorted(p.name for p in (tmp_path / "c" / "_committed").iterdir()) == ["b.json"]
    assert not (tmp_path / "c" / "data" / "a.parquet").exists()


def test_writer_fails_a_shard_whose_rows_do_not_add_up_or_whose_commit_the_store_refuses(tmp_path):
    out = tmp_path / "c"
    (out / "errors").mkdir(parents=True)
    (out / "errors" / "b.parquet").mkdir()  # the store refuses this one file: the rename onto it fails
    writer = CorpusWriter(CorpusLayout(str(out), 4, 2, {}), {}, "run-1")
    # "a": index 3 in a shard the END row says has 3 samples -> not committed as if whole
    rows = [(S.SAMPLE, "a", 0), (S.SAMPLE, "a", 1), (S.SAMPLE, "a", 3), (S.SAMPLE, "b", 0), (S.SAMPLE, "c", 0)]
    assert writer.add(_writer_batch(rows)) == []
    batch = _writer_batch([(S.END, s, -1) for s in ("a", "b", "c")], {"a": 3, "b": 1, "c": 1})
    assert [m["shard"] for m in writer.add(batch)] == ["c"]
    assert writer.failed["a"].startswith("read: rows + errors (3 + 0) do not account for the 3 samples")
    assert writer.failed["b"].startswith("storage: commit failed: writing ") and "b.parquet" in writer.failed["b"]
    assert sorted(p.name for p in (out / "_committed").iterdir()) == ["c.json"]
    assert (out / "data" / "b.parquet").exists()  # left without a marker: the next run rewrites it
    assert pq.read_table(out / "data" / "c.parquet")[S.KEY].to_pylist() == ["c-0"]


def test_inputs_changed_since_their_commit_are_pending_again():
    listed = {"old": ShardObject("s3://b/old.tar", 10, "e1"), "same": ShardObject("s3://b/same.tar", 10, "e1"),
              "etag": ShardObject("s3://b/etag.tar", 10, "e2"), "size": ShardObject("s3://b/size.tar", 11, "e1"),
              "new": ShardObject("s3://b/new.tar", 10, "e1")}
    committed = {"old": {"shard": "old"},  # a marker from before markers recorded the input: committed
                 "same": {"shard_version": "e1", "shard_bytes": 10},
                 "etag": {"shard_version": "e1", "shard_bytes": 10}, "size": {"shard_version": "e1", "shard_bytes": 10}}
    assert _still_committed(committed, listed) == {"old", "same"}
