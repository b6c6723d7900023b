"""`dualtok tokenize`: the main job. Its config type, and the wiring from config to pipeline."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from typing import Literal

from jobs.job_config import RayConfig, StorageConfig, add_config_arguments, config_from_args, init_ray
from pipelines.configuration import to_dict
from pipelines.decode import DecodeConfig
from pipelines.stages import BundleSource, StageResources
from pipelines.tokenize import RunSummary, TokenizePlan, run_tokenize

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageConfig:
    """Image preprocessing; the encoder input size comes from the bundle."""

    max_pixels: int = 64_000_000
    min_side: int = 16
    jpeg_draft: bool = True


@dataclass(frozen=True)
class TokenizeConfig:
    inputs: list[str] = field(default_factory=list)  # prefixes, globs, {00000..00099} braces, @list files
    output: str = ""
    bundle: str = "small"  # a bundle path/URI, or a preset name (random weights)
    seed: int = 0  # weights seed when `bundle` is a preset
    streams: Literal["both", "guide", "semantic"] = "both"
    image: ImageConfig = ImageConfig()
    guide: StageResources = StageResources()
    semantic: StageResources = StageResources()
    read_cpus: float = 1.0
    max_shards: int | None = None  # tokenize at most this many pending shards this run
    on_bundle_change: Literal["error", "keep"] = "error"
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("inputs is empty: give shard URIs, a prefix, a glob, a brace pattern or @list")
        if not self.output:
            raise ValueError("output is empty: give the corpus URI (a folder or s3://bucket/prefix)")


def plan_from_config(config: TokenizeConfig) -> TokenizePlan:
    options = config.storage.storage_options()

    source = BundleSource(config.bundle, seed=config.seed, storage_options=options)
    size = _input_size(source, config.streams)
    return TokenizePlan(
        inputs=list(config.inputs), output=config.output, source=source, streams=config.streams,
        decode=DecodeConfig(size=size, max_pixels=config.image.max_pixels, min_side=config.image.min_side,
                            draft=config.image.jpeg_draft),
        guide=config.guide, semantic=config.semantic, read_cpus=config.read_cpus, max_shards=config.max_shards,
        on_bundle_change=config.on_bundle_change, storage_options=options, resolved_config=to_dict(config),
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
    if summary.untrained_parts:
        print(f"NOTE: the {', '.join(summary.untrained_parts)} weights are random-initialised (untrained): "
              "the tokens exercise the pipeline but carry no meaning.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(TokenizeConfig, args)
    plan = plan_from_config(config)
    init_ray(config.ray, min_cpus=plan.required_cpus)
    print_summary(run_tokenize(plan))
    return 0
