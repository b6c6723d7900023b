"""What every model stage of every pipeline shares: where its bundle comes from (`BundleSource`),
the resources of its actor pool (`StageResources`), its device and dtype, and `add_actor_stage`,
the adapter that puts a stage class on a Ray Data dataset as an actor pool (the models loaded
once per actor). The stages themselves live with their pipeline (`tokenize/encode.py`,
`audit/stages.py`); the torch-free CPU stages in `io/read.py`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dualtok_core.errors import BundleError
from dualtok_core.presets import preset_names
from dualtok.pipelines.io.storage import revealed

if TYPE_CHECKING:  # torch and the models load in the actors, not where plans are made
    import torch

    from dualtok_core.bundle import DualTokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageResources:
    """Resources of one stage; encoder stages run as an actor pool of `actors`..`max_actors`."""

    batch_size: int = 16  # images per forward pass of one actor
    actors: int = 1  # actors the pool starts with (each loads its own copy of the models)
    max_actors: int | None = None  # the pool grows to this many while input waits; None: fixed at `actors`
    gpus_per_actor: float = 0.0  # GPUs each actor reserves (0.5: two actors share one GPU)
    cpus_per_actor: float = 1.0  # CPUs each actor reserves; on CPU its torch threads, rounded
    device: str = "auto"  # auto: cuda when the actor has a GPU, else cpu
    dtype: str = "auto"  # auto: bfloat16 on cuda, float32 on cpu

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.actors < 1 or (self.max_actors is not None and self.max_actors < self.actors):
            raise ValueError(f"stage resources out of range: {self}")

    @property
    def torch_threads(self) -> int:
        """Threads torch uses in a CPU actor: its CPU share, rounded, at least 1 (0.875 -> 1, 3.9 -> 4)."""
        return max(1, round(self.cpus_per_actor))


@dataclass(frozen=True)
class BundleSource:
    """Where the models come from: a preset name (random weights) or a bundle path/URI."""

    spec: str
    seed: int = 0
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    # part -> hash the driver saw; an actor whose weights differ (other code or files on its node) stops
    expected_hashes: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    @property
    def is_preset(self) -> bool:
        return self.spec in preset_names()

    def load(self, parts: tuple[str, ...]) -> DualTokenizer:
        from dualtok_core.bundle import DualTokenizer

        if self.is_preset:
            tokenizer = DualTokenizer.from_preset(self.spec, seed=self.seed, parts=parts)
        else:
            tokenizer = DualTokenizer.from_pretrained(self.spec, parts=parts,
                                                   storage_options=revealed(self.storage_options) or None)
        for part in parts:
            expected, actual = self.expected_hashes.get(part), tokenizer.info.part_hashes[part]
            if expected is not None and expected != actual:
                raise BundleError(
                    f"{self.spec}: the {part} weights loaded here (hash {actual[:16]}) differ from the driver's "
                    f"({expected[:16]}); nodes run different code or see different bundle files"
                )
        return tokenizer


def pick_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def native_bf16_cpu() -> bool:
    """True when this machine's CPU computes bfloat16 natively (AVX512-BF16 or AMX tiles). There the
    `small` encoders run ~1.7x faster in bfloat16 than in float32 (docs/benchmarks.md); elsewhere
    torch emulates bfloat16, slower than float32."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own capability checks
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# ---- the adapter ---------------------------------------------------------------------------
def add_actor_stage(ds: Any, stage_cls: type, resources: StageResources, **constructor_kwargs: Any) -> Any:
    """Put an encoder stage on a dataset as an actor pool holding one model per actor."""
    from ray.data import ActorPoolStrategy

    pool = ActorPoolStrategy(min_size=resources.actors, max_size=resources.max_actors or resources.actors)
    return ds.map_batches(
        stage_cls,
        fn_constructor_kwargs={**constructor_kwargs, "resources": resources},
        batch_size=resources.batch_size,
        compute=pool,
        num_gpus=resources.gpus_per_actor or None,
        num_cpus=resources.cpus_per_actor,
        # Ray Data's actor pools already default to max_restarts=-1 and max_task_retries=-1:
        # a lost actor is replaced and its batches retried; the corpus writer drops re-deliveries.
    )
