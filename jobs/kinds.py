"""The job kinds a cluster runs: one table, read by `dualtok submit` and `dualtok manifests`.

Kinds differ only in their `dualtok` command line and in the resources their Ray cluster needs;
everything else (image, storage credentials, auth, retries) is the same for all of them and lives
in `jobs/manifests.py`. A job *file* names a kind and carries that kind's config:

    job: tokenize            # a key of KINDS
    config:                  # the keys of the kind's config type (e.g. TokenizeConfig)
      inputs: [s3://bucket/shards/]
      output: s3://bucket/corpus
    date_subfolder: output   # optional: each run writes under <output>/<YYYY-MM-DD> (UTC)

A scheduled job whose output must differ per run (an audit samples once per output folder) names
that key in `date_subfolder`; a retry on the same day writes into the same folder and resumes.

Config types are named, not imported, so that reading the table costs nothing and a kind whose
module does not exist yet fails only when it is used.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dualtok.pipelines.config import ConfigError, from_dict
from dualtok.pipelines.train.config import STAGE_CONFIGS


@dataclass(frozen=True)
class WorkerShape:
    """One Kubernetes worker group of a job's Ray cluster (and one pod of it)."""

    gpus: int
    cpus: int
    memory: str  # Kubernetes quantity, e.g. "48Gi"
    min_replicas: int
    max_replicas: int


@dataclass(frozen=True)
class JobKind:
    name: str
    command: tuple[str, ...]  # the dualtok subcommand and its positional arguments
    config_type: str  # "module:Class"
    workers: WorkerShape | None  # None: the driver does all the work (on the head)
    active_deadline_s: int  # a RayJob running longer than this is failed (and retried)

    def entrypoint(self, config_path: str) -> list[str]:
        """The driver's command line: `dualtok <command> -c <config file>`."""
        return ["dualtok", *self.command, "-c", config_path]

    def load_config_type(self) -> type:
        module_name, _, class_name = self.config_type.partition(":")
        module = importlib.import_module(module_name)
        try:
            return getattr(module, class_name)
        except AttributeError:
            raise ConfigError(f"job kind {self.name!r}: {module_name} has no config type {class_name}") from None


# One GPU per pod keeps autoscaling fine-grained for the encoders (one model replica per GPU);
# training stages take whole 8-GPU nodes so that data-parallel ranks share NVLink.
_ONE_GPU = WorkerShape(gpus=1, cpus=8, memory="48Gi", min_replicas=0, max_replicas=16)
_EIGHT_GPUS = WorkerShape(gpus=8, cpus=64, memory="480Gi", min_replicas=1, max_replicas=1)
_DAY = 24 * 3600
_PLAIN_URI = re.compile(r"^[A-Za-z0-9_.:/@+=,%~-]+$")  # safe inside a double-quoted shell word

KINDS: dict[str, JobKind] = {
    kind.name: kind
    for kind in (
        JobKind("tokenize", ("tokenize",), "dualtok.pipelines.tokenize.config:TokenizeConfig", _ONE_GPU, _DAY),
        JobKind("audit", ("audit",), "dualtok.pipelines.audit.config:AuditConfig", dataclasses.replace(_ONE_GPU, max_replicas=4), _DAY),
        JobKind("stats", ("stats",), "dualtok.jobs.stats:StatsConfig", None, 6 * 3600),
        *(
            JobKind(f"train-{stage}", ("train", stage), f"{cls.__module__}:{cls.__name__}", _EIGHT_GPUS, 7 * _DAY)
            for stage, cls in STAGE_CONFIGS.items()
        ),
        # every stage in order, then the held-out tokenize and audit, on the training cluster's shape
        JobKind("recipe", ("recipe",), "dualtok.jobs.recipe:RecipeConfig", _EIGHT_GPUS, 7 * _DAY),
    )
}


def get_kind(name: str) -> JobKind:
    if name not in KINDS:
        raise ConfigError(f"unknown job kind {name!r}; known kinds: {', '.join(KINDS)}")
    return KINDS[name]


@dataclass(frozen=True)
class JobFile:
    """A parsed job file: its kind, the config mapping as written, and the config it builds."""

    path: Path
    kind: JobKind
    raw_config: dict[str, Any]
    config: Any  # an instance of kind.load_config_type()
    date_subfolder: str | None = None  # config key whose value gets /<YYYY-MM-DD> appended per run

    def config_for(self, date: dt.date) -> dict[str, Any]:
        """The config a run on `date` uses: `date_subfolder`'s value gets `/<date>` appended."""
        if self.date_subfolder is None:
            return dict(self.raw_config)
        base = str(self.raw_config[self.date_subfolder]).rstrip("/")
        return {**self.raw_config, self.date_subfolder: f"{base}/{date.isoformat()}"}

    def dated_override(self) -> list[str]:
        """The same, as a shell word for an entrypoint that a shell runs at run time (RayJobs)."""
        if self.date_subfolder is None:
            return []
        base = str(self.raw_config[self.date_subfolder]).rstrip("/")
        return [f'"{self.date_subfolder}={base}/$(date -u +%F)"']


def read_job_file(path: str | Path) -> JobFile:
    """Parse a job file and build its config with the kind's real config type (fails fast)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read the job file: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a job file is a mapping with keys 'job' and 'config'")
    unknown = sorted(set(data) - {"job", "config", "date_subfolder"})
    if unknown or "job" not in data:
        raise ConfigError(f"{path}: a job file has the keys 'job', 'config' and optionally 'date_subfolder' "
                          f"(got {sorted(data)})")
    kind = get_kind(str(data["job"]))
    raw = data.get("config") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: 'config' must be a mapping of {kind.config_type} keys")
    config = from_dict(kind.load_config_type(), raw)
    _refuse_secrets(config, path)
    dated = data.get("date_subfolder")
    if dated is not None and not (isinstance(raw.get(dated), str) and _PLAIN_URI.match(raw[dated])):
        raise ConfigError(f"{path}: date_subfolder {dated!r} must name a config key that holds a path or URI "
                          "(no spaces, quotes or $)")
    return JobFile(path=path, kind=kind, raw_config=raw, config=config, date_subfolder=dated)


def _refuse_secrets(config: Any, path: Path, where: str = "") -> None:
    """Job files travel to clusters and into ConfigMaps: credentials come from the environment."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata.get("secret") and value not in (None, ""):
            raise ConfigError(
                f"{path}: config.{where}{f.name} holds a credential; job files are uploaded to the cluster "
                "and stored in ConfigMaps, so give credentials through the environment (AWS_* variables, "
                "a Kubernetes Secret or a service-account role) instead"
            )
        if dataclasses.is_dataclass(value):
            _refuse_secrets(value, path, f"{where}{f.name}.")
