"""Running one training stage on Ray Train: plan, fit (or resume), export the bundle, mark the run finished.

Rerunning resumes a run (same `name` in the same `storage_path`) from the latest checkpoint;
rerunning a finished one only says so. A rerun whose config or input bundle differs from what the
run recorded stops and names each difference (or, with on_config_change=new_run, starts a new run):
runs never mix configs.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dualtok_core.errors import BundleError, DualtokError
from dualtok.pipelines.cluster import init_ray
from dualtok.pipelines.io import schemas as S
from dualtok.pipelines.train.config import TrainConfig, training_cpus

logger = logging.getLogger(__name__)


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


def train(config: TrainConfig, callbacks: list[Any] | None = None) -> TrainSummary:
    """Train `config`'s stage (or resume it), export the bundle, mark the run finished.

    `callbacks` are Ray Train `UserCallback`s, run on the Ray Train controller.
    """
    from dualtok.pipelines.train.plan import plan_training  # imports torch and the models

    started = time.monotonic()
    plan = plan_training(config)
    finished = plan.layout.finished()
    if finished is not None:
        return _already_finished(plan, finished, started)
    init_ray(config.ray, min_cpus=training_cpus(config))
    plan.write_run_record()
    result = fit(plan, plan.dataset(), callbacks)
    return finish(plan, result, started)


def fit(plan: Any, dataset: Any, callbacks: list[Any] | None = None) -> Any:
    """Run the stage's TorchTrainer over `dataset`; returns Ray Train's Result (raises on failure)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from dualtok.pipelines.train.worker import DATASET_NAME, train_loop_per_worker

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
    from dualtok.pipelines.train.state import export_bundle, read_checkpoint

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
