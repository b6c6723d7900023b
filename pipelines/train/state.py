"""What a training run leaves on storage, and how it becomes a bundle.

Under `<storage_path>/<name>/` (any fsspec URI):
    run.json                      the resolved config (secrets redacted), versions, input bundle, and the
                                  run's identity: what a rerun must match to resume it (train/plan.py)
    checkpoint_*/                 Ray Train's checkpoints (trainable.safetensors, training_state.pt, checkpoint.json)
    metrics/<last step>.jsonl     per-step metrics, one file per checkpoint interval, written with the checkpoint
    metrics.jsonl                 all of them in step order, written at the end
    _finished.json                written last, after the export: a rerun of the command stops here
Checkpoints hold only the trained parts' tensors; the frozen ones come from the input bundle,
which the export copies unchanged next to the trained part.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dualtok_core.bundle import BundleInfo, DualTokenizer
from dualtok_core.errors import BundleError
from dualtok_core.guide import GuideVQModel
from dualtok_core.training_stages import TrainingStage, stage_class
from dualtok.pipelines.io import schemas as S
from dualtok.pipelines.actors import BundleSource
from dualtok.pipelines.io.outputs import OutputFolder
from dualtok.pipelines.io.storage import commit_bytes, filesystem, join, local_copy, revealed

logger = logging.getLogger(__name__)

MODEL_FILE, STATE_FILE, META_FILE = "trainable.safetensors", "training_state.pt", "checkpoint.json"
METRICS_DIR, METRICS_FILE, FINISHED_FILE, RUN_FILE = "metrics", "metrics.jsonl", "_finished.json", "run.json"
TEXT_TOKENIZER_DIR = "semantic/tokenizer"  # inside a bundle: the Q-Former's text tokenizer


@dataclass(frozen=True)
class RunLayout:
    """Where one named run keeps its checkpoints, metrics and completion marker."""

    storage_path: str
    name: str
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def run_dir(self) -> str:
        return join(self.storage_path, self.name)

    def path(self, *parts: str) -> str:
        return join(self.run_dir, *parts)

    def folder(self) -> OutputFolder:
        return OutputFolder(self.run_dir, self.storage_options)

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Commit the rows of one checkpoint interval; a rerun of the interval overwrites them."""
        if not rows:
            return
        body = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode()
        self.folder().write(body, METRICS_DIR, f"{rows[-1][S.TRAIN_STEP]:010d}.jsonl")

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every committed metrics row, one per step, in step order."""
        out = self.folder()
        out.fs.invalidate_cache()
        if not out.exists(METRICS_DIR):
            return []
        by_step: dict[int, dict[str, Any]] = {}
        for path in sorted(p for p in out.fs.find(out.path(METRICS_DIR)) if p.endswith(".jsonl")):
            for line in out.fs.cat_file(path).decode().splitlines():
                row = json.loads(line)
                by_step[row[S.TRAIN_STEP]] = row
        return [by_step[step] for step in sorted(by_step)]

    def write_merged_metrics(self) -> list[dict[str, Any]]:
        rows = self.read_metrics()
        self.folder().write("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode(), METRICS_FILE)
        return rows

    def finished(self) -> dict[str, Any] | None:
        return self.folder().read_json(FINISHED_FILE)

    def record(self) -> dict[str, Any] | None:
        """The run's `run.json`, or None before its first start."""
        return self.folder().read_json(RUN_FILE)

    def has_checkpoints(self) -> bool:
        out = self.folder()
        root = out.path()
        return out.fs.isdir(root) and any(p.rstrip("/").rsplit("/", 1)[-1].startswith("checkpoint_")
                                          for p in out.fs.ls(root))

    def write_finished(self, marker: dict[str, Any]) -> None:
        self.folder().write_json(marker, FINISHED_FILE)

    def ray_storage(self) -> tuple[str, Any]:
        """(storage_path, storage_filesystem) for Ray Train's RunConfig.

        Remote paths go through fsspec (wrapped for pyarrow) so that the endpoint and credentials
        of `storage_options` apply; pyarrow's own S3 client fails on S3-compatible stores whose
        CompleteMultipartUpload replies differ from AWS's (moto, some MinIO versions).
        """
        if "://" not in self.storage_path or self.storage_path.startswith("file://"):
            return str(Path(self.storage_path.removeprefix("file://")).resolve()), None
        import pyarrow.fs as pafs

        fs, path = filesystem(self.storage_path, self.storage_options or None)
        return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


# ---- checkpoints ------------------------------------------------------------------------------
def save_checkpoint(
    folder: Path, stage: TrainingStage, training_state: dict[str, Any], meta: dict[str, Any]
) -> None:
    """Write one checkpoint folder: trained tensors (safetensors), optimizer/scheduler/RNG, metadata."""
    save_file(stage.trainable_state(), str(folder / MODEL_FILE))
    torch.save(training_state, folder / STATE_FILE)
    (folder / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def read_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(trained tensors, training state, metadata); the state is read with weights_only=True."""
    for name in (MODEL_FILE, STATE_FILE, META_FILE):
        if not (folder / name).is_file():
            raise BundleError(f"checkpoint {folder} has no {name}")
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    return load_file(str(folder / MODEL_FILE)), state, json.loads((folder / META_FILE).read_text())


def capture_training_state(
    step: int, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any, rngs: list[dict[str, Any]],
    code_usage: torch.Tensor | None,
) -> dict[str, Any]:
    """What a checkpoint keeps besides the weights: all of it loads with torch.load(weights_only=True)."""
    return {
        "step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None, "rng": rngs,
        "code_usage": code_usage.clone() if code_usage is not None else None,
    }


def apply_training_state(
    state: dict[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any, rank: int, world: int,
    seed: int,
) -> int:
    """Restore optimizer, LR schedule, loss scaler and this rank's RNG; returns the step reached."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rngs = state["rng"]
    if len(rngs) == world:
        set_rng_state(rngs[rank])
    else:  # another worker count: the saved streams do not map onto the new ranks
        torch.manual_seed(seed * 1000 + rank + int(state["step"]))
    return int(state["step"])


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_python_state(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_python_state(value: Any) -> tuple:
    """random.setstate wants tuples; a weights_only load may hand lists back."""
    return tuple(_as_python_state(v) if isinstance(v, list) else v for v in value)


# ---- building the trained branch, and exporting it ---------------------------------------------
def available_parts(source: BundleSource) -> tuple[str, ...]:
    """The parts a preset or bundle holds (a bundle may hold only some)."""
    from dualtok_core.presets import PARTS

    if source.is_preset:
        return PARTS
    fs, root = filesystem(source.spec, source.storage_options or None)
    found = tuple(p for p in PARTS if fs.isdir(join(root, p)))
    if not found:
        raise BundleError(f"{source.spec} holds no bundle part ({', '.join(PARTS)})")
    return found


def branch_for_stage(
    stage: str, tokenizer: DualTokenizer, init_from_movq: str | None, storage_options: dict[str, Any] | None
) -> torch.nn.Module:
    """The branch a stage trains, as the input bundle has it, or (guide) rebuilt from MoVQ weights."""
    part = stage_class(stage).part
    model = tokenizer.part(part)
    if stage == "guide" and init_from_movq:
        config = model.config
        with local_copy(init_from_movq, storage_options) as folder:
            model, report = GuideVQModel.from_movq(folder, image_size=config.image_size, guide_size=config.guide_size)
        logger.info("guide initialised from MoVQ %s: %s", init_from_movq, report.summary())
    return model


@dataclass(frozen=True)
class ExportRequest:
    stage: str
    source: BundleSource
    output: str
    provenance: str  # what bundle.json records as the trained part's source
    init_from_movq: str | None = None
    text_tokenizer: str | None = None  # copied into the bundle's semantic/tokenizer/
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False)


def export_bundle(request: ExportRequest, checkpoint_dir: Path) -> DualTokenizer:
    """The input bundle with the trained part replaced by the checkpoint's, saved to `output`."""
    parts = available_parts(request.source)
    tokenizer = request.source.load(parts)
    stage = stage_class(request.stage)
    model = branch_for_stage(request.stage, tokenizer, request.init_from_movq, request.storage_options or None)
    tensors, _, _ = read_checkpoint(checkpoint_dir)
    trained = stage(model)
    trained.load_trainable_state(tensors)
    modules = dict(tokenizer.parts)
    modules[stage.part] = model.eval()
    hashes = {p: h for p, h in tokenizer.info.part_hashes.items() if p != stage.part}
    sources = {**tokenizer.info.sources, stage.part: request.provenance}
    exported = DualTokenizer(modules, BundleInfo(preset=tokenizer.info.preset, sources=sources, part_hashes=hashes))
    exported.save_pretrained(request.output, storage_options=revealed(request.storage_options) or None)
    _carry_text_tokenizer(request, "semantic" in parts)
    logger.info("exported %s to %s (fingerprint %s)", request.stage, request.output, exported.fingerprint)
    return exported


def _carry_text_tokenizer(request: ExportRequest, has_semantic: bool) -> None:
    """Keep the Q-Former's text tokenizer with the bundle, so the next stages find it there."""
    if not has_semantic:
        return
    source = request.text_tokenizer or bundle_text_tokenizer(request.source)
    if source is None:
        return
    fs, root = filesystem(join(request.output, TEXT_TOKENIZER_DIR), request.storage_options or None)
    fs.makedirs(root, exist_ok=True)
    with local_copy(source, request.storage_options or None) as folder:
        for path in sorted(folder.iterdir()):
            if path.is_file():
                commit_bytes(fs, f"{root.rstrip('/')}/{path.name}", path.read_bytes())


def bundle_text_tokenizer(source: BundleSource) -> str | None:
    """The text tokenizer stored in a bundle (`semantic/tokenizer/`), if the bundle has one."""
    if source.is_preset:
        return None
    uri = join(source.spec, TEXT_TOKENIZER_DIR)
    fs, root = filesystem(uri, source.storage_options or None)
    return uri if fs.isdir(root) else None
