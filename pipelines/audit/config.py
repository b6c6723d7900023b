"""The audit pipeline's config (`AuditConfig`: what `dualtok audit` takes, keys and defaults) and
the plan a run executes (`plan_from_config`). Render defaults come from `RenderSettings`, the type
that applies them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from dualtok.pipelines.actors import BundleSource, StageResources
from dualtok.pipelines.audit.index import parse_thresholds
from dualtok.pipelines.audit.perceptual import PerceptualWeights
from dualtok.pipelines.audit.plan import BASE_VARIANTS, AuditPlan, ReportSettings
from dualtok.pipelines.audit.sample import SampleSpec
from dualtok.pipelines.audit.stages import RenderSettings
from dualtok.pipelines.cluster import RayConfig
from dualtok.pipelines.config import ConfigError, to_dict
from dualtok.pipelines.io.storage import StorageConfig

DEFAULT_SAMPLE_SIZE = 64  # rows audited when neither sample_size nor sample_fraction is given


@dataclass(frozen=True)
class AuditConfig:
    corpus: str = ""  # the token corpus (the tokenize job's output)
    output: str = ""  # the audit folder: tables, images, summary.json, index.html
    sources: list[str] = field(default_factory=list)  # source shards; empty: each shard's recorded shard_uri
    bundle: str = ""  # bundle path/URI or preset; empty: the bundle the corpus records
    bundle_seed: int | None = None  # weights seed of a preset bundle; None: the corpus's
    guide_bundles: list[str] = field(default_factory=list)  # extra guide branches (16/32/128 px ...) to compare
    # other diffusion branches (an unCLIP one beside a text one) re-rendering the same tokens: bundles whose
    # semantic branch is the corpus bundle's; each adds dual-<kind> and semantic-only-<kind>
    diffusion_bundles: list[str] = field(default_factory=list)
    variants: list[str] = field(default_factory=lambda: list(BASE_VARIANTS))  # dual, semantic-only, guide-upsampled
    sample_size: int | None = None  # corpus rows audited (a seeded sample); default 64 unless sample_fraction
    sample_fraction: float | None = None  # or this share of the corpus's rows
    seed: int = 0  # the sample and the diffusion noise
    size: int = RenderSettings.size  # output size of every reconstruction (and of the originals it is compared with)
    steps: int = RenderSettings.steps  # DDIM steps of the whole schedule; dual runs int(strength * steps) of them
    strength: float = RenderSettings.strength  # the share of the schedule the guide is inverted to
    guidance: float = RenderSettings.guidance  # classifier-free guidance scale (1: off)
    inversion_condition: Literal["unconditional", "semantic"] = "unconditional"  # the condition DDIM inverts under
    slice_size: int = 16  # sampled images per unit of work (committed together)
    reconstruct: StageResources = StageResources(batch_size=4)  # batch_size: images per forward pass
    score: StageResources = StageResources()  # batch_size: images per LPIPS/CLIP forward pass
    fetch_cpus: float = 1.0  # CPUs of each task fetching and decoding the sampled originals
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


def plan_from_config(config: AuditConfig) -> AuditPlan:
    from dualtok.pipelines.audit.pipeline import diffusion_name, guide_name  # imports torch and the models

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
    diffusions: dict[str, BundleSource] = {}
    for diffusion_spec in config.diffusion_bundles:
        source = BundleSource(diffusion_spec, storage_options=options)
        name = diffusion_name(source.load(("diffusion",)))
        if name in diffusions:
            raise ConfigError(
                f"diffusion_bundles {diffusions[name].spec} and {diffusion_spec} are both {name} branches")
        diffusions[name] = source
    size = config.sample_size if config.sample_size is not None or config.sample_fraction is not None \
        else DEFAULT_SAMPLE_SIZE
    return AuditPlan(
        corpus=config.corpus, output=config.output, source=BundleSource(spec, seed=seed, storage_options=options),
        guides=guides, diffusions=diffusions, variants=tuple(config.variants),
        sample=SampleSpec(size=size, fraction=config.sample_fraction, seed=config.seed), sources=tuple(config.sources),
        render=RenderSettings(size=config.size, steps=config.steps, strength=config.strength,
                              guidance=config.guidance, seed=config.seed,
                              inversion_condition=config.inversion_condition, chunk=config.reconstruct.batch_size),
        slice_size=config.slice_size, reconstruct=config.reconstruct, score=config.score, fetch_cpus=config.fetch_cpus,
        weights=config.metrics, report=config.report, corpus_stats=config.corpus_stats,
        max_slices=config.max_slices, storage_options=options, resolved_config=to_dict(config),
    )
