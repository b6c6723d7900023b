"""Jobs that cannot silently produce the wrong corpus: a missing bundle, a wrong path or an
unreachable job server fail before Ray starts, with one clear line and exit code 2; a run whose
samples are all bad commits them and exits 4; unset resources size themselves to the cluster.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest


from dualtok.jobs.checks import EXIT_TOO_MANY_ERRORS
from dualtok.pipelines.tokenize.config import TokenizeConfig, default_resources, resolve_resources
from dualtok.pipelines.config import BUNDLE_REQUIRED, load_config
from dualtok.pipelines.actors import StageResources
from tests.shard_factory import encode, photo_images, sample_members, tar_bytes

REPO = Path(__file__).parents[1]

# Runs every case through `dualtok.jobs.cli.main` in ONE fresh interpreter (one import of torch and ray,
# not one per case, and before the clock starts: a loaded machine makes imports slow, not Ray) and
# reports, per case, the exit code, stderr, the seconds it took and whether Ray was started: every
# check must come before `init_ray`.
_RUNNER = """
import contextlib, io, json, sys, time
import ray, ray.job_submission
import dualtok.jobs.audit, dualtok.jobs.submit, dualtok.jobs.tokenize, dualtok.jobs.train
from dualtok.jobs.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    started = time.monotonic()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    results.append({"code": code, "stderr": err.getvalue(), "seconds": time.monotonic() - started,
                    "ray": ray.is_initialized()})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checks")
    (root / "shards").mkdir()
    jpeg = encode(photo_images(1)[0])
    (root / "shards" / "00000.tar").write_bytes(tar_bytes(sample_members("a", jpeg, "a photo")))
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("no shards here")
    (root / "not-a-bundle").mkdir()
    (root / "a-file").write_text("")
    job = root / "job.yaml"
    job.write_text(f"job: tokenize\nconfig:\n  inputs: [{root / 'shards'}]\n  output: {root / 'out'}\n  bundle: tiny\n")
    return {"root": root, "shards": root / "shards", "job": job}


CASES = {  # name -> (argv with {root} for the tmp folder, what stderr must say)
    "no bundle": (["tokenize", "inputs={root}/shards", "output={root}/out"], BUNDLE_REQUIRED),
    "missing shard": (["tokenize", "inputs={root}/shards/00009.tar", "output={root}/out", "bundle=tiny"],
                      "input shard {root}/shards/00009.tar does not exist"),
    "missing folder": (["tokenize", "inputs={root}/nowhere", "output={root}/out", "bundle=tiny"],
                       "input {root}/nowhere does not exist"),
    "folder without shards": (["tokenize", "inputs={root}/empty", "output={root}/out", "bundle=tiny"],
                              "no .tar or .parquet shards under {root}/empty"),
    "bundle typo": (["tokenize", "inputs={root}/shards", "output={root}/out", "bundle=smal"],
                    "bundle smal does not exist (and is not a preset"),
    "folder is no bundle": (["tokenize", "inputs={root}/shards", "output={root}/out", "bundle={root}/not-a-bundle"],
                            "not a bundle: missing bundle.json in {root}/not-a-bundle"),
    "output under a file": (["tokenize", "inputs={root}/shards", "output={root}/a-file/corpus", "bundle=tiny"],
                            "output {root}/a-file/corpus cannot be created: {root}/a-file is a file"),
    "audit of no corpus": (["audit", "corpus={root}/nowhere", "output={root}/audit"],
                           "corpus {root}/nowhere does not exist"),
    "train without bundle": (["train", "guide", "inputs={root}/shards", "output={root}/b", "storage_path={root}/r"],
                             BUNDLE_REQUIRED),
    "submit, no server": (["submit", "{root}/job.yaml", "--address", "http://127.0.0.1:9"],
                          "cannot reach the Ray job server at http://127.0.0.1:9: "),
}


@pytest.fixture(scope="module")
def results(paths) -> dict[str, dict]:
    root = str(paths["root"])
    argvs = [[arg.replace("{root}", root) for arg in argv] for argv, _ in CASES.values()]
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    run = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(argvs)], capture_output=True, text=True,
                         cwd=REPO, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return dict(zip(CASES, json.loads(run.stdout.strip().splitlines()[-1])))


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_before_ray_starts_with_one_line_and_exit_2(case, results, paths):
    result, expected = results[case], CASES[case][1].replace("{root}", str(paths["root"]))
    assert result["code"] == 2, result
    assert expected in result["stderr"], result["stderr"]
    assert "Traceback" not in result["stderr"] and len(result["stderr"].strip().splitlines()) == 1, result["stderr"]
    assert not result["ray"], "Ray was started before the inputs were checked"
    assert result["seconds"] < 10, result


def test_defaults_size_themselves_to_the_cluster():
    gpu = default_resources(cpus=128, gpus=16, encoder=StageResources(batch_size=64))
    assert (gpu.read_cpus, gpu.read_actors) == (1.0, 64)  # 4 read actors per GPU (docs/cluster.md)
    assert (gpu.encoder.actors, gpu.encoder.max_actors, gpu.encoder.gpus_per_actor) == (1, 16, 1.0)
    assert gpu.encoder.batch_size == 64  # the user's batch size is kept
    two = default_resources(cpus=2, gpus=0)
    assert (two.read_cpus, two.read_actors, two.encoder.actors, two.encoder.max_actors) == (0.25, 1, 2, None)
    assert two.read_cpus + two.encoder.actors * two.encoder.cpus_per_actor <= 2  # fits: nothing waits
    assert default_resources(cpus=16, gpus=0).encoder.actors == 4  # then more threads per actor
    assert default_resources(cpus=16, gpus=0).encoder.cpus_per_actor == pytest.approx(3.937)
    four_nodes = default_resources(cpus=32, gpus=0, node_cpus=8)  # each actor must fit on one node
    assert (four_nodes.encoder.actors, four_nodes.encoder.max_actors, four_nodes.read_actors) == (4, 16, 4)
    assert four_nodes.encoder.cpus_per_actor == pytest.approx(1.937)


def test_resources_the_user_sets_are_kept():
    base = ["inputs=[a.tar]", "output=o", "bundle=tiny"]
    auto = load_config(TokenizeConfig, None, base)
    assert resolve_resources(auto, cpus=8, gpus=2) == default_resources(8, 2)
    chosen = load_config(TokenizeConfig, None, [*base, "encoder.actors=3", "read_actors=5"])
    sized = resolve_resources(chosen, cpus=8, gpus=2)
    assert (sized.encoder.actors, sized.encoder.gpus_per_actor, sized.read_actors) == (3, 0.0, 5)
    assert sized.read_cpus == 1.0  # unset: sized for the GPU cluster


@pytest.mark.slow  # a real tokenize run on the session's Ray cluster: 10 s, ~40 s on 2 loaded cores
@pytest.mark.timeout(600)
def test_a_run_where_every_sample_is_bad_commits_and_exits_4(ray_session, tmp_path, capsys, caplog):
    """Also the run a scheduler reads: with --json, one JSON object is the whole of stdout; Ray Data's
    progress block is off and the pipeline logs one line per committed shard with its rate and ETA."""
    from dualtok.jobs.cli import main as cli

    shards = tmp_path / "shards"
    shards.mkdir()
    members = [m for i in range(4) for m in sample_members(f"k{i}", b"not an image at all", f"caption {i}")]
    (shards / "00000.tar").write_bytes(tar_bytes(members))
    out = tmp_path / "corpus"
    started = time.monotonic()
    caplog.set_level("INFO", logger="dualtok.pipelines")
    code = cli(["tokenize", f"inputs={shards}", f"output={out}", "bundle=tiny", "streams=guide", "encoder.actors=1",
                "--json"])
    printed = capsys.readouterr()
    err = printed.err
    assert code == EXIT_TOO_MANY_ERRORS, err
    assert "4 of 4 samples (100.0%) are errors, over max_error_fraction=0.5; top reasons: 4 x decode" in err
    record = json.loads(printed.out)  # the whole of stdout is one JSON object
    assert record["job"] == "tokenize" and record["exit_code"] == EXIT_TOO_MANY_ERRORS
    assert record["shards"] == {"total": 1, "committed": 1, "skipped": 0, "failed": {}}
    assert record["images"] == 0 and record["errors"] == 4 and record["untrained_parts"] == ["guide"]
    assert "Total Progress" not in err
    logged = [r.getMessage() for r in caplog.records]
    assert len([m for m in logged if re.search(r"committed shard 00000: .*\| shards 1/1 .* images/s .* ETA", m)]) == 1
    marker = json.loads((out / "_committed" / "00000.json").read_text())  # committed all the same
    assert (marker["samples"], marker["rows"], marker["errors"]) == (4, 0, 4)
    used = json.loads((out / "manifest.json").read_text())["config"]  # the resources the run used, sized or set
    assert (used["encoder"]["actors"], used["read_actors"], used["read_cpus"]) == (1, 1, 0.25)
    assert time.monotonic() - started < 300


def test_training_leaves_a_cpu_for_its_read_tasks():
    from dualtok.pipelines.train.config import STAGE_CONFIGS, training_cpus

    base = ["inputs=s3://b/shards/", "bundle=tiny", "output=/tmp/out", "storage_path=/tmp/runs"]
    laptop = load_config(STAGE_CONFIGS["guide"], None, [*base, "num_workers=2"])
    assert training_cpus(laptop) == 3  # 2 workers x 1 CPU + the read tasks' CPU: on 2 cores, 3 logical CPUs
    wide = load_config(STAGE_CONFIGS["guide"], None, [*base, "num_workers=4", "resources_per_worker={CPU: 8}",
                                                      "read_cpus=2"])
    assert training_cpus(wide) == 34


def test_training_paths_are_absolute_for_the_workers(tmp_path, monkeypatch):
    """Ray's workers run in another folder: a relative storage_path or bundle must not move with them
    (metrics.jsonl stayed empty and a `bundle=bundles/guide` stage could not load its bundle)."""
    from dualtok_core.bundle import DualTokenizer
    from dualtok.pipelines.train.config import STAGE_CONFIGS
    from dualtok.pipelines.train.plan import plan_training

    monkeypatch.chdir(tmp_path)
    DualTokenizer.from_preset("tiny", parts=("guide",)).save_pretrained(tmp_path / "bundles" / "start")
    plan = plan_training(load_config(STAGE_CONFIGS["guide"], None, [
        "inputs=s3://b/shards/", "bundle=bundles/start", "output=bundles/guide", "storage_path=runs"]))
    assert plan.layout.run_dir.startswith(f"{tmp_path}/runs/")
    assert plan.worker.source.spec == str(tmp_path / "bundles" / "start")
