"""Training's config: one typed config per stage (its defaults are the stage's recipe), and what
fixes a run's identity (the keys a rerun may change and still resume).

Each stage has one config type (a `TrainConfig` with the stage's defaults: SEED's released values
for the semantic stages, see docs/training.md). Batch sizes are per worker; the global batch is
batch_size x grad_accumulation x num_workers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from dualtok.pipelines.cluster import RayConfig
from dualtok.pipelines.config import BUNDLE_REQUIRED, to_dict
from dualtok.pipelines.io.storage import StorageConfig


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
    num_workers: int = 1  # Ray Train workers (data-parallel ranks)
    use_gpu: bool = False  # one GPU per worker
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # default {"CPU": 1} (+ 1 GPU)
    batch_size: int = 64  # images per worker per micro-batch
    grad_accumulation: int = 1  # micro-batches per optimizer step
    steps: int = 10_000  # optimizer steps of the whole run
    lr: float = 1e-4  # peak learning rate, reached after the warmup; cosine decay to min_lr after it
    min_lr: float = 1e-5  # the learning rate at the last step
    warmup_lr: float = 1e-6  # the learning rate at step 1, rising linearly to lr
    warmup_steps: int = 2000  # steps of linear warmup
    weight_decay: float = 0.05  # AdamW's decoupled weight decay (not applied to norms and biases)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.999  # AdamW beta2
    max_grad_norm: float | None = 1.0  # None: no clipping (SEED clips nothing)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    checkpoint_every: int = 500  # steps between checkpoints (a restart resumes from the latest)
    keep_checkpoints: int = 2  # checkpoints kept in the run folder; older ones are deleted
    max_failures: int = 3  # worker-group restarts (from the latest checkpoint) before the run fails
    shuffle_buffer: int = 256  # rows in each worker's local shuffle buffer (0: stream order)
    read_cpus: float = 1.0  # CPUs of each Ray Data read/decode task feeding the workers
    # Augmentation (training only; tokenize never augments): each image becomes a random square crop
    # whose area is this share range of its centre square, resized to the branch's input; 1.0, 1.0: none.
    crop_scale_min: float = 0.5  # smallest crop area share (BLIP-2/SEED's RandomResizedCrop: 0.5)
    crop_scale_max: float = 1.0  # largest crop area share
    hflip: bool = True  # mirror half of the images left-right
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
        if not 0.0 < self.crop_scale_min <= self.crop_scale_max <= 1.0:
            raise ValueError(f"crop scales must satisfy 0 < crop_scale_min <= crop_scale_max <= 1, got "
                             f"{self.crop_scale_min}, {self.crop_scale_max}")


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
class VaeTrainConfig(TrainConfig):
    """Branch III's AutoencoderKL from scratch (SD 1.x's VAE recipe without its LPIPS and GAN terms:
    Adam betas 0.5, 0.9, no weight decay). Its export sets the VAE's scaling_factor to 1 / the
    latents' running std, so the unet stage sees unit-variance latents."""

    STAGE: ClassVar[str] = "vae"
    batch_size: int = 16
    lr: float = 1e-4
    warmup_steps: int = 500
    weight_decay: float = 0.0
    beta1: float = 0.5
    beta2: float = 0.9
    kl_weight: float = 1e-6  # KL per latent element against the per-pixel L1 (SD 1.x's ratio is ~2e-8)


@dataclass(frozen=True)
class UnetTrainConfig(TrainConfig):
    """Branch III's UNet from scratch on the frozen VAE's latents, conditioned on the frozen text
    encoder's caption features (SD 1.x's epsilon objective on the bundle's noise schedule)."""

    STAGE: ClassVar[str] = "unet"
    batch_size: int = 32
    lr: float = 1e-4
    warmup_steps: int = 500
    weight_decay: float = 0.01
    caption_dropout: float = 0.1  # share of captions replaced by "" so that classifier-free guidance works


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
    label_smoothing: float = 0.1  # = dualtok_core.semantic.SEED_LABEL_SMOOTHING (this module stays torch-free)


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


# In the order a from-scratch bundle trains them (dualtok_core.training_stages.STAGES).
STAGE_CONFIGS: dict[str, type[TrainConfig]] = {
    cls.STAGE: cls for cls in (GuideTrainConfig, VaeTrainConfig, UnetTrainConfig, QFormerTrainConfig,
                               CodebookTrainConfig, ReverseTrainConfig)
}


def default_run_name(stage: str, output: str) -> str:
    """Stable across reruns of one command (same stage and output), so a rerun resumes its run."""
    return f"{stage}-{hashlib.sha256(output.rstrip('/').encode()).hexdigest()[:10]}"


def training_cpus(config: TrainConfig) -> float:
    """Logical CPUs a run needs: every worker's, plus `read_cpus` for Ray Data's read tasks. Without
    the latter a local cluster of exactly the workers' CPUs (num_workers=2 on a 2-core laptop) holds
    them all and the read tasks wait forever."""
    per_worker = dict(config.resources_per_worker).get("CPU", 1.0)
    return config.num_workers * per_worker + config.read_cpus


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
