"""`dualtok submit` and the local stack: submission ids, token headers, and a real tokenize job
submitted to a local Ray head (started by the same `dualtok stack up` the docs use) that writes
its corpus to the stack's loopback S3."""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import s3fs

from dualtok.jobs.kinds import read_job_file
from dualtok.jobs.submit import auth_headers, job_client, plan_submission
from dualtok.pipelines.io import schemas as S
from dualtok.pipelines.config import ConfigError
from dualtok.pipelines.shards.photos import write_sample_shards

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[1]
LOCAL_JOB = ROOT / "infra" / "local" / "tokenize.yaml"
DAY = dt.date(2026, 3, 14)


def job_file(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- submission ids -------------------------------------------------------------------------------
def test_submission_id_depends_on_kind_config_and_date_only(tmp_path):
    a = job_file(tmp_path, "a.yaml", "job: tokenize\nconfig: {inputs: [s3://b/s/], output: s3://b/c, bundle: tiny, seed: 1}\n")
    # the same config, other key order and layout, comments: the same job
    b = job_file(tmp_path, "b.yaml", "# nightly\njob: tokenize\nconfig:\n  seed: 1\n  output: s3://b/c\n"
                                     "  bundle: tiny\n  inputs:\n    - s3://b/s/\n")
    c = job_file(tmp_path, "c.yaml", "job: tokenize\nconfig: {inputs: [s3://b/s/], output: s3://b/c, bundle: tiny, seed: 2}\n")
    plan_a, plan_b = plan_submission(read_job_file(a), DAY), plan_submission(read_job_file(b), DAY)
    assert plan_a.submission_id == plan_b.submission_id
    assert plan_a.submission_id.startswith("dualtok-tokenize-20260314-")
    assert plan_submission(read_job_file(c), DAY).submission_id != plan_a.submission_id
    assert plan_submission(read_job_file(a), DAY + dt.timedelta(days=1)).submission_id != plan_a.submission_id
    assert plan_submission(read_job_file(a), DAY, attempt=2).submission_id == plan_a.submission_id + "-a2"
    assert plan_a.entrypoint == "dualtok tokenize -c config.yaml"
    assert plan_a.metadata["config_sha256"] == plan_a.config_sha256 and plan_a.metadata["dualtok_job"] == "tokenize"


def test_date_subfolder_gives_each_day_its_own_output(tmp_path):
    text = "job: stats\nconfig: {corpus: s3://b/c, output: s3://b/stats/}\n"
    plain = plan_submission(read_job_file(job_file(tmp_path, "plain.yaml", text)), DAY)
    dated = plan_submission(read_job_file(job_file(tmp_path, "dated.yaml", text + "date_subfolder: output\n")), DAY)
    assert plain.config["output"] == "s3://b/stats/" and dated.config["output"] == "s3://b/stats/2026-03-14"
    assert dated.config["corpus"] == "s3://b/c" and dated.submission_id != plain.submission_id
    with pytest.raises(ConfigError, match="date_subfolder 'top_duplicates' must name a config key"):
        read_job_file(job_file(tmp_path, "bad.yaml", "job: stats\nconfig: {corpus: c, top_duplicates: 3}\n"
                                                     "date_subfolder: top_duplicates\n"))


def test_bad_job_files_fail_before_anything_is_sent(tmp_path):
    cases = {
        "job: tokenise\nconfig: {}\n": "unknown job kind 'tokenise'",
        "job: tokenize\nconfig: {inputs: [x], output: y, bundle: tiny}\nresources: {}\n": "optionally 'date_subfolder'",
        "job: tokenize\nconfig: {inputs: [x], output: y, bundel: tiny}\n": "unknown config key 'bundel'",
        "job: tokenize\nconfig: {output: y}\n": "inputs is empty",
        "- job\n": "a job file is a mapping",
    }
    for i, (text, message) in enumerate(cases.items()):
        with pytest.raises(ConfigError, match=message):
            read_job_file(job_file(tmp_path, f"{i}.yaml", text))


def test_token_comes_from_env_or_token_file_and_is_sent_as_bearer(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("file-token\n")
    assert auth_headers({"RAY_AUTH_TOKEN": "env-token", "RAY_AUTH_TOKEN_PATH": str(token_file)}) == {
        "Authorization": "Bearer env-token"}
    assert auth_headers({"RAY_AUTH_TOKEN_PATH": str(token_file)}) == {"Authorization": "Bearer file-token"}
    assert auth_headers({}) == {}
    token_file.write_text("")
    with pytest.raises(ConfigError, match="token file is empty"):
        auth_headers({"RAY_AUTH_TOKEN_PATH": str(token_file)})


def test_explicit_address_must_agree_with_rays_address_env(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    with pytest.raises(ConfigError, match="conflicts with RAY_ADDRESS"):
        job_client("http://head:8265")


# ---- the local stack, end to end -------------------------------------------------------------------
def _dualtok(*args: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dualtok.jobs.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _stack_env(stdout: str) -> dict[str, str]:
    """What `eval "$(dualtok stack up)"` would export."""
    words = [shlex.split(line)[1] for line in stdout.splitlines() if line.startswith("export ")]
    return dict(word.split("=", 1) for word in words)


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_stack_down_stops_its_process_groups_and_nothing_else(tmp_path, processes):
    from dualtok.jobs.local_stack import StackState, down

    stranger = processes.start(["sleep", "60"])  # a recycled pid: not the Ray head
    # "our" server: a leader that exits on SIGTERM and leaves a child behind in its process group
    ours = processes.start(["bash", "-c", "sleep 60 & wait", "moto", "-p", "61"])
    StackState(dir=str(tmp_path), ray_pid=stranger.pid, ray_temp_dir="/tmp/dtk-gone",
               s3_pid=ours.pid, s3_url="http://127.0.0.1:61").save()
    down(tmp_path)
    assert ours.wait(timeout=5) is not None and not _alive(ours.pid)  # leader and its child are gone
    assert stranger.poll() is None  # the unrelated process was left alone
    assert not (tmp_path / "stack.json").exists()


@pytest.fixture
def local_stack(tmp_path):
    """`dualtok stack up`, as the docs run it; `dualtok stack down` afterwards, whatever happened."""
    assert shutil.which("dualtok"), "the job's driver runs `dualtok`: install the project (pip install -e .)"
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    stack_dir = tmp_path / "stack"
    up = _dualtok("stack", "up", "--dir", str(stack_dir), env=base_env)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        state = json.loads((stack_dir / "stack.json").read_text())
        yield {**base_env, **_stack_env(up.stdout)}, state
    finally:
        down = _dualtok("stack", "down", "--dir", str(stack_dir), env=base_env)
        assert down.returncode == 0, down.stderr[-3000:]
    assert not _alive(state["ray_pid"]) and not _alive(state["s3_pid"])
    assert not Path(state["ray_temp_dir"]).exists()


@pytest.mark.slow  # ~2 min on 2 cores: a Ray head with its job server, a real tokenize job
def test_submit_tokenize_to_the_local_stack_runs_once_per_day(local_stack):
    env, state = local_stack
    token = (Path(state["dir"]) / "auth_token").read_text()
    assert env["RAY_AUTH_TOKEN_PATH"].endswith("auth_token") and token not in json.dumps(env)
    fs = s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                           client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]}, skip_instance_cache=True)
    write_sample_shards("s3://dualtok/shards", count=6, per_shard=3, seed=0,
                        storage_options={"key": env["AWS_ACCESS_KEY_ID"], "secret": env["AWS_SECRET_ACCESS_KEY"],
                                         "client_kwargs": {"endpoint_url": env["AWS_ENDPOINT_URL"]}})

    first = _dualtok("submit", str(LOCAL_JOB), "--wait", env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    submission = plan_submission(read_job_file(LOCAL_JOB), dt.datetime.now(dt.timezone.utc).date()).submission_id
    assert f"job {submission}: SUCCEEDED" in first.stdout
    assert "tokenize: 2 shards committed" in first.stdout  # the driver's own output, streamed back
    assert token not in first.stdout + first.stderr

    markers = {p: json.loads(fs.cat_file(p)) for p in fs.find("dualtok/corpus/_committed")}
    assert sorted(m["shard"] for m in markers.values()) == ["00000", "00001"]
    table = pq.ParquetDataset(fs.find("dualtok/corpus/data"), filesystem=fs).read()
    assert table.num_rows == 6 and len(set(table[S.KEY].to_pylist())) == 6
    assert len(table[S.SEMANTIC_TOKENS][0]) == 32 and len(table[S.GUIDE_TOKENS][0]) == 64
    assert len(fs.find("dualtok/corpus/runs")) == 1

    # the scheduler fires again the same day: same submission id, attached, nothing runs again
    second = _dualtok("submit", str(LOCAL_JOB), "--wait", env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "already submitted on" in second.stdout and f"{submission} is SUCCEEDED" in second.stdout
    fs.invalidate_cache()
    assert len(fs.find("dualtok/corpus/runs")) == 1
    assert {p: json.loads(fs.cat_file(p)) for p in fs.find("dualtok/corpus/_committed")} == markers

    # the head enforces token authentication: without the token its job server refuses requests
    with pytest.raises(urllib.error.HTTPError, match="401"):
        urllib.request.urlopen(f"{env['RAY_API_SERVER_ADDRESS']}/api/jobs/", timeout=30)
    assert _job_ids(env) == [submission]


def _job_ids(env: dict[str, str]) -> list[str]:
    """The jobs the head knows, straight from the job server's REST API."""
    request = urllib.request.Request(f"{env['RAY_API_SERVER_ADDRESS']}/api/jobs/",
                                     headers=auth_headers({"RAY_AUTH_TOKEN_PATH": env["RAY_AUTH_TOKEN_PATH"]}))
    with urllib.request.urlopen(request, timeout=30) as response:
        return [job["submission_id"] for job in json.loads(response.read())]
