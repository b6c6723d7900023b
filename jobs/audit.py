"""`dualtok audit`: reconstruction audits of a token corpus (Ray Data), or with `--stats-only`
the corpus statistics alone. Its config type, and the wiring from config to pipeline."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

from dualtok.jobs.checks import EXIT_TOO_MANY_ERRORS, check_bundle, check_output, too_many_errors
from dualtok.pipelines.cluster import RayConfig, init_ray
from dualtok.pipelines.io.storage import StorageConfig
from dualtok.jobs.config import add_config_arguments, config_from_args
from dualtok.pipelines.audit.plan import BASE_VARIANTS, ReportSettings
from dualtok.pipelines.audit.index import parse_thresholds
from dualtok.pipelines.config import ConfigError, to_dict
from dualtok.pipelines.audit.perceptual import PerceptualWeights
from dualtok.pipelines.progress import quiet_ray_data
from dualtok.pipelines.actors import StageResources

logger = logging.getLogger(__name__)

DEFAULT_SAMPLE_SIZE = 64  # rows audited when neither sample_size nor sample_fraction is given


@dataclass(frozen=True)
class AuditConfig:
    corpus: str = ""  # the token corpus (the tokenize job's output)
    output: str = ""  # the audit folder: tables, images, summary.json, index.html
    sources: list[str] = field(default_factory=list)  # source shards; empty: each shard's recorded shard_uri
    bundle: str = ""  # bundle path/URI or preset; empty: the bundle the corpus records
    bundle_seed: int | None = None  # weights seed of a preset bundle; None: the corpus's
    guide_bundles: list[str] = field(default_factory=list)  # extra guide branches (16/32/128 px ...) to compare
    variants: list[str] = field(default_factory=lambda: list(BASE_VARIANTS))
    sample_size: int | None = None
    sample_fraction: float | None = None
    seed: int = 0  # the sample and the diffusion noise
    size: int = 256  # output size of every reconstruction (and of the originals it is compared with)
    steps: int = 25  # DDIM steps of the whole schedule; dual runs int(strength * steps) of them
    strength: float = 0.7
    guidance: float = 3.0
    inversion_condition: Literal["unconditional", "semantic"] = "unconditional"
    slice_size: int = 16  # sampled images per unit of work (committed together)
    reconstruct: StageResources = StageResources(batch_size=4)  # batch_size: images per forward pass
    score: StageResources = StageResources()  # batch_size: images per LPIPS/CLIP forward pass
    fetch_cpus: float = 1.0
    metrics: PerceptualWeights = PerceptualWeights()
    report: ReportSettings = ReportSettings()  # grid_images, worst_k, best_k
    corpus_stats: bool = True  # include the corpus statistics section in the report
    stats_only: bool = False  # statistics only, no reconstruction (as `dualtok stats`)
    max_slices: int | None = None  # audit at most this many pending slices this run
    max_error_fraction: float = 0.5  # exit 4 when more of the sampled images than this could not be audited; 1.0: never
    # {"dual.psnr": 18.0, "dual.lpips": 0.4}: exit 4 when a variant's mean is below it (above for lpips)
    thresholds: dict[str, float] = field(default_factory=dict)
    run_index: bool = False  # also rewrite <output's parent>/index.html: each metric over the audit folders there
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()

    def __post_init__(self) -> None:
        if not self.corpus:
            raise ValueError("corpus is empty: give the token corpus URI (the tokenize job's output)")
        if not self.output:
            raise ValueError("output is empty: give a folder or s3://bucket/prefix for the audit")
        if self.sample_size is not None and self.sample_fraction is not None:
            raise ValueError("give sample_size or sample_fraction, not both")
        unknown = [v for v in self.variants if v not in BASE_VARIANTS]
        if unknown or not self.variants:
            raise ValueError(f"variants must be a non-empty list of {', '.join(BASE_VARIANTS)}; got {self.variants} "
                             "(guide resolutions come from guide_bundles)")
        parse_thresholds(self.thresholds)  # a key that names no variant metric fails here, before any work
        if not 0.0 <= self.max_error_fraction <= 1.0:
            raise ValueError(f"max_error_fraction must be in [0, 1] (1.0: no limit), got {self.max_error_fraction}")
        if self.size < 8 or self.steps < 1 or self.slice_size < 1:
            raise ValueError(f"size ({self.size}), steps ({self.steps}) and slice_size ({self.slice_size}) are too small")


def _corpus_bundle(config: AuditConfig, options: dict[str, Any]) -> tuple[str, int]:
    """The bundle spec and weights seed the corpus's manifest records."""
    from dualtok.pipelines.io.storage import filesystem, join

    fs, path = filesystem(join(config.corpus, "manifest.json"), options or None)
    if not fs.exists(path):
        raise ConfigError(f"{config.corpus} has no manifest.json to name its bundle: give bundle=<path or preset>")
    manifest = json.loads(fs.cat_file(path))
    return manifest["bundle"]["bundle"], int(manifest.get("config", {}).get("seed", 0))


def plan_from_config(config: AuditConfig) -> Any:
    from dualtok.pipelines.audit.plan import AuditPlan
    from dualtok.pipelines.audit.pipeline import guide_name
    from dualtok.pipelines.audit.sample import SampleSpec
    from dualtok.pipelines.audit.stages import RenderSettings
    from dualtok.pipelines.actors import BundleSource

    options = config.storage.storage_options()
    spec, seed = _corpus_bundle(config, options) if not config.bundle else (config.bundle, 0)
    seed = config.bundle_seed if config.bundle_seed is not None else seed
    guides: dict[str, BundleSource] = {}
    for guide_spec in config.guide_bundles:
        source = BundleSource(guide_spec, storage_options=options)
        name = guide_name(source.load(("guide",)))
        if name in guides:
            raise ConfigError(f"guide_bundles {guides[name].spec} and {guide_spec} both have {name[1:]} px guides")
        guides[name] = source
    size = config.sample_size if config.sample_size is not None or config.sample_fraction is not None \
        else DEFAULT_SAMPLE_SIZE
    return AuditPlan(
        corpus=config.corpus, output=config.output, source=BundleSource(spec, seed=seed, storage_options=options),
        guides=guides, variants=tuple(config.variants),
        sample=SampleSpec(size=size, fraction=config.sample_fraction, seed=config.seed), sources=tuple(config.sources),
        render=RenderSettings(size=config.size, steps=config.steps, strength=config.strength,
                              guidance=config.guidance, seed=config.seed,
                              inversion_condition=config.inversion_condition, chunk=config.reconstruct.batch_size),
        slice_size=config.slice_size, reconstruct=config.reconstruct, score=config.score, fetch_cpus=config.fetch_cpus,
        weights=config.metrics, report=config.report, corpus_stats=config.corpus_stats,
        max_slices=config.max_slices, storage_options=options, resolved_config=to_dict(config),
    )


def summary_record(summary: Any, exit_code: int, crossed: list[str]) -> dict[str, Any]:
    """The run as one JSON object (`--json`): counts, each variant's mean metrics, thresholds crossed."""
    variants = {v["name"]: {"images": v["images"], "images_per_second": v["images_per_second"],
                            **{m: stats.get("mean") for m, stats in v["metrics"].items()}} for v in summary.variants}
    return {"job": "audit", "exit_code": exit_code, "output": summary.output, "report": summary.report,
            "slices": {"total": summary.slices_total, "committed": summary.slices_committed,
                       "skipped": summary.slices_skipped},
            "images": summary.images, "errors": summary.errors, "errors_by_reason": dict(summary.errors_by_reason),
            "seconds": round(summary.seconds, 3), "bundle_fingerprint": summary.bundle_fingerprint,
            "untrained_parts": list(summary.untrained_parts), "variants": variants, "thresholds_crossed": crossed}


def print_summary(summary: Any, exit_code: int = 0, crossed: list[str] | None = None, as_json: bool = False) -> None:
    """The run's summary on stdout: a table for people, or with `as_json` one JSON object only."""
    if as_json:
        print(json.dumps(summary_record(summary, exit_code, crossed or []), sort_keys=True, default=str))
        return
    print(f"audit: {summary.slices_committed} slices done this run, {summary.slices_skipped} already done "
          f"(of {summary.slices_total}); {summary.images} images audited, {summary.errors} errors, "
          f"{summary.seconds:.1f} s")
    print(f"{'variant':<24}{'tokens g+s':>12}{'PSNR':>9}{'SSIM':>8}{'images/s':>10}")
    for v in summary.variants:
        psnr, ssim = v["metrics"].get("psnr", {}), v["metrics"].get("ssim", {})
        speed = v["images_per_second"]
        print(f"{v['name']:<24}{v['num_guide_tokens']:>6}+{v['num_semantic_tokens']:<5}"
              f"{_mean(psnr, 2):>9}{_mean(ssim, 3):>8}{(f'{speed:.3f}' if speed else '-'):>10}")
    print(f"report: {summary.report}  (bundle {summary.bundle_fingerprint})")
    if summary.untrained_parts:
        print(f"NOTE: the {', '.join(summary.untrained_parts)} weights are random-initialised (untrained): "
              "the audit exercises the pipeline but its scores carry no meaning.")


def _mean(stats: dict[str, Any], digits: int) -> str:
    return "-" if stats.get("mean") is None else f"{stats['mean']:.{digits}f}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, AuditConfig)
    parser.add_argument("--stats-only", action="store_true",
                        help="corpus statistics only, no reconstruction (same as stats_only=true)")


def check_paths(config: AuditConfig) -> None:
    """Before Ray starts: the corpus is a token corpus, the bundle (when given) is a bundle or a
    preset, the output can be created."""
    from dualtok.pipelines.io.storage import filesystem, join

    options = config.storage.storage_options()
    fs, path = filesystem(join(config.corpus, "manifest.json"), options or None)
    if not fs.exists(path):
        there = fs.exists(fs._parent(path))
        raise ConfigError(f"corpus {config.corpus} " + ("is not a token corpus: missing manifest.json" if there
                                                        else "does not exist"))
    if config.bundle:
        check_bundle(config.bundle, options)
    check_output(config.output, options)


def run(args: argparse.Namespace) -> int:
    """Exit codes: 0 done; 2 a config or input error (checked before Ray starts); 4 more than
    `max_error_fraction` of the sampled images could not be audited (the audit is still written)."""
    config = config_from_args(AuditConfig, args)
    check_paths(config)
    if args.stats_only or config.stats_only:
        from dualtok.jobs.stats import print_statistics, write_statistics

        stats = write_statistics(config.corpus, config.output, config.storage.storage_options())
        print_statistics(stats, config.output)
        return 0
    from dualtok.pipelines.audit.pipeline import run_audit

    plan = plan_from_config(config)
    init_ray(config.ray)
    quiet_ray_data(getattr(args, "verbose", 0))  # before the dataset is built: it copies the context
    summary = run_audit(plan)
    crossed = _after_audit(config, summary)
    too_many = summary.error_fraction > config.max_error_fraction
    code = EXIT_TOO_MANY_ERRORS if too_many or crossed else 0
    print_summary(summary, code, crossed, as_json=getattr(args, "json", False))
    for line in crossed:
        print(f"dualtok audit: threshold crossed: {line}", file=sys.stderr)
    if too_many:
        message = too_many_errors(summary.errors, summary.images + summary.errors, summary.errors_by_reason,
                                  config.max_error_fraction)
        print(f"dualtok audit: error: {message}", file=sys.stderr)
    return code


def _after_audit(config: AuditConfig, summary: Any) -> list[str]:
    """The nightly part: rewrite the cross-run index when asked; the thresholds this run crosses."""
    from dualtok.pipelines.audit.index import crossed_thresholds, write_index

    thresholds = parse_thresholds(config.thresholds)
    if config.run_index:
        write_index(config.output, thresholds, config.storage.storage_options() or None)
    return crossed_thresholds(summary.variants, thresholds)
