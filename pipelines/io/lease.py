"""One writer per output: a lease object beside the corpus, so that two runs never write one output.

Two runs on one output (a retried job, a nightly run overlapping a long backfill) would both redo
every pending shard and could leave a marker describing the other run's files. `<output>/_lease.json`
names its holder (run id, host, pid) and when it expires (UTC). It is

- created by a conditional write that fails if it exists (S3: `If-None-Match: *`; local disk: a
  hard link, which fails if the name exists): of two runs starting together, one wins;
- renewed every ttl/3 by a heartbeat thread, and before each shard commit (`guard`), by a
  compare-and-swap on the version its holder last wrote (S3: `If-Match` on the ETag; local disk:
  the same comparison under an exclusive lock on the output folder). A holder that finds another
  lease there, or none, has lost it and stops before committing anything more;
- taken over, once expired (its holder died without releasing it), by the same compare-and-swap,
  so of two runs that both find it expired only one wins (a delete then a create could let both).
  A holder that ran on this machine (same kernel boot and pid namespace) and whose process has
  exited is taken over at once: rerunning a killed driver need not wait out its ttl;
- released (deleted, if still this run's) at the end of the run, error or not.

A run that finds a live lease fails at once, naming the holder and when its lease expires, or waits
up to `LeaseConfig.wait_s` for it. Expiry compares the holder's clock with the next run's: hosts must
agree on the time to well within the ttl (NTP does). The lease holds no secrets.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterator, Protocol

import fsspec
from fsspec.asyn import sync
from fsspec.implementations.local import LocalFileSystem

from dualtok_core.errors import DualtokError
from dualtok.pipelines.io.storage import STORE_ERRORS, commit_bytes, create_exclusive, filesystem, join

logger = logging.getLogger(__name__)

LEASE_FILE = "_lease.json"
_S3_PRECONDITION_CODES = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")
_VANISHED_RETRIES = 5  # a lease that exists for the create but not for the next read, this often: give up


@dataclass(frozen=True)
class LeaseConfig:
    """How a run holds its output: a section of the configs of jobs that write one."""

    ttl_s: float = 120.0  # a holder that stops renewing (renewals every ttl/3) loses the lease after this long
    wait_s: float = 0.0  # when another run holds the lease: wait up to this long for it, then fail

    def __post_init__(self) -> None:
        if self.ttl_s <= 0 or self.wait_s < 0:
            raise ValueError(f"lease.ttl_s must be > 0 and lease.wait_s >= 0, got {self.ttl_s} and {self.wait_s}")


class LeaseError(DualtokError):
    """This run may not write the output: another run holds it, or this run lost its hold."""


class LeaseHeldError(LeaseError):
    """Another run holds the output's lease."""


class LeaseLostError(LeaseError):
    """This run's lease expired or was taken over: it must not commit anything more."""


@dataclass(frozen=True)
class _Stored:
    body: dict[str, Any]
    version: str  # S3: the ETag; local disk: a digest of the bytes


class _LeaseObject(Protocol):
    def create(self, data: bytes) -> str | None: ...
    def read(self) -> _Stored | None: ...
    def replace(self, data: bytes, version: str) -> str | None: ...
    def delete(self, version: str) -> bool: ...


class Lease:
    """This run's hold on one output. `with Lease(...) as lease:` acquires it (or raises
    `LeaseHeldError`), renews it in a thread, and releases it on the way out; call `guard()`
    before each commit."""

    def __init__(self, output: str, run_id: str, config: LeaseConfig = LeaseConfig(),
                 storage_options: dict[str, Any] | None = None) -> None:
        fs, _ = filesystem(output, storage_options)
        self.uri = join(output, LEASE_FILE)
        self.run_id, self.config = run_id, config
        self._object = _lease_object(fs, fs._strip_protocol(self.uri), self.uri)
        self._lease_id = uuid.uuid4().hex  # tells this Lease from another of the same run id
        self._created = _utc_now()
        self._version: str | None = None
        self._expires = 0.0  # the expiry (unix seconds) of the last lease this run wrote
        self._lost: str | None = None
        self._lock = threading.Lock()  # one store operation at a time: heartbeat, guard, release
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Hold the lease, waiting up to `wait_s` while another run holds it; then renew it in a thread."""
        deadline = time.monotonic() + self.config.wait_s
        vanished = 0
        while (holder := self._try_acquire()) is not None:
            if not holder and (vanished := vanished + 1) < _VANISHED_RETRIES:
                continue  # released between our create and our read: create again at once
            left = deadline - time.monotonic()
            if left <= 0:
                raise LeaseHeldError(
                    f"another run is writing {self.uri.rsplit('/', 1)[0]}: {_describe(holder)}. Two runs on "
                    f"one output would both redo its pending shards. Rerun when it has finished (set "
                    f"lease.wait_s to wait for it); if it died, its lease expires at {holder.get('expires')} "
                    "and the next run takes it over")
            logger.info("the output is held by %s; waiting up to %.0f s more", _describe(holder), left)
            until_expiry = max(_parse_time(holder["expires"]) - time.time(), 0.0) + 0.05 if holder else 0.1
            time.sleep(min(left, until_expiry, max(self.config.ttl_s / 3, 0.1)))
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-{self.run_id}", daemon=True)
        self._thread.start()

    def guard(self) -> None:
        """Raise `LeaseLostError` unless this run still holds the lease; renew it on the way, so a
        commit starts with a whole ttl ahead of it. A store that cannot be reached is tolerated only
        while the lease this run last wrote has more than a third of its ttl left."""
        with self._lock:
            try:
                self._renew()
            except STORE_ERRORS as err:
                left = self._expires - time.time()
                if left < self.config.ttl_s / 3:
                    raise LeaseLostError(f"cannot renew the lease {self.uri} ({type(err).__name__}: {err}) and it "
                                         f"expires in {left:.0f} s: stopping before the next commit") from err
                logger.warning("renewing the lease %s failed (%s); it is still held for %.0f s", self.uri, err, left)

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still this run's (never another run's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(self.config.ttl_s, 30.0))
        with self._lock:
            if self._version is None or self._lost:
                return
            try:
                released = self._object.delete(self._version)
            except STORE_ERRORS as err:
                logger.warning("could not release the lease %s (%s): the next run takes it over once it "
                               "expires at %s", self.uri, err, _iso(self._expires))
                return
            self._version = None
        if not released:
            logger.warning("the lease %s was no longer this run's at release; left it in place", self.uri)

    def _try_acquire(self) -> dict[str, Any] | None:
        """None once this run holds the lease; else the live holder's lease ({} if it just vanished)."""
        body = self._body()
        data = _encode(body)
        version = self._object.create(data)
        if version is None:
            current = self._object.read()
            if current is None:
                return {}  # released between the create and the read: try again at once
            if current.body.get("lease_id") == self._lease_id:  # our create landed; its answer was lost
                body, version = current.body, current.version
            elif not (why := _gone(current.body)):
                return current.body
            elif (version := self._object.replace(data, current.version)) is None:
                return self._holder_now(current.body)
            else:
                logger.warning("took over the lease of %s: %s", _describe(current.body), why)
        self._version, self._expires = version, _parse_time(body["expires"])
        logger.info("run %s holds the lease %s until %s (renewed every %.1f s)", self.run_id, self.uri,
                    body["expires"], self.config.ttl_s / 3)
        return None

    def _holder_now(self, fallback: dict[str, Any]) -> dict[str, Any]:
        """Who holds the lease after another run won the race to take it over."""
        current = self._object.read()
        return current.body if current is not None else fallback

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.config.ttl_s / 3):
            with self._lock:
                try:
                    self._renew()
                except LeaseError as err:  # lost, or something else now sits at the lease's name
                    self._lost = self._lost or str(err)
                    logger.error("%s", err)
                    return
                except STORE_ERRORS as err:
                    logger.warning("renewing the lease %s failed (%s); retrying in %.0f s; it expires at %s",
                                   self.uri, err, self.config.ttl_s / 3, _iso(self._expires))

    def _renew(self) -> None:
        """Extend the lease by a ttl if it is still this run's (the caller holds `_lock`)."""
        if self._lost:
            raise LeaseLostError(self._lost)
        if self._version is None:
            raise LeaseLostError(f"run {self.run_id} does not hold the lease {self.uri}")
        body = self._body()
        version = self._object.replace(_encode(body), self._version)
        if version is None:
            current = self._object.read()
            if current is None or current.body.get("lease_id") != self._lease_id:
                self._lost = (f"run {self.run_id} lost the lease {self.uri}: "
                              f"{'it was deleted' if current is None else 'now held by ' + _describe(current.body)}"
                              "; stopping before the next commit (committed shards stay committed)")
                raise LeaseLostError(self._lost)
            body, version = current.body, current.version  # our write landed; its answer was lost
        self._version, self._expires = version, _parse_time(body["expires"])

    def _body(self) -> dict[str, Any]:
        now = time.time()
        return {"run_id": self.run_id, "lease_id": self._lease_id, "host": socket.gethostname(), "pid": os.getpid(),
                "created": self._created, "renewed": _iso(now), "expires": _iso(now + self.config.ttl_s),
                "ttl_s": self.config.ttl_s, "process": _process_identity()}


def read_lease(output: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The lease on `output` as stored (who holds it, until when), or None if nobody does."""
    fs, _ = filesystem(output, storage_options)
    uri = join(output, LEASE_FILE)
    current = _lease_object(fs, fs._strip_protocol(uri), uri).read()
    return current.body if current is not None else None


def _lease_object(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> _LeaseObject:
    if isinstance(fs, LocalFileSystem):
        return _LocalLease(path)
    if "s3" in fs.protocol:
        return _S3Lease(fs, path)
    raise LeaseError(f"cannot hold a lease on {uri}: a lease needs conditional writes, which this project uses "
                     f"on local disks and S3 (any endpoint), not on {fs.protocol}")


class _LocalLease:
    """The lease as a local file. Create is a hard link (exclusive); compare-and-swap and delete
    run under an exclusive `flock` of the output folder, which every run on this host takes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fs = LocalFileSystem()

    def create(self, data: bytes) -> str | None:
        return _digest(data) if create_exclusive(self.fs, self.path, data) else None

    def read(self) -> _Stored | None:
        try:
            with open(self.path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return None
        return _Stored(_decode(data, self.path), _digest(data))

    def replace(self, data: bytes, version: str) -> str | None:
        with self._locked():
            current = self.read()
            if current is None or current.version != version:
                return None
            commit_bytes(self.fs, self.path, data)
            return _digest(data)

    def delete(self, version: str) -> bool:
        with self._locked():
            current = self.read()
            if current is None or current.version != version:
                return False
            os.unlink(self.path)
            return True

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        folder = os.path.dirname(self.path) or "."
        fd = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor drops the lock


class _S3Lease:
    """The lease as an S3 object: conditional PUTs and DELETEs on its ETag (AWS S3, MinIO, moto)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.fs, self.path = fs, path
        self.bucket, self.key, _ = fs.split_path(path)

    def create(self, data: bytes) -> str | None:
        try:
            response = self.fs.pipe_file(self.path, data, mode="create")
        except FileExistsError:
            return None
        return self._etag(response)

    def read(self) -> _Stored | None:
        try:
            data, etag = sync(self.fs.loop, self._get)
        except FileNotFoundError:
            return None
        return _Stored(_decode(data, self.path), etag)

    def replace(self, data: bytes, version: str) -> str | None:
        try:
            response = self.fs.pipe_file(self.path, data, IfMatch=version)
        except OSError as err:
            if _precondition_failed(err):
                return None
            raise
        return self._etag(response)

    def delete(self, version: str) -> bool:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=version)
        except FileNotFoundError:
            return False
        except OSError as err:
            if _precondition_failed(err):
                return False
            raise
        self.fs.invalidate_cache(self.path)
        return True

    async def _get(self) -> tuple[bytes, str]:
        """Body and ETag from one GET, so they describe the same version."""
        response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
        try:
            return await response["Body"].read(), response["ETag"]
        finally:
            response["Body"].close()

    def _etag(self, response: Any) -> str:
        if isinstance(response, dict) and response.get("ETag"):
            return response["ETag"]
        return self.fs.info(self.path, refresh=True)["ETag"]  # a multipart PUT answers without it


def _precondition_failed(err: OSError) -> bool:
    """s3fs turns a 412 (If-Match / If-None-Match did not hold) into a plain OSError: read the code."""
    response = getattr(err.__cause__, "response", None) or {}
    return str(response.get("Error", {}).get("Code")) in _S3_PRECONDITION_CODES


def _gone(body: dict[str, Any]) -> str:
    """Why the lease's holder no longer holds it ('' if it may still): its lease expired, or its
    process ran on this machine and has exited (a killed driver rerun at once need not wait a ttl)."""
    if _parse_time(body["expires"]) <= time.time():
        return "it expired"
    theirs, mine = body.get("process") or {}, _process_identity()
    same_machine = bool(mine) and all(theirs.get(k) == mine[k] for k in ("boot_id", "pid_ns"))
    if same_machine and _start_time(int(body.get("pid", -1))) != theirs.get("start"):
        return f"its process {body.get('pid')} on this machine has exited"
    return ""


@functools.lru_cache(maxsize=1)
def _process_identity() -> dict[str, str]:
    """What tells this process from any other, even across containers on one kernel: the kernel's boot
    id, the pid namespace, and the process's start time (a reused pid has another). {} without /proc."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            boot_id = handle.read().strip()
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return {}
    start = _start_time(os.getpid())
    return {"boot_id": boot_id, "pid_ns": pid_ns, "start": start} if start else {}


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks since boot); None if no such process
    runs (a zombie, killed but not yet reaped by its parent, has exited too)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()  # after the command name: field 3 on
    except (OSError, ValueError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _describe(body: dict[str, Any]) -> str:
    if not body:
        return "a lease that exists for a create but not for a read (is the store consistent?)"
    return (f"run {body.get('run_id')} on host {body.get('host')} (pid {body.get('pid')}), lease taken "
            f"{body.get('created')}, expiring {body.get('expires')} unless renewed")


def _encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, indent=1, sort_keys=True).encode()


def _decode(data: bytes, path: str) -> dict[str, Any]:
    try:
        body = json.loads(data)
        _parse_time(body["expires"])
    except (ValueError, KeyError, TypeError) as err:
        raise LeaseError(f"{path} is not a lease this project wrote ({type(err).__name__}: {err}); if no run is "
                         "writing the output, delete it") from err
    return body


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _utc_now() -> str:
    return _iso(time.time())


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, timezone.utc).isoformat(timespec="milliseconds")


def _parse_time(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()
