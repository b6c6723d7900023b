"""Crash and rerun: a killed driver or a killed encoder actor never costs or duplicates a sample.

Each test runs `dualtok tokenize` as a separate driver process connected to the session's Ray
cluster, kills something part-way, and compares the final corpus with a clean run's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dualtok.jobs.cli import main as cli
from dualtok.pipelines.shards.photos import write_sample_shards

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]

SHARDS, PER_SHARD = 10, 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recovery") / "shards"
    write_sample_shards(str(root), count=SHARDS * PER_SHARD, per_shard=PER_SHARD, seed=11)
    return root


@pytest.fixture(scope="module")
def clean_corpus(ray_session, shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "corpus"
    assert cli(["tokenize", f"inputs={shards}", f"output={out}", "bundle=tiny"]) == 0
    return pq.read_table(out / "data").sort_by("key")


def tokenize_command(shards: Path, out: Path) -> list[str]:
    # One read actor (the default) and batch size 1: shards finish one after another, so a kill
    # lands part-way through the run.
    return [sys.executable, "-m", "dualtok.jobs.cli", "--log-level", "WARNING", "tokenize", f"inputs={shards}",
            f"output={out}", "bundle=tiny", "encoder.batch_size=1"]


def start_driver(processes, address: str, shards: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": address}
    return processes.start(tokenize_command(shards, out), env=env, cwd=Path(__file__).parents[1],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for_markers(out: Path, at_least: int, proc: subprocess.Popen, timeout: float = 300) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        markers = sorted((out / "_committed").glob("*.json")) if (out / "_committed").exists() else []
        if len(markers) >= at_least:
            return markers
        if proc.poll() is not None:
            raise AssertionError(f"driver exited ({proc.returncode}) early: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.1)
    raise AssertionError(f"fewer than {at_least} shards committed after {timeout} s")


def assert_same_as_clean(out: Path, clean) -> None:
    table = pq.read_table(out / "data").sort_by("key")
    keys = table["key"].to_pylist()
    assert len(keys) == len(set(keys)) == clean.num_rows == SHARDS * PER_SHARD
    assert table.select(clean.column_names).equals(clean)
    markers = [json.loads(p.read_text()) for p in (out / "_committed").glob("*.json")]
    assert len(markers) == SHARDS and all(m["rows"] + m["errors"] == m["samples"] for m in markers)


def test_driver_killed_then_rerun_finishes_exactly_once(ray_session, shards, clean_corpus, tmp_path, processes):
    out = tmp_path / "corpus"
    proc = start_driver(processes, ray_session, shards, out)
    before = wait_for_markers(out, 1, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    committed = {p.name: p.read_text() for p in (out / "_committed").glob("*.json")}
    assert len(before) <= len(committed) < SHARDS, "the kill must land part-way through the run"

    env = {**os.environ, "RAY_ADDRESS": ray_session}
    rerun = subprocess.run(tokenize_command(shards, out), env=env, cwd=Path(__file__).parents[1],
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # shards committed before the kill were skipped, not recomputed: their markers are untouched
    assert {name: (out / "_committed" / name).read_text() for name in committed} == committed
    assert f"{len(committed)} already done" in rerun.stdout
    assert_same_as_clean(out, clean_corpus)


def encoder_actor_pids() -> list[int]:
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    return [int(line.split()[0]) for line in ps.splitlines() if "ray::MapWorker" in line and "EncodeTokens" in line]


def test_encoder_actor_killed_job_still_completes_exactly_once(ray_session, shards, clean_corpus, tmp_path,
                                                                processes):
    out = tmp_path / "corpus"
    proc = start_driver(processes, ray_session, shards, out)
    wait_for_markers(out, 1, proc)
    pids = encoder_actor_pids()
    assert pids, "no guide encoder actor process found to kill"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert len(list((out / "_committed").glob("*.json"))) < SHARDS, "the kill must land part-way through the run"
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-3000:]
    assert_same_as_clean(out, clean_corpus)
