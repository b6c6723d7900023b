"""`dualtok submit <job.yaml>`: run a job on a Ray cluster through Ray's job server, once per day.

The submission id is derived from (job kind, the config's content, the date), so a scheduler
that fires twice on the same day attaches to the first submission instead of starting a second
run. The job file's config travels to the cluster as the job's `working_dir`; the driver runs
`dualtok <command> -c config.yaml` there. Credentials never travel with the job: the cluster's
nodes get them from their environment (a Kubernetes Secret, a service-account role).

Ray token authentication: the token is read from RAY_AUTH_TOKEN, else from the file named by
RAY_AUTH_TOKEN_PATH, and sent as a bearer token; with neither, Ray's own lookup applies
(RAY_AUTH_MODE=token and ~/.ray/auth_token). The token is never logged or printed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dualtok.jobs.kinds import JobFile, read_job_file
from dualtok.pipelines.config import ConfigError

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"  # the config file's name in the job's working_dir
# job status -> exit code of `dualtok submit --wait`
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}
_TERMINAL = set(EXIT_CODES)
_ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # Ray's job client lets these override `address`


@dataclass(frozen=True)
class Submission:
    submission_id: str
    entrypoint: str
    config_sha256: str
    metadata: dict[str, str]
    config: dict[str, Any]  # what the driver reads: the job file's config, dated when it asks for that


def config_digest(job: JobFile) -> str:
    """sha256 of the job's config as written (key order, comments and YAML layout aside)."""
    content = {"config": job.raw_config, "date_subfolder": job.date_subfolder}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def submission_id(kind: str, digest: str, date: dt.date, attempt: int = 1) -> str:
    """`dualtok-<kind>-<yyyymmdd>-<config hash>`, plus `-a<n>` for a deliberate re-run that day."""
    if attempt < 1:
        raise ConfigError(f"attempt must be >= 1, got {attempt}")
    sid = f"dualtok-{kind}-{date:%Y%m%d}-{digest[:12]}"
    return sid if attempt == 1 else f"{sid}-a{attempt}"


def plan_submission(job: JobFile, date: dt.date, attempt: int = 1) -> Submission:
    digest = config_digest(job)
    entrypoint = " ".join(job.kind.entrypoint(CONFIG_NAME))
    metadata = {"dualtok_job": job.kind.name, "config_sha256": digest, "date": date.isoformat(),
                "job_file": job.path.name}
    return Submission(submission_id(job.kind.name, digest, date, attempt), entrypoint, digest, metadata,
                      job.config_for(date))


def auth_headers(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The bearer-token header for a token-authenticated cluster, or {} to let Ray decide."""
    env = os.environ if environ is None else environ
    token = env.get("RAY_AUTH_TOKEN", "").strip()
    if not token and env.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as err:
            raise ConfigError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token file: {err}") from err
        if not token:
            raise ConfigError(f"RAY_AUTH_TOKEN_PATH={path}: the token file is empty")
    return {"Authorization": f"Bearer {token}"} if token else {}


def _check_address(address: str | None) -> None:
    """Ray's job client silently prefers RAY_API_SERVER_ADDRESS/RAY_ADDRESS over its argument."""
    for name in _ADDRESS_ENV:
        value = os.environ.get(name)
        if address and value and value.rstrip("/") != address.rstrip("/"):
            raise ConfigError(f"--address {address} conflicts with {name}={value}, which Ray's job client "
                              f"would use instead; unset {name} or pass the same address")
        if value:
            return


def job_client(address: str | None) -> Any:
    from ray.job_submission import JobSubmissionClient

    _check_address(address)
    headers = auth_headers()
    try:
        return JobSubmissionClient(address, headers=headers)
    except ConnectionError as err:  # Ray's message, and a 27-line traceback without this
        shown = address or next((os.environ[n] for n in _ADDRESS_ENV if os.environ.get(n)), "the default address")
        reason = " ".join(str(err).split())
        raise ConfigError(f"cannot reach the Ray job server at {shown}: {reason} (pass --address http://HEAD:8265, "
                          "or start one with `dualtok stack up`)") from err


def submit_or_attach(client: Any, plan: Submission) -> bool:
    """Submit the job; True if this call created it, False if that id already existed."""
    with tempfile.TemporaryDirectory(prefix="dualtok-job-") as workdir:
        (Path(workdir) / CONFIG_NAME).write_text(yaml.safe_dump(plan.config, sort_keys=False))
        try:
            client.submit_job(entrypoint=plan.entrypoint, submission_id=plan.submission_id,
                              runtime_env={"working_dir": workdir}, metadata=plan.metadata)
        except RuntimeError as err:
            if "already exists" not in str(err):
                raise
            return False
    return True


def wait_for(client: Any, submission_id: str, poll_s: float = 1.0) -> str:
    """Follow the job to its end, streaming its logs to stdout; returns the final status."""
    try:
        asyncio.run(_stream_logs(client, submission_id))
    except RuntimeError as err:  # the log stream broke (network, head restart): the job may go on
        logger.warning("log stream of %s ended early (%s); polling its status", submission_id, err)
    while (status := str(client.get_job_status(submission_id).value)) not in _TERMINAL:
        time.sleep(poll_s)
    return status


async def _stream_logs(client: Any, submission_id: str) -> None:
    async for chunk in client.tail_job_logs(submission_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job_file", metavar="JOB.yaml", help="job file: `job: <kind>` and `config: {...}`")
    parser.add_argument("--address", default=None,
                        help="Ray job server, e.g. http://head:8265 (default: RAY_API_SERVER_ADDRESS or RAY_ADDRESS)")
    parser.add_argument("--wait", action="store_true", help="stream the job's logs; exit with its status")
    parser.add_argument("--date", type=dt.date.fromisoformat, default=None,
                        help="the schedule's date, YYYY-MM-DD (default: today, UTC); part of the submission id")
    parser.add_argument("--attempt", type=int, default=1,
                        help="run again on the same date under a new id (2, 3, ...) after a failed run")
    parser.add_argument("--dry-run", action="store_true", help="check the job file and print the submission only")


def run(args: argparse.Namespace) -> int:
    job = read_job_file(args.job_file)
    date = args.date or dt.datetime.now(dt.timezone.utc).date()
    plan = plan_submission(job, date, args.attempt)
    print(f"submission: {plan.submission_id}\nentrypoint: {plan.entrypoint}")
    if args.dry_run:
        return 0
    client = job_client(args.address)
    if submit_or_attach(client, plan):
        print(f"submitted:  {plan.submission_id}")
    else:
        status = str(client.get_job_status(plan.submission_id).value)
        print(f"already submitted on {date.isoformat()} with this config: {plan.submission_id} is {status}")
        if status in _TERMINAL:
            return EXIT_CODES[status]
    if not args.wait:
        return 0
    status = wait_for(client, plan.submission_id)
    print(f"job {plan.submission_id}: {status}")
    return EXIT_CODES[status]

