"""Session fixtures: the real parts integration tests run against.

- `s3`: a moto S3 server on a loopback port (a subprocess, as s3fs's own tests run it), with
  test credentials exported through the standard AWS environment variables so that every process
  (Ray workers included) reaches it the way users' jobs reach a real endpoint.
- `ray_session`: one local Ray cluster for the whole test session.
- `processes`: starts subprocesses for a test and kills them (and their process groups) after it,
  also when the test failed or timed out; `scripts/test.sh` sweeps for anything that still escaped.

Nothing here forks the pytest process: by the time tests run it holds Ray's and moto's threads, and
a forked child inherits whatever locks they held. Subprocesses are started with fork+exec (Popen).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

@contextlib.contextmanager
def torch_threads(count: int):
    """torch's intra-op thread count set to `count`, restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's
    spin-waiting makes them ~10x slower; the thread count is restored afterwards."""
    with torch_threads(1):
        yield


S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "dualtok-test-key",
    "AWS_SECRET_ACCESS_KEY": "dualtok-test-secret-value",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class S3Endpoint:
    def __init__(self, url: str) -> None:
        self.url = url
        self.storage_options = {"client_kwargs": {"endpoint_url": url}}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(client_kwargs={"endpoint_url": self.url}, skip_instance_cache=True)

    def new_bucket(self) -> str:
        name = f"dualtok-{uuid.uuid4().hex[:10]}"
        self.filesystem().mkdir(name)
        return name


@pytest.fixture(scope="session")
def s3():
    port = free_port()
    env = {**os.environ, **S3_TEST_ENV}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    saved = {k: os.environ.get(k) for k in (*S3_TEST_ENV, "AWS_ENDPOINT_URL")}
    try:
        wait_for_port(port)
        url = f"http://127.0.0.1:{port}"
        os.environ.update(S3_TEST_ENV)
        # botocore reads AWS_ENDPOINT_URL: the standard way to point every client at an endpoint.
        os.environ["AWS_ENDPOINT_URL"] = url
        yield S3Endpoint(url)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session", autouse=True)
def bundle_cache(tmp_path_factory):
    """Bundles loaded from object storage are cached per machine (`DUALTOK_CACHE`); the suite's go to
    a temporary folder, set before Ray starts so that every worker shares it, never ~/.cache."""
    saved = os.environ.get("DUALTOK_CACHE")
    os.environ["DUALTOK_CACHE"] = str(tmp_path_factory.mktemp("bundle-cache"))
    yield os.environ["DUALTOK_CACHE"]
    if saved is None:
        os.environ.pop("DUALTOK_CACHE", None)
    else:
        os.environ["DUALTOK_CACHE"] = saved


@pytest.fixture(scope="session")
def tiny():
    """The `tiny` preset bundle (seed 0), every part: built once per session; tests only read it."""
    from dualtok_core.bundle import DualTokenizer

    return DualTokenizer.from_preset("tiny", seed=0)


def tokens_in(tokenizer, images, dtype: str):
    """`tokenizer`'s tokens for `images` as the suite's CPU encoder actors compute them: in `dtype` (a
    corpus's recorded one) on one torch thread (the 4-CPU cluster gives each actor 0.94 CPU). Ids
    near a tie between two codes depend on both: oneDNN splits a convolution's sums by thread.
    By a copy: the session's tokenizer stays float32 (a bfloat16 round trip would round its weights)."""
    import copy

    import torch

    with torch_threads(1):
        return copy.deepcopy(tokenizer).to(getattr(torch, dtype)).tokenize(images)


@pytest.fixture(scope="session")
def ray_session(s3):
    """One local Ray cluster for the session, started after the S3 env is set so that every worker
    inherits it. Yields its address: subprocess drivers (kill tests, `dualtok` runs) connect to it."""
    import ray

    # Ray Train's controller polls its workers every 2 s, so each training run ends up to 2 s after its
    # workers did; the cluster's processes inherit this from the process that starts it
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    context = ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield context.address_info["gcs_address"]
    finally:
        started = ray_node_processes()
        ray.shutdown()
        end_processes(started, grace_s=15.0)


def ray_node_processes() -> list:
    """The local Ray node's processes (raylet, GCS, every worker and actor), before shutdown."""
    import psutil
    import ray

    node = ray._private.worker._global_node
    heads = [info.process.pid for infos in node.all_processes.values() for info in infos] if node else []
    found = []
    for pid in heads:
        with contextlib.suppress(psutil.NoSuchProcess):
            head = psutil.Process(pid)
            found += [head, *head.children(recursive=True)]
    return found


def end_processes(procs: list, grace_s: float) -> None:
    """Give `procs` `grace_s` to exit (Ray's workers leave shortly after their raylet), then SIGKILL
    the rest: an actor stuck in its exit path (seen: a Ray Train controller) must not outlive the
    fixture that started it."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            print(f"ray_session: ending {proc.pid} ({' '.join(proc.cmdline())[:80]}), alive {grace_s:g} s after "
                  "ray.shutdown()", file=sys.stderr)
            proc.kill()
    psutil.wait_procs(alive, timeout=10)


class Processes:
    """Subprocesses a test starts, each in a session of its own so that teardown can end the whole
    group (a driver's Ray workers are Ray's to end; the driver and its children are ours)."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def start(self, args: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(args, start_new_session=True, **kwargs)
        self.started.append(proc)
        return proc

    def end_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.fixture
def processes():
    started = Processes()
    try:
        yield started
    finally:
        started.end_all()
