"""The training stages as modules whose forward is the stage's loss. Each stage class is the one
place that declares what it trains (`part`, `trainable_prefixes`), what else it loads frozen
(`frozen_parts`), its loss terms (`loss_terms`, the metric columns), whether its rows need
captions, and how a batch of images and captions becomes its `forward`'s arguments (`inputs`).
Adding a stage is adding a class to `STAGES`; the Ray Train worker, the planner, the exporter and
the job's `stage` choices read everything from here.

    guide     Branch I   eq. 4-5 MSE to the input resized to the guide size + VQ terms   (GuideVQModel)
    vae       Branch III the AutoencoderKL: L1 reconstruction + KL                      (UNet, text encoder frozen)
    unet      Branch III epsilon prediction on the frozen VAE's latents, conditioned on the frozen
                         text encoder's 77 x D caption features (the eq. 8 target), captions
                         dropped to "" at `caption_dropout` for classifier-free guidance
    qformer   Branch II  eq. 6 contrastive, last causal query vs. the text [CLS]         (ViT frozen)
    codebook  Branch II  eq. 7 cosine between decoded and causal embeddings + VQ terms   (ViT, Q-Former frozen)
    reverse   Branch II  eq. 8 MSE of the 77 generation embeddings to the text encoder's features
                                                                              (only the Reverse Q-Former trains)

The stages of a from-scratch bundle run in this order: guide, vae, unet, qformer, codebook,
reverse (the reverse stage's target is the trained text encoder's features, so the diffusion
branch comes before it; the text encoder itself is never trained, as in SD and SEED).

A stage wraps one branch so that DDP can wrap the stage: DDP synchronises gradients only for
what runs through its `forward`, so the loss must be that forward. Frozen parts get
`requires_grad=False` and stay in eval mode (`SemanticTokenizer.freeze_for_stage`); checkpoints
and exports hold only the trainable parts' tensors, the rest comes from the input bundle.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from diffusers.utils import BaseOutput
from torch import nn

from dualtok_core.diffusion import DiffusionReconstructor
from dualtok_core.errors import DualtokError
from dualtok_core.guide import GuideVQModel
from dualtok_core.semantic import SEED_LABEL_SMOOTHING, STAGE_TRAINABLE, SemanticTokenizer, contrastive_loss

Gather = Callable[[torch.Tensor], torch.Tensor]


def no_gather(tensor: torch.Tensor) -> torch.Tensor:
    """The single-process all-gather: the local batch is the global batch."""
    return tensor


def tokenize_captions(tokenizer: Any, captions: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> (input_ids, attention_mask), both (B, L) int64, padded to the longest, truncated."""
    encoded = tokenizer(
        [str(c) for c in captions], padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return encoded["input_ids"].long(), encoded["attention_mask"].long()


@dataclass
class StageContext:
    """What a stage needs beside its bundle, resolved by the caller (core reads no files or stores)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    gather: Gather = no_gather  # the all-gather with gradients across workers (qformer's negatives)
    text_tokenizer: Any = None  # qformer: the Q-Former's text tokenizer (a transformers tokenizer)
    max_text_length: int = 32
    label_smoothing: float = SEED_LABEL_SMOOTHING
    model: nn.Module | None = None  # the branch to train instead of the bundle's (guide: MoVQ weights)
    kl_weight: float = 1e-6  # vae: weight of the KL term per latent element, against the per-pixel L1
    caption_dropout: float = 0.1  # unet: share of captions replaced by "" (classifier-free guidance)


@dataclass
class StageOutput(BaseOutput):
    loss: torch.Tensor  # the scalar that is back-propagated
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars to log
    ids: torch.Tensor | None = None  # (B, L) code ids, for codebook usage (guide, codebook)


class TrainingStage(nn.Module, abc.ABC):
    """One branch with its stage's trainable parts; `forward(**batch)` returns the stage's loss."""

    name: ClassVar[str] = ""
    part: ClassVar[str] = ""  # the bundle part this stage trains
    frozen_parts: ClassVar[tuple[str, ...]] = ()  # other bundle parts it loads and keeps frozen
    needs_captions: ClassVar[bool] = False  # rows without a caption are skipped
    # Where the trained branch's input size is in its config: the file under the part's folder
    # (a bundle) or the key path in the preset's kwargs, and the key.
    config_path: ClassVar[tuple[str, ...]] = ()
    size_key: ClassVar[str] = "image_size"
    loss_terms: ClassVar[tuple[str, ...]] = ()  # the keys of `StageOutput.terms` (metric columns)

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @classmethod
    def parts(cls) -> tuple[str, ...]:
        """The bundle parts a run of this stage loads: the trained one first."""
        return (cls.part, *cls.frozen_parts)

    @classmethod
    def from_bundle(cls, tokenizer: Any, context: StageContext) -> TrainingStage:
        """The stage over `tokenizer`'s part (a `DualTokenizer` holding `parts()`), on `context.device`."""
        return cls(context.model if context.model is not None else tokenizer.part(cls.part)).to(context.device)

    def inputs(self, images: torch.Tensor, captions: list[str]) -> dict[str, torch.Tensor]:
        """`forward`'s keyword arguments for a batch: images (B, 3, S, S) in [0, 1] on the stage's
        device, and the rows' captions."""
        return {"images": images}

    @property
    def image_size(self) -> int:
        return int(self.model.config.image_size)

    @classmethod
    def input_size(cls, part_config: dict[str, Any]) -> int:
        """The trained branch's input size from its config (what `config_path` points at)."""
        return int(part_config[cls.size_key])

    @property
    def codebook_size(self) -> int | None:
        """Codes the stage's ids index (for usage metrics), or None when it produces no ids."""
        return None

    @abc.abstractmethod
    def trainable_prefixes(self) -> tuple[str, ...]:
        """Top-level submodule names of `model` that this stage trains ('' = all of it)."""

    def _trains(self, name: str) -> bool:
        prefixes = self.trainable_prefixes()
        return prefixes == ("",) or name.split(".")[0] in prefixes

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """CPU copies of the trained parts' tensors (parameters and buffers): what a checkpoint keeps."""
        return {
            name: tensor.detach().to("cpu").clone().contiguous()
            for name, tensor in self.model.state_dict().items()
            if self._trains(name)
        }

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `trainable_state()`; every trained tensor must be there, and nothing else."""
        expected = {name for name in self.model.state_dict() if self._trains(name)}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise DualtokError(
                f"{self.name} checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        self.model.load_state_dict(state, strict=False)


class GuideStage(TrainingStage):
    """Branch I end to end: encoder, codebook and decoder all train."""

    name, part = "guide", "guide"
    loss_terms = ("recon_loss", "codebook_loss", "commitment_loss")

    def __init__(self, model: GuideVQModel) -> None:
        super().__init__(model)
        model.requires_grad_(True)
        model.train()

    def trainable_prefixes(self) -> tuple[str, ...]:
        return ("",)

    @property
    def codebook_size(self) -> int:
        return int(self.model.config.num_vq_embeddings)

    def forward(self, images: torch.Tensor) -> StageOutput:
        out = self.model(images)  # GuideOutput
        terms = {"recon_loss": out.recon_loss, "codebook_loss": out.codebook_loss,
                 "commitment_loss": out.commitment_loss}
        return StageOutput(loss=out.loss, terms={k: v.detach() for k, v in terms.items()}, ids=out.ids)


class _SemanticStage(TrainingStage):
    def __init__(self, model: SemanticTokenizer) -> None:
        super().__init__(model)
        model.freeze_for_stage(self.name)

    def trainable_prefixes(self) -> tuple[str, ...]:
        return STAGE_TRAINABLE[self.name]


class QFormerStage(_SemanticStage):
    """Eq. 6 over the global batch: features are all-gathered (with gradients) before the loss, so
    every image's negatives are the captions of every worker, as in SEED/BLIP-2."""

    name, part, needs_captions = "qformer", "semantic", True
    loss_terms = ("contrastive_loss", "temperature")

    def __init__(self, model: SemanticTokenizer, gather: Gather = no_gather, label_smoothing: float = SEED_LABEL_SMOOTHING,
                 text_tokenizer: Any = None, max_text_length: int = 32) -> None:
        super().__init__(model)
        self.gather = gather
        self.label_smoothing = label_smoothing
        self.text_tokenizer, self.max_text_length = text_tokenizer, max_text_length

    @classmethod
    def from_bundle(cls, tokenizer: Any, context: StageContext) -> QFormerStage:
        if context.text_tokenizer is None:
            raise DualtokError("the qformer stage needs the Q-Former's text tokenizer")
        model = context.model if context.model is not None else tokenizer.part(cls.part)
        return cls(model, gather=context.gather, label_smoothing=context.label_smoothing,
                   text_tokenizer=context.text_tokenizer, max_text_length=context.max_text_length).to(context.device)

    def inputs(self, images: torch.Tensor, captions: list[str]) -> dict[str, torch.Tensor]:
        ids, mask = tokenize_captions(self.text_tokenizer, captions, self.max_text_length)
        return {"images": images, "input_ids": ids.to(images.device), "attention_mask": mask.to(images.device)}

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> StageOutput:
        image_feat, text_feat = self.model.image_text_features(images, input_ids, attention_mask)  # (B, E) each
        image_feat, text_feat = self.gather(image_feat), self.gather(text_feat)  # (N, E): N = global batch
        loss = contrastive_loss(image_feat, text_feat, self.model.temperature, self.label_smoothing)
        return StageOutput(loss=loss, terms={"contrastive_loss": loss.detach(),
                                             "temperature": self.model.temperature.detach().float()})


class CodebookStage(_SemanticStage):
    """Eq. 7: codebook + embedding decoder reconstruct the frozen Causal Q-Former's output."""

    name, part = "codebook", "semantic"
    loss_terms = ("cosine_loss", "codebook_loss", "commitment_loss")

    @property
    def codebook_size(self) -> int:
        return int(self.model.config.codebook_size)

    def forward(self, images: torch.Tensor) -> StageOutput:
        out = self.model.reconstruction_loss(images)
        terms = {"cosine_loss": out.cosine_loss, "codebook_loss": out.codebook_loss,
                 "commitment_loss": out.commitment_loss}
        return StageOutput(loss=out.loss, terms={k: v.detach() for k, v in terms.items()}, ids=out.ids)


class ReverseStage(_SemanticStage):
    """Eq. 8: the Reverse Q-Former's 77 generation embeddings regress the frozen diffusion text
    encoder's features of the caption (`target`, computed by the caller)."""

    name, part, needs_captions = "reverse", "semantic", True
    frozen_parts = ("diffusion",)  # its text encoder makes the target
    loss_terms = ("generation_loss",)

    def __init__(self, model: SemanticTokenizer, text_encoder: nn.Module | None = None) -> None:
        super().__init__(model)
        # Not a submodule: frozen, outside DDP (no gradient sync, no per-step buffer broadcast) and
        # outside checkpoints; `from_bundle` puts it on the stage's device.
        self.__dict__["text_encoder"] = text_encoder

    @classmethod
    def from_bundle(cls, tokenizer: Any, context: StageContext) -> ReverseStage:
        model = context.model if context.model is not None else tokenizer.part(cls.part)
        encoder = tokenizer.part("diffusion").to(context.device).eval().requires_grad_(False)
        return cls(model, text_encoder=encoder).to(context.device)

    def inputs(self, images: torch.Tensor, captions: list[str]) -> dict[str, torch.Tensor]:
        if self.text_encoder is None:
            raise DualtokError("the reverse stage needs the bundle's diffusion text encoder (its eq. 8 target)")
        with torch.no_grad():
            target = self.text_encoder.text_embeddings(captions)  # (B, 77, D)
        return {"images": images, "target": target.to(images.device)}

    def forward(self, images: torch.Tensor, target: torch.Tensor) -> StageOutput:
        loss = self.model.generation_loss(target, images=images)
        return StageOutput(loss=loss, terms={"generation_loss": loss.detach()})


class _DiffusionStage(TrainingStage):
    """One part of Branch III (`trained`: "vae" or "unet") trains; the rest stays frozen in eval mode."""

    part = "diffusion"
    trained: ClassVar[str] = ""
    config_path = ("vae",)
    size_key = "sample_size"

    def __init__(self, model: DiffusionReconstructor) -> None:
        super().__init__(model)
        model.requires_grad_(False).eval()
        getattr(model, self.trained).requires_grad_(True).train()

    def train(self, mode: bool = True) -> _DiffusionStage:
        getattr(self.model, self.trained).train(mode)  # the frozen parts stay in eval mode
        self.training = mode
        return self

    def trainable_prefixes(self) -> tuple[str, ...]:
        return (self.trained,)

    @property
    def image_size(self) -> int:
        return int(self.model.vae.config.sample_size)


class VaeStage(_DiffusionStage):
    """The AutoencoderKL: L1 between image and decoded posterior sample, plus the KL to N(0, I).

    It also keeps a running estimate of the latents' standard deviation (over the posterior
    samples it trains on) and exports `scaling_factor = 1 / std`, as SD 1.x chose its 0.18215:
    the UNet stage then sees latents of unit variance, whatever the VAE learnt.
    """

    name, trained = "vae", "vae"
    loss_terms = ("recon_loss", "kl_loss", "latent_std")
    STD_KEY = "_stats.latent_std"  # the running std, kept in checkpoints beside the VAE's tensors
    STD_MOMENTUM = 0.01

    def __init__(self, model: DiffusionReconstructor, kl_weight: float = 1e-6) -> None:
        super().__init__(model)
        self.kl_weight = kl_weight
        self.register_buffer("latent_std", torch.zeros((), dtype=torch.float32))  # 0: no estimate yet

    @classmethod
    def from_bundle(cls, tokenizer: Any, context: StageContext) -> VaeStage:
        model = context.model if context.model is not None else tokenizer.part(cls.part)
        return cls(model, kl_weight=context.kl_weight).to(context.device)

    def forward(self, images: torch.Tensor) -> StageOutput:
        vae = self.model.vae
        x = images * 2.0 - 1.0  # (B, 3, S, S) in [-1, 1]
        posterior = vae.encode(x).latent_dist
        z = posterior.sample()  # (B, 4, S/f, S/f)
        reconstruction = vae.decode(z).sample  # (B, 3, S, S)
        recon = (reconstruction.float() - x.float()).abs().mean()
        kl = posterior.kl().float().mean() / z[0].numel()  # per latent element
        with torch.no_grad():
            std = z.detach().float().std()
            momentum = self.STD_MOMENTUM if bool(self.latent_std > 0) else 1.0
            self.latent_std.mul_(1.0 - momentum).add_(momentum * std)
        loss = recon + self.kl_weight * kl
        return StageOutput(loss=loss, terms={"recon_loss": recon.detach(), "kl_loss": kl.detach(),
                                             "latent_std": self.latent_std.detach().clone()})

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {**super().trainable_state(), self.STD_KEY: self.latent_std.detach().to("cpu").clone()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        std = state.pop(self.STD_KEY, None)
        if std is None:
            raise DualtokError(f"vae checkpoint has no {self.STD_KEY}: it was not written by the vae stage")
        super().load_trainable_state(state)
        self.latent_std.copy_(std)
        if float(std) > 0:
            self.model.vae.register_to_config(scaling_factor=1.0 / float(std))


class UnetStage(_DiffusionStage):
    """Epsilon prediction on the frozen VAE's latents (posterior samples, scaled) at uniformly drawn
    timesteps of the bundle's own noise schedule, conditioned on the frozen text encoder's (B, 77, D)
    caption features: the conditioning the Reverse Q-Former is trained to imitate (eq. 8)."""

    name, trained, needs_captions = "unet", "unet", True
    loss_terms = ("noise_loss",)

    def __init__(self, model: DiffusionReconstructor, caption_dropout: float = 0.1) -> None:
        super().__init__(model)
        if not 0.0 <= caption_dropout < 1.0:
            raise DualtokError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
        self.caption_dropout = caption_dropout

    @classmethod
    def from_bundle(cls, tokenizer: Any, context: StageContext) -> UnetStage:
        model = context.model if context.model is not None else tokenizer.part(cls.part)
        return cls(model, caption_dropout=context.caption_dropout).to(context.device)

    def inputs(self, images: torch.Tensor, captions: list[str]) -> dict[str, torch.Tensor]:
        dropped = torch.rand(len(captions)) < self.caption_dropout  # the global RNG: checkpointed
        kept = ["" if drop else str(caption) for caption, drop in zip(captions, dropped.tolist(), strict=True)]
        with torch.no_grad():
            cond = self.model.text_embeddings(kept)  # (B, 77, D)
        return {"images": images, "cond": cond.to(images.device)}

    def forward(self, images: torch.Tensor, cond: torch.Tensor) -> StageOutput:
        vae, scheduler = self.model.vae, self.model.scheduler
        with torch.no_grad():
            x = (images * 2.0 - 1.0).to(vae.dtype)
            latents = self.model.scale_latents(vae.encode(x).latent_dist.sample())  # (B, 4, h, w)
        noise = torch.randn_like(latents)
        steps = int(scheduler.config.num_train_timesteps)
        t = torch.randint(0, steps, (latents.shape[0],), device=latents.device)
        # q(z_t | z_0) of the schedule, computed here: the scheduler's add_noise moves its own tables.
        alpha = scheduler.alphas_cumprod.to(latents.device, torch.float32)[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        noisy = (alpha.sqrt() * latents.float() + (1.0 - alpha).sqrt() * noise.float()).to(latents.dtype)
        pred = self.model.unet(noisy, t, encoder_hidden_states=cond.to(noisy.dtype)).sample  # (B, 4, h, w)
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        return StageOutput(loss=loss, terms={"noise_loss": loss.detach()})


# In the order a from-scratch bundle trains them.
STAGES: dict[str, type[TrainingStage]] = {
    stage.name: stage for stage in (GuideStage, VaeStage, UnetStage, QFormerStage, CodebookStage, ReverseStage)
}


def stage_class(name: str) -> type[TrainingStage]:
    if name not in STAGES:
        raise DualtokError(f"unknown training stage {name!r}; stages are {', '.join(STAGES)}")
    return STAGES[name]


class CodeUsage:
    """Which codes the recent steps chose, so that the never-chosen ('dead') ones can be restarted."""

    def __init__(self, size: int) -> None:
        self.used = torch.zeros(size, dtype=torch.bool)  # (K,)

    def update(self, ids: torch.Tensor) -> None:
        self.used[ids.reshape(-1).to("cpu")] = True

    def reset(self) -> None:
        self.used.zero_()
