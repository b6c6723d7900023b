"""The loop every Ray Train worker of `dualtok train` runs.

Each worker loads the input bundle's parts the stage needs, restores the latest checkpoint if
Ray Train hands one over (a rerun of the command, or a restart after a worker died), wraps the
stage module in DDP, and steps until `steps`: micro-batches from its share of the Ray Data
stream, one gradient exchange per optimizer step, metrics reported every step, a checkpoint
(rank 0 writes it) every `checkpoint_every` steps and at the last one.
"""

from __future__ import annotations

import logging
import random
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dualtok_core.errors import BundleError, DualtokError
from dualtok_core.guide import codebook_usage
from dualtok_core.imaging import augment, check_uint8_images, to_model_input
from dualtok_core.semantic import SEED_LABEL_SMOOTHING
from dualtok_core.training import LRSchedule, autocast_dtype, build_optimizer, build_scheduler, optimizer_step
from dualtok_core.training_stages import CodeUsage, StageContext, TrainingStage, no_gather, stage_class
from dualtok.pipelines.train.state import (
    RunLayout, apply_training_state, branch_for_stage, capture_training_state, read_checkpoint, rng_state,
    save_checkpoint,
)
from dualtok.pipelines.io import schemas as S
from dualtok.pipelines.actors import BundleSource
from dualtok.pipelines.train.data import load_text_tokenizer

logger = logging.getLogger(__name__)

DATASET_NAME = "train"


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a worker needs, resolved by the driver from the job config."""

    stage: str
    source: BundleSource
    layout: RunLayout
    steps: int
    checkpoint_every: int
    batch_size: int  # images per worker per micro-batch
    grad_accumulation: int
    schedule: LRSchedule
    weight_decay: float
    betas: tuple[float, float]
    max_grad_norm: float | None
    mixed_precision: str
    seed: int
    input_fingerprint: str
    text_tokenizer: str | None = None
    max_text_length: int = 32
    label_smoothing: float = SEED_LABEL_SMOOTHING
    init_from_movq: str | None = None
    dead_code_every: int = 0
    shuffle_buffer: int = 0
    torch_threads: int | None = None
    kl_weight: float = 1e-6
    caption_dropout: float = 0.1
    crop_scale: tuple[float, float] = (1.0, 1.0)  # area share range of the random crops; (1, 1): none
    hflip: bool = False


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point: `config["plan"]` is the WorkerPlan."""
    StageWorker(config["plan"]).run()


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """(B, ...) on every rank -> (world * B, ...) in rank order; gradients flow back to each source."""
    import torch.distributed.nn.functional as dist_nn

    with warnings.catch_warnings():
        # torch 2.13 marks it deprecated in favour of a private module; it is the public autograd gather.
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(dist_nn.all_gather(tensor))


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Like `all_gather_with_grad`, for values that need no gradient (ids, latents)."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


class StageWorker:
    """One worker's model, optimizer, data stream and step counter for one stage."""

    def __init__(self, plan: WorkerPlan) -> None:
        import ray.train
        import ray.train.torch

        self.plan = plan
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.distributed = self.world > 1 and dist.is_initialized()
        if plan.torch_threads:
            torch.set_num_threads(plan.torch_threads)
        self.device = ray.train.torch.get_device()
        self.stage = self._build_stage()
        self.stage.to(self.device)
        self.optimizer = build_optimizer(self.stage.named_trainable_parameters(), plan.schedule.lr,
                                         plan.weight_decay, plan.betas)
        self.scheduler = build_scheduler(self.optimizer, plan.schedule)
        self.amp = autocast_dtype(plan.mixed_precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp == torch.float16 else None
        size = self.stage.codebook_size
        self.usage = CodeUsage(size) if size else None
        self.step = self.resumed_from = self._restore()
        self.module = ray.train.torch.prepare_model(self.stage)
        logger.info("rank %d/%d: stage %s on %s, starting at step %d", self.rank, self.world, plan.stage,
                    self.device, self.step)

    # ---- building -------------------------------------------------------------------------------
    def _build_stage(self) -> TrainingStage:
        plan, cls = self.plan, stage_class(self.plan.stage)
        tokenizer = plan.source.load(cls.parts())
        text_tokenizer = None
        if plan.text_tokenizer is not None:  # the planner resolves one for the stages that read captions as text
            vocab = int(tokenizer.part("semantic").config.qformer_config["vocab_size"])
            text_tokenizer = load_text_tokenizer(plan.text_tokenizer, vocab, plan.source.storage_options)
        context = StageContext(
            device=self.device, gather=all_gather_with_grad if self.world > 1 else no_gather,
            text_tokenizer=text_tokenizer, max_text_length=plan.max_text_length, label_smoothing=plan.label_smoothing,
            model=branch_for_stage(plan.stage, tokenizer, plan.init_from_movq, plan.source.storage_options or None),
            kl_weight=plan.kl_weight, caption_dropout=plan.caption_dropout,
        )
        return cls.from_bundle(tokenizer, context)

    def _restore(self) -> int:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            torch.manual_seed(self.plan.seed * 1000 + self.rank)
            random.seed(self.plan.seed * 1000 + self.rank)
            return 0
        with checkpoint.as_directory() as folder:
            tensors, state, meta = read_checkpoint(Path(folder))
        if meta.get("stage") != self.plan.stage:
            raise BundleError(f"run {self.plan.layout.name} holds a {meta.get('stage')} checkpoint, not {self.plan.stage}")
        self.stage.load_trainable_state(tensors)
        step = apply_training_state(state, self.optimizer, self.scheduler, self.scaler, self.rank, self.world,
                                    self.plan.seed)
        if self.usage is not None and state.get("code_usage") is not None:
            self.usage.used.copy_(state["code_usage"])
        logger.info("rank %d restored step %d from %s", self.rank, step, checkpoint.path)
        return step

    # ---- data -----------------------------------------------------------------------------------
    def _batches(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(epoch, numpy batch) forever: a new pass over this worker's share when one runs out."""
        import ray.train

        shard = ray.train.get_dataset_shard(DATASET_NAME)
        epoch = 0
        while True:
            seen = 0
            for batch in shard.iter_batches(
                batch_size=self.plan.batch_size, batch_format="numpy", drop_last=True,
                local_shuffle_buffer_size=self.plan.shuffle_buffer or None,
            ):
                seen += 1
                yield epoch, batch
            if not seen:
                raise DualtokError(
                    f"worker {self.rank} got no full batch of {self.plan.batch_size} training samples: give more "
                    "shards, fewer workers or a smaller batch_size (samples without captions are skipped in "
                    "the qformer and reverse stages)"
                )
            epoch += 1

    def _inputs(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """A numpy batch -> the stage module's keyword arguments, on the device."""
        # Ray Data hands out read-only arrays; torch warns about wrapping those, so copy when needed.
        pixels = check_uint8_images(np.require(batch[S.IMAGE], requirements="W"))  # (B, S', S', 3) uint8
        if self.plan.crop_scale != (1.0, 1.0) or self.plan.hflip:
            # Drawn from the global RNG, which checkpoints keep: a resumed run augments as the original would.
            images = augment(pixels, self.stage.image_size, self.plan.crop_scale, self.plan.hflip, self.device)
        else:
            images = to_model_input(pixels, self.stage.image_size, self.device, torch.float32)  # (B, 3, S, S)
        return self.stage.inputs(images, [str(c) for c in batch[S.CAPTION]])

    # ---- the loop -------------------------------------------------------------------------------
    def run(self) -> None:
        plan, rows = self.plan, []
        batches = self._batches()
        last_end, last_cpu = time.perf_counter(), time.process_time()
        while self.step < plan.steps:
            epoch, micro = 0, []
            fetch_start = time.perf_counter()
            for _ in range(plan.grad_accumulation):
                epoch, batch = next(batches)
                micro.append(self._inputs(batch))
            compute_start = time.perf_counter()
            result = optimizer_step(self.module, self.optimizer, self.scheduler, micro,
                                    max_grad_norm=plan.max_grad_norm, amp_dtype=self.amp, scaler=self.scaler)
            compute_end = time.perf_counter()
            self.step += 1
            row = self._metrics_row(result, epoch)
            row[S.TRAIN_DATA_SECONDS] = compute_start - fetch_start
            row[S.TRAIN_COMPUTE_SECONDS] = compute_end - compute_start
            if self.plan.dead_code_every and self.step % self.plan.dead_code_every == 0:
                row[S.TRAIN_DEAD_CODES] = self._restart_dead_codes(micro[-1]["images"])
            row[S.TRAIN_SECONDS] = time.perf_counter() - last_end
            row[S.TRAIN_CPU_SECONDS] = time.process_time() - last_cpu
            images = plan.batch_size * plan.grad_accumulation * self.world
            row[S.TRAIN_IMAGES_PER_SECOND] = images / row[S.TRAIN_SECONDS]
            rows.append(row)
            # Metrics reach Ray Train only with checkpoints: each `ray.train.report` blocks until the
            # controller takes the previous one, which it polls every 2 s (Ray Train v2's health-check
            # interval), so a report per step capped training at one step per 2 s whatever it cost.
            # Every step's row still reaches storage, with its checkpoint interval.
            if self.step % plan.checkpoint_every == 0 or self.step == plan.steps:
                self._checkpoint(row, rows)
                rows = []
            last_end, last_cpu = time.perf_counter(), time.process_time()

    def _metrics_row(self, result: Any, epoch: int) -> dict[str, Any]:
        """Loss terms averaged over the workers, LR, grad norm, codebook health on the global batch."""
        values = {S.TRAIN_LOSS: result.loss, **result.terms}
        if self.distributed:
            packed = torch.tensor(list(values.values()), dtype=torch.float64)
            dist.all_reduce(packed)
            values = dict(zip(values, (packed / self.world).tolist(), strict=True))
        row: dict[str, Any] = {S.TRAIN_STEP: self.step, S.TRAIN_EPOCH: epoch, S.TRAIN_LR: result.lr,
                               S.TRAIN_GRAD_NORM: result.grad_norm, S.TRAIN_RESUMED_FROM: self.resumed_from, **values}
        if self.usage is not None and result.ids is not None:
            ids = all_gather(result.ids.to(self.device)) if self.distributed else result.ids  # (N, L)
            usage, perplexity = codebook_usage(ids, self.stage.codebook_size)
            row.update({S.TRAIN_CODEBOOK_USAGE: usage, S.TRAIN_CODEBOOK_PERPLEXITY: perplexity})
            self.usage.update(ids)
        return row

    @torch.no_grad()
    def _restart_dead_codes(self, images: torch.Tensor) -> int:
        """Move the codes no image chose since the last restart onto encoder outputs of this batch.

        Every rank gathers the same latents and draws with the same generator, so the codebooks
        stay identical without a broadcast.
        """
        latents = self.stage.model.encode_latents(images)  # (B, D, h, w)
        latents = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])  # (B*h*w, D)
        if self.distributed:
            latents = all_gather(latents)
        generator = torch.Generator().manual_seed(self.plan.seed * 1_000_003 + self.step)
        restarted = self.stage.model.reset_dead_codes(latents, self.usage.used, generator)
        self.usage.reset()
        return restarted

    def _checkpoint(self, row: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        """Metrics of the interval, then the checkpoint: a crash between them redoes the interval."""
        import ray.train
        from ray.train import Checkpoint

        rngs = [rng_state()]
        if self.distributed:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, rng_state())
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if self.rank == 0:
                self.plan.layout.write_metrics(rows)
                state = capture_training_state(self.step, self.optimizer, self.scheduler, self.scaler, rngs,
                                               self.usage.used if self.usage is not None else None)
                meta = {"stage": self.plan.stage, "step": self.step, "run": self.plan.layout.name,
                        "world_size": self.world, "input_fingerprint": self.plan.input_fingerprint}
                save_checkpoint(Path(folder), self.stage, state, meta)
                checkpoint = Checkpoint.from_directory(folder)
            ray.train.report(row, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{self.step:010d}")

