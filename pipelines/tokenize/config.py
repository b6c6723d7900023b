"""The tokenize pipeline's config (`TokenizeConfig`: what `dualtok tokenize` takes, keys and
defaults), its resources sized to the cluster a run finds (`default_resources`, `resolve_resources`),
and the plan a run executes (`plan_from_config`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

from dualtok.pipelines.actors import BundleSource, StageResources
from dualtok.pipelines.cluster import RayConfig
from dualtok.pipelines.config import BUNDLE_REQUIRED, to_dict
from dualtok.pipelines.io.decode import DecodeConfig
from dualtok.pipelines.io import schemas as S
from dualtok.pipelines.io.lease import LeaseConfig
from dualtok.pipelines.io.parquet_shards import ParquetColumns
from dualtok.pipelines.io.shards import ShardLimits
from dualtok.pipelines.io.storage import StorageConfig
from dualtok.pipelines.tokenize.pipeline import TokenizePlan
from dualtok_core.preprocess import Preprocess

READ_ACTORS_PER_GPU = 4  # decode actors that keep one GPU's encoder fed (docs/cluster.md)


@dataclass(frozen=True)
class ImageConfig:
    """Image preprocessing and the caps that bound what one sample may cost; the encoder input size
    comes from the bundle. A sample over a cap is an error row with the cap's name in its reason.
    The defaults are those of `DecodeConfig` and `ShardLimits`, the types that apply them."""

    max_pixels: int = DecodeConfig.max_pixels  # width x height, read from the header
    max_decoded_bytes: int = DecodeConfig.max_decoded_bytes  # the decoded image in Pillow's mode (16-bit: 2 B/px)
    max_member_bytes: int = ShardLimits.max_member_bytes  # one image or caption (tar member, Parquet cell)
    max_caption_bytes: int = ShardLimits.max_caption_bytes  # a .txt or .json member, or a Parquet caption
    min_side: int = DecodeConfig.min_side  # a smaller image is an error row, not blown up
    jpeg_draft: bool = DecodeConfig.draft  # JPEG DCT-domain downscaling when the image is >= 2x the target

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_decoded_bytes", "max_member_bytes", "max_caption_bytes", "min_side"):
            if getattr(self, name) < 1:
                raise ValueError(f"image.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def limits(self) -> ShardLimits:
        return ShardLimits(max_member_bytes=self.max_member_bytes, max_caption_bytes=self.max_caption_bytes)

    def decode(self, image: Preprocess, semantic: Preprocess | None = None) -> DecodeConfig:
        return DecodeConfig(size=image.size, fit=image.fit, interpolation=image.interpolation, semantic=semantic,
                            max_pixels=self.max_pixels, max_decoded_bytes=self.max_decoded_bytes,
                            min_side=self.min_side, draft=self.jpeg_draft)


@dataclass(frozen=True)
class EncoderResources(StageResources):
    """The encoder pool as the config takes it: with `actors`, `max_actors`, `gpus_per_actor` and
    `cpus_per_actor` all unset (None) the job sizes the pool to the cluster (`default_resources`);
    set any of them and the others take `StageResources`' defaults (1 actor, 1 CPU, no GPU)."""

    actors: int | None = None  # type: ignore[assignment]  # None: sized to the cluster
    gpus_per_actor: float | None = None  # type: ignore[assignment]
    cpus_per_actor: float | None = None  # type: ignore[assignment]
    # what the encoders compute in, fixed per corpus (its markers record it); auto: the corpus's own,
    # else bfloat16 on GPUs and on CPUs that compute it natively (AVX512-BF16, AMX), float32 elsewhere
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # type: ignore[assignment]

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
    """What `dualtok tokenize` takes: each key, its default, and (the comment on its field) its meaning."""

    # tar (.tar, .tar.gz, .tgz) or Parquet (.parquet) shards: prefixes, globs, {00000..00099} braces, @list files
    inputs: list[str] = field(default_factory=list)
    output: str = ""  # the corpus folder or URI (data/, errors/, _committed/, manifest.json)
    bundle: str = ""  # required: a bundle path/URI, or a preset name (tiny, small, paper: random weights)
    seed: int = 0  # weights seed when `bundle` is a preset
    streams: Literal["both", "guide", "semantic"] = "both"  # which token columns the corpus gets
    image: ImageConfig = ImageConfig()
    parquet: ParquetColumns = ParquetColumns()  # which columns of a .parquet input hold the image, caption, key
    # Source fields copied into every corpus (and errors) row as nullable string columns, e.g. [url, sha256,
    # license]: a tar sample's .json sidecar keys, a .parquet input's columns; a missing field is null.
    # Fixed per corpus: a rerun on it with another list is refused.
    passthrough: list[str] = field(default_factory=list)
    # one actor pool; each actor holds every requested branch; its size sized to the cluster unless set
    encoder: EncoderResources = EncoderResources()
    read_cpus: float | None = None  # per read+decode actor; None: 1 on GPU clusters, 0.25 on CPU-only ones
    # read+decode actors: the pool starts with one and grows to this many when encoders wait; None: 4 per GPU, 1 on CPU
    read_actors: int | None = None
    max_error_fraction: float = 0.5  # exit 4 when more of this run's samples than this are errors; 1.0: never
    prefetch_batches: int = 4  # decoded batches in flight per encoder actor: bounds the object store's use
    max_shards: int | None = None  # tokenize at most this many pending shards this run
    # where whole shards are committed from their token parts: "tasks" (Ray tasks: no token row reaches
    # the driver), "driver" (the driver's threads), "auto" (the driver on a one-node cluster without GPUs)
    commits: Literal["auto", "driver", "tasks"] = "auto"
    # A rerun whose bundle differs from the one the corpus was made with: "error" stops; "keep"
    # tokenizes the new shards with the new bundle (each marker records its bundle's fingerprint).
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
        S.check_passthrough(self.passthrough)


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
    return TokenizePlan(
        inputs=list(config.inputs), output=config.output, source=source, streams=config.streams,
        decode=config.image.decode(*decode_inputs(source, config.streams)), limits=config.image.limits,
        parquet=config.parquet,
        passthrough=tuple(config.passthrough),
        encoder=resources.encoder, read_cpus=resources.read_cpus, read_actors=resources.read_actors,
        prefetch_batches=config.prefetch_batches,
        max_shards=config.max_shards, commits=config.commits,
        on_bundle_change=config.on_bundle_change, input_root=config.input_root, lease=config.lease,
        # the manifest records the resources the run used, sized or set
        storage_options=options, resolved_config=to_dict(dataclasses.replace(
            config, read_cpus=resources.read_cpus, read_actors=resources.read_actors, encoder=resources.encoder)),
    )


def decode_inputs(source: BundleSource, streams: str) -> tuple[Preprocess, Preprocess | None]:
    """What the decode stage makes: IMAGE, and SEMANTIC_IMAGE where the semantic branch needs its own.

    Branches with the default preprocessing (centre crop, bicubic) share one crop at the largest input
    they take (guide 256, semantic 224), each resized on its way into the model, as every bundle made
    before per-branch preprocessing was: their tokens do not change. A branch with any other
    preprocessing (a released BLIP-2 / SEED: the whole image resized to 224) gets its input cut from
    the decoded image directly, at its own size.
    """
    own = _branch_preprocess(source)
    parts = [p for p in ("guide", "semantic") if streams in (p, "both")]
    shared = [own[p] for p in parts if (own[p].fit, own[p].interpolation) == ("center_crop", "bicubic")]
    effective = {p: Preprocess(max(q.size for q in shared)) if own[p] in shared else own[p] for p in parts}
    image = effective[parts[0]]
    semantic = effective.get("semantic")
    return image, semantic if semantic is not None and semantic != image else None


def _branch_preprocess(source: BundleSource) -> dict[str, Preprocess]:
    """Each branch's `Preprocess`, from the preset or the bundle's part configs (absent keys: defaults)."""
    import json

    from dualtok.pipelines.io.storage import filesystem, join
    from dualtok_core.presets import get_preset

    sizes = {"guide": 256, "semantic": 224}
    configs: dict[str, dict] = {}
    if source.is_preset:
        preset = get_preset(source.spec)
        configs = {"guide": preset.guide, "semantic": preset.semantic}
    else:
        for part in sizes:
            fs, path = filesystem(join(source.spec, part, "config.json"), source.storage_options or None)
            configs[part] = json.loads(fs.cat_file(path)) if fs.exists(path) else {}
    return {part: Preprocess(int(configs[part].get("image_size", size)), configs[part].get("input_fit", "center_crop"),
                             configs[part].get("input_interpolation", "bicubic"))
            for part, size in sizes.items()}
