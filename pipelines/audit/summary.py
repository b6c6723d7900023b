"""From the per-image audit table to the numbers a report states: means with 95% intervals per
variant (the paper's Table 2 layout), speed per variant, per-shard summaries, ranked images and
the guide-resolution ablation (sec. 4.2, Figure 3).

Intervals are Student-t intervals of the mean over images (the images are the random sample);
PSNR is infinite for a pixel-identical reconstruction, so means are over finite values and the
infinite ones are counted separately.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
from scipy import stats as scipy_stats

from dualtok.pipelines.io import schemas as S

METRICS = (S.PSNR, S.SSIM, S.PSNR_GUIDE, S.SSIM_GUIDE, S.LPIPS, S.CLIP_SCORE, S.CLIP_SIMILARITY)
LOWER_IS_BETTER = {S.LPIPS}
CONFIDENCE = 0.95


def mean_interval(values: np.ndarray) -> dict[str, Any]:
    """n, mean, 95% Student-t interval, std and median over the finite values (None when n == 0)."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    n = int(finite.size)
    out: dict[str, Any] = {"n": n, "n_infinite": int(np.isinf(values).sum()), "mean": None, "ci_low": None,
                           "ci_high": None, "std": None, "median": None}
    if n == 0:
        return out
    mean = float(finite.mean())
    std = float(finite.std(ddof=1)) if n > 1 else 0.0
    half = float(scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * std / math.sqrt(n)) if n > 1 else math.nan
    out.update(mean=mean, std=std, median=float(np.median(finite)),
               ci_low=mean - half if n > 1 else None, ci_high=mean + half if n > 1 else None)
    return out


def _column(table: pa.Table, name: str) -> np.ndarray:
    return table[name].to_numpy(zero_copy_only=False).astype(np.float64) if table.num_rows else np.zeros(0)


def _by_variant(table: pa.Table) -> dict[str, pa.Table]:
    names = table[S.VARIANT].to_pylist()
    groups: dict[str, list[int]] = defaultdict(list)
    for i, name in enumerate(names):
        groups[name].append(i)
    return {name: table.take(pa.array(rows)) for name, rows in groups.items()}


def variant_summaries(table: pa.Table, variants: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per variant, in the audit's variant order: tokens, metrics, images/s."""
    groups = _by_variant(table)
    out = []
    for spec in variants:
        part = groups.get(spec["name"], table.slice(0, 0))
        seconds = float(np.nansum(_column(part, S.SECONDS)))
        entry = {**spec, "images": part.num_rows, "seconds": round(seconds, 4),
                 "images_per_second": part.num_rows / seconds if seconds > 0 else None, "metrics": {}}
        for metric in METRICS:
            values = part[metric].drop_null().to_numpy().astype(np.float64) if part.num_rows else np.zeros(0)
            if values.size:
                entry["metrics"][metric] = mean_interval(values)
        out.append(entry)
    return out


def shard_summaries(table: pa.Table, errors: pa.Table, variants: list[str]) -> list[dict[str, Any]]:
    """Per source shard: images audited, errors, and the mean PSNR/SSIM of each variant."""
    shards = sorted(set(table[S.SHARD].to_pylist()) | set(errors[S.SHARD].to_pylist()))
    error_counts = defaultdict(int)
    for shard in errors[S.SHARD].to_pylist():
        error_counts[shard] += 1
    rows = table.to_pydict() if table.num_rows else {c: [] for c in table.column_names}
    collected: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    images: dict[str, set[int]] = defaultdict(set)
    for i, shard in enumerate(rows[S.SHARD]):
        images[shard].add(rows[S.INDEX][i])
        for metric in (S.PSNR, S.SSIM):
            collected[(shard, rows[S.VARIANT][i])][metric].append(rows[metric][i])
    out = []
    for shard in shards:
        means = {v: {m: mean_interval(np.array(collected[(shard, v)][m]))["mean"] for m in (S.PSNR, S.SSIM)}
                 for v in variants if (shard, v) in collected}
        out.append({"shard": shard, "images": len(images[shard]), "errors": error_counts[shard], "variants": means})
    return out


def ranked(table: pa.Table, variant: str, k: int, worst: bool, metric: str = S.PSNR) -> list[dict[str, Any]]:
    """The k worst (or best) images of one variant by `metric`, as (shard, index, key, value)."""
    part = _by_variant(table).get(variant)
    if part is None or k <= 0:
        return []
    values = _column(part, metric)
    order = np.argsort(values, kind="stable")
    if not worst:
        order = order[::-1]
    keep = order[:k]
    return [{"shard": part[S.SHARD][int(i)].as_py(), "index": part[S.INDEX][int(i)].as_py(),
             "key": part[S.KEY][int(i)].as_py(), metric: float(values[i])} for i in keep]


def ablation_points(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """PSNR against the number of guide tokens: one series per kind (re-rendered, upsampled)."""
    points = []
    for entry in summaries:
        psnr = entry["metrics"].get(S.PSNR)
        if psnr is None or psnr["mean"] is None or entry.get("diffusion"):  # the ablation is the bundle's own branch
            continue
        series = "guide upsampled" if entry["kind"] == "guide-upsampled" else "diffusion re-render"
        points.append({"series": series, "variant": entry["name"], "guide_tokens": entry["num_guide_tokens"],
                       "guide_size": entry["guide_size"], "mean": psnr["mean"], "ci_low": psnr["ci_low"],
                       "ci_high": psnr["ci_high"]})
    return sorted(points, key=lambda p: (p["series"], p["guide_tokens"]))
