"""The tokenize pipeline: WebDataset shards (or Parquet files of images) -> Ray Data -> a Parquet
token corpus, exactly once.

    shard URIs (pending only) -> ReadAndDecode (a pool of torch-free CPU actors, one shard per call)
      -> EncodeTokens (actor pool; each actor holds the guide and/or semantic branch, and writes its
         token rows to the run's part files, `io/token_parts.py`)
      -> driver: PartCommits learns each shard's part files, ERROR rows and END row; once they
         account for its samples a task commits it whole (CorpusWriter), then the driver writes its marker.

Decoded images cross the object store once, from a read actor into an encoder actor, and the bytes
in flight are capped (`prefetch_batches` per actor), so memory stays flat however large the input.
No token row reaches the driver: only part names and counts, error rows and one END row per shard
(docs/scale.md: the driver's cost per image before and after). The unit of work and of commit is
the input shard: a rerun skips committed shards, picks up new ones, and redoes any shard a crash
left uncommitted, that failed (a store fault that outlived the retries, a shard that cannot be read to
its end: `RunSummary.shards_failed`, never committed), or whose input changed since its commit.
The corpus's passthrough columns are fixed by its first run: a run asking for others is refused
before anything is written, since every file of a corpus has one schema.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from dualtok.pipelines.config import ConfigError
from dualtok.pipelines.io import schemas as S
from dualtok.pipelines.io.corpus import MARKER_INDEX, MARKERS_DIR, RUNS_DIR, CorpusLayout
from dualtok.pipelines.io.token_parts import PartCommits, Tasks, ThreadTasks, TokenParts, task_failed
from dualtok.pipelines.io.shard_ids import assign_shard_ids, normalize_root
from dualtok.pipelines.io.decode import DecodeConfig
from dualtok.pipelines.io.lease import Lease, LeaseConfig
from dualtok.pipelines.progress import Progress, format_progress
from dualtok.pipelines.io.outputs import merge_counts, new_run_id, package_versions
from dualtok.pipelines.io.parquet_shards import ParquetColumns
from dualtok.pipelines.io.read import DecodeImages, ReadShards, add_read_stage
from dualtok.pipelines.io.shards import ShardLimits
from dualtok.pipelines.actors import BundleSource, StageResources, add_actor_stage
from dualtok.pipelines.io.storage import ShardObject, StorageFault, list_shard_objects

logger = logging.getLogger(__name__)

Streams = Literal["both", "guide", "semantic"]
_MIN_INFLIGHT_BATCHES = 16


class BundleMismatchError(ConfigError):
    """The output already holds shards made by a different bundle, or computed in another dtype:
    nothing is run (exit 2)."""


@dataclass(frozen=True)
class TokenizePlan:
    """Everything a tokenize run needs, resolved from a `TokenizeConfig` by `plan_from_config`
    (tokenize/config.py). No defaults here: they live in the config, once."""

    inputs: list[str]
    output: str
    source: BundleSource
    streams: Streams
    decode: DecodeConfig
    limits: ShardLimits  # caps on tar members, checked before they are read
    parquet: ParquetColumns  # which columns of a Parquet shard hold the image, caption and key
    passthrough: tuple[str, ...]  # source fields copied into every row, in this order
    encoder: StageResources
    read_cpus: float
    read_actors: int
    prefetch_batches: int  # decoded batches held in the object store per encoder actor, at most
    max_shards: int | None
    on_bundle_change: Literal["error", "keep"]
    input_root: str | None  # shard ids are paths under it; None: the corpus's recorded root
    lease: LeaseConfig
    commits: Literal["auto", "driver", "tasks"]  # where shards are committed: `commit_tasks`
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False)
    resolved_config: dict[str, Any] = field(default_factory=dict, hash=False)  # secrets already redacted


    @property
    def required_cpus(self) -> float:
        """Logical CPUs the pipeline needs to make progress: one read actor plus every minimum encoder."""
        return self.read_cpus + self.encoder.actors * self.encoder.cpus_per_actor

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(p for p in ("guide", "semantic") if self.streams in (p, "both"))

    @property
    def inflight_bytes(self) -> int:
        """The object-store bytes the dataset may hold: `prefetch_batches` decoded batches for every
        actor the pool may grow to, and at least `_MIN_INFLIGHT_BATCHES`. Ray Data splits the budget
        between the read and encode stages and only starts a read call when its share holds the call's
        pending output (~2 blocks); below ~6 blocks in all the pipeline stalls."""
        batches = max(self.prefetch_batches * (self.encoder.max_actors or self.encoder.actors), _MIN_INFLIGHT_BATCHES)
        return batches * self.batch_bytes

    @property
    def batch_bytes(self) -> int:
        """Bytes of one encoder batch of decoded images (uint8 RGB at the decode size)."""
        semantic = self.decode.semantic.size**2 * 3 if self.decode.semantic is not None else 0
        return self.encoder.batch_size * (self.decode.size**2 * 3 + semantic)


@dataclass
class RunSummary:
    output: str
    shards_total: int
    shards_skipped: int
    shards_committed: int
    images: int
    errors: int
    seconds: float
    bundle_fingerprint: str
    untrained_parts: list[str]
    dtype: str | None = None  # what the encoders computed in (None: nothing ran and the corpus records none)
    shards_failed: dict[str, str] = field(default_factory=dict)  # shard -> why; not committed, redone next run
    storage_retries: int = 0  # store retries the shard reads took this run (from the read stage's END rows)
    samples: int = 0  # samples in the shards committed this run: images + errors
    errors_by_reason: dict[str, int] = field(default_factory=dict)  # this run's error rows by reason, most first

    @property
    def error_fraction(self) -> float:
        """Errors per sample this run: what the job's `max_error_fraction` gate compares."""
        return self.errors / self.samples if self.samples else 0.0

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


ProgressCallback = Callable[[Progress], None]


def run_tokenize(plan: TokenizePlan, shards: list[ShardObject] | None = None,
                 progress: ProgressCallback | None = None, *, _encoder_stage: type | None = None) -> RunSummary:
    """Tokenize every input shard not yet committed under `plan.output`, holding the output's lease
    (`dualtok.pipelines.io.lease`) from start to end: a second run on the same output fails at once, naming this one.
    `shards` is the inputs' listing when the caller already made it (the job lists before Ray starts,
    to fail fast on a wrong path); None lists them here. `progress` (a terminal's progress line) is
    called after every batch; without it each committed shard is logged at INFO with the rate and ETA.
    `_encoder_stage` replaces `EncodeTokens` for `benchmarks/scale.py`'s stand-in, which takes the model
    cost out; no config or command reaches it."""
    started = time.monotonic()
    run_id = new_run_id()
    if shards is None:
        shards = list_shard_objects(plan.inputs, plan.storage_options or None)
    with Lease(plan.output, run_id, plan.lease, plan.storage_options or None) as lease:
        return _run_held(plan, shards, run_id, lease, started, progress, _encoder_stage)


def _run_held(plan: TokenizePlan, shards: list[ShardObject], run_id: str, lease: Lease,
              started: float, progress: ProgressCallback | None = None,
              encoder_stage: type | None = None) -> RunSummary:
    """The run, while it holds the output's lease; every shard commit checks the lease first."""
    import ray

    objects = {obj.uri: obj for obj in _outside_output(shards, plan)}
    uris = sorted(objects)
    layout, info = _layout(plan)
    plan = dataclasses.replace(plan, source=dataclasses.replace(plan.source, expected_hashes=info["part_hashes"]))
    versions, committed = layout.committed_listed()
    _check_passthrough(committed, plan.passthrough)
    # ids are paths under the corpus's recorded input root, whatever else this run lists
    ids = assign_shard_ids(uris, plan.output, committed, plan.input_root, run_id, plan.storage_options or None)
    _check_bundle(committed, info["bundle_fingerprint"], plan.on_bundle_change)
    skipped = _still_committed(committed, {sid: objects[uri] for sid, uri in ids.items()})
    pending = [sid for sid in sorted(ids) if sid not in skipped]
    if plan.max_shards is not None:
        pending = pending[: plan.max_shards]
    logger.info("%d input shards: %d already committed, %d to do", len(ids), len(skipped), len(pending))
    writer = None
    dtype = corpus_dtype(plan.encoder, committed, plan.on_bundle_change) if pending else _recorded_dtype(committed)
    info = {**info, "dtype": dtype}  # recorded in every file's metadata, every marker and the manifest
    layout = dataclasses.replace(layout, metadata=info)
    if pending:
        if not ray.is_initialized():
            ray.init()
        _warn_if_starved(plan.required_cpus)
        config = plan.resolved_config
        plan = dataclasses.replace(plan, encoder=dataclasses.replace(plan.encoder, dtype=dtype), resolved_config={
            **config, "encoder": {**config.get("encoder", {}), "dtype": dtype}})
        tasks = commit_tasks(plan.commits)
        writer = PartCommits(layout, {sid: ids[sid] for sid in pending}, run_id, tasks, guard=lease.guard,
                             max_inflight=max(8, 2 * (plan.encoder.max_actors or plan.encoder.actors)))
        writer.clear(all_runs=True)  # parts a dead run left: this run holds the lease, they are nobody's
        parts = TokenParts(layout, run_id)
        dataset = _build_dataset(plan, [(sid, ids[sid]) for sid in pending], parts, encoder_stage)
        try:
            _drain(dataset, writer, total=len(pending), progress=progress)
        finally:
            tasks.close()
            writer.clear()
    done, failed = (writer.done, writer.failed) if writer is not None else ({}, {})
    retries = writer.storage_retries if writer is not None else {}
    summary = RunSummary(
        output=plan.output, shards_total=len(ids), shards_skipped=len(skipped), shards_committed=len(done),
        images=sum(m["rows"] for m in done.values()), errors=sum(m["errors"] for m in done.values()),
        seconds=time.monotonic() - started, bundle_fingerprint=info["bundle_fingerprint"], dtype=dtype,
        untrained_parts=info["untrained_parts"], shards_failed=dict(sorted(failed.items())),
        storage_retries=sum(retries.values()),
        samples=sum(m["samples"] for m in done.values()), errors_by_reason=_errors_by_reason(done),
    )
    lease.guard()  # the manifest describes this run's corpus: only while the run still holds the output
    # the corpus now: the markers read at the start, less those redone this run, plus this run's commits
    # (the run holds the output's lease: nobody else wrote markers meanwhile)
    corpus = {**committed, **done}
    _write_manifest(plan, layout, run_id, summary, info, corpus)
    try:
        layout.compact_markers(versions, committed, done, set(failed))
    except StorageFault as fault:  # the index is a cache: the next run reads the markers themselves
        logger.warning("could not write the marker index (the next run reads every marker): %s", fault)
    return summary


def _errors_by_reason(markers: dict[str, dict[str, Any]]) -> dict[str, int]:
    return merge_counts(marker.get("errors_by_reason", {}) for marker in markers.values())


def _layout(plan: TokenizePlan) -> tuple[CorpusLayout, dict[str, Any]]:
    parts = plan.parts
    tokenizer = plan.source.load(parts)  # once on the driver: fingerprint, token widths, vocab sizes
    info: dict[str, Any] = {
        "schema_version": S.CORPUS_SCHEMA_VERSION, "bundle": plan.source.spec,
        "bundle_fingerprint": tokenizer.fingerprint, "part_hashes": tokenizer.info.part_hashes, "preset": tokenizer.info.preset,
        "weights": tokenizer.info.sources, "untrained_parts": tokenizer.info.untrained_parts,
        "image_size": plan.decode.size,
        # how each branch's input was cut from the images (a BLIP-2 / SEED bundle: the whole image resized)
        "preprocess": {part: tokenizer.preprocess(part).describe() for part in parts},
    }
    guide_len = semantic_len = None
    if "guide" in parts:
        guide_len = tokenizer.guide_grid**2
        info.update(guide_grid=tokenizer.guide_grid, guide_size=tokenizer.guide_size, guide_vocab=tokenizer.guide_vocab)
    if "semantic" in parts:
        semantic_len = tokenizer.num_semantic_tokens
        info.update(semantic_tokens=semantic_len, semantic_vocab=tokenizer.semantic_vocab)
    layout = CorpusLayout(plan.output, guide_len, semantic_len, info, plan.storage_options, plan.passthrough)
    return layout, info


def _warn_if_starved(required: float) -> None:
    import ray

    available = ray.cluster_resources().get("CPU", 0.0)
    if available < required:
        # not an error: an autoscaling cluster may add the nodes once the job asks for them
        logger.warning("the pipeline needs %.1f logical CPUs (a read actor + the encoder actors) but the cluster "
                       "has %.1f now; it waits until the autoscaler adds nodes", required, available)


def _still_committed(committed: dict[str, dict[str, Any]], inputs: dict[str, ShardObject]) -> set[str]:
    """The input shards whose marker describes the object listed now. A shard rewritten since its
    commit (another size or version) is pending again, and its files are rewritten under the same
    names. Markers written before markers recorded the input (no `shard_version`) count as committed:
    there is nothing to compare them with, and redoing every old shard would be a surprise."""
    done = set()
    for sid, obj in inputs.items():
        marker = committed.get(sid)
        if marker is None:
            continue
        if "shard_version" in marker and (marker["shard_version"], marker.get("shard_bytes")) != (obj.version, obj.size):
            logger.info("shard %s: input changed since its commit (%s, %s bytes -> %s, %s bytes); redoing it",
                        sid, marker["shard_version"], marker.get("shard_bytes"), obj.version, obj.size)
            continue
        done.add(sid)
    return done


def _outside_output(shards: list[ShardObject], plan: TokenizePlan) -> list[ShardObject]:
    """The listed shards, less the corpus's own files: inputs given as a prefix above the output
    would otherwise list its Parquet files as shards."""
    output = normalize_root(plan.output, plan.storage_options or None)
    kept = [obj for obj in shards if not obj.uri.startswith(output)]
    if len(kept) < len(shards):
        logger.info("%d listed files lie under the output %s: not input shards", len(shards) - len(kept), output)
    return kept


def _check_passthrough(committed: dict[str, dict[str, Any]], passthrough: tuple[str, ...]) -> None:
    """Every file of a corpus has the same columns: a run asking for other passthrough columns than
    the committed shards have stops before anything is written (markers without the key have none)."""
    others = sorted({tuple(m.get("passthrough", ())) for m in committed.values()} - {passthrough})
    if others:
        raise ConfigError(
            f"the corpus's committed shards have passthrough columns {list(others[0]) or 'none'}, this run asks "
            f"for {list(passthrough) or 'none'}: every file of a corpus has the same columns. Rerun with "
            f"passthrough=[{','.join(others[0])}], or write to a new output")


def _check_bundle(committed: dict[str, dict[str, Any]], fingerprint: str, policy: str) -> None:
    others = sorted({m.get("bundle_fingerprint") for m in committed.values()} - {fingerprint})
    if others and policy == "error":
        raise BundleMismatchError(
            f"the output holds shards made by bundle(s) {others}, this run uses {fingerprint}; write to a new "
            "output, or set on_bundle_change=keep to keep them and tokenize only the new shards"
        )


def corpus_dtype(encoder: StageResources, committed: dict[str, dict[str, Any]], policy: str) -> str:
    """The dtype this run's encoders compute in. Tokens depend on it (float32 and bfloat16 agree on
    ~97-98 % of ids: docs/benchmarks.md), so a corpus keeps one: `auto` takes the one its markers
    record; for a new corpus (or markers from before markers recorded it) bfloat16 on GPUs and on CPUs
    that compute it natively, float32 elsewhere. On a CPU-only cluster the driver's CPU decides: set
    `encoder.dtype` where the nodes differ. A dtype other than the corpus's is refused as another bundle
    is (`on_bundle_change`)."""
    from dualtok.pipelines.actors import native_bf16_cpu

    recorded = _recorded_dtype(committed)
    if encoder.dtype != "auto":
        dtype = encoder.dtype
    elif recorded is not None:
        dtype = recorded
    else:
        on_gpu = encoder.device.startswith("cuda") or (encoder.device == "auto" and encoder.gpus_per_actor > 0)
        dtype = "bfloat16" if on_gpu or native_bf16_cpu() else "float32"
    others = sorted(_recorded_dtypes(committed) - {dtype})
    if others and policy == "error":
        raise BundleMismatchError(
            f"the output holds shards tokenized in {', '.join(others)}, this run computes in {dtype}: their ids "
            f"would differ. Rerun with encoder.dtype={others[0]}, write to a new output, or set "
            "on_bundle_change=keep to keep them and tokenize only the new shards")
    logger.info("encoders compute in %s%s", dtype, " (the corpus's own)" if dtype == recorded else "")
    return dtype


def _recorded_dtypes(committed: dict[str, dict[str, Any]]) -> set[str]:
    """The dtypes the corpus's markers record (markers from before they recorded one: none)."""
    return {m["dtype"] for m in committed.values() if m.get("dtype")}


def _recorded_dtype(committed: dict[str, dict[str, Any]]) -> str | None:
    """The dtype the corpus's markers record when they agree on one; None for none or several."""
    recorded = _recorded_dtypes(committed)
    return recorded.pop() if len(recorded) == 1 else None


def _build_dataset(plan: TokenizePlan, shards: list[tuple[str, str]], parts: TokenParts,
                   encoder_stage: type | None = None) -> Any:
    import ray
    from ray.data import ExecutionResources

    items = [{S.SHARD: sid, S.SHARD_URI: uri} for sid, uri in shards]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # Ray Data merges what a task yields into blocks of up to `target_max_block_size` (128 MiB):
    # a whole shard of decoded images would become one block, handed to ONE actor as one task,
    # and with the budget below holding a block or two the other actors would sit idle. One
    # encoder batch per block lets every actor take work and makes the budget count batches.
    ds.context.target_max_block_size = plan.batch_bytes
    # read blocks of one encoder batch each: the unit the in-flight budget below is counted in
    read = ReadShards(plan.storage_options, rows_per_batch=plan.encoder.batch_size, limits=plan.limits,
                      parquet=plan.parquet, passthrough=plan.passthrough)
    ds = add_read_stage(ds, read, DecodeImages(plan.decode), num_cpus=plan.read_cpus, max_actors=plan.read_actors)
    from dualtok.pipelines.tokenize.encode import EncodeTokens  # torch and the models: the actors' imports

    ds = add_actor_stage(ds, encoder_stage or EncodeTokens, plan.encoder, source=plan.source, streams=plan.parts,
                         parts=parts)
    # Decoding is ~100x cheaper than encoding on CPU; left to Ray Data's default budget (half the
    # object store) the read actors race through the whole input ahead of the encoders, and the
    # session's memory grows with the input. This dataset's own context caps it.
    ds.context.execution_options.resource_limits = ExecutionResources.for_limits(
        object_store_memory=plan.inflight_bytes)
    return ds


def _drain(dataset: Any, writer: PartCommits, total: int, progress: ProgressCallback | None = None) -> None:
    """Hand every batch (ERROR, END and PART rows: the token rows stay in their part files) to the
    committer, then wait for the commits it started; report progress per batch (`progress`) or per
    commit (the log). Images count the rows as their parts arrive (a re-delivered part counts twice
    here, never in the summary, which counts committed rows)."""
    done = images = 0
    started = time.monotonic()

    def report(markers: list[dict[str, Any]]) -> None:
        nonlocal done
        for marker in markers:
            done += 1
            now = Progress(done=done, total=total, images=images, seconds=time.monotonic() - started)
            if progress is None:
                logger.info("committed shard %s: %d rows, %d errors | %s",
                            marker["shard"], marker["rows"], marker["errors"], format_progress(now))
        if progress is not None:
            progress(Progress(done=done, total=total, images=images, seconds=time.monotonic() - started))

    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        images += int(batch[S.PART_ROWS][batch[S.ROW_KIND] == S.PART].sum())
        report(writer.add(batch))
    report(writer.finish())
    if writer.pending:  # failed shards are not pending: they were dropped when they failed
        raise RuntimeError(f"the pipeline ended with shards still incomplete: {sorted(writer.pending)}")


class RayTasks:
    """`PartCommits`' commits as Ray tasks. They reserve no CPU: they wait on the store, and must not
    queue behind the encoder actors that hold the CPUs (on a CPU-only cluster, all of them)."""

    def __init__(self) -> None:
        import ray

        self.ray = ray
        self.remote: dict[Any, Any] = {}

    def submit(self, fn: Callable[..., dict[str, Any]], *args: Any) -> Any:
        if fn not in self.remote:
            self.remote[fn] = self.ray.remote(num_cpus=0, max_retries=3)(fn)
        return self.remote[fn].remote(*args)

    def ready(self, handles: list[Any], wait: bool) -> list[Any]:
        if not handles:
            return []
        if wait:
            self.ray.wait(handles, num_returns=1)
        return self.ray.wait(handles, num_returns=len(handles), timeout=0)[0]

    def result(self, handle: Any) -> dict[str, Any]:
        """The commit's outcome; a task that died or raised fails its shard, not the run."""
        try:
            return self.ray.get(handle)
        except self.ray.exceptions.RayError as err:
            return task_failed(err)

    def close(self) -> None:
        """Nothing to release: the tasks are Ray's, and `PartCommits.finish` waited for them."""


def commit_tasks(commits: str) -> Tasks:
    """Where this run commits shards (`TokenizeConfig.commits`): "auto" is the driver's threads when
    the cluster is one live node without GPUs (this machine: a few images/s, and no worker process
    to start per job), Ray tasks otherwise (no token row reaches the driver)."""
    import ray

    if commits == "auto":
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        commits = "driver" if len(nodes) == 1 and not nodes[0]["Resources"].get("GPU") else "tasks"
    logger.info("shards are committed in %s", "the driver's threads" if commits == "driver" else "Ray tasks")
    return ThreadTasks() if commits == "driver" else RayTasks()


def _write_manifest(plan: TokenizePlan, layout: CorpusLayout, run_id: str, summary: RunSummary,
                    info: dict[str, Any], markers: dict[str, dict[str, Any]]) -> None:
    """The run's record: totals over the corpus, never one entry per shard (a corpus of 10^5 shards
    would rewrite megabytes per run; the markers and their index enumerate)."""
    bundles: dict[str, int] = {}
    for marker in markers.values():
        fingerprint = str(marker.get("bundle_fingerprint"))
        bundles[fingerprint] = bundles.get(fingerprint, 0) + 1
    manifest = {
        "run_id": run_id, "kind": "tokenize", "config": plan.resolved_config, "versions": package_versions(),
        "bundle": info,
        "this_run": {"shards_committed": summary.shards_committed, "shards_skipped": summary.shards_skipped,
                     "shards_failed": summary.shards_failed, "storage_retries": summary.storage_retries,
                     "images": summary.images, "errors": summary.errors, "seconds": round(summary.seconds, 3),
                     "images_per_second": round(summary.images_per_second, 3)},
        "corpus": {"shards": len(markers), "rows": sum(m["rows"] for m in markers.values()),
                   "errors": sum(m["errors"] for m in markers.values()),
                   "samples": sum(m["samples"] for m in markers.values()),
                   "bundles": sorted({m.get("bundle_fingerprint") for m in markers.values()}),
                   "shards_by_bundle": dict(sorted(bundles.items())),
                   "markers": f"{MARKERS_DIR}/<shard>.json (compacted in {MARKER_INDEX})"},
    }
    out = layout.folder()
    out.write_json(manifest, RUNS_DIR, f"{run_id}.json")
    out.write_json(manifest, "manifest.json")
