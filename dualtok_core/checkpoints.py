"""Reading released weights: the one safetensors reader and the one load report every loader returns.

Weights come from safetensors files only, single-file or sharded (`<stem>.safetensors.index.json`);
a pickle checkpoint is never read. Each loader (MoVQ -> guide, BLIP-2 -> semantic, SD 1.x ->
diffusion, and their assembly into a bundle in `pretrained.py`) says what it copied and what it
left at its random init with a `LoadReport`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from dualtok_core.errors import BundleError

RANDOM_INIT = "random-init"  # how bundle.json's sources start for anything not loaded from weights
CHECKPOINT_KINDS = {"guide": "MoVQ", "semantic": "BLIP-2", "diffusion": "Stable Diffusion"}

Shape = tuple[int, ...]


def weight_files(folder: Path, stem: str, what: str = "weights") -> list[Path]:
    """The safetensors files of a diffusers/transformers weights folder: `<stem>.safetensors`, or
    the shards its index names. Raises naming the folder when there are none."""
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (folder / f"{stem}.safetensors").is_file():
        return [folder / f"{stem}.safetensors"]
    raise BundleError(
        f"{folder} has no {stem}.safetensors (or sharded index): {what} are read from safetensors only; "
        "pickle checkpoints are not loaded (convert one with save_pretrained(safe_serialization=True))"
    )


def read_tensors(
    folder: Path, stem: str, rename: Callable[[str], str | None] = lambda key: key, what: str = "weights"
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(our name -> tensor, the checkpoint keys `rename` mapped to None), reading only the tensors kept."""
    tensors: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for file in weight_files(folder, stem, what):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                ours = rename(key)
                if ours is None:
                    dropped.append(key)
                else:
                    tensors[ours] = handle.get_tensor(key)
    return tensors, sorted(dropped)


def tensor_names(folder: Path, stem: str, what: str = "weights") -> set[str]:
    """The tensor names of a weights folder, without reading any tensor."""
    names: set[str] = set()
    for file in weight_files(folder, stem, what):
        with safe_open(str(file), framework="pt") as handle:
            names.update(handle.keys())
    return names


def random_prefixes(names: list[str], random: set[str]) -> list[str]:
    """The shortest dotted prefixes of `names` under which every tensor is in `random`."""
    total, hit = Counter(), Counter()
    for name in names:
        pieces = name.split(".")
        for depth in range(1, len(pieces) + 1):
            prefix = ".".join(pieces[:depth])
            total[prefix] += 1
            hit[prefix] += name in random
    groups = set()
    for name in random:
        pieces = name.split(".")
        prefixes = (".".join(pieces[:depth]) for depth in range(1, len(pieces) + 1))
        groups.add(next(p for p in prefixes if hit[p] == total[p]))
    return sorted(groups)


@dataclass
class LoadReport:
    """What a load took from a checkpoint and what it left at its random init."""

    source: str | None  # the checkpoint's path or URI; None when everything is random-init
    names: list[str] = field(default_factory=list, repr=False)  # every tensor name of ours the report covers
    loaded: list[str] = field(default_factory=list)  # our names filled from the checkpoint
    # our name -> (checkpoint shape, our shape): tensors that did not fit and stayed random
    mismatched: dict[str, tuple[Shape, Shape]] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)  # checkpoint tensors (or prefixes) nothing took
    part: str = ""  # the bundle part, when the report is about one
    kind: str = ""  # the checkpoint's kind ("SEED"); default: the part's usual one (CHECKPOINT_KINDS)
    notes: list[str] = field(default_factory=list)  # what the load means for the part's use, in words

    @property
    def checkpoint_kind(self) -> str:
        return self.kind or CHECKPOINT_KINDS.get(self.part, "checkpoint")

    @property
    def left_random(self) -> list[str]:
        """Our names at their random init: not in the checkpoint, or shape-mismatched."""
        return sorted(set(self.names) - set(self.loaded))

    @property
    def missing(self) -> list[str]:
        """Our names the checkpoint has no tensor for."""
        return sorted(set(self.left_random) - set(self.mismatched))

    @property
    def random_modules(self) -> list[str]:
        """The shortest module prefixes holding only random tensors (what training must still fit)."""
        return random_prefixes(self.names, set(self.left_random))

    @property
    def random_parts(self) -> list[str]:
        """Top-level submodules with at least one random tensor."""
        return sorted({name.split(".")[0] for name in self.left_random})

    @property
    def loaded_parts(self) -> list[str]:
        return sorted({name.split(".")[0] for name in self.loaded})

    @property
    def fully_loaded(self) -> bool:
        return self.source is not None and not self.left_random

    def summary(self, max_modules: int = 8) -> str:
        """One line: what was loaded from where, what stayed random (the first few modules)."""
        if self.source is None:
            return f"{RANDOM_INIT}: all {len(self.left_random)} tensors"
        text = f"{self.checkpoint_kind} {self.source}: {len(self.loaded)} tensors loaded"
        if self.left_random:
            modules = self.random_modules
            shown = ", ".join(modules[:max_modules])
            more = len(modules) - max_modules
            text += f", {len(self.left_random)} left random ({shown}{f', +{more} more' if more > 0 else ''})"
        if self.mismatched:
            text += f", {len(self.mismatched)} of them shape-mismatched ({', '.join(sorted(self.mismatched)[:3])})"
        if self.unused:
            more = f", +{len(self.unused) - 3} more" if len(self.unused) > 3 else ""
            text += f"; unused from the checkpoint: {', '.join(self.unused[:3])}{more}"
        return "; ".join([text, *self.notes])

    def provenance(self, preset: str, seed: int) -> str:
        """The `bundle.json` source: starts with RANDOM_INIT whenever any tensor is random."""
        random = f"{RANDOM_INIT} (preset {preset}, seed {seed})"
        if self.source is None:
            return random
        kind = self.checkpoint_kind
        if not self.left_random:
            return f"{kind} {self.source} (all {len(self.loaded)} tensors)"
        return (
            f"{random} for {len(self.left_random)} of {len(self.names)} tensors "
            f"[{', '.join(self.random_modules)}]; the other {len(self.loaded)} from {kind} {self.source}"
        )
