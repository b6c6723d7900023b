"""`dualtok tokenize`: the main job. Its config type, and the wiring from config to pipeline.

Exit codes: 0 every pending shard committed; 2 a config or input error, or another run holds the
output (nothing was run: a wrong key, inputs that match no shard, a shard outside the corpus's root);
3 partial failure: some shards failed this run (a storage fault that outlived the retries, a tar that
cannot be read to its end), are listed with the reason, and are not committed: the others are, and
the next run redoes the failed ones; also a run that lost its output lease part-way. Anything else
(1) is a failure of the job itself.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import dataclass, field
from typing import Literal

from jobs.job_config import RayConfig, StorageConfig, add_config_arguments, config_from_args, init_ray
from pipelines.configuration import to_dict
from pipelines.decode import DecodeConfig
from pipelines.lease import LeaseConfig, LeaseLostError
from pipelines.shards import ShardLimits
from pipelines.stages import BundleSource, StageResources
from pipelines.tokenize import RunSummary, TokenizePlan, run_tokenize

logger = logging.getLogger(__name__)

EXIT_PARTIAL_FAILURE = 3  # some shards failed this run; the rest committed (0 = all, 2 = config/input error)


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
class TokenizeConfig:
    inputs: list[str] = field(default_factory=list)  # prefixes, globs, {00000..00099} braces, @list files
    output: str = ""
    bundle: str = "small"  # a bundle path/URI, or a preset name (random weights)
    seed: int = 0  # weights seed when `bundle` is a preset
    streams: Literal["both", "guide", "semantic"] = "both"
    image: ImageConfig = ImageConfig()
    encoder: StageResources = StageResources()  # one actor pool; each actor holds every requested branch
    read_cpus: float = 1.0  # per read+decode actor
    read_actors: int = 1  # read+decode actors: the pool starts with one and grows to this many when encoders wait
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
        if self.prefetch_batches < 1 or self.read_actors < 1 or self.read_cpus <= 0:
            raise ValueError(f"prefetch_batches and read_actors must be >= 1 and read_cpus > 0, got "
                             f"{self.prefetch_batches}, {self.read_actors} and {self.read_cpus}")


def cpu_node_resources(cpus: int, max_actors: int = 4) -> tuple[float, StageResources]:
    """(read_cpus, encoder resources) that fill a CPU-only machine of `cpus` cores.

    Decoding costs ~1-2 % of encoding on CPU, so one read actor gets a quarter CPU and the rest goes
    to encoder actors: one per core up to `max_actors` (each holds both branches' weights and
    activations: ~0.7 GB with `small`), then more torch threads per actor. Single-threaded actors
    side by side beat one actor using every core (torch's intra-op scaling on 2 cores is ~1.6x;
    docs/benchmarks.md). The job's defaults (1 read CPU, one 1-CPU actor) suit GPU nodes instead.
    """
    actors = max(1, min(cpus, max_actors))
    per_actor = max(cpus - 0.25, 0.75) / actors
    per_actor = math.floor(per_actor * 1000) / 1000  # a short number that never sums past `cpus`
    return 0.25, StageResources(actors=actors, cpus_per_actor=per_actor)


def plan_from_config(config: TokenizeConfig) -> TokenizePlan:
    options = config.storage.storage_options()

    source = BundleSource(config.bundle, seed=config.seed, storage_options=options)
    size = _input_size(source, config.streams)
    return TokenizePlan(
        inputs=list(config.inputs), output=config.output, source=source, streams=config.streams,
        decode=config.image.decode(size), limits=config.image.limits,
        encoder=config.encoder, read_cpus=config.read_cpus, read_actors=config.read_actors,
        prefetch_batches=config.prefetch_batches,
        max_shards=config.max_shards,
        on_bundle_change=config.on_bundle_change, input_root=config.input_root, lease=config.lease,
        storage_options=options, resolved_config=to_dict(config),
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

    from pipelines.storage import filesystem, join

    sizes = {}
    for part, default in (("guide", 256), ("semantic", 224)):
        fs, path = filesystem(join(source.spec, part, "config.json"), source.storage_options or None)
        sizes[part] = json.loads(fs.cat_file(path)).get("image_size", default) if fs.exists(path) else default
    return sizes


def print_summary(summary: RunSummary) -> None:
    print(
        f"tokenize: {summary.shards_committed} shards committed, {summary.shards_skipped} already done "
        f"(of {summary.shards_total}); {summary.images} images, {summary.errors} errors, "
        f"{summary.images_per_second:.1f} images/s"
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(TokenizeConfig, args)
    plan = plan_from_config(config)
    init_ray(config.ray, min_cpus=plan.required_cpus)
    try:
        summary = run_tokenize(plan)
    except LeaseLostError as err:  # shards committed before the loss stand; the rest are the next run's
        print(f"dualtok tokenize: stopped: {err}", file=sys.stderr)
        return EXIT_PARTIAL_FAILURE
    print_summary(summary)
    return EXIT_PARTIAL_FAILURE if summary.shards_failed else 0
