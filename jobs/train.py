"""`dualtok train <stage>`: one stage of the tokenizer as a Ray Train job, ending in a bundle.

    dualtok train guide    inputs=s3://b/shards/ bundle=small output=s3://b/bundles/guide storage_path=s3://b/runs
    dualtok train qformer  inputs=... bundle=s3://b/bundles/guide text_tokenizer=/models/bert-base-uncased ...
    dualtok train codebook inputs=... bundle=s3://b/bundles/qformer ...
    dualtok train reverse  inputs=... bundle=s3://b/bundles/codebook ...

Each stage has one config type (a `TrainConfig` with the stage's defaults: SEED's released values
for the semantic stages, see docs/training.md). Rerunning a command resumes its run (same `name`
in the same `storage_path`) from the latest checkpoint; rerunning a finished one only says so. A
rerun whose config or input bundle differs from what the run recorded stops and names each
difference (or, with on_config_change=new_run, starts a new run): runs never mix configs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from dualtok_core.errors import BundleError, DualtokError
from jobs.job_checks import BUNDLE_REQUIRED
from jobs.job_config import RayConfig, StorageConfig, add_config_arguments, config_from_args, init_ray
from pipelines import schemas as S
from pipelines.configuration import to_dict

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Fields every stage shares. Batch sizes are per worker; the global batch is
    batch_size x grad_accumulation x num_workers."""

    STAGE: ClassVar[str] = ""

    inputs: list[str] = field(default_factory=list)  # WebDataset shards: prefixes, globs, {a..b}, @list files
    bundle: str = ""  # required: the input bundle, a path/URI, or a preset name (tiny, small, paper: random weights)
    output: str = ""  # where the trained bundle is written (path or URI)
    storage_path: str = ""  # where runs keep checkpoints and metrics (path or URI)
    name: str = ""  # run name; default: derived from the stage and output, so a rerun resumes
    seed: int = 0  # preset weights seed, and the training seed
    num_workers: int = 1
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # default {"CPU": 1} (+ 1 GPU)
    batch_size: int = 64
    grad_accumulation: int = 1
    steps: int = 10_000
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_steps: int = 2000
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    max_grad_norm: float | None = 1.0  # None: no clipping (SEED clips nothing)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    max_failures: int = 3  # worker-group restarts (from the latest checkpoint) before the run fails
    shuffle_buffer: int = 256  # rows in each worker's local shuffle buffer (0: stream order)
    read_cpus: float = 1.0
    # A rerun whose config differs from its run's (keys outside RESUME_MAY_CHANGE, the input
    # bundle's weights): "error" stops before training, naming each difference; "new_run" starts a
    # fresh run named `<name>-<digest of the new config>` (which a later rerun resumes).
    on_config_change: Literal["error", "new_run"] = "error"
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()

    def __post_init__(self) -> None:
        if not self.bundle:
            raise ValueError(BUNDLE_REQUIRED)
        for key in ("inputs", "output", "storage_path"):
            if not getattr(self, key):
                raise ValueError(f"{key} is empty: the {self.STAGE} stage needs inputs, output and storage_path")
        positive = ("num_workers", "batch_size", "grad_accumulation", "steps", "checkpoint_every", "keep_checkpoints")
        bad = [key for key in positive if getattr(self, key) < 1]
        if bad:
            raise ValueError(f"{', '.join(bad)} must be >= 1")
        if self.max_failures < -1:
            raise ValueError("max_failures must be >= -1 (-1: retry forever)")


# Keys a rerun may change and still resume its run: none changes the schedule or the tensors.
# Where the run lives and exports to, the hardware and how a step is spread over it (the global
# batch `batch_size x grad_accumulation x num_workers` is compared instead), checkpoint and retry
# policy, and how the data is read (a resumed stream restarts its order anyway). Every other key,
# a new one included, must match the run's record.
RESUME_MAY_CHANGE = frozenset({
    "name", "storage_path", "output", "num_workers", "batch_size", "grad_accumulation", "use_gpu",
    "resources_per_worker", "checkpoint_every", "keep_checkpoints", "max_failures", "shuffle_buffer",
    "read_cpus", "on_config_change", "storage", "ray",
})


@dataclass(frozen=True)
class GuideTrainConfig(TrainConfig):
    """Branch I (paper sec. 3.1). The paper gives no hyper-parameters; these follow taming/MoVQ's
    Adam (betas 0.5, 0.9, no weight decay) with SEED's warmup + cosine."""

    STAGE: ClassVar[str] = "guide"
    batch_size: int = 16
    warmup_steps: int = 1000
    weight_decay: float = 0.0
    beta1: float = 0.5
    beta2: float = 0.9
    init_from_movq: str | None = None  # a Kandinsky 2.2 MoVQ folder (diffusers format), local or URI
    # Every this many steps, codes no image chose since the last restart move onto encoder outputs
    # (VQ-VAE's usual fix against codebook collapse; 0: off).
    dead_code_every: int = 100


@dataclass(frozen=True)
class QFormerTrainConfig(TrainConfig):
    """SEED stage 1 (its pretrain_qformer.yaml): lr 3e-5 -> 3e-6, 2000 warmup steps from 3e-7,
    AdamW weight decay 0.05, 64 pairs per GPU, label smoothing 0.1."""

    STAGE: ClassVar[str] = "qformer"
    lr: float = 3e-5
    min_lr: float = 3e-6
    warmup_lr: float = 3e-7
    text_tokenizer: str | None = None  # BERT-style folder (local or URI); default: the bundle's semantic/tokenizer
    max_text_length: int = 32  # BLIP-2's max_txt_len
    label_smoothing: float = 0.1


@dataclass(frozen=True)
class CodebookTrainConfig(TrainConfig):
    """SEED stage 2 (its pretrain_codebook.yaml): lr 1e-4 -> 1e-5, 2000 warmup steps from 1e-6,
    AdamW weight decay 0.05, 256 images per GPU."""

    STAGE: ClassVar[str] = "codebook"
    batch_size: int = 256


@dataclass(frozen=True)
class ReverseTrainConfig(TrainConfig):
    """SEED trains the Reverse Q-Former with its stage-2 recipe; so does this stage."""

    STAGE: ClassVar[str] = "reverse"
    batch_size: int = 256


STAGE_CONFIGS: dict[str, type[TrainConfig]] = {
    cls.STAGE: cls for cls in (GuideTrainConfig, QFormerTrainConfig, CodebookTrainConfig, ReverseTrainConfig)
}


@dataclass
class TrainSummary:
    stage: str
    run: str
    run_dir: str
    output: str
    steps: int
    fingerprint: str  # of the exported bundle
    input_fingerprint: str
    first_loss: float | None
    last_loss: float | None
    images_per_second: float | None  # median over the run's steps
    seconds: float
    already_finished: bool = False


def default_run_name(stage: str, output: str) -> str:
    """Stable across reruns of one command (same stage and output), so a rerun resumes its run."""
    return f"{stage}-{hashlib.sha256(output.rstrip('/').encode()).hexdigest()[:10]}"


def train(config: TrainConfig, callbacks: list[Any] | None = None) -> TrainSummary:
    """Train `config`'s stage (or resume it), export the bundle, mark the run finished.

    `callbacks` are Ray Train `UserCallback`s, run on the Ray Train controller.
    """
    from jobs.train_plan import plan_training

    started = time.monotonic()
    plan = plan_training(config)
    finished = plan.layout.finished()
    if finished is not None:
        return _already_finished(plan, finished, started)
    init_ray(config.ray, min_cpus=training_cpus(config))
    plan.write_run_record()
    result = fit(plan, plan.dataset(), callbacks)
    return finish(plan, result, started)


def training_cpus(config: TrainConfig) -> float:
    """Logical CPUs a run needs: every worker's, plus `read_cpus` for Ray Data's read tasks. Without
    the latter a local cluster of exactly the workers' CPUs (num_workers=2 on a 2-core laptop) holds
    them all and the read tasks wait forever."""
    per_worker = dict(config.resources_per_worker).get("CPU", 1.0)
    return config.num_workers * per_worker + config.read_cpus


def fit(plan: Any, dataset: Any, callbacks: list[Any] | None = None) -> Any:
    """Run the stage's TorchTrainer over `dataset`; returns Ray Train's Result (raises on failure)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from jobs.train_worker import DATASET_NAME, train_loop_per_worker

    config = plan.config
    storage_path, storage_filesystem = plan.layout.ray_storage()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan.worker},
        scaling_config=ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.use_gpu, resources_per_worker=plan.resources_per_worker,
        ),
        run_config=RunConfig(
            name=plan.layout.name, storage_path=storage_path, storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
            callbacks=list(callbacks or []),
        ),
        datasets={DATASET_NAME: dataset},
    )
    return trainer.fit()


def finish(plan: Any, result: Any, started: float) -> TrainSummary:
    """Export the final checkpoint into a bundle, merge the metrics, write the completion marker."""
    from jobs.train_state import export_bundle, read_checkpoint

    if result.checkpoint is None:
        raise DualtokError(f"run {plan.layout.name} ended without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        _, _, meta = read_checkpoint(Path(folder))
        if meta["step"] != plan.config.steps:
            raise DualtokError(f"run {plan.layout.name} stopped at step {meta['step']} of {plan.config.steps}")
        exported = export_bundle(plan.export, Path(folder))
    rows = plan.layout.write_merged_metrics()
    summary = _summary(plan, rows, exported.fingerprint, started)
    plan.layout.write_finished({
        "stage": plan.config.STAGE, "run": plan.layout.name, "steps": plan.config.steps,
        "output": plan.config.output, "fingerprint": exported.fingerprint,
        "input_fingerprint": plan.input_fingerprint, "first_loss": summary.first_loss,
        "last_loss": summary.last_loss, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    return summary


def _summary(plan: Any, rows: list[dict[str, Any]], fingerprint: str, started: float) -> TrainSummary:
    speeds = [row[S.TRAIN_IMAGES_PER_SECOND] for row in rows]
    return TrainSummary(
        stage=plan.config.STAGE, run=plan.layout.name, run_dir=plan.layout.run_dir, output=plan.config.output,
        steps=plan.config.steps, fingerprint=fingerprint, input_fingerprint=plan.input_fingerprint,
        first_loss=rows[0][S.TRAIN_LOSS] if rows else None, last_loss=rows[-1][S.TRAIN_LOSS] if rows else None,
        images_per_second=statistics.median(speeds) if speeds else None, seconds=time.monotonic() - started,
    )


def _already_finished(plan: Any, marker: dict[str, Any], started: float) -> TrainSummary:
    if marker.get("output") != plan.config.output or marker.get("steps") != plan.config.steps:
        raise BundleError(
            f"run {plan.layout.name} in {plan.config.storage_path} already finished ({marker.get('steps')} steps, "
            f"exported to {marker.get('output')}); give a new name= to train again"
        )
    logger.info("run %s already finished; its bundle is %s", plan.layout.name, marker["output"])
    return TrainSummary(
        stage=marker["stage"], run=plan.layout.name, run_dir=plan.layout.run_dir, output=marker["output"],
        steps=marker["steps"], fingerprint=marker["fingerprint"], input_fingerprint=marker["input_fingerprint"],
        first_loss=marker.get("first_loss"), last_loss=marker.get("last_loss"), images_per_second=None,
        seconds=time.monotonic() - started, already_finished=True,
    )


def print_summary(summary: TrainSummary) -> None:
    if summary.already_finished:
        print(f"train {summary.stage}: run {summary.run} already finished ({summary.steps} steps); nothing to do")
    else:
        speed = f", {summary.images_per_second:.1f} images/s" if summary.images_per_second else ""
        loss = f"; loss {summary.first_loss:.4g} -> {summary.last_loss:.4g}" if summary.last_loss is not None else ""
        print(f"train {summary.stage}: run {summary.run} finished {summary.steps} steps in {summary.seconds:.0f} s"
              f"{speed}{loss}")
    print(f"bundle:  {summary.output}  (fingerprint {summary.fingerprint}, from {summary.input_fingerprint})")
    print(f"run:     {summary.run_dir}  (checkpoints, metrics.jsonl)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stage", choices=list(STAGE_CONFIGS), help="the stage to train (paper sec. 3.1-3.2)")
    add_config_arguments(parser, TrainConfig, variants=STAGE_CONFIGS)
    parser.set_defaults(_config_type=lambda args: STAGE_CONFIGS[args.stage])  # --print-config


def run(args: argparse.Namespace) -> int:
    config = config_from_args(STAGE_CONFIGS[args.stage], args)
    print_summary(train(config))
    return 0


def resolved_config(config: TrainConfig) -> dict[str, Any]:
    """The config as recorded beside the run (secrets redacted), with the stage."""
    return {"stage": config.STAGE, **to_dict(config)}


def run_identity(config: TrainConfig, input_fingerprint: str, part_hashes: dict[str, str]) -> dict[str, Any]:
    """What fixes a run's schedule and tensors, as JSON data: the resolved config less the keys a
    rerun may change, the global batch, and the input bundle's fingerprint and part hashes."""
    kept = {k: v for k, v in resolved_config(config).items() if k not in RESUME_MAY_CHANGE}
    kept["global_batch"] = config.batch_size * config.grad_accumulation * config.num_workers
    kept["input_fingerprint"], kept["input_part_hashes"] = input_fingerprint, dict(part_hashes)
    return json.loads(json.dumps(kept, sort_keys=True, default=str))  # as a run.json read back has it

