"""`dualtok stack up|down|env`: a local Ray head (with its job server) and a loopback S3 endpoint.

    eval "$(dualtok stack up --dir .stack)"     # start both, create the buckets, print the env
    dualtok submit infra/jobs/local-tokenize.yaml --wait
    dualtok stack down --dir .stack             # stop exactly what `up` started

`up` starts a moto S3 server and `ray start --head --block`, each in its own process session,
and records them in `<dir>/stack.json`; `down` signals those process groups and nothing else (it
never runs `ray stop`, which would stop every Ray cluster on the machine). All ports are free
ports picked at start, so the stack runs beside other local clusters. The Ray head enforces
token authentication; its token lives in `<dir>/auth_token` (mode 0600) and is never printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dualtok_core.errors import DualtokError

logger = logging.getLogger(__name__)

STATE_FILE, ENV_FILE, TOKEN_FILE = "stack.json", "env", "auth_token"
# moto accepts any credentials; these only keep boto3 from looking for real ones.
LOCAL_AWS = {"AWS_ACCESS_KEY_ID": "dualtok-local", "AWS_SECRET_ACCESS_KEY": "dualtok-local-secret",
             "AWS_DEFAULT_REGION": "us-east-1"}
_RAY_PORT_FLAGS = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
                   "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
                   "node-manager-port", "object-manager-port")


class StackError(DualtokError):
    """The local stack could not start, or its state file does not describe a running stack."""


@dataclass
class StackState:
    dir: str
    s3_url: str = ""
    s3_pid: int = 0
    ray_pid: int = 0  # leader of the head's process group
    ray_temp_dir: str = ""
    dashboard_url: str = ""
    gcs_address: str = ""
    buckets: list[str] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        """What a shell needs to use the stack (no secret in it: the token stays in its file)."""
        return {
            "AWS_ENDPOINT_URL": self.s3_url, **LOCAL_AWS,
            "RAY_API_SERVER_ADDRESS": self.dashboard_url,  # job server: dualtok submit, ray job ...
            "RAY_ADDRESS": self.gcs_address,  # drivers: dualtok tokenize ... connect here
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(Path(self.dir) / TOKEN_FILE),
        }

    def save(self) -> None:
        path = Path(self.dir)
        (path / STATE_FILE).write_text(json.dumps(asdict(self), indent=1))
        (path / ENV_FILE).write_text(self.exports())

    def exports(self) -> str:
        """`export K=V` lines, quoted for a shell's eval."""
        return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in self.env().items())


def load_state(directory: str | Path) -> StackState:
    path = Path(directory) / STATE_FILE
    if not path.exists():
        raise StackError(f"no local stack recorded in {directory} ({STATE_FILE} is missing)")
    return StackState(**json.loads(path.read_text()))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(check, what: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"{what} exited with code {proc.returncode}; see {log}")
        if check():
            return
        time.sleep(0.5)
    raise StackError(f"{what} not ready after {timeout:.0f} s; see {log}")


def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    # Own session = own process group: `down` signals that group, and only it.
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def require_s3_server() -> None:
    """moto's S3 server (and the Flask it runs on) is the `stack` extra, not the plain install: say how
    to get it before anything starts, instead of a subprocess that dies with an ImportError in a log."""
    import importlib.util

    missing = [name for name in ("moto", "flask") if importlib.util.find_spec(name) is None]
    if missing:
        raise StackError(f"`dualtok stack up` runs moto's S3 server, which is not installed ({', '.join(missing)} "
                         "missing): pip install 'dualtok[stack]'  (or: pip install 'moto[server]>=5')")


def start_s3(state: StackState, buckets: list[str]) -> None:
    import boto3

    port = free_port()
    log = Path(state.dir) / "moto.log"
    proc = _spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                  {**os.environ, **LOCAL_AWS}, log)
    state.s3_pid, state.s3_url = proc.pid, f"http://127.0.0.1:{port}"
    state.save()
    _wait(lambda: _listening(port), "moto S3 server", 60, proc, log)
    client = boto3.client("s3", endpoint_url=state.s3_url, region_name=LOCAL_AWS["AWS_DEFAULT_REGION"],
                          aws_access_key_id=LOCAL_AWS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=LOCAL_AWS["AWS_SECRET_ACCESS_KEY"])
    for bucket in buckets:
        client.create_bucket(Bucket=bucket)
    state.buckets = list(buckets)


def start_ray(state: StackState, num_cpus: int, object_store_bytes: int, timeout: float) -> None:
    ports = {flag: free_port() for flag in _RAY_PORT_FLAGS}
    # Ray's socket paths must stay under ~107 bytes: a short temp dir, not one under `dir`.
    state.ray_temp_dir = tempfile.mkdtemp(prefix="dtk-")
    token_path = Path(state.dir) / TOKEN_FILE
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update({**LOCAL_AWS, "AWS_ENDPOINT_URL": state.s3_url, "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": str(token_path)})
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--num-cpus={num_cpus}", f"--object-store-memory={object_store_bytes}",
           f"--temp-dir={state.ray_temp_dir}", "--disable-usage-stats",
           *(f"--{flag}={port}" for flag, port in ports.items())]
    log = Path(state.dir) / "ray.log"
    proc = _spawn(cmd, env, log)
    state.ray_pid, state.dashboard_url = proc.pid, f"http://127.0.0.1:{ports['dashboard-port']}"
    state.save()
    headers = {"Authorization": f"Bearer {token_path.read_text().strip()}"}
    # `ray start` writes the GCS address file once the whole node is up, after the job server answers.
    address_file = Path(state.ray_temp_dir) / "ray_current_cluster"
    _wait(lambda: address_file.exists() and _http_ok(f"{state.dashboard_url}/api/jobs/", headers),
          "Ray head and its job server", timeout, proc, log)
    state.gcs_address = address_file.read_text().strip()


def _http_ok(url: str, headers: dict[str, str]) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def up(directory: str | Path, buckets: list[str], num_cpus: int = 4, object_store_bytes: int = 1 << 30,
       timeout: float = 180.0) -> StackState:
    """Start the stack (moto S3 + a Ray head with its job server) and record it under `directory`."""
    require_s3_server()
    path = Path(directory).resolve()
    path.mkdir(parents=True, exist_ok=True)
    if (path / STATE_FILE).exists():
        raise StackError(f"{path} already holds a stack; stop it first with `dualtok stack down --dir {directory}`")
    token_path = path / TOKEN_FILE
    token_path.touch(mode=0o600)
    token_path.write_text(secrets.token_hex(32))
    state = StackState(dir=str(path))
    try:
        start_s3(state, buckets)
        start_ray(state, num_cpus, object_store_bytes, timeout)
    except BaseException:
        down(path)
        raise
    state.save()
    logger.info("local stack up: S3 %s, Ray job server %s, Ray %s", state.s3_url, state.dashboard_url,
                state.gcs_address)
    return state


def _command_line(pid: int) -> str:
    """The process's command line, or "" where `ps` is missing (then the pid is trusted)."""
    try:
        result = subprocess.run(["ps", "-o", "args=", "-p", str(pid)], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return ""
    return result.stdout.strip()


def _stop_group(pid: int, what: str, marker: str, grace_s: float = 2.0) -> None:
    """Stop process group `pid`: SIGTERM its leader, then the whole group, then SIGKILL what is left.
    The leader first: `ray start --block` stops its node's processes itself on SIGTERM when idle,
    but after a job it may not, and then the group's processes must be signalled directly.
    `grace_s` per step: after a job, `ps` showed the leader, the GCS, the raylet and the autoscaler
    monitor all still running 5 s after each SIGTERM, so a longer grace only delays the SIGKILL
    (the submit test's teardown: 13.5 s with 5 s; the stack is a local dev stack, its state and
    temp folder are removed right after)."""
    if pid <= 0 or not _group_alive(pid):
        return
    command = _command_line(pid)
    if command and marker not in command:
        # the pid was recycled by an unrelated process: not ours to signal
        logger.warning("%s: process %d is now %r, not the one this stack started; leaving it", what, pid, command)
        return
    for signal_group, sig in ((False, signal.SIGTERM), (True, signal.SIGTERM), (True, signal.SIGKILL)):
        try:
            os.killpg(pid, sig) if signal_group else os.kill(pid, sig)
        except ProcessLookupError:
            pass  # the leader is gone; the rest of its group is signalled next
        deadline = time.monotonic() + grace_s
        while _group_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _group_alive(pid):
            return
        logger.info("%s (process group %d) still running after %s", what, pid, sig.name)


def _group_alive(pgid: int) -> bool:
    with contextlib.suppress(ChildProcessError):  # not our child: nothing to reap
        os.waitpid(pgid, os.WNOHANG)  # reap the leader if it is our own child (`up` failing)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def down(directory: str | Path) -> None:
    """Stop the Ray head and the S3 server that `up` recorded in `directory`; remove their state."""
    state = load_state(directory)
    _stop_group(state.ray_pid, "Ray head", marker=f"--temp-dir={state.ray_temp_dir}")
    _stop_group(state.s3_pid, "moto S3 server", marker=f"-p {state.s3_url.rsplit(':', 1)[-1]}")
    if state.ray_temp_dir and Path(state.ray_temp_dir).name.startswith("dtk-"):
        shutil.rmtree(state.ray_temp_dir, ignore_errors=True)
    for name in (STATE_FILE, ENV_FILE, TOKEN_FILE):
        (Path(state.dir) / name).unlink(missing_ok=True)
    logger.info("local stack in %s stopped", state.dir)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["up", "down", "env"], help="start, stop, or print the env of a stack")
    parser.add_argument("--dir", default=".dualtok-stack", help="where the stack's state, token and logs live")
    parser.add_argument("--bucket", action="append", dest="buckets", default=None,
                        help="bucket to create (repeatable; default: dualtok)")
    parser.add_argument("--num-cpus", type=int, default=4, help="CPUs the Ray head offers to jobs")
    parser.add_argument("--object-store-gb", type=float, default=1.0)


def run(args: argparse.Namespace) -> int:
    if args.action == "up":
        state = up(args.dir, args.buckets or ["dualtok"], args.num_cpus, int(args.object_store_gb * (1 << 30)))
    elif args.action == "down":
        down(args.dir)
        return 0
    else:
        state = load_state(args.dir)
    print(state.exports(), end="")
    return 0
