"""The four training stages as modules whose forward is the stage's loss.

    guide     Branch I   eq. 4-5 MSE to the input resized to the guide size + VQ terms   (GuideVQModel)
    qformer   Branch II  eq. 6 contrastive, last causal query vs. the text [CLS]         (ViT frozen)
    codebook  Branch II  eq. 7 cosine between decoded and causal embeddings + VQ terms   (ViT, Q-Former frozen)
    reverse   Branch II  eq. 8 MSE of the 77 generation embeddings to the text encoder's features
                                                                              (only the Reverse Q-Former trains)

A stage wraps one branch so that DDP can wrap the stage: DDP synchronises gradients only for
what runs through its `forward`, so the loss must be that forward. Frozen parts get
`requires_grad=False` and stay in eval mode (`SemanticTokenizer.freeze_for_stage`); checkpoints
and exports hold only the trainable parts' tensors, the rest comes from the input bundle.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from diffusers.utils import BaseOutput
from torch import nn

from dualtok_core.errors import DualtokError
from dualtok_core.guide import GuideVQModel
from dualtok_core.semantic import STAGE_TRAINABLE, SemanticTokenizer, contrastive_loss

Gather = Callable[[torch.Tensor], torch.Tensor]


def no_gather(tensor: torch.Tensor) -> torch.Tensor:
    """The single-process all-gather: the local batch is the global batch."""
    return tensor


@dataclass
class StageOutput(BaseOutput):
    loss: torch.Tensor  # the scalar that is back-propagated
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars to log
    ids: torch.Tensor | None = None  # (B, L) code ids, for codebook usage (guide, codebook)


class TrainingStage(nn.Module, abc.ABC):
    """One branch with its stage's trainable parts; `forward(**batch)` returns the stage's loss."""

    name: ClassVar[str] = ""
    part: ClassVar[str] = ""  # the bundle part this stage trains
    needs_captions: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def image_size(self) -> int:
        return int(self.model.config.image_size)

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

    def __init__(self, model: SemanticTokenizer, gather: Gather = no_gather, label_smoothing: float = 0.1) -> None:
        super().__init__(model)
        self.gather = gather
        self.label_smoothing = label_smoothing

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> StageOutput:
        image_feat, text_feat = self.model.image_text_features(images, input_ids, attention_mask)  # (B, E) each
        image_feat, text_feat = self.gather(image_feat), self.gather(text_feat)  # (N, E): N = global batch
        loss = contrastive_loss(image_feat, text_feat, self.model.temperature, self.label_smoothing)
        return StageOutput(loss=loss, terms={"contrastive_loss": loss.detach(),
                                             "temperature": self.model.temperature.detach().float()})


class CodebookStage(_SemanticStage):
    """Eq. 7: codebook + embedding decoder reconstruct the frozen Causal Q-Former's output."""

    name, part = "codebook", "semantic"

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

    def forward(self, images: torch.Tensor, target: torch.Tensor) -> StageOutput:
        loss = self.model.generation_loss(target, images=images)
        return StageOutput(loss=loss, terms={"generation_loss": loss.detach()})


STAGES: dict[str, type[TrainingStage]] = {
    stage.name: stage for stage in (GuideStage, QFormerStage, CodebookStage, ReverseStage)
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
