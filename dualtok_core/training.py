"""What every training stage shares: the LR schedule, the optimizer, and one optimizer step.

Ray-free and single-device, like the models: the job (`dualtok.pipelines.train.worker`) wraps a stage
module (`training_stages.py`) in DDP and calls `optimizer_step` with its micro-batches. Gradient
accumulation skips DDP's all-reduce on all but the last micro-batch (`no_sync`), so a step of
`k` micro-batches costs one gradient exchange.

The schedule is LAVIS's `linear_warmup_cosine_lr`, the one SEED trains with, applied per
optimizer step (LAVIS warms up per step but decays per epoch; a streamed corpus has no epochs
worth the name, so the cosine runs over `total_steps`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dualtok_core.errors import DualtokError

logger = logging.getLogger(__name__)

MIXED_PRECISION = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class LRSchedule:
    """Linear warmup from `warmup_lr` to `lr` over `warmup_steps`, then cosine down to `min_lr`.

    Callable as a `LambdaLR` factor (lr_at(step) / lr); frozen, so its state is its fields.
    """

    lr: float
    total_steps: int
    warmup_steps: int = 0
    warmup_lr: float = 0.0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.total_steps < 1:
            raise DualtokError(f"the schedule needs lr > 0 and total_steps >= 1, got {self}")
        if self.warmup_steps < 0 or self.warmup_lr < 0 or not 0 <= self.min_lr <= self.lr:
            raise DualtokError(f"warmup_steps, warmup_lr must be >= 0 and 0 <= min_lr <= lr, got {self}")

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0 = the first step)."""
        if step < self.warmup_steps:
            return self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def __call__(self, step: int) -> float:
        return self.lr_at(step) / self.lr


def build_optimizer(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; biases, norms and scalars get no weight decay (as LAVIS)."""
    decay, no_decay = [], []
    for _, param in named_parameters:
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 else decay).append(param)
    if not decay and not no_decay:
        raise DualtokError("the optimizer got no trainable parameter: is every part of the stage frozen?")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: LRSchedule) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR that follows `schedule`; its state_dict is the step count and the schedule's fields."""
    for group in optimizer.param_groups:
        group["lr"] = schedule.lr
        group["initial_lr"] = schedule.lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """`auto` is bf16 on CUDA and full precision elsewhere; otherwise the named dtype (or None for `no`)."""
    if mixed_precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if mixed_precision not in MIXED_PRECISION:
        raise DualtokError(f"mixed_precision must be auto, {', '.join(MIXED_PRECISION)}; got {mixed_precision!r}")
    return MIXED_PRECISION[mixed_precision]


@dataclass
class StepResult:
    """One optimizer step, averaged over its micro-batches (this process's share of the batch)."""

    loss: float
    terms: dict[str, float]
    grad_norm: float
    lr: float  # the learning rate the step used
    ids: torch.Tensor | None  # (N, L) code ids the step's images chose, for codebook usage


def optimizer_step(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    micro_batches: Sequence[Mapping[str, Any]],
    *,
    max_grad_norm: float | None = None,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> StepResult:
    """Forward/backward every micro-batch (keyword arguments of `module`), clip, step, advance the LR.

    `module` returns a `StageOutput`; under DDP, gradients are exchanged once, after the last
    micro-batch. With fp16, `scaler` scales the loss and skips steps whose gradients overflow.
    """
    if not micro_batches:
        raise DualtokError("optimizer_step needs at least one micro-batch")
    device_type = next(module.parameters()).device.type
    optimizer.zero_grad(set_to_none=True)
    count = len(micro_batches)
    sums: dict[str, torch.Tensor] = {}
    ids = []
    for index, batch in enumerate(micro_batches):
        last = index == count - 1
        sync = nullcontext() if last or not hasattr(module, "no_sync") else module.no_sync()
        with sync:
            with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = module(**batch)
            loss = out.loss.float() / count
            (scaler.scale(loss) if scaler is not None else loss).backward()
        for name, value in {"loss": out.loss, **out.terms}.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float() / count
        if out.ids is not None:
            ids.append(out.ids.detach())
    grad_norm = _clip(optimizer, max_grad_norm, scaler)
    lr = float(optimizer.param_groups[0]["lr"])
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    values = {name: float(value) for name, value in sums.items()}
    return StepResult(
        loss=values.pop("loss"), terms=values, grad_norm=grad_norm, lr=lr,
        ids=torch.cat(ids) if ids else None,
    )


def _clip(optimizer: torch.optim.Optimizer, max_grad_norm: float | None, scaler: torch.amp.GradScaler | None) -> float:
    """Clip the global gradient norm (after unscaling fp16 gradients); returns the norm before clipping."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not params:
        raise DualtokError("no trainable parameter received a gradient: does the loss depend on them?")
    limit = max_grad_norm if max_grad_norm else float("inf")
    return float(torch.nn.utils.clip_grad_norm_(params, limit))
