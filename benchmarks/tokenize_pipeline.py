"""Benchmark of the tokenize pipeline against its four targets, measured side by side in one run.

    python benchmarks/tokenize_pipeline.py             # full: 2,000 photos, 16 shards, ~15-20 min idle
    python benchmarks/tokenize_pipeline.py --quick     # smoke run: 200 photos, 8 shards

Everything runs on this machine: a moto S3 server on a free loopback port (started and stopped
here, as tests/conftest.py does), sample-photo shards written to it, then:

1. the pipeline at 1x (a quarter of the shards) and 4x (all of them), each in a fresh local Ray
   session whose memory (RSS of the driver and every process under it) a thread samples;
2. calibration, in one fresh process, in the dtype the job chose (its manifest): decode+resize
   seconds per image and model seconds per image (guide + semantic, `--threads` torch threads)
   -> efficiency = pipeline images/s x their sum;
3. `plain_dataloader.py` (float32, as such a script computes unless cast) with 0, 1 and 2 DataLoader
   workers on two shards, then the best count on all shards -> the pipeline / plain ratio; where the
   job chose another dtype, the best count again in that dtype -> the ratio at the same dtype;
4. the ceiling: one 1-thread plain process per CPU on disjoint shards, in the job's dtype;
5. the token columns' bytes on disk per image (Parquet column-chunk sizes) vs raw uint16.
"""

from __future__ import annotations

import argparse
import contextlib
import concurrent.futures
import itertools
import json
import logging
import multiprocessing
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import ray

# isort: split
import psutil  # after ray: ray ships psutil in its thirdparty_files and puts that folder on sys.path

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TARGETS = {"efficiency": 0.9, "vs_plain": 1.2, "memory_4x_over_1x": 1.1, "token_bytes_over_raw": 1.05}
# Ray starts its workers at niceness 15 (raylet's `worker_niceness`): on a machine shared with other
# users' processes they would get a few percent of a core while the plain script, at 0, gets its
# share. At 0 every side of the comparison competes alike; on an idle machine it changes nothing.
RAY_WORKER_NICENESS = {"RAY_worker_niceness": "0"}
S3_ENV = {"AWS_ACCESS_KEY_ID": "dualtok-bench-key", "AWS_SECRET_ACCESS_KEY": "dualtok-bench-secret",
          "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass(frozen=True)
class BenchConfig:
    photos: int = 2000
    per_shard: int = 125
    batch_size: int = 16
    cpus: int = os.cpu_count() or 2  # the Ray session's CPUs; also the calibration's torch threads
    threads: int = 0  # calibration torch threads; 0: = cpus (one process using the whole machine)
    calibration_images: int = 96
    sweep_shards: int = 2
    workers: tuple[int, ...] = (0, 1, 2)
    bundle: str = "small"
    overrides: tuple[str, ...] = ()  # extra `dualtok tokenize` key=value overrides, applied last

    @property
    def shards(self) -> int:
        return -(-self.photos // self.per_shard)

    def pipeline_overrides(self) -> list[str]:
        """What the benchmark adds to `dualtok tokenize`: the bundle, and the batch size only where it
        differs from the job's default. Resources are the job's defaults, sized to the cluster the job
        finds (as users run it): nothing here tunes them."""
        from dualtok.pipelines.actors import StageResources

        batch = [] if self.batch_size == StageResources().batch_size else [f"encoder.batch_size={self.batch_size}"]
        return [f"bundle={self.bundle}", *batch, *self.overrides]


# ---- measurement helpers --------------------------------------------------------------------
class SessionSampler:
    """Samples, from a background thread, this process and every process under it (Ray's GCS,
    raylet, workers) less the excluded pids (the S3 server): the peak of their summed RSS, and
    each process's CPU seconds (by Ray's process title) to show where the CPU went."""

    def __init__(self, exclude: set[int], interval: float = 1.0) -> None:
        self.exclude, self.interval = set(exclude), interval
        self.own_cpu = 0.0  # the sampler thread's own CPU seconds: counted in "driver", reported apart
        self.peak, self.peak_pss, self.samples = 0, 0, 0  # PSS: shared pages split among their users (1 in 10)
        self.at_peak: dict[str, str] = {}  # title -> "processes x mean RSS (shared)" at the peak
        self.cpu: dict[int, tuple[str, float]] = {}  # pid -> (title, user+system seconds since start)
        self._baseline = {p.pid: _cpu_seconds(p) for p in self._processes()}  # the driver's CPU so far
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="session-sampler", daemon=True)

    def __enter__(self) -> SessionSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()  # the last CPU times of processes still alive

    def cpu_by_title(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for title, seconds in self.cpu.values():
            totals[title] = totals.get(title, 0.0) + seconds
        return {k: round(v, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}

    def _processes(self) -> list[psutil.Process]:
        root = psutil.Process()
        for pid in list(self.exclude):  # the S3 server's own children too
            with contextlib.suppress(psutil.NoSuchProcess):  # the server may already be gone
                self.exclude.update(c.pid for c in psutil.Process(pid).children(recursive=True))
        return [p for p in [root, *root.children(recursive=True)] if p.pid not in self.exclude]

    def _sample(self) -> None:
        by_title: dict[str, list[tuple[int, int]]] = {}  # title -> (RSS, shared part) of each process
        pss = 0
        for proc in self._processes():
            try:
                with proc.oneshot():
                    # PSS walks every page table (smaps_rollup): ~0.1 CPU-s per sample here, so 1 in 10
                    full = self.samples % 10 == 0
                    memory = proc.memory_full_info() if full else proc.memory_info()
                    seconds = _cpu_seconds(proc) - self._baseline.get(proc.pid, 0.0)
                    title = _title(proc)  # re-read: an idle Ray worker later becomes an actor
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue  # a worker that exited between listing and reading
            self.cpu[proc.pid] = (title, seconds)
            by_title.setdefault(title, []).append((memory.rss, memory.shared))
            pss += memory.pss if full else 0
        self.peak_pss = max(self.peak_pss, pss)
        total = sum(rss for v in by_title.values() for rss, _ in v)
        if total > self.peak:
            self.peak = total
            self.at_peak = {t: _rss_text(v) for t, v in sorted(by_title.items(), key=lambda kv: -sum(r for r, _ in kv[1]))}
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self.own_cpu = time.thread_time()
            self._stop.wait(self.interval)


def _rss_text(processes: list[tuple[int, int]]) -> str:
    """'2 x 1017 MiB (210 shared)': shared pages (libraries, Ray's object store) count in each process."""
    n = len(processes)
    rss, shared = (sum(p[i] for p in processes) / n / 2**20 for i in (0, 1))
    return f"{n} x {rss:.0f} MiB ({shared:.0f} shared)"


def _cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def _title(proc: psutil.Process) -> str:
    """'ray::MapWorker(MapBatches(EncodeTokens))', 'raylet', 'gcs_server', 'driver', ..."""
    if proc.pid == os.getpid():
        return "driver"
    words = proc.cmdline() or [proc.name()]
    first = words[0] if words[0].startswith("ray::") else os.path.basename(words[0])
    if first.startswith("python") and len(words) > 1:
        first = os.path.basename(words[1])  # e.g. ray's log_monitor.py
    return first.split(" ")[0] if first.startswith("ray::") else first


@contextmanager
def s3_server() -> Iterator[tuple[str, int]]:
    """moto's S3 server on a free loopback port; the AWS env points every process at it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, **S3_ENV}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto's S3 server did not listen on {url}") from None
                time.sleep(0.1)
        os.environ.update(S3_ENV)
        os.environ["AWS_ENDPOINT_URL"] = url  # botocore's standard endpoint variable: Ray workers inherit it
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def calibrate(shard_uris: list[str], bundle: str, count: int, batch_size: int, threads: int,
              dtype: str) -> dict[str, float]:
    """Serial seconds per image in ONE process: decode+resize (PIL, one thread), then each branch
    in `dtype` with `threads` torch threads and with 1 (what efficiency weighs the pipeline's
    throughput by)."""
    import numpy as np
    import torch

    from dualtok.pipelines.io.decode import DecodeConfig, decode_image
    from dualtok.pipelines.io.shards import iter_samples
    from dualtok.pipelines.actors import BundleSource

    tokenizer = BundleSource(bundle).load(("guide", "semantic")).to(getattr(torch, dtype))
    size = max(tokenizer.part(p).config.image_size for p in ("guide", "semantic"))  # as the pipeline decodes
    config = DecodeConfig(size=size)
    samples = (sample for uri in shard_uris for sample in iter_samples(uri))  # lazily: stop at `count`
    blobs = [sample.image_bytes()[1] for sample in itertools.islice(samples, count)]
    start = time.perf_counter()
    pixels = np.stack([decode_image(b, config).pixels for b in blobs])  # (N, S, S, 3) uint8
    result = {"decode_s": (time.perf_counter() - start) / len(blobs), "threads": threads, "images": len(blobs),
              "dtype": dtype}
    for n_threads, suffix in ((threads, ""), (1, "_1thread")):
        torch.set_num_threads(n_threads)
        for name, encode in (("guide", tokenizer.encode_guide), ("semantic", tokenizer.encode_semantic)):
            encode(pixels[:batch_size])  # warm-up: the first call allocates and picks kernels
            start = time.perf_counter()
            for i in range(0, len(pixels), batch_size):
                encode(pixels[i : i + batch_size])
            result[f"{name}_s{suffix}"] = (time.perf_counter() - start) / len(pixels)
        result[f"model_s{suffix}"] = result[f"guide_s{suffix}"] + result[f"semantic_s{suffix}"]
    return result


def in_fresh_process(function: Any, **kwargs: Any) -> Any:
    """Run in a spawned process, so that the driver's memory (part of the Ray session's) is not
    padded by torch state or by the freed-but-kept heap of writing 2,000 photos."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(function, **kwargs).result()


def write_shards(output: str, photos: int, per_shard: int) -> list[str]:
    from dualtok.pipelines.shards.photos import write_sample_shards

    return list(write_sample_shards(output, photos, per_shard).shards)


def run_pipeline(inputs: str, output: str, config: BenchConfig, exclude: set[int]) -> dict[str, Any]:
    """One `dualtok tokenize` run, the job's own code path (`dualtok.jobs.cli` -> `dualtok.jobs.tokenize.run`:
    its checks, its resource sizing, its defaults), in the fresh local Ray session the job starts itself,
    timed from the command on. The counts come from the manifest the job writes."""
    from dualtok.jobs.cli import main as dualtok

    # the job starts its own local Ray, as `dualtok tokenize` does for users (the machine's cores)
    cpus = [] if config.cpus == os.cpu_count() else [f"ray.num_cpus={config.cpus}"]
    argv = ["-q", "tokenize", "inputs=" + json.dumps([inputs]), f"output={output}", *cpus,
            *config.pipeline_overrides()]
    with SessionSampler(exclude) as session:
        start = time.monotonic()
        code = dualtok(argv)
        seconds = time.monotonic() - start
        ray.shutdown()
    if code != 0:
        raise RuntimeError(f"dualtok {' '.join(argv)} exited {code}")
    fs, path = fsspec.core.url_to_fs(output.rstrip("/") + "/manifest.json")
    manifest = json.loads(fs.cat_file(path))
    summary = manifest["this_run"]
    return {"images": summary["images"], "errors": summary["errors"], "seconds": seconds,
            "images_per_second": summary["images"] / seconds, "job_seconds": summary["seconds"],
            "dtype": manifest["bundle"]["dtype"],
            "resources": {k: manifest["config"][k] for k in ("read_cpus", "read_actors", "encoder")},
            "peak_rss_bytes": session.peak, "peak_pss_bytes": session.peak_pss, "memory_samples": session.samples, "rss_at_peak": session.at_peak,
            "cpu_seconds": sum(session.cpu_by_title().values()), "cpu_by_process": session.cpu_by_title(),
            "sampler_cpu_seconds": session.own_cpu}


def run_plain(inputs: str, workers: int, config: BenchConfig, scratch: str, dtype: str = "float32") -> dict[str, Any]:
    """`plain_dataloader.py` in its own process, as users run it (torch's default threads)."""
    process, result = _start_plain(inputs, workers, config, scratch, dtype=dtype)
    if process.wait() != 0:
        raise RuntimeError(f"plain_dataloader.py failed on {inputs} (exit {process.returncode})")
    with open(result) as handle:
        return json.load(handle)


def run_plain_split(bucket: str, config: BenchConfig, scratch: str, dtype: str) -> dict[str, Any]:
    """The machine's ceiling for this work in `dtype`: one single-threaded plain process per CPU, all
    at once, each on its own contiguous part of the shards. No pipeline computing in `dtype` on these
    CPUs can do the same work faster; the pipeline's ratio to this is its overhead (Ray, the driver,
    the commit protocol)."""
    parts = min(config.cpus, config.shards)
    bounds = [config.shards * i // parts for i in range(parts + 1)]
    started = [_start_plain(shard_pattern(bucket, hi, lo), 0, config, scratch, threads=1, dtype=dtype)
               for lo, hi in zip(bounds, bounds[1:])]
    runs = []
    for process, result in started:
        if process.wait() != 0:
            raise RuntimeError(f"a split plain_dataloader.py run failed (exit {process.returncode})")
        with open(result) as handle:
            runs.append(json.load(handle))
    images, seconds = sum(r["images"] for r in runs), max(r["seconds"] for r in runs)
    return {"processes": parts, "images": images, "seconds": seconds, "images_per_second": images / seconds,
            "dtype": dtype}


def _start_plain(inputs: str, workers: int, config: BenchConfig, scratch: str,
                 threads: int | None = None, dtype: str = "float32") -> tuple[subprocess.Popen, str]:
    out = tempfile.mkdtemp(dir=scratch, prefix=f"plain-w{workers}-")
    result = os.path.join(out, "result.json")
    command = [sys.executable, str(HERE / "plain_dataloader.py"), "--inputs", inputs, "--output", out,
               "--bundle", config.bundle, "--batch-size", str(config.batch_size), "--workers", str(workers),
               "--dtype", dtype, "--json", result, *(["--threads", str(threads)] if threads else [])]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, cwd=REPO), result


def corpus_bytes(output: str) -> dict[str, Any]:
    """Per-image bytes of the corpus files by column, from the Parquet footers."""
    import fsspec
    import pyarrow.parquet as pq

    from dualtok.pipelines.io import schemas as S

    fs, root = fsspec.core.url_to_fs(output)
    files = sorted(p for p in fs.find(f"{root}/data") if p.endswith(".parquet"))
    by_column: dict[str, int] = {}
    rows = file_bytes = 0
    for path in files:
        meta = pq.read_metadata(fs.open(path))
        rows += meta.num_rows
        file_bytes += fs.size(path)
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                chunk = group.column(c)
                name = chunk.path_in_schema.split(".")[0]
                by_column[name] = by_column.get(name, 0) + chunk.total_compressed_size
    schema = pq.read_schema(fs.open(files[0]))
    widths = {n: schema.field(n).type.list_size for n in (S.GUIDE_TOKENS, S.SEMANTIC_TOKENS)}
    token_bytes = sum(by_column[n] for n in widths)
    raw = 2 * sum(widths.values())  # uint16 ids
    metadata_bytes = sum(v for k, v in by_column.items() if k not in widths)
    return {
        "files": len(files), "rows": rows, "raw_token_bytes_per_image": raw,
        "token_bytes_per_image": token_bytes / rows, "token_ratio": token_bytes / rows / raw,
        "per_column_bytes_per_image": {k: round(v / rows, 2) for k, v in sorted(by_column.items())},
        "metadata_bytes_per_image": metadata_bytes / rows,
        "footer_and_headers_bytes_per_image": (file_bytes - token_bytes - metadata_bytes) / rows,
        "file_bytes_per_image": file_bytes / rows,
    }


def uniform_token_corpus(output: str, scratch: str, rows_per_shard: int) -> dict[str, Any]:
    """The corpus rewritten by the pipeline's own writer with every token replaced by a uniformly
    random id of its vocabulary: what a trained codebook that uses all codes evenly stores (random
    weights use few codes, which compress far better than real tokens will)."""
    import fsspec
    import numpy as np
    import pyarrow.parquet as pq

    from dualtok.pipelines.io import schemas as S
    from dualtok.pipelines.io.corpus import CorpusLayout, CorpusWriter

    fs, root = fsspec.core.url_to_fs(output)
    files = sorted(p for p in fs.find(f"{root}/data") if p.endswith(".parquet"))
    table = pq.ParquetDataset(files, filesystem=fs).read()
    meta = S.read_metadata(pq.read_schema(fs.open(files[0])))
    n, rng = table.num_rows, np.random.default_rng(0)
    widths = {S.GUIDE_TOKENS: (meta["guide_grid"] ** 2, meta["guide_vocab"]),
              S.SEMANTIC_TOKENS: (meta["semantic_tokens"], meta["semantic_vocab"])}
    distinct = {name: len(np.unique(np.stack(table[name].to_numpy(zero_copy_only=False)))) for name in widths}
    tokens = {name: rng.integers(0, vocab, (n, width), dtype=np.uint16) for name, (width, vocab) in widths.items()}
    local = os.path.join(scratch, "uniform-corpus")
    writer = CorpusWriter(CorpusLayout(local, widths[S.GUIDE_TOKENS][0], widths[S.SEMANTIC_TOKENS][0], meta), {},
                          "uniform")
    for start in range(0, n, rows_per_shard):
        rows = range(start, min(n, start + rows_per_shard))
        writer.add(_sample_batch(table, rows, tokens, f"{start:06d}"))
    result = corpus_bytes(local)
    result["distinct_ids_in_pipeline_corpus"] = distinct
    return result


def _sample_batch(table: Any, rows: range, tokens: dict[str, Any], shard: str) -> dict[str, Any]:
    """Rows of `table` as one pipeline batch (SAMPLE rows, then the shard's END row)."""
    import numpy as np

    from dualtok.pipelines.io import schemas as S

    n = len(rows)
    def objects(values: list[Any]) -> Any:
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return array

    picked = table.slice(rows.start, n)
    batch = {S.ROW_KIND: np.array([S.SAMPLE] * n + [S.END]), S.SHARD: objects([shard] * (n + 1)),
             S.INDEX: np.arange(n + 1), S.SHARD_SAMPLES: np.array([-1] * n + [n]),
             S.STAGE: objects([""] * (n + 1)), S.REASON: objects([""] * (n + 1)),
             S.SHARD_BYTES: np.full(n + 1, -1), S.SHARD_VERSION: objects([""] * (n + 1)),
             S.SHARD_RETRIES: np.zeros(n + 1, np.int64)}  # what the END row says of the (absent) input
    for name in (S.KEY, S.CAPTION, S.WIDTH, S.HEIGHT):
        batch[name] = objects([*picked[name].to_pylist(), None])
    for name, ids in tokens.items():
        batch[name] = np.concatenate([ids[rows.start : rows.stop], np.zeros((1, ids.shape[1]), np.uint16)])
    return batch


# ---- the run --------------------------------------------------------------------------------
@dataclass
class Results:
    config: dict[str, Any]
    machine: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, float] = field(default_factory=dict)
    pipeline_1x: dict[str, Any] = field(default_factory=dict)
    pipeline_4x: dict[str, Any] = field(default_factory=dict)
    plain_sweep: dict[int, dict[str, Any]] = field(default_factory=dict)
    plain_best: dict[str, Any] = field(default_factory=dict)
    plain_same_dtype: dict[str, Any] = field(default_factory=dict)  # the best count in the job's dtype
    plain_split: dict[str, Any] = field(default_factory=dict)
    storage: dict[str, Any] = field(default_factory=dict)
    storage_uniform: dict[str, Any] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)


def shard_pattern(bucket: str, count: int, first: int = 0) -> str:
    """Shards first..count-1 as a brace pattern (both `dualtok tokenize` and webdataset expand it)."""
    return f"s3://{bucket}/shards/{{{first:05d}..{count - 1:05d}}}.tar"


def run_benchmark(config: BenchConfig, scratch: str) -> Results:
    import s3fs

    os.environ.update(RAY_WORKER_NICENESS)
    results = Results(config=asdict(config))
    results.machine = machine_info()
    with s3_server() as (url, moto_pid):
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
        shards = in_fresh_process(write_shards, output=f"s3://{bucket}/shards", photos=config.photos,
                                  per_shard=config.per_shard)
        logger.info("wrote %d photos in %d shards to %s", config.photos, len(shards), url)
        quarter = max(1, config.shards // 4)
        results.pipeline_1x = run_pipeline(shard_pattern(bucket, quarter), f"s3://{bucket}/corpus-1x",
                                           config, {moto_pid})
        logger.info("pipeline 1x: %s", results.pipeline_1x)
        results.pipeline_4x = run_pipeline(shard_pattern(bucket, config.shards), f"s3://{bucket}/corpus-4x",
                                           config, {moto_pid})
        logger.info("pipeline 4x: %s", results.pipeline_4x)
        dtype = results.pipeline_4x["dtype"]  # what the job chose for this machine
        results.calibration = in_fresh_process(
            calibrate, shard_uris=shards, bundle=config.bundle, count=config.calibration_images,
            batch_size=config.batch_size, threads=config.threads or config.cpus, dtype=dtype)
        logger.info("calibration: %s", results.calibration)
        sweep_inputs = shard_pattern(bucket, min(config.sweep_shards, config.shards))
        for workers in config.workers:
            results.plain_sweep[workers] = run_plain(sweep_inputs, workers, config, scratch)
            logger.info("plain, %d workers, %s: %s", workers, sweep_inputs, results.plain_sweep[workers])
        best = max(results.plain_sweep, key=lambda w: results.plain_sweep[w]["images_per_second"])
        results.plain_best = run_plain(shard_pattern(bucket, config.shards), best, config, scratch)
        logger.info("plain, best (%d workers), all shards: %s", best, results.plain_best)
        results.plain_same_dtype = results.plain_best
        if dtype != results.plain_best["dtype"]:
            results.plain_same_dtype = run_plain(shard_pattern(bucket, config.shards), best, config, scratch, dtype)
            logger.info("plain, best (%d workers), all shards, %s: %s", best, dtype, results.plain_same_dtype)
        results.plain_split = run_plain_split(bucket, config, scratch, dtype)
        logger.info("plain, one 1-thread process per CPU on split shards: %s", results.plain_split)
        results.storage = corpus_bytes(f"s3://{bucket}/corpus-4x")
        results.storage_uniform = uniform_token_corpus(f"s3://{bucket}/corpus-4x", scratch, config.per_shard)
    results.machine["load_after"] = os.getloadavg()
    results.ratios = ratios(results)
    return results


def ratios(r: Results) -> dict[str, float]:
    pipeline = r.pipeline_4x["images_per_second"]
    return {
        "efficiency": pipeline * (r.calibration["decode_s"] + r.calibration["model_s"]),
        # the stricter reading: against every CPU running its own single-threaded copy of the work
        "efficiency_per_cpu_1thread": pipeline * (r.calibration["decode_s"] + r.calibration["model_s_1thread"])
        / r.config["cpus"],
        "vs_plain": pipeline / r.plain_best["images_per_second"],
        "vs_plain_same_dtype": pipeline / r.plain_same_dtype["images_per_second"],
        "ceiling_vs_plain": r.plain_split["images_per_second"] / r.plain_same_dtype["images_per_second"],
        "vs_ceiling": pipeline / r.plain_split["images_per_second"],
        "memory_4x_over_1x": r.pipeline_4x["peak_rss_bytes"] / r.pipeline_1x["peak_rss_bytes"],
        "memory_4x_over_1x_pss": r.pipeline_4x["peak_pss_bytes"] / r.pipeline_1x["peak_pss_bytes"],
        "token_bytes_over_raw": r.storage["token_ratio"],
        "token_bytes_over_raw_uniform_ids": r.storage_uniform["token_ratio"],
    }


def machine_info() -> dict[str, Any]:
    import torch

    return {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "load_before": os.getloadavg(), "python": platform.python_version(), "torch": torch.__version__,
            "ray": ray.__version__, "platform": platform.platform()}


# ---- reporting ------------------------------------------------------------------------------
def report_lines(r: Results) -> list[str]:
    cal, p1, p4, plain, st = r.calibration, r.pipeline_1x, r.pipeline_4x, r.plain_best, r.storage
    rows = [
        ("pipeline efficiency", r.ratios["efficiency"], ">=", TARGETS["efficiency"],
         (f"{p4['images_per_second']:.2f} img/s x ({cal['decode_s'] * 1e3:.1f} ms decode + "
         f"{cal['model_s'] * 1e3:.0f} ms model, {cal['threads']} threads, 1 process)")),
        ("pipeline / plain DataLoader", r.ratios["vs_plain"], ">=", TARGETS["vs_plain"],
         (f"{p4['images_per_second']:.2f} vs {plain['images_per_second']:.2f} img/s "
         f"(pipeline: {p4['dtype']}, the job's choice here; plain: {plain['dtype']}, {plain['workers']} "
         f"workers, best of {sorted(r.plain_sweep)})")),
        ("peak memory 4x / 1x", r.ratios["memory_4x_over_1x"], "<=", TARGETS["memory_4x_over_1x"],
         (f"{p4['peak_rss_bytes'] / 2**20:.0f} MiB ({p4['images']} img) vs {p1['peak_rss_bytes'] / 2**20:.0f} MiB "
         f"({p1['images']} img); by PSS (shared pages counted once): {r.ratios['memory_4x_over_1x_pss']:.3f}")),
        ("token bytes / raw uint16", r.ratios["token_bytes_over_raw"], "<=", TARGETS["token_bytes_over_raw"],
         (f"{st['token_bytes_per_image']:.1f} vs {st['raw_token_bytes_per_image']} B/img; metadata columns "
         f"{st['metadata_bytes_per_image']:.1f} B/img, footers {st['footer_and_headers_bytes_per_image']:.1f} B/img")),
        ("same, uniform random ids", r.ratios["token_bytes_over_raw_uniform_ids"], "<=",
         TARGETS["token_bytes_over_raw"],
         (f"{r.storage_uniform['token_bytes_per_image']:.1f} B/img: the corpus rewritten by `CorpusWriter` with "
         f"every id drawn uniformly from its vocabulary (random weights use only "
         f"{_distinct(r.storage_uniform['distinct_ids_in_pipeline_corpus'])} ids)")),
    ]
    lines = ["| measure | value | target | met | details |", "| --- | ---: | ---: | :-: | --- |"]
    for name, value, op, target, detail in rows:
        met = value >= target if op == ">=" else value <= target
        lines.append(f"| {name} | {value:.3f} | {op} {target} | {'yes' if met else 'NO'} | {detail} |")
    return lines


def detail_lines(r: Results) -> list[str]:
    cal = r.calibration
    lines = [(f"- machine: {r.machine['cpus']} CPUs, {r.machine['memory_gib']} GiB; load average (1/5/15 min) "
             f"before {_load(r.machine['load_before'])}, after {_load(r.machine['load_after'])}; "
             f"python {r.machine['python']}, torch {r.machine['torch']}, ray {r.machine['ray']}"),
             (f"- calibration ({cal['images']} images, one process, {cal['dtype']}): decode+resize "
             f"{cal['decode_s'] * 1e3:.1f} ms; "
             f"with {cal['threads']} torch threads guide {cal['guide_s'] * 1e3:.0f} ms + semantic "
             f"{cal['semantic_s'] * 1e3:.0f} ms, with 1 thread {cal['guide_s_1thread'] * 1e3:.0f} + "
             f"{cal['semantic_s_1thread'] * 1e3:.0f} ms per image"),
             (f"- efficiency per CPU against 1-thread work (pipeline img/s x (decode + 1-thread model s/img) / "
             f"{r.config['cpus']} CPUs): {r.ratios['efficiency_per_cpu_1thread']:.3f}")]
    for label, run in (("1x", r.pipeline_1x), ("4x", r.pipeline_4x)):
        busy = run["cpu_seconds"] / (run["seconds"] * r.config["cpus"])
        lines.append(f"- pipeline {label}: {run['images']} images, {run['errors']} errors in {run['seconds']:.1f} s "
                     f"incl. Ray's start ({run['images_per_second']:.2f} img/s); peak RSS "
                     f"{run['peak_rss_bytes'] / 2**20:.0f} MiB (PSS {run['peak_pss_bytes'] / 2**20:.0f} MiB) over "
                     f"{run['memory_samples']} samples; CPU "
                     f"{run['cpu_seconds']:.0f} s = {busy:.0%} of {r.config['cpus']} CPUs: {_cpu_groups(run)} "
                     f"(the driver's includes this benchmark's memory sampler, {run['sampler_cpu_seconds']:.1f} s)")
    for workers, run in sorted(r.plain_sweep.items()):
        lines.append(f"- plain DataLoader, {workers} workers, {run['images']} images: "
                     f"{run['images_per_second']:.2f} img/s (torch threads {run['torch_threads']})")
    plain, same = r.plain_best, r.plain_same_dtype
    lines.append(f"- plain DataLoader, best ({plain['workers']} workers), {plain['images']} images, {plain['dtype']}: "
                 f"{plain['images_per_second']:.2f} img/s")
    if same is not plain:
        lines.append(f"- plain DataLoader, the same in {same['dtype']} (the job's dtype): "
                     f"{same['images_per_second']:.2f} img/s; the pipeline is {r.ratios['vs_plain_same_dtype']:.3f}x it")
    split = r.plain_split
    lines.append(f"- ceiling: {split['processes']} plain processes at once, 1 torch thread each, on disjoint shards, "
                 f"{split['dtype']}: {split['images_per_second']:.2f} img/s = {r.ratios['ceiling_vs_plain']:.3f}x "
                 f"the best plain run in {split['dtype']}; the pipeline reaches {r.ratios['vs_ceiling']:.3f} of it")
    columns = ", ".join(f"{k} {v}" for k, v in r.storage["per_column_bytes_per_image"].items())
    lines.append(f"- corpus bytes per image by column: {columns}; whole files {r.storage['file_bytes_per_image']:.1f}")
    return lines


def _cpu_groups(run: dict[str, Any]) -> str:
    """CPU seconds by role; a worker that has not yet become an actor shows up as ray::IDLE."""
    groups: dict[str, float] = {}
    for title, seconds in run["cpu_by_process"].items():
        role = ("encoder actors" if "EncodeTokens" in title
                else "driver" if title == "driver" else "read+decode actors and idle workers"
                if title == "ray::IDLE" or "ReadAndDecode" in title else "Ray's own processes")
        groups[role] = groups.get(role, 0.0) + seconds
    return ", ".join(f"{k} {v:.0f} s" for k, v in sorted(groups.items(), key=lambda kv: -kv[1]))


def _distinct(counts: dict[str, int]) -> str:
    return " and ".join(f"{v} {k.split('_')[0]}" for k, v in counts.items())


def _load(values: Any) -> str:
    return "/".join(f"{v:.1f}" for v in values)


def write_docs(path: Path, r: Results, command: str) -> None:
    """Replace the generated block of the docs page, keeping the hand-written analysis around it."""
    begin, end = "<!-- benchmark:begin -->", "<!-- benchmark:end -->"
    block = "\n".join([begin, f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with:", "",
                       "```", command, "```", "", *report_lines(r), "", *detail_lines(r), end])
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{begin}\n{end}\n"
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    path.write_text(head + block + tail)


def parse_args(argv: list[str] | None) -> tuple[BenchConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 200 photos in 8 shards")
    parser.add_argument("--photos", type=int, help="photos in the 4x input (default 2000; --quick 200)")
    parser.add_argument("--per-shard", type=int, help="photos per shard (default 125; --quick 25)")
    parser.add_argument("--batch-size", type=int, default=BenchConfig.batch_size)
    parser.add_argument("--cpus", type=int, default=BenchConfig.cpus, help="the Ray session's CPUs")
    parser.add_argument("--threads", type=int, default=0, help="calibration torch threads (default: --cpus)")
    parser.add_argument("--workers", default="0,1,2", help="DataLoader worker counts to sweep")
    parser.add_argument("--json", help="also write all results here")
    parser.add_argument("--write-docs", nargs="?", const=str(REPO / "docs" / "benchmarks.md"),
                        help="update the results block of docs/benchmarks.md (or the given page)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="extra `dualtok tokenize` overrides")
    args = parser.parse_args(argv)
    config = BenchConfig(
        photos=args.photos or (200 if args.quick else BenchConfig.photos),
        per_shard=args.per_shard or (25 if args.quick else BenchConfig.per_shard),
        batch_size=args.batch_size, cpus=args.cpus, threads=args.threads,
        calibration_images=32 if args.quick else BenchConfig.calibration_images,
        workers=tuple(int(w) for w in args.workers.split(",")), overrides=tuple(args.overrides),
    )
    return config, args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config, args = parse_args(argv)
    command = "python benchmarks/tokenize_pipeline.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="dualtok-bench-") as scratch:
        results = run_benchmark(config, scratch)
    for line in [*report_lines(results), "", *detail_lines(results)]:
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(results), indent=1, default=str))
    if args.write_docs:
        write_docs(Path(args.write_docs), results, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
