"""`ScoreReconstruction`: the audit's last stage. Metrics per image and variant, the PNGs the
report shows, and the slice's finished tables (Parquet bytes) for the driver to commit.

PSNR and SSIM (`dualtok_core.metrics`, scikit-image's definitions) are computed on exactly the
uint8 arrays that are saved as lossless PNGs, so anyone can recompute them from the files.
"At guide size" resizes both images to the bundle's guide size first: how well the layout the
guide carries survives, apart from the detail the diffusion invents.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from dualtok_core import metrics
from dualtok_core.errors import DualtokError
from dualtok_core.imaging import resize_float, to_uint8
from dualtok.pipelines.io.outputs import parquet_bytes
from dualtok.pipelines.io import schemas as S
from dualtok.pipelines.audit.stages import OK, PAYLOAD, STAGE_SCORE, VariantSpec, fail_rows, image_path, unpack
from dualtok.pipelines.audit.perceptual import LPIPS, ClipScorer, PerceptualWeights
from dualtok.pipelines.actors import StageResources, pick_device
from dualtok.pipelines.io.storage import commit_bytes, filesystem, join

logger = logging.getLogger(__name__)

TABLE, ERRORS, ROWS, ERROR_COUNT = "table", "errors", "rows", "error_count"


@dataclass(frozen=True)
class ScoreSettings:
    output: str  # the audit's output URI: PNGs go under <output>/images/
    variants: tuple[VariantSpec, ...]
    guide_size: int  # the bundle's guide size: the "at guide size" metrics resize to it
    weights: PerceptualWeights = PerceptualWeights()
    learned_batch: int = 16  # images per LPIPS / CLIP forward pass
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False)


def resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (B, H, W, 3) -> (B, size, size, 3) with the pipeline's one resize (bicubic, antialiased)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W)
    return to_uint8(resize_float(x, size).clamp(0.0, 1.0))


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=4)
    return buffer.getvalue()


def rows_parquet(rows: list[dict[str, Any]], schema: pa.Schema) -> bytes:
    return parquet_bytes(pa.Table.from_pylist(rows, schema=schema))


class ScoreReconstruction:
    """Slice payload -> the slice's audit table and errors table (Parquet bytes) + PNGs on storage."""

    def __init__(self, settings: ScoreSettings, resources: StageResources) -> None:
        self.settings = settings
        device = pick_device(resources.device)  # the learned metrics use a GPU when the actor has one
        if device.type == "cpu":
            torch.set_num_threads(resources.torch_threads)
        w = settings.weights
        self.lpips = LPIPS(w.lpips_alexnet, w.lpips_linear).to(device) if w.lpips_alexnet else None
        self.clip = ClipScorer(w.clip, device) if w.clip else None
        self.fs, _ = filesystem(settings.output, settings.storage_options or None)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch[S.SLICE])
        out = {TABLE: np.empty(n, dtype=object), ERRORS: np.empty(n, dtype=object),
               ROWS: np.zeros(n, dtype=np.int64), ERROR_COUNT: np.zeros(n, dtype=np.int64)}
        for i, (name, data) in enumerate(zip(batch[S.SLICE], batch[PAYLOAD])):
            table, errors = self.score_slice(str(name), unpack(data))
            out[TABLE][i], out[ERRORS][i] = rows_parquet(table, S.AUDIT_SCHEMA), rows_parquet(errors, S.AUDIT_ERRORS_SCHEMA)
            out[ROWS][i], out[ERROR_COUNT][i] = len({(r[S.SHARD], r[S.INDEX]) for r in table}), len(errors)
        return {S.SLICE: batch[S.SLICE], **out}

    def score_slice(self, slice_name: str, payload: dict[str, np.ndarray]) -> tuple[list[dict], list[dict]]:
        """(audit rows, error rows) of one slice; writes its PNGs."""
        good = np.flatnonzero(payload["status"] == OK)
        scores: dict[str, dict[str, np.ndarray]] = {}
        if len(good):
            try:
                scores = {v.name: self._scores(v, payload, good) for v in self.settings.variants}
                self._write_images(payload, good)
            except (DualtokError, OSError) as err:  # a metric or a write that fails spoils the rows, not the run
                fail_rows(payload, good, STAGE_SCORE, f"{type(err).__name__}: {err}")
        good = np.flatnonzero(payload["status"] == OK)
        rows = [self._row(slice_name, v, payload, int(r), k, scores[v.name])
                for k, r in enumerate(good) for v in self.settings.variants]
        bad = np.flatnonzero(payload["status"] != OK)
        errors = [{S.SLICE: slice_name, S.KEY: str(payload[S.KEY][r]), S.SHARD: str(payload[S.SHARD][r]),
                   S.INDEX: int(payload[S.INDEX][r]), S.STAGE: str(payload["stage"][r]),
                   S.REASON: str(payload["reason"][r])} for r in bad]
        return rows, errors

    def _scores(self, v: VariantSpec, payload: dict[str, np.ndarray], good: np.ndarray) -> dict[str, np.ndarray]:
        original, recon = payload["original"][good], payload[f"recon.{v.name}"][good]  # (B, S, S, 3)
        g = self.settings.guide_size
        small_original, small_recon = resize_uint8(original, g), resize_uint8(recon, g)  # (B, g, g, 3)
        out = {S.PSNR: metrics.psnr(original, recon), S.SSIM: metrics.ssim(original, recon),
               S.PSNR_GUIDE: metrics.psnr(small_original, small_recon),
               S.SSIM_GUIDE: metrics.ssim(small_original, small_recon)}
        if self.lpips is not None:
            out[S.LPIPS] = self._batched(self.lpips, original, recon)
        if self.clip is not None:
            out[S.CLIP_SIMILARITY] = self._batched(self.clip.image_similarity, original, recon)
            has = payload["has_caption"][good]
            score = np.full(len(good), np.nan)
            if has.any():
                captions = np.asarray([str(c) for c in payload[S.CAPTION][good][has]])
                score[has] = self._batched(lambda x, c: self.clip.clip_score(x, list(c)), recon[has], captions)
            out[S.CLIP_SCORE] = score
        return out

    def _batched(self, fn: Any, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        step = self.settings.learned_batch
        return np.concatenate([fn(a[i : i + step], b[i : i + step]) for i in range(0, len(a), step)])

    def _write_images(self, payload: dict[str, np.ndarray], good: np.ndarray) -> None:
        names = ["original"] + sorted({v.guide_image for v in self.settings.variants if v.guide_image})
        names += [f"recon.{v.name}" for v in self.settings.variants]
        for r in good:
            shard, index = str(payload[S.SHARD][r]), int(payload[S.INDEX][r])
            for name in names:
                relative = image_path(shard, index, name.removeprefix("recon."))
                path = self.fs._strip_protocol(join(self.settings.output, relative))
                commit_bytes(self.fs, path, png_bytes(payload[name][r]))

    def _row(self, slice_name: str, v: VariantSpec, payload: dict[str, np.ndarray], r: int, k: int,
             scores: dict[str, np.ndarray]) -> dict[str, Any]:
        shard, index = str(payload[S.SHARD][r]), int(payload[S.INDEX][r])

        def value(name: str) -> float | None:
            found = scores.get(name)
            return None if found is None or np.isnan(found[k]) else float(found[k])

        return {
            S.SLICE: slice_name, S.KEY: str(payload[S.KEY][r]), S.SHARD: shard, S.INDEX: index,
            S.CAPTION: str(payload[S.CAPTION][r]) if payload["has_caption"][r] else None,
            S.VARIANT: v.name, S.GUIDE_SIZE: v.guide_size, S.NUM_GUIDE_TOKENS: v.num_guide_tokens,
            S.NUM_SEMANTIC_TOKENS: v.num_semantic_tokens,
            **{m: float(scores[m][k]) for m in (S.PSNR, S.SSIM, S.PSNR_GUIDE, S.SSIM_GUIDE)},
            S.LPIPS: value(S.LPIPS), S.CLIP_SCORE: value(S.CLIP_SCORE), S.CLIP_SIMILARITY: value(S.CLIP_SIMILARITY),
            S.SECONDS: float(payload[f"seconds.{v.name}"][r]),
            S.ORIGINAL_PATH: image_path(shard, index, "original"),
            S.GUIDE_PATH: image_path(shard, index, v.guide_image) if v.guide_image else None,
            S.RECONSTRUCTION_PATH: image_path(shard, index, v.name),
        }
