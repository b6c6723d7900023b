"""From a stage's job config to everything the driver, the workers and the export need.

Resolved once on the driver, before Ray starts anything: the input bundle's parts and
fingerprint (workers check they load the same weights), the trained branch's input size, the
Q-Former's text tokenizer, the run's layout on storage and the worker resources.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

from dualtok_core.bundle import BUNDLE_SCHEMA_VERSION, BundleInfo
from dualtok_core.errors import BundleError, DualtokError
from dualtok_core.presets import get_preset, preset_names
from dualtok_core.semantic import SEED_LABEL_SMOOTHING
from dualtok_core.training import LRSchedule
from dualtok_core.training_stages import stage_class
from dualtok.pipelines.train.config import TrainConfig, default_run_name, resolved_config, run_identity
from dualtok.pipelines.train.state import RUN_FILE, ExportRequest, RunLayout, available_parts, bundle_text_tokenizer
from dualtok.pipelines.train.worker import WorkerPlan
from dualtok.pipelines.actors import BundleSource
from dualtok.pipelines.io.outputs import package_versions
from dualtok.pipelines.io.storage import filesystem, join, list_shards
from dualtok.pipelines.train.data import TrainingDataConfig, load_text_tokenizer, training_dataset

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainPlan:
    config: TrainConfig
    layout: RunLayout
    worker: WorkerPlan
    export: ExportRequest
    data: TrainingDataConfig
    input_fingerprint: str
    resources_per_worker: dict[str, float] | None = field(default=None, hash=False)
    identity: dict[str, Any] = field(default_factory=dict, hash=False)  # what a rerun must match to resume
    replaces: str | None = None  # on_config_change=new_run: the run whose config this one changed

    def dataset(self) -> Any:
        """The Ray Data dataset of the inputs' training rows (lazy; streamed by the workers)."""
        shards = list_shards(list(self.config.inputs), self.data.storage_options or None)
        logger.info("training %s on %d shards", self.config.STAGE, len(shards))
        return training_dataset(shards, self.data)

    def write_run_record(self) -> None:
        """`<run>/run.json`: the resolved config, package versions and the input bundle, per attempt."""
        record = {"config": resolved_config(self.config), "versions": package_versions(),
                  "input": {"bundle": self.config.bundle, "fingerprint": self.input_fingerprint,
                            "part_hashes": dict(self.worker.source.expected_hashes)},
                  "identity": self.identity, "replaces": self.replaces}
        self.layout.folder().write_json(record, RUN_FILE)


def absolute(uri: str) -> str:
    """A local path as an absolute one: Ray's workers run in another folder than the driver, and a
    relative `storage_path=runs` or `bundle=bundles/guide` there names another place."""
    return uri if "://" in uri else os.path.abspath(uri)


def plan_training(config: TrainConfig) -> TrainPlan:
    stage = stage_class(config.STAGE)
    options = config.storage.storage_options()
    spec = config.bundle if config.bundle in preset_names() else absolute(config.bundle)
    source = BundleSource(spec, seed=config.seed, storage_options=options)
    parts = available_parts(source)
    needed = stage.parts()
    missing = [p for p in needed if p not in parts]
    if missing:
        raise BundleError(f"the {config.STAGE} stage needs the {', '.join(missing)} part(s); {config.bundle} lacks them")
    info = _input_info(source, parts)
    source = dataclasses.replace(source, expected_hashes={p: info.part_hashes[p] for p in needed
                                                           if p in info.part_hashes})
    branch_config = part_config(source, stage.part, stage.config_path)
    identity = run_identity(config, info.fingerprint, source.expected_hashes)
    name = config.name or default_run_name(config.STAGE, config.output)
    requested = RunLayout(absolute(config.storage_path), name, options)
    layout = resolve_run(config, requested, identity)
    text_tokenizer = _text_tokenizer(config, source, branch_config)
    _check_movq(getattr(config, "init_from_movq", None), options)
    provenance = (f"trained: stage {config.STAGE}, run {layout.name}, steps {config.steps}, "
                  f"from {info.fingerprint}")
    resources = dict(config.resources_per_worker) or None
    return TrainPlan(
        config=config, layout=layout,
        worker=_worker_plan(config, source, layout, info.fingerprint, text_tokenizer, resources),
        export=ExportRequest(stage=config.STAGE, source=source, output=config.output, provenance=provenance,
                             init_from_movq=getattr(config, "init_from_movq", None), text_tokenizer=text_tokenizer,
                             storage_options=options),
        data=TrainingDataConfig(image_size=decode_size(stage.input_size(branch_config), config.crop_scale_min),
                                require_captions=stage.needs_captions, read_cpus=config.read_cpus,
                                storage_options=options),
        input_fingerprint=info.fingerprint, resources_per_worker=resources, identity=identity,
        replaces=requested.name if layout.name != requested.name else None,
    )


def resolve_run(config: TrainConfig, layout: RunLayout, identity: dict[str, Any]) -> RunLayout:
    """The run this config continues: `layout`'s when it is new or recorded the same identity.
    Otherwise resuming would mix schedules, tensors or provenance, so stop naming each difference,
    or (on_config_change=new_run) go to the run named after the new identity, new or resumable."""
    changes = identity_changes(layout, identity)
    if not changes:
        return layout
    if config.on_config_change == "new_run":
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
        fresh = dataclasses.replace(layout, name=f"{layout.name}-{digest}")
        if not identity_changes(fresh, identity):
            logger.warning("run %s was made with another config (%s); training run %s instead",
                           layout.name, "; ".join(changes), fresh.name)
            return fresh
    raise DualtokError(
        f"run {layout.name} in {layout.storage_path} was made with another config, so resuming it would mix "
        f"them: {'; '.join(changes)}. Rerun with the run's values to resume it, or give "
        "on_config_change=new_run (or another name=) to start a new run"
    )


def identity_changes(layout: RunLayout, identity: dict[str, Any]) -> list[str]:
    """'key: old -> new' for every recorded identity key that differs; [] for a run not started yet."""
    record = layout.record()
    if record is None or "identity" not in record:
        if record is None and not layout.has_checkpoints():
            return []
        return ["the run records no config identity (made by an older dualtok)"]
    old, new = _flat(record["identity"]), _flat(identity)
    return [f"{key}: {old.get(key, '(absent)')!r} -> {new.get(key, '(absent)')!r}"
            for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)]


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _worker_plan(
    config: TrainConfig, source: BundleSource, layout: RunLayout, fingerprint: str, text_tokenizer: str | None,
    resources: dict[str, float] | None,
) -> WorkerPlan:
    schedule = LRSchedule(lr=config.lr, total_steps=config.steps, warmup_steps=config.warmup_steps,
                          warmup_lr=config.warmup_lr, min_lr=config.min_lr)
    return WorkerPlan(
        stage=config.STAGE, source=source, layout=layout, steps=config.steps,
        checkpoint_every=config.checkpoint_every, batch_size=config.batch_size,
        grad_accumulation=config.grad_accumulation, schedule=schedule, weight_decay=config.weight_decay,
        betas=(config.beta1, config.beta2), max_grad_norm=config.max_grad_norm,
        mixed_precision=config.mixed_precision, seed=config.seed, input_fingerprint=fingerprint,
        text_tokenizer=text_tokenizer, max_text_length=getattr(config, "max_text_length", 32),
        label_smoothing=getattr(config, "label_smoothing", SEED_LABEL_SMOOTHING),
        init_from_movq=getattr(config, "init_from_movq", None),
        dead_code_every=getattr(config, "dead_code_every", 0), shuffle_buffer=config.shuffle_buffer,
        kl_weight=getattr(config, "kl_weight", 1e-6), caption_dropout=getattr(config, "caption_dropout", 0.1),
        crop_scale=(config.crop_scale_min, config.crop_scale_max), hflip=config.hflip,
        # Ray sets OMP_NUM_THREADS from the worker's CPUs; torch follows the same count explicitly.
        torch_threads=max(1, int((resources or {}).get("CPU", 1))),
    )


def _input_info(source: BundleSource, parts: tuple[str, ...]) -> BundleInfo:
    """The input's part hashes: built for a preset, read from bundle.json for a bundle (weights are
    re-hashed where they are loaded)."""
    if source.is_preset:
        return source.load(parts).info
    fs, root = filesystem(join(source.spec, "bundle.json"), source.storage_options or None)
    if not fs.exists(root):
        raise BundleError(f"{source.spec} is not a dualtok bundle: bundle.json is missing")
    data = json.loads(fs.cat_file(root))
    if data.get("schema_version") != BUNDLE_SCHEMA_VERSION:
        raise BundleError(
            f"{source.spec}: bundle schema_version {data.get('schema_version')} is not {BUNDLE_SCHEMA_VERSION}"
        )
    info = BundleInfo(**data)
    info.part_hashes = {p: h for p, h in info.part_hashes.items() if p in parts}
    return info


def part_config(source: BundleSource, part: str, sub: tuple[str, ...] = ()) -> dict[str, Any]:
    """The trained branch's constructor config (image size, vocab size), without loading weights;
    `sub` names a component inside the part (the diffusion part's `vae`)."""
    if source.is_preset:
        config = get_preset(source.spec).kwargs(part)
        for key in sub:
            config = config[key]
        return config
    fs, path = filesystem(join(source.spec, part, *sub, "config.json"), source.storage_options or None)
    return json.loads(fs.cat_file(path))


def decode_size(image_size: int, crop_scale_min: float) -> int:
    """The side training decodes images to: large enough that the smallest random crop (area share
    `crop_scale_min` of it) is still about `image_size` wide, at most twice `image_size`."""
    return min(2 * image_size, math.ceil(image_size / math.sqrt(crop_scale_min)))


def _text_tokenizer(config: TrainConfig, source: BundleSource, semantic_config: dict[str, Any]) -> str | None:
    """The qformer stage's text tokenizer (from the config or the bundle), checked against the Q-Former."""
    if config.STAGE != "qformer":
        return None
    uri = getattr(config, "text_tokenizer", None) or bundle_text_tokenizer(source)
    if uri is None:
        raise BundleError(
            f"the qformer stage needs the Q-Former's text tokenizer: {config.bundle} has no semantic/tokenizer/, "
            "so give text_tokenizer=<folder or URI> (a BERT-style tokenizer in transformers' format)"
        )
    load_text_tokenizer(uri, int(semantic_config["qformer_config"]["vocab_size"]), source.storage_options or None)
    return absolute(uri)


def _check_movq(uri: str | None, storage_options: dict[str, Any]) -> None:
    """Fail on the driver, not in every worker, when the MoVQ weights to start from are not there."""
    if uri is None:
        return
    fs, path = filesystem(uri, storage_options or None)
    if not (fs.exists(join(path, "config.json")) or fs.exists(join(path, "movq", "config.json"))):
        raise BundleError(f"init_from_movq={uri} holds no MoVQ config.json (nor movq/config.json)")
