"""`dualtok tokenize`: the main job. Its config type, and the wiring from config to pipeline.

Exit codes: 0 every pending shard committed; 2 a config or input error, or another run holds the
output (nothing was run: a wrong key, no bundle=, an input that does not exist or a folder without
shards, a path that is not a bundle, an output that cannot be created, a shard outside the corpus's
root; all checked before Ray starts); 3 partial failure: some shards failed this run (a storage fault
that outlived the retries, a tar that cannot be read to its end), are listed with the reason, and are
not committed: the others are, and the next run redoes the failed ones; also a run that lost its
output lease part-way; 4 too many bad samples: more than `max_error_fraction` of this run's samples
are error rows (what was done is committed: the rows are right, the input is bad). Anything else
(1) is a failure of the job itself.

Resources left unset size themselves to what Ray reports (`default_resources`): one encoder actor per
GPU and 4 read actors per GPU on GPU clusters, the cores filled on CPU-only ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Literal


from dualtok.jobs.checks import EXIT_TOO_MANY_ERRORS, check_bundle, check_output, too_many_errors
from dualtok.pipelines.cluster import RayConfig, init_ray
from dualtok.pipelines.io.storage import StorageConfig
from dualtok.jobs.config import add_config_arguments, config_from_args
from dualtok.pipelines.config import BUNDLE_REQUIRED, to_dict
from dualtok.pipelines.io.decode import DecodeConfig
from dualtok.pipelines.io.lease import LeaseConfig, LeaseLostError
from dualtok.pipelines.progress import TerminalProgress, format_duration, quiet_ray_data
from dualtok.pipelines.io.shards import ShardLimits
from dualtok.pipelines.actors import BundleSource, StageResources
from dualtok.pipelines.io.storage import list_shard_objects
from dualtok.pipelines.tokenize.pipeline import RunSummary, TokenizePlan, run_tokenize

logger = logging.getLogger(__name__)

EXIT_PARTIAL_FAILURE = 3  # some shards failed this run; the rest committed (0 = all, 2 = config/input error)
READ_ACTORS_PER_GPU = 4  # decode actors that keep one GPU's encoder fed (docs/cluster.md)


@dataclass(frozen=True)
class ImageConfig:
    """Image preprocessing and the caps that bound what one sample may cost; the encoder input size
    comes from the bundle. A sample over a cap is an error row with the cap's name in its reason.
    The defaults are those of `DecodeConfig` and `ShardLimits`, the types that apply them."""

    max_pixels: int = DecodeConfig.max_pixels  # width x height, read from the header
    max_decoded_bytes: int = DecodeConfig.max_decoded_bytes  # the decoded image in Pillow's mode (16-bit: 2 B/px)
    max_member_bytes: int = ShardLimits.max_member_bytes  # an image or caption member, from its tar header
    max_caption_bytes: int = ShardLimits.max_caption_bytes  # a .txt or .json member
    min_side: int = DecodeConfig.min_side
    jpeg_draft: bool = DecodeConfig.draft

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_decoded_bytes", "max_member_bytes", "max_caption_bytes", "min_side"):
            if getattr(self, name) < 1:
                raise ValueError(f"image.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def limits(self) -> ShardLimits:
        return ShardLimits(max_member_bytes=self.max_member_bytes, max_caption_bytes=self.max_caption_bytes)

    def decode(self, size: int) -> DecodeConfig:
        return DecodeConfig(size=size, max_pixels=self.max_pixels, max_decoded_bytes=self.max_decoded_bytes,
                            min_side=self.min_side, draft=self.jpeg_draft)


@dataclass(frozen=True)
class EncoderResources(StageResources):
    """The encoder pool as the config takes it: with `actors`, `max_actors`, `gpus_per_actor` and
    `cpus_per_actor` all unset (None) the job sizes the pool to the cluster (`default_resources`);
    set any of them and the others take `StageResources`' defaults (1 actor, 1 CPU, no GPU)."""

    actors: int | None = None  # type: ignore[assignment]  # None: sized to the cluster
    gpus_per_actor: float | None = None  # type: ignore[assignment]
    cpus_per_actor: float | None = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        too_few = self.max_actors is not None and self.max_actors < (self.actors or 1)
        if self.batch_size < 1 or (self.actors is not None and self.actors < 1) or too_few:
            raise ValueError(f"stage resources out of range: {self}")

    @property
    def is_sized(self) -> bool:
        """True when the user set none of the pool's sizing fields."""
        return all(getattr(self, f) is None for f in _SIZED_ENCODER_FIELDS)

    def resources(self, sized: StageResources | None = None) -> StageResources:
        """The stage's resources: `sized` when nothing here is set (and it is given), else the fields
        set here over `StageResources`' defaults; batch size, device and dtype always from here."""
        if self.is_sized and sized is not None:
            return dataclasses.replace(sized, batch_size=self.batch_size, device=self.device, dtype=self.dtype)
        chosen = {f: getattr(self, f) for f in _SIZED_ENCODER_FIELDS if getattr(self, f) is not None}
        return StageResources(batch_size=self.batch_size, device=self.device, dtype=self.dtype, **chosen)


_SIZED_ENCODER_FIELDS = ("actors", "max_actors", "gpus_per_actor", "cpus_per_actor")


@dataclass(frozen=True)
class TokenizeConfig:
    inputs: list[str] = field(default_factory=list)  # prefixes, globs, {00000..00099} braces, @list files
    output: str = ""
    bundle: str = ""  # required: a bundle path/URI, or a preset name (tiny, small, paper: random weights)
    seed: int = 0  # weights seed when `bundle` is a preset
    streams: Literal["both", "guide", "semantic"] = "both"
    image: ImageConfig = ImageConfig()
    # one actor pool; each actor holds every requested branch; its size sized to the cluster unless set
    encoder: EncoderResources = EncoderResources()
    read_cpus: float | None = None  # per read+decode actor; None: 1 on GPU clusters, 0.25 on CPU-only ones
    # read+decode actors: the pool starts with one and grows to this many when encoders wait; None: 4 per GPU, 1 on CPU
    read_actors: int | None = None
    max_error_fraction: float = 0.5  # exit 4 when more of this run's samples than this are errors; 1.0: never
    prefetch_batches: int = 4  # decoded batches in flight per encoder actor: bounds the object store's use
    max_shards: int | None = None  # tokenize at most this many pending shards this run
    on_bundle_change: Literal["error", "keep"] = "error"
    # Shard ids are paths under this folder, fixed when the corpus is first written (recorded in
    # <output>/_corpus.json; unset: the recorded root, or on the first run the shards' common folder).
    # Nightly date folders (s3://b/2026-12-01/...) need the prefix above them from the first night: s3://b/
    input_root: str | None = None
    lease: LeaseConfig = LeaseConfig()  # one writer per output: ttl_s, and wait_s to wait for a running one
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("inputs is empty: give shard URIs, a prefix, a glob, a brace pattern or @list")
        if not self.output:
            raise ValueError("output is empty: give the corpus URI (a folder or s3://bucket/prefix)")
        if not self.bundle:
            raise ValueError(BUNDLE_REQUIRED)
        if self.prefetch_batches < 1 or (self.read_actors or 1) < 1 or (self.read_cpus or 1) <= 0:
            raise ValueError(f"prefetch_batches and read_actors must be >= 1 and read_cpus > 0, got "
                             f"{self.prefetch_batches}, {self.read_actors} and {self.read_cpus}")
        if not 0.0 <= self.max_error_fraction <= 1.0:
            raise ValueError(f"max_error_fraction must be in [0, 1] (1.0: no limit), got {self.max_error_fraction}")


def cpu_node_resources(cpus: int, max_actors: int = 4) -> tuple[float, StageResources]:
    """(read_cpus, encoder resources) that fill a CPU-only machine of `cpus` cores.

    Decoding costs ~1-2 % of encoding on CPU, so one read actor gets a quarter CPU and the rest goes
    to encoder actors: one per core up to `max_actors` (each holds both branches' weights and
    activations: ~0.7 GB with `small`), then more torch threads per actor. Single-threaded actors
    side by side beat one actor using every core (torch's intra-op scaling on 2 cores is ~1.6x;
    docs/benchmarks.md). The job uses it when the config leaves resources unset on a CPU-only
    cluster (`default_resources`); the demo uses it for this machine.
    """
    actors = max(1, min(cpus, max_actors))
    per_actor = max(cpus - 0.25, 0.75) / actors
    per_actor = math.floor(per_actor * 1000) / 1000  # a short number that never sums past `cpus`
    return 0.25, StageResources(actors=actors, cpus_per_actor=per_actor)


@dataclass(frozen=True)
class Resources:
    """The read and encode stages' resources, as the plan takes them."""

    read_cpus: float
    read_actors: int
    encoder: StageResources


def default_resources(cpus: float, gpus: float, encoder: StageResources = StageResources(),
                      node_cpus: float | None = None) -> Resources:
    """What a cluster of `cpus` CPUs and `gpus` GPUs runs when the config leaves resources unset.

    GPUs: one encoder actor per GPU, as an autoscaling pool (one at the start, up to one per GPU, so
    a cluster that is still adding GPU nodes starts at once), fed by 4 read actors per GPU
    (docs/cluster.md measured 4 decode actors per GPU). CPU only: `cpu_node_resources` for a node of
    `node_cpus` (the largest; None: one node of `cpus`), the cores filled; on several nodes the pool
    grows to that many actors per node, with one read actor per node. `encoder`'s batch size, device
    and dtype are kept.
    """
    if gpus >= 1:
        count = int(gpus)
        return Resources(1.0, READ_ACTORS_PER_GPU * count, dataclasses.replace(
            encoder, actors=1, max_actors=count, gpus_per_actor=1.0, cpus_per_actor=1.0))
    per_node = max(1, int(node_cpus or cpus))
    nodes = max(1, int(cpus // per_node))
    read_cpus, sized = cpu_node_resources(per_node)
    return Resources(read_cpus, nodes, dataclasses.replace(
        encoder, actors=sized.actors, max_actors=sized.actors * nodes if nodes > 1 else None, gpus_per_actor=0.0,
        cpus_per_actor=sized.cpus_per_actor))


def resolve_resources(config: TokenizeConfig, cpus: float, gpus: float, node_cpus: float | None = None) -> Resources:
    """The config's resources, with what it leaves unset sized to the cluster: the encoder pool when
    none of its sizing fields was changed, `read_cpus`/`read_actors` when they are None."""
    sized = default_resources(cpus, gpus, node_cpus=node_cpus)
    return Resources(
        read_cpus=sized.read_cpus if config.read_cpus is None else config.read_cpus,
        read_actors=sized.read_actors if config.read_actors is None else config.read_actors,
        encoder=_encoder(config.encoder, sized.encoder),
    )


def _encoder(encoder: StageResources, sized: StageResources | None) -> StageResources:
    """The config's encoder as the stage takes it (code may pass a plain, fully set `StageResources`)."""
    return encoder.resources(sized) if isinstance(encoder, EncoderResources) else encoder


def plan_from_config(config: TokenizeConfig, resources: Resources | None = None) -> TokenizePlan:
    """The plan; `resources` None: the config's, 1 read CPU and 1 read actor where it leaves them unset."""
    options = config.storage.storage_options()
    if resources is None:
        resources = Resources(config.read_cpus or 1.0, config.read_actors or 1, _encoder(config.encoder, None))
    source = BundleSource(config.bundle, seed=config.seed, storage_options=options)
    size = _input_size(source, config.streams)
    return TokenizePlan(
        inputs=list(config.inputs), output=config.output, source=source, streams=config.streams,
        decode=config.image.decode(size), limits=config.image.limits,
        encoder=resources.encoder, read_cpus=resources.read_cpus, read_actors=resources.read_actors,
        prefetch_batches=config.prefetch_batches,
        max_shards=config.max_shards,
        on_bundle_change=config.on_bundle_change, input_root=config.input_root, lease=config.lease,
        # the manifest records the resources the run used, sized or set
        storage_options=options, resolved_config=to_dict(dataclasses.replace(
            config, read_cpus=resources.read_cpus, read_actors=resources.read_actors, encoder=resources.encoder)),
    )


def _input_size(source: BundleSource, streams: str) -> int:
    """Decode once at the largest input any requested branch takes (guide 256, semantic 224)."""
    from dualtok_core.presets import get_preset

    if source.is_preset:
        preset = get_preset(source.spec)
        sizes = {"guide": preset.guide.get("image_size", 256), "semantic": preset.semantic.get("image_size", 224)}
    else:
        sizes = _bundle_input_sizes(source)
    wanted = [sizes[p] for p in ("guide", "semantic") if streams in (p, "both")]
    return max(wanted)


def _bundle_input_sizes(source: BundleSource) -> dict[str, int]:
    import json

    from dualtok.pipelines.io.storage import filesystem, join

    sizes = {}
    for part, default in (("guide", 256), ("semantic", 224)):
        fs, path = filesystem(join(source.spec, part, "config.json"), source.storage_options or None)
        sizes[part] = json.loads(fs.cat_file(path)).get("image_size", default) if fs.exists(path) else default
    return sizes


def summary_record(summary: RunSummary, exit_code: int) -> dict[str, Any]:
    """The run as one JSON object (`--json`): what a scheduler needs to decide what happens next."""
    return {
        "job": "tokenize", "exit_code": exit_code, "output": summary.output,
        "shards": {"total": summary.shards_total, "committed": summary.shards_committed,
                   "skipped": summary.shards_skipped, "failed": dict(summary.shards_failed)},
        "images": summary.images, "errors": summary.errors, "samples": summary.samples,
        "errors_by_reason": dict(summary.errors_by_reason), "seconds": round(summary.seconds, 3),
        "images_per_second": round(summary.images_per_second, 3), "storage_retries": summary.storage_retries,
        "bundle_fingerprint": summary.bundle_fingerprint, "untrained_parts": list(summary.untrained_parts),
    }


def print_summary(summary: RunSummary, exit_code: int = 0, as_json: bool = False) -> None:
    """The run's summary on stdout: a few lines for people, or with `as_json` one JSON object only."""
    if as_json:
        print(json.dumps(summary_record(summary, exit_code), sort_keys=True))
        return
    print(
        f"tokenize: {summary.shards_committed} shards committed, {summary.shards_skipped} already done "
        f"(of {summary.shards_total}); {summary.images} images, {summary.errors} errors, "
        f"{summary.images_per_second:.1f} images/s in {format_duration(summary.seconds)}"
    )
    print(f"corpus:   {summary.output}  (bundle {summary.bundle_fingerprint})")
    if summary.storage_retries:
        print(f"storage:  {summary.storage_retries} store retries while reading shards")
    if summary.shards_failed:
        print(f"FAILED:   {len(summary.shards_failed)} shards were not committed; the next run redoes them:")
        for shard, reason in summary.shards_failed.items():
            print(f"  {shard}: {' '.join(reason.split())}")  # one line per shard
    if summary.untrained_parts:
        print(f"NOTE: the {', '.join(summary.untrained_parts)} weights are random-initialised (untrained): "
              "the tokens exercise the pipeline but carry no meaning.")


def terminal_progress(args: argparse.Namespace, label: str) -> TerminalProgress | None:
    """A progress line redrawn on stderr when stderr is a terminal and neither -q nor --json is given;
    None otherwise (the pipeline then logs one line per committed shard)."""
    if getattr(args, "quiet", False) or getattr(args, "json", False) or not sys.stderr.isatty():
        return None
    return TerminalProgress(label)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TokenizeConfig)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(TokenizeConfig, args)
    options = config.storage.storage_options()
    shards = list_shard_objects(config.inputs, options or None)  # once, before Ray: a wrong path fails in a second
    check_bundle(config.bundle, options)
    check_output(config.output, options)
    init_ray(config.ray, min_cpus=_explicit_cpus(config))
    plan = plan_from_config(config, _cluster_resources(config))
    quiet_ray_data(getattr(args, "verbose", 0))  # before the dataset is built: it copies the context
    reporter = terminal_progress(args, "tokenize")
    try:
        summary = run_tokenize(plan, shards, progress=reporter)
    except LeaseLostError as err:  # shards committed before the loss stand; the rest are the next run's
        print(f"dualtok tokenize: stopped: {err}", file=sys.stderr)
        return EXIT_PARTIAL_FAILURE
    finally:
        if reporter is not None:
            reporter.close()
    too_many = summary.error_fraction > config.max_error_fraction
    code = EXIT_TOO_MANY_ERRORS if too_many else EXIT_PARTIAL_FAILURE if summary.shards_failed else 0
    print_summary(summary, code, as_json=getattr(args, "json", False))
    if too_many:
        message = too_many_errors(summary.errors, summary.samples, summary.errors_by_reason, config.max_error_fraction)
        print(f"dualtok tokenize: error: {message}", file=sys.stderr)
    return code


def _explicit_cpus(config: TokenizeConfig) -> float:
    """CPUs a local cluster needs for the resources the user set (sized ones fit any cluster)."""
    explicit = resolve_resources(config, cpus=1, gpus=0)
    return explicit.read_cpus + explicit.encoder.actors * explicit.encoder.cpus_per_actor


def _cluster_resources(config: TokenizeConfig) -> Resources:
    """`resolve_resources` for the cluster Ray reports now, logged in one line."""
    import ray

    total = ray.cluster_resources()
    node_cpus = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=None)
    resources = resolve_resources(config, total.get("CPU", 1.0), total.get("GPU", 0.0), node_cpus or None)
    enc = resources.encoder
    logger.info("resources (cluster: %g CPUs, %g GPUs): %d-%s encoder actors x (%g CPU, %g GPU, batch %d), "
                "up to %d read actors x %g CPU", total.get("CPU", 0), total.get("GPU", 0), enc.actors,
                enc.max_actors or enc.actors, enc.cpus_per_actor, enc.gpus_per_actor, enc.batch_size,
                resources.read_actors, resources.read_cpus)
    return resources
