"""`dualtok recipe`: a whole bundle trained from one config, every stage in order, then audited.

    dualtok recipe -c benchmarks/reproduction/recipe.yaml

The stages run in the order a from-scratch bundle needs (guide, vae, unet, qformer, codebook,
reverse: `dualtok_core.training_stages.STAGES`), each an ordinary `dualtok train <stage>` run that
reads the previous stage's bundle. Under `output`:

    bundles/<stage>/          the bundle after each stage; the last one is the recipe's bundle
    bundles/guide-<px>px/     extra guide branches (`guide_sizes`), for the guide-resolution ablation
    runs/<stage>/             each stage's run: checkpoints, metrics.jsonl, _finished.json
    text_tokenizer/           the Q-Former's WordPiece vocabulary, trained on the training captions
                              when neither `text_tokenizer` nor the input bundle gives one
    heldout/corpus/           the held-out shards tokenized with the final bundle (`dualtok tokenize`)
    heldout/audit/            their audit (`dualtok audit`): summary.json, index.html
    recipe.json               the resolved recipe and what each step did (losses, seconds, worker CPU)

A rerun after a crash skips what is finished (each stage's `_finished.json`, the corpus's commit
markers, the audit's slices) and resumes the stage that stopped from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from dualtok.jobs.config import add_config_arguments, config_from_args
from dualtok.pipelines.cluster import RayConfig, init_ray
from dualtok.pipelines.config import ConfigError, from_dict, to_dict
from dualtok.pipelines.io import schemas as S
from dualtok.pipelines.io.outputs import OutputFolder
from dualtok.pipelines.io.storage import StorageConfig, filesystem, join
from dualtok.pipelines.train.config import STAGE_CONFIGS, TrainConfig, training_cpus

logger = logging.getLogger(__name__)

RECIPE_FILE = "recipe.json"
MAX_TOKENIZER_CAPTIONS = 1_000_000  # captions read to train a text tokenizer when none is given


@dataclass(frozen=True)
class RecipeConfig:
    inputs: list[str] = field(default_factory=list)  # training shards (prefixes, globs, {a..b}, @list files)
    heldout: list[str] = field(default_factory=list)  # held-out shards, tokenized and audited at the end; empty: no audit
    bundle: str = ""  # required: the starting bundle or preset (tiny, small, paper: random weights)
    output: str = ""  # the recipe's folder (path or URI): bundles/, runs/, heldout/, recipe.json
    stages: list[str] = field(default_factory=lambda: list(STAGE_CONFIGS))  # which stages, run in STAGES order
    guide_sizes: list[int] = field(default_factory=list)  # extra guide branches (px, preset bundles only), audited beside it
    # A preset's constructor settings changed per part ({guide: {image_size: 128}}): the recipe starts
    # from that random-initialised bundle (bundles/init) instead of the preset itself.
    preset_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    text_tokenizer: str | None = None  # the qformer stage's; default: the bundle's, else one trained on the captions
    seed: int = 0  # preset weights seed and every stage's training seed
    every_stage: dict[str, Any] = field(default_factory=dict)  # train keys every stage gets (num_workers, batch_size, ...)
    stage: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-stage train keys over every_stage: {vae: {steps: 2000}}
    tokenize: dict[str, Any] = field(default_factory=dict)  # tokenize keys for the held-out corpus
    audit: dict[str, Any] = field(default_factory=dict)  # audit keys for the held-out audit (sample_size, size, steps, ...)
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()

    def __post_init__(self) -> None:
        from dualtok.pipelines.config import BUNDLE_REQUIRED

        if not self.bundle:
            raise ValueError(BUNDLE_REQUIRED)
        if not self.inputs or not self.output:
            raise ValueError("inputs and output are required: the training shards and the recipe's folder")
        unknown = [s for s in [*self.stages, *self.stage] if s not in STAGE_CONFIGS]
        if unknown or not self.stages:
            raise ValueError(f"stages must name some of {', '.join(STAGE_CONFIGS)}; got {unknown or self.stages}")
        reserved = sorted({"inputs", "bundle", "output", "storage_path", "name", "seed", "storage", "ray"}
                          & {*self.every_stage, *(k for keys in self.stage.values() for k in keys)})
        if reserved:
            raise ValueError(f"{', '.join(reserved)}: the recipe sets these for every stage; give them at the top level")
        from dualtok_core.presets import PARTS, preset_names

        if self.preset_overrides and self.bundle not in preset_names():
            raise ValueError(f"preset_overrides change a preset; bundle {self.bundle} is not one")
        if set(self.preset_overrides) - set(PARTS):
            raise ValueError(f"preset_overrides names parts {sorted(self.preset_overrides)}; parts are {PARTS}")


@dataclass
class RecipePlan:
    """Every step's config, built (and so validated) before anything runs."""

    config: RecipeConfig
    stages: list[TrainConfig]  # in order; each one's bundle is the previous one's output
    guides: list[tuple[int, TrainConfig]]  # (guide px, its guide-stage config)
    tokenize: Any | None  # TokenizeConfig of the held-out corpus
    audit: Any | None  # AuditConfig of the held-out audit

    @property
    def bundle(self) -> str:
        return self.stages[-1].output


def plan_recipe(config: RecipeConfig) -> RecipePlan:
    from dualtok_core.presets import preset_names
    from dualtok.pipelines.audit.config import AuditConfig
    from dualtok.pipelines.tokenize.config import TokenizeConfig

    ordered = [s for s in STAGE_CONFIGS if s in config.stages]
    from dualtok.pipelines.train.plan import absolute

    root = absolute(config.output).rstrip("/")  # Ray's workers run in another folder
    bundle = config.bundle if config.bundle in preset_names() else absolute(config.bundle)
    if config.preset_overrides:
        bundle = join(root, "bundles", "init")
    stages = []
    for stage in ordered:
        stages.append(_stage_config(config, stage, bundle, join(root, "bundles", stage), stage))
        bundle = stages[-1].output
    if config.guide_sizes and config.bundle not in preset_names():
        raise ConfigError(f"guide_sizes builds guide branches from a preset; bundle {config.bundle} is not one")
    guides = [(px, _stage_config(config, "guide", join(root, "bundles", f"guide-{px}px-init"),
                                 join(root, "bundles", f"guide-{px}px"), f"guide-{px}px"))
              for px in config.guide_sizes]
    tokenize = audit = None
    if config.heldout:
        corpus = join(root, "heldout", "corpus")
        tokenize = from_dict(TokenizeConfig, {"inputs": list(config.heldout), "output": corpus, "bundle": bundle,
                                              "seed": config.seed, **_shared(config), **config.tokenize}, "tokenize.")
        audit = from_dict(AuditConfig, {"corpus": corpus, "output": join(root, "heldout", "audit"), "bundle": bundle,
                                        "guide_bundles": [g.output for _, g in guides], **_shared(config),
                                        **config.audit}, "audit.")
    return RecipePlan(config=config, stages=stages, guides=guides, tokenize=tokenize, audit=audit)


def _shared(config: RecipeConfig) -> dict[str, Any]:
    return {"storage": to_dict(config.storage, redact=False), "ray": to_dict(config.ray)}


def _stage_config(config: RecipeConfig, stage: str, bundle: str, output: str, name: str) -> TrainConfig:
    own = {f.name for f in dataclasses.fields(STAGE_CONFIGS[stage])}
    # An every_stage key that only some stages take (dead_code_every) goes to those; a key no stage
    # takes is passed on, so that it fails as a misspelt key does.
    keys = {k: v for k, v in config.every_stage.items() if k in own or k not in _keys_of_some_stage()}
    keys.update(config.stage.get(stage, {}))
    if stage == "qformer" and config.text_tokenizer:
        keys.setdefault("text_tokenizer", config.text_tokenizer)
    return from_dict(STAGE_CONFIGS[stage], {
        "inputs": list(config.inputs), "bundle": bundle, "output": output,
        "storage_path": join(config.output.rstrip("/"), "runs"), "name": name, "seed": config.seed,
        **_shared(config), **keys,
    }, f"stage.{stage}.")


def _keys_of_some_stage() -> set[str]:
    return {f.name for cls in STAGE_CONFIGS.values() for f in dataclasses.fields(cls)}


# ---- running ----------------------------------------------------------------------------------
def run_recipe(plan: RecipePlan) -> dict[str, Any]:
    """Every step in order, skipping finished ones; returns (and writes) the recipe record."""
    from dualtok.pipelines.train.run import train

    config = plan.config
    before = OutputFolder(config.output, config.storage.storage_options()).read_json(RECIPE_FILE) or {}
    record: dict[str, Any] = {"config": to_dict(config), "stages": {}, "guides": {}, "heldout": None}
    init_ray(config.ray, min_cpus=max(training_cpus(c) for c in [*plan.stages, *(g for _, g in plan.guides)]))
    started = time.monotonic()
    if config.preset_overrides:
        _initial_bundle(config, plan.stages[0].bundle)
    for stage_config in plan.stages:
        stage_config = _with_text_tokenizer(plan, stage_config)
        earlier = before.get("stages", {}).get(stage_config.STAGE)
        record["stages"][stage_config.STAGE] = _step(stage_config, train(stage_config), earlier)
        _write_record(config, record)
    for px, guide_config in plan.guides:
        _initial_guide_bundle(config, px, guide_config.bundle)
        record["guides"][f"{px}px"] = _step(guide_config, train(guide_config), before.get("guides", {}).get(f"{px}px"))
        _write_record(config, record)
    if plan.tokenize is not None:
        record["heldout"] = _heldout(plan)
    record["seconds"] = time.monotonic() - started
    record["bundle"] = plan.bundle
    _stamp_provenance(plan, record)
    _write_record(config, record)
    return record


def _stamp_provenance(plan: RecipePlan, record: dict[str, Any]) -> None:
    """Name the recipe, the data and the code that made the final bundle in its bundle.json
    (rewritten only when that changes, so a rerun that did nothing leaves the bundle as it was)."""
    from dualtok_core import __version__
    from dualtok.pipelines.io.storage import list_shard_objects

    config = plan.config
    out = OutputFolder(plan.bundle, config.storage.storage_options())
    info = out.read_json("bundle.json")
    shards = list_shard_objects(list(config.inputs), config.storage.storage_options() or None)
    provenance = {
        "made_by": "dualtok recipe", "recipe": to_dict(config),
        "data": {"inputs": list(config.inputs), "heldout": list(config.heldout),
                 "train_shards": {obj.uri.rsplit("/", 1)[-1]: obj.size for obj in shards}},
        "code": {"dualtok": __version__, "git_commit": _git_commit()},
        "stages": {name: {k: step[k] for k in ("steps", "first_loss", "last_loss")}
                   for name, step in record["stages"].items()},
    }
    if info.get("provenance") != json.loads(json.dumps(provenance, default=str)):
        out.write_json({**info, "provenance": provenance}, "bundle.json")


def _git_commit() -> str | None:
    """The commit of the dualtok checkout running this, when it is one (an installed wheel is not)."""
    import subprocess
    from pathlib import Path

    try:
        done = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def _step(config: TrainConfig, summary: Any, earlier: dict[str, Any] | None = None) -> dict[str, Any]:
    """What one stage did, from its summary and its merged metrics (worker CPU seconds, loss curve).
    `wall_seconds` is the wall time of the invocation that trained it: a rerun that finds the stage
    finished carries it over from the `earlier` record (None when no record knows it)."""
    from dualtok.pipelines.train.state import RunLayout

    layout = RunLayout(config.storage_path, summary.run, config.storage.storage_options())
    rows = layout.read_metrics()
    cpu = [r.get(S.TRAIN_CPU_SECONDS) for r in rows]
    step_seconds = [r[S.TRAIN_SECONDS] for r in rows]
    return {
        "run": summary.run_dir, "bundle": summary.output, "steps": summary.steps,
        "already_finished": summary.already_finished, "first_loss": summary.first_loss,
        "last_loss": summary.last_loss,
        "wall_seconds": (earlier or {}).get("wall_seconds") if summary.already_finished else round(summary.seconds, 1),
        "step_seconds_total": round(sum(step_seconds), 1),
        "worker_cpu_seconds": round(sum(c for c in cpu if c is not None), 1) if any(c is not None for c in cpu) else None,
    }


def _with_text_tokenizer(plan: RecipePlan, config: TrainConfig) -> TrainConfig:
    """The qformer stage's text tokenizer: given, in its bundle, or trained here on the captions."""
    if config.STAGE != "qformer" or getattr(config, "text_tokenizer", None):
        return config
    from dualtok.pipelines.actors import BundleSource
    from dualtok.pipelines.train.state import bundle_text_tokenizer

    options = config.storage.storage_options()
    if bundle_text_tokenizer(BundleSource(config.bundle, storage_options=options)) is not None:
        return config
    return dataclasses.replace(config, text_tokenizer=_caption_tokenizer(plan.config, config))


def _caption_tokenizer(recipe: RecipeConfig, config: TrainConfig) -> str:
    """Train a WordPiece vocabulary on the training captions, once, into <output>/text_tokenizer."""
    import tempfile
    from pathlib import Path

    from dualtok.pipelines.io.shards import iter_samples
    from dualtok.pipelines.io.storage import list_shards
    from dualtok.pipelines.train.data import train_text_tokenizer
    from dualtok.pipelines.train.plan import part_config
    from dualtok.pipelines.actors import BundleSource

    options = config.storage.storage_options()
    out = OutputFolder(join(recipe.output.rstrip("/"), "text_tokenizer"), options)
    if out.exists("tokenizer.json"):
        return out.uri()
    captions: list[str] = []
    for shard in list_shards(list(recipe.inputs), options or None):
        captions += [s.caption for s in iter_samples(shard, options or None) if s.caption and s.caption.strip()]
        if len(captions) >= MAX_TOKENIZER_CAPTIONS:
            break
    vocab = int(part_config(BundleSource(config.bundle, storage_options=options), "semantic")
                ["qformer_config"]["vocab_size"])
    with tempfile.TemporaryDirectory() as folder:
        train_text_tokenizer(captions, folder, vocab, getattr(config, "max_text_length", 32))
        files = sorted(Path(folder).iterdir(), key=lambda f: f.name == "tokenizer.json")
        for file in files:  # tokenizer.json last: its presence means the folder is complete
            out.write(file.read_bytes(), file.name)
    logger.info("trained a WordPiece text tokenizer (at most %d tokens) on %d captions: %s", vocab, len(captions),
                out.uri())
    return out.uri()


def _initial_guide_bundle(config: RecipeConfig, px: int, uri: str) -> None:
    """A guide-only bundle of the (overridden) preset with `px` px guides, random-initialised."""
    _initial_bundle(config, uri, {"guide": {"guide_size": px}}, ("guide",))


def _initial_bundle(config: RecipeConfig, uri: str, more: dict[str, dict[str, Any]] | None = None,
                    parts: tuple[str, ...] | None = None) -> None:
    """The preset with `preset_overrides` (and `more`) applied, random-initialised, written once to `uri`."""
    from dataclasses import replace

    from dualtok_core.bundle import BundleInfo, DualTokenizer
    from dualtok_core.checkpoints import RANDOM_INIT
    from dualtok_core.presets import PARTS, build_parts, get_preset

    options = config.storage.storage_options()
    fs, path = filesystem(join(uri, "bundle.json"), options or None)
    if fs.exists(path):
        return
    spec, changes = get_preset(config.bundle), {**config.preset_overrides}
    for part, keys in (more or {}).items():
        changes[part] = {**changes.get(part, {}), **keys}
    spec = replace(spec, **{part: {**getattr(spec, part), **keys} for part, keys in changes.items()})
    built = build_parts(spec, seed=config.seed, parts=parts or PARTS)
    what = f"{RANDOM_INIT} (preset {config.bundle}, seed {config.seed}, changed {json.dumps(changes, sort_keys=True)})"
    info = BundleInfo(preset=config.bundle, sources={part: what for part in built})
    DualTokenizer(built, info).save_pretrained(uri, storage_options=options or None)


def _heldout(plan: RecipePlan) -> dict[str, Any]:
    from dualtok.jobs.audit import audit
    from dualtok.jobs.tokenize import tokenize

    corpus, code = tokenize(plan.tokenize)
    if code != 0:
        raise ConfigError(f"tokenizing the held-out shards ended with exit code {code}: see {plan.tokenize.output}")
    summary, code, _ = audit(plan.audit)
    variants = {v["name"]: {m: {k: stats.get(k) for k in ("mean", "ci_low", "ci_high")}
                            for m, stats in v["metrics"].items()}
                for v in summary.variants}
    return {"corpus": plan.tokenize.output, "images": corpus.images, "audit": plan.audit.output,
            "report": summary.report, "audited": summary.images, "errors": summary.errors, "variants": variants}


def _write_record(config: RecipeConfig, record: dict[str, Any]) -> None:
    OutputFolder(config.output, config.storage.storage_options()).write(
        json.dumps(record, indent=2, default=str).encode(), RECIPE_FILE)  # steps in the order they ran


# ---- the command ------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, RecipeConfig)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(RecipeConfig, args)
    plan = plan_recipe(config)
    record = run_recipe(plan)
    for name, step in [*record["stages"].items(), *(("guide " + k, v) for k, v in record["guides"].items())]:
        done = "already finished" if step["already_finished"] else f"{step['wall_seconds']:.0f} s"
        loss = f"loss {step['first_loss']:.4g} -> {step['last_loss']:.4g}" if step["last_loss"] is not None else ""
        print(f"{name:<14} {step['steps']:>6} steps  {done:<18} {loss}")
    print(f"bundle: {record['bundle']}")
    heldout = record["heldout"]
    if heldout:
        print(f"held-out audit: {heldout['audited']} images, report {heldout['report']}")
        for name, metrics in heldout["variants"].items():
            psnr, ssim = metrics.get("psnr", {}), metrics.get("ssim", {})
            print(f"  {name:<22} PSNR {psnr.get('mean') or float('nan'):6.2f}  SSIM {ssim.get('mean') or float('nan'):.3f}")
    print(f"record: {join(config.output, RECIPE_FILE)}")
    return 0
