"""Shard ids that do not depend on the run, and one writer per output.

- Ids are paths under the corpus's recorded input root: the nightly date-folder layout on loopback
  S3 gets every sample once; a shard outside the root, or a different shard with a committed id,
  is an error before anything is written, never a duplicate or a skip.
- The output lease: a second run fails at once naming the holder, an expired lease is taken over,
  a holder that lost its lease stops before committing; on local disk and on S3.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dualtok.jobs.cli import main as cli
from dualtok.pipelines.io import schemas as S
from dualtok.pipelines.io.corpus import CorpusLayout, CorpusWriter
from dualtok.pipelines.io.shard_ids import CORPUS_FILE, assign_shard_ids, read_input_root
from dualtok.pipelines.io.lease import LEASE_FILE, Lease, LeaseConfig, LeaseHeldError, LeaseLostError, read_lease
from dualtok.pipelines.io.storage import ShardIdentityError
from tests.conftest import S3_TEST_ENV
from tests.shard_factory import encode, photo_images, sample_members, tar_bytes
from tests.test_tokenize import _writer_batch

pytestmark = pytest.mark.timeout(600)
REPO = Path(__file__).parents[1]


def shard_bytes(prefix: str, count: int, seed: int) -> tuple[bytes, list[str]]:
    """A shard of `count` captioned photos whose keys start with `prefix`; returns (tar, keys)."""
    keys = [f"{prefix}{i:03d}" for i in range(count)]
    images = photo_images(count, seed=seed)
    members = sum((sample_members(k, encode(im, quality=85), f"photo {k}") for k, im in zip(keys, images)), [])
    return tar_bytes(members), keys


def tokenize(*args: str) -> int:
    # One encoder actor: these runs are about shard ids, not pool sizing (each actor start imports torch).
    return cli(["--log-level", "WARNING", "tokenize", "bundle=tiny", "streams=guide", "encoder.batch_size=4",
                "encoder.actors=1", *args])


def s3_corpus(fs, prefix: str) -> tuple[list[str], dict[str, dict]]:
    """(sorted keys of every corpus row, markers by shard id) of a corpus on S3."""
    fs.invalidate_cache()
    files = sorted(p for p in fs.find(f"{prefix}/data") if p.endswith(".parquet"))
    keys = sorted(pq.ParquetDataset(files, filesystem=fs).read()[S.KEY].to_pylist()) if files else []
    markers = {}
    for path in fs.find(f"{prefix}/_committed"):
        marker = json.loads(fs.cat_file(path))
        markers[marker["shard"]] = marker
    return keys, markers


def local_markers(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "_committed").glob("*.json"))}


# ---- shard ids -----------------------------------------------------------------------------------
@pytest.mark.slow  # three runs
def test_date_folders_on_s3_get_each_sample_once_with_input_root(ray_session, s3, capsys):
    fs, bucket = s3.filesystem(), s3.new_bucket()
    day1, keys1 = shard_bytes("a", 3, seed=1)
    day2, keys2 = shard_bytes("b", 2, seed=2)
    fs.pipe_file(f"{bucket}/2026-12-01/00000.tar", day1)
    out, root = f"s3://{bucket}/corpus", f"s3://{bucket}/"
    # the first night computes in float32 (say, on a CPU pool without native bfloat16)
    assert tokenize(f"inputs=s3://{bucket}/2026-12-01/", f"output={out}", f"input_root={root}",
                    "encoder.dtype=float32") == 0
    fs.pipe_file(f"{bucket}/2026-12-02/00000.tar", day2)  # the next night's folder, same file name
    inputs = f"inputs=[s3://{bucket}/2026-12-01/,s3://{bucket}/2026-12-02/]"
    assert tokenize(inputs, f"output={out}", f"input_root={root}") == 0

    keys, markers = s3_corpus(fs, f"{bucket}/corpus")
    assert keys == sorted(keys1 + keys2)  # every sample exactly once
    assert sorted(markers) == ["2026-12-01__00000", "2026-12-02__00000"]
    assert markers["2026-12-02__00000"]["shard_uri"] == f"s3://{bucket}/2026-12-02/00000.tar"
    assert markers["2026-12-01__00000"]["rows"] == 3 and markers["2026-12-02__00000"]["rows"] == 2
    assert read_input_root(out) == root
    assert not fs.exists(f"{bucket}/corpus/{LEASE_FILE}")  # released at the end of each run

    # the root is recorded: a third night without input_root gets the same kind of id
    day3, keys3 = shard_bytes("c", 1, seed=3)
    fs.pipe_file(f"{bucket}/2026-12-03/00000.tar", day3)
    assert tokenize(f"inputs=s3://{bucket}/2026-12-0[123]/*.tar", f"output={out}") == 0
    keys, markers = s3_corpus(fs, f"{bucket}/corpus")
    assert keys == sorted(keys1 + keys2 + keys3) and "2026-12-03__00000" in markers
    # later nights with `encoder.dtype=auto` continue in the corpus's dtype, whatever this CPU computes
    # fastest: float32 and bfloat16 ids differ near ties
    assert {m["dtype"] for m in markers.values()} == {"float32"}
    fs.invalidate_cache()
    schema = pq.read_schema(fs.open(f"{bucket}/corpus/data/2026-12-03__00000.parquet"))
    assert S.read_metadata(schema)["dtype"] == "float32"


def test_without_input_root_the_next_date_folder_fails_fast_and_writes_nothing(ray_session, s3, capsys):
    fs, bucket = s3.filesystem(), s3.new_bucket()
    day1, keys1 = shard_bytes("a", 2, seed=4)
    fs.pipe_file(f"{bucket}/day1/00000.tar", day1)
    fs.pipe_file(f"{bucket}/day2/00000.tar", shard_bytes("b", 2, seed=5)[0])
    out = f"s3://{bucket}/corpus"
    assert tokenize(f"inputs=s3://{bucket}/day1/", f"output={out}") == 0
    assert read_input_root(out) == f"s3://{bucket}/day1/"  # the first run's common folder, as before
    before = {p: fs.cat_file(p) for p in fs.find(f"{bucket}/corpus")}
    capsys.readouterr()

    # a new shard in the root, tokenized in another dtype than the corpus's (float32 and bfloat16 ids
    # differ near ties): refused naming both, nothing written (checked below)
    fs.pipe_file(f"{bucket}/day1/00001.tar", shard_bytes("c", 1, seed=6)[0])
    made_in = json.loads(fs.cat_file(f"{bucket}/corpus/_committed/00000.json"))["dtype"]
    other = "float32" if made_in == "bfloat16" else "bfloat16"
    assert tokenize(f"inputs=s3://{bucket}/day1/", f"output={out}", f"encoder.dtype={other}") == 2
    err = capsys.readouterr().err
    assert f"tokenized in {made_in}, this run computes in {other}" in err and f"encoder.dtype={made_in}" in err

    assert tokenize(f"inputs=[s3://{bucket}/day1/,s3://{bucket}/day2/]", f"output={out}") == 2
    err = capsys.readouterr().err
    assert f"input shard s3://{bucket}/day2/00000.tar is outside the corpus's input root s3://{bucket}/day1/" in err
    assert "input_root=" in err and "new output" in err
    # another root for a corpus that has one: an error naming both, not new ids for old shards
    assert tokenize(f"inputs=s3://{bucket}/day1/", f"output={out}", f"input_root=s3://{bucket}/") == 2
    err = capsys.readouterr().err
    assert f"input_root s3://{bucket}/ differs from" in err and f"s3://{bucket}/day1/" in err

    fs.invalidate_cache()
    assert {p: fs.cat_file(p) for p in fs.find(f"{bucket}/corpus")} == before  # nothing written, lease gone
    keys, markers = s3_corpus(fs, f"{bucket}/corpus")
    assert keys == sorted(keys1) and sorted(markers) == ["00000"]


def test_a_different_shard_with_a_committed_id_is_an_error_not_a_skip(ray_session, tmp_path, capsys):
    shards, out = tmp_path / "in", tmp_path / "corpus"
    (shards / "day1").mkdir(parents=True)
    (shards / "day1" / "00000.tar").write_bytes(shard_bytes("a", 2, seed=6)[0])
    assert tokenize(f"inputs={shards}/day1/", f"output={out}", f"input_root={shards}") == 0
    assert list(local_markers(out)) == ["day1__00000"]
    (shards / "day1__00000.tar").write_bytes(shard_bytes("z", 3, seed=7)[0])  # same id under the root
    capsys.readouterr()

    assert tokenize(f"inputs={shards}/day1__00000.tar", f"output={out}") == 2
    err = capsys.readouterr().err
    assert f"input shard {shards}/day1__00000.tar has id 'day1__00000'" in err
    assert f"committed that id for {shards}/day1/00000.tar" in err
    # both in one listing: named together, before anything runs
    assert tokenize(f"inputs={shards}", f"output={out}") == 2
    err = capsys.readouterr().err
    assert f"{shards}/day1/00000.tar and {shards}/day1__00000.tar both map to shard id 'day1__00000'" in err
    assert list(local_markers(out)) == ["day1__00000"] and local_markers(out)["day1__00000"]["rows"] == 2


def _marker(sid: str, uri: str) -> dict:
    return {"shard": sid, "shard_uri": uri, "rows": 1, "errors": 0, "samples": 1}


def test_a_corpus_from_before_roots_were_recorded_keeps_its_ids(tmp_path):
    """Its root is what its markers imply; it is recorded, and a shard listed with others keeps its id."""
    out, root = tmp_path / "corpus", tmp_path / "in"
    old = {"00000": _marker("00000", f"{root}/day1/00000.tar"), "00001": _marker("00001", f"{root}/day1/00001.tar")}
    uris = [f"{root}/day1/00000.tar", f"{root}/day1/00002.tar"]
    assert assign_shard_ids(uris, str(out), old, None, "run-1") == {"00000": uris[0], "00002": uris[1]}
    recorded = json.loads((out / CORPUS_FILE).read_text())
    assert recorded["input_root"] == f"{root}/day1/" and "markers" in recorded["source"]
    # what the old runs did wrong (two roots for one corpus) is reported, not guessed at
    mixed = {**old, "day1__00001": _marker("day1__00001", f"{root}/day1/00001.tar")}
    with pytest.raises(ShardIdentityError, match="written under different input roots"):
        assign_shard_ids(uris, str(tmp_path / "other"), mixed, None, "run-2")
    assert not (tmp_path / "other" / CORPUS_FILE).exists()


def test_input_root_is_normalised_and_a_first_run_outside_it_records_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uris = [f"{tmp_path}/in/2026-12-01/00000.tar"]
    ids = assign_shard_ids(uris, str(tmp_path / "corpus"), {}, "in", "run-1")  # relative, no trailing '/'
    assert ids == {"2026-12-01__00000": uris[0]} and read_input_root(str(tmp_path / "corpus")) == f"{tmp_path}/in/"
    with pytest.raises(ShardIdentityError, match=r"outside the corpus's input root .*/in/2026-12-01/ \(input_root\)"):
        assign_shard_ids([f"{tmp_path}/elsewhere/x.tar"], str(tmp_path / "c2"), {}, f"{tmp_path}/in/2026-12-01", "r")
    assert read_input_root(str(tmp_path / "c2")) is None


# ---- the output lease ----------------------------------------------------------------------------
@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "corpus")
    s3 = request.getfixturevalue("s3")
    return f"s3://{s3.new_bucket()}/corpus"


def test_a_second_holder_fails_naming_the_first_until_it_releases(output):
    first = Lease(output, "run-first", LeaseConfig(ttl_s=30))
    with first:
        body = read_lease(output)
        assert body["run_id"] == "run-first" and body["pid"] == os.getpid() and body["expires"] > body["created"]
        assert not any(secret in json.dumps(body) for secret in S3_TEST_ENV.values())
        with pytest.raises(LeaseHeldError) as held:
            Lease(output, "run-second").acquire()
        assert "run run-first on host" in str(held.value) and f"expires at {body['expires']}" in str(held.value)
        first.guard()  # renews: still the holder
        assert read_lease(output)["renewed"] > body["renewed"]
    assert read_lease(output) is None
    with Lease(output, "run-second"):
        assert read_lease(output)["run_id"] == "run-second"


def test_the_heartbeat_keeps_a_short_lease_alive(output):
    with Lease(output, "run-long", LeaseConfig(ttl_s=2.0)):
        time.sleep(4.5)  # more than two ttls: only renewals keep it
        with pytest.raises(LeaseHeldError, match="run run-long"):
            Lease(output, "run-other").acquire()


_HOLDER = """
import sys
from dualtok.pipelines.io.lease import Lease, LeaseConfig, LeaseLostError
lease = Lease(sys.argv[1], "run-child", LeaseConfig(ttl_s=3.0))
lease.acquire()
print("held", flush=True)
sys.stdin.readline()
try:
    lease.guard()
    print("still held", flush=True)
except LeaseLostError as err:
    print("lost:", err, flush=True)
lease.release()
"""


def start_holder(output: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, output], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held", proc.stderr.read()
    return proc


def test_an_expired_lease_is_taken_over_and_its_stalled_holder_stops(output, caplog):
    holder = start_holder(output)
    try:
        holder.send_signal(signal.SIGSTOP)  # a holder that stops renewing: a hung or partitioned driver
        with pytest.raises(LeaseHeldError, match="run run-child"):
            Lease(output, "run-next").acquire()
        with caplog.at_level(logging.WARNING, logger="dualtok.pipelines.io.lease"):
            taker = Lease(output, "run-next", LeaseConfig(ttl_s=30, wait_s=10))
            taker.acquire()  # waits for the child's lease to expire, then takes it over
        assert any("took over the lease of run run-child" in r.getMessage() and r.getMessage().endswith("it expired")
                   for r in caplog.records)
        holder.send_signal(signal.SIGCONT)
        out, err = holder.communicate("commit?\n", timeout=60)
        # the old holder finds it lost the lease before its next commit, and leaves the new one alone
        assert out.startswith("lost: run run-child lost the lease") and "now held by run run-next" in out, err
        assert read_lease(output)["run_id"] == "run-next"
        taker.guard()
        taker.release()
        assert read_lease(output) is None
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("reaped", [True, False])
def test_the_lease_of_a_killed_run_on_this_machine_is_taken_over_at_once(tmp_path, caplog, reaped):
    """A driver killed and rerun on the same machine: its process is gone, so no need to wait out
    its ttl (a zombie, not yet reaped by its parent, is gone too)."""
    output = str(tmp_path / "corpus")
    holder = start_holder(output)
    pid = holder.pid
    holder.kill()
    if reaped:
        holder.wait()
    else:
        while not open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
            time.sleep(0.01)
    try:
        assert read_lease(output)["run_id"] == "run-child"  # a killed run cannot release it
        with caplog.at_level(logging.WARNING, logger="dualtok.pipelines.io.lease"):
            with Lease(output, "run-next"):  # wait_s=0: no waiting
                assert read_lease(output)["run_id"] == "run-next"
        assert any(f"its process {pid} on this machine has exited" in r.getMessage() for r in caplog.records)
    finally:
        holder.wait()


def test_the_writer_commits_nothing_once_its_lease_is_lost(tmp_path):
    out = tmp_path / "corpus"
    layout = CorpusLayout(str(out), 4, 2, {"bundle_fingerprint": "f"})
    lease = Lease(str(out), "run-a", LeaseConfig(ttl_s=30))
    lease.acquire()
    writer = CorpusWriter(layout, {"s0": "in/s0.tar", "s1": "in/s1.tar"}, "run-a", guard=lease.guard)
    committed = writer.add(_writer_batch([(S.SAMPLE, "s0", 0), (S.END, "s0", -1)], {"s0": 1}))
    assert [m["shard"] for m in committed] == ["s0"]
    (out / LEASE_FILE).unlink()  # an operator removed it, and another run started
    with Lease(str(out), "run-b"):
        with pytest.raises(LeaseLostError, match="now held by run run-b"):
            writer.add(_writer_batch([(S.SAMPLE, "s1", 0), (S.END, "s1", -1)], {"s1": 1}))
        assert sorted(local_markers(out)) == ["s0"] and not (out / "data" / "s1.parquet").exists()
        lease.release()
        assert read_lease(str(out))["run_id"] == "run-b"  # the loser never deletes the winner's lease


def test_a_second_tokenize_run_on_one_output_fails_naming_the_first(ray_session, s3, capsys):
    fs, bucket = s3.filesystem(), s3.new_bucket()
    fs.pipe_file(f"{bucket}/in/00000.tar", shard_bytes("a", 2, seed=8)[0])
    out = f"s3://{bucket}/corpus"
    with Lease(out, "run-backfill"):  # the first run, holding its output
        assert tokenize(f"inputs=s3://{bucket}/in/", f"output={out}") == 2
        err = capsys.readouterr().err
        assert "another run is writing" in err and "run run-backfill on host" in err and "expires at" in err
        fs.invalidate_cache()
        assert fs.find(f"{bucket}/corpus") == [f"{bucket}/corpus/{LEASE_FILE}"]  # the holder's lease only
    assert tokenize(f"inputs=s3://{bucket}/in/", f"output={out}") == 0
    assert s3_corpus(fs, f"{bucket}/corpus")[0] == ["a000", "a001"]


@pytest.mark.slow
def test_two_concurrent_tokenize_drivers_one_output(ray_session, tmp_path, capsys):
    """A real first run (a `dualtok tokenize` driver process) holds the output; a second fails at once
    naming it; the first finishes every sample once and releases the lease."""
    shards, out = tmp_path / "in", tmp_path / "corpus"
    shards.mkdir()
    expected = []
    for s in range(4):
        data, keys = shard_bytes(f"s{s}", 3, seed=20 + s)
        (shards / f"{s:05d}.tar").write_bytes(data)
        expected += keys
    command = [sys.executable, "-m", "dualtok.jobs.cli", "--log-level", "WARNING", "tokenize", f"inputs={shards}",
               f"output={out}", "bundle=tiny", "streams=guide", "encoder.batch_size=1"]
    first = subprocess.Popen(command, env={**os.environ, "RAY_ADDRESS": ray_session}, cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while read_lease(str(out)) is None:
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lease"
            time.sleep(0.05)
        holder = read_lease(str(out))["run_id"]
        capsys.readouterr()
        assert tokenize(f"inputs={shards}", f"output={out}") == 2
        assert f"run {holder} on host" in capsys.readouterr().err
        assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    finally:
        first.kill()
        first.wait()
    assert sorted(pq.read_table(out / "data")[S.KEY].to_pylist()) == sorted(expected)
    assert read_lease(str(out)) is None and len(local_markers(out)) == 4
    assert all(m["run_id"] == holder for m in local_markers(out).values())
