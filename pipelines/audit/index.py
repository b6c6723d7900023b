"""Nightly audits: a cross-run index page, and per-metric thresholds that fail a run.

Layout (documented in docs/audit.md): each night's audit writes to its own folder under one parent,
`s3://b/audits/2026-12-01/`, `s3://b/audits/2026-12-02/`, ...; with `run_index=true` the audit then
rewrites `<parent>/index.html`, which plots each metric (PSNR, SSIM, ... of each variant) over every
folder beside it that holds a `summary.json`, in the order the audits were generated, and links each
run's own report. Folders without a summary (an audit still running, other files) are skipped.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from dualtok.pipelines.audit import html as H
from dualtok.pipelines.io import schemas as S
from dualtok.pipelines.audit.summary import LOWER_IS_BETTER, METRICS
from dualtok.pipelines.io.storage import commit_bytes, filesystem, join
from dualtok.pipelines.audit.svg import series_plot

logger = logging.getLogger(__name__)

INDEX_FILE = "index.html"
_SUMMARY_FILE = "summary.json"
# the metrics plotted over runs, named as the run's own report names them
_PLOTTED = {S.PSNR: "PSNR (dB)", S.SSIM: "SSIM", S.LPIPS: "LPIPS", S.CLIP_SIMILARITY: "CLIP image similarity"}


def parse_thresholds(thresholds: dict[str, Any]) -> dict[tuple[str, str], float]:
    """`{"dual.psnr": 18.0}` -> {("dual", "psnr"): 18.0}; a key or value that cannot be one is an error
    naming it (checked at start-up, before any work)."""
    out = {}
    for key, value in thresholds.items():
        variant, _, metric = str(key).rpartition(".")
        if not variant or metric not in METRICS:
            raise ValueError(f"thresholds key {key!r} is not <variant>.<metric> with metric one of "
                             f"{', '.join(METRICS)} (e.g. dual.psnr)")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"thresholds.{key} must be a number, got {value!r}")
        out[(variant, metric)] = float(value)
    return out


def crossed_thresholds(variants: list[dict[str, Any]], thresholds: dict[tuple[str, str], float]) -> list[str]:
    """One line per threshold the run's means cross: below it for metrics where higher is better, above
    it for LPIPS. A threshold on a variant or metric the run does not have is crossed too: a nightly
    check that silently measures nothing is the failure it exists to catch."""
    means = {(v["name"], m): stats.get("mean") for v in variants for m, stats in v["metrics"].items()}
    crossed = []
    for (variant, metric), limit in sorted(thresholds.items()):
        mean = means.get((variant, metric))
        if mean is None:
            crossed.append(f"{variant}.{metric}: no value in this audit (threshold {limit:g})")
        elif (mean > limit) if metric in LOWER_IS_BETTER else (mean < limit):
            side = "above" if metric in LOWER_IS_BETTER else "below"
            crossed.append(f"{variant}.{metric} = {mean:.4g} is {side} its threshold {limit:g}")
    return crossed


def parent_folder(output: str) -> str:
    """The folder holding the audit folder `output` (its dated siblings are the other runs)."""
    stripped = output.rstrip("/")
    return stripped.rsplit("/", 1)[0] if "/" in stripped.split("://", 1)[-1] else "."


def load_runs(parent: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """(name, summary) of every folder under `parent` holding a summary.json, oldest audit first."""
    fs, root = filesystem(parent, storage_options)
    runs = []
    for entry in fs.ls(root, detail=True):
        if entry["type"] != "directory":
            continue
        path = f"{entry['name'].rstrip('/')}/{_SUMMARY_FILE}"
        if fs.exists(path):
            summary = json.loads(fs.cat_file(path))
            runs.append({"name": entry["name"].rstrip("/").rsplit("/", 1)[-1], "summary": summary})
    return sorted(runs, key=lambda r: (r["summary"].get("generated_at", ""), r["name"]))


def render_index(runs: list[dict[str, Any]], thresholds: dict[tuple[str, str], float]) -> str:
    """The index page: one plot per metric (a line per variant over the runs), then a table of runs."""
    names = [r["name"] for r in runs]
    plots = []
    for metric, label in _PLOTTED.items():
        series: dict[str, list[dict[str, float | None]]] = {}
        for x, run in enumerate(runs):
            for v in run["summary"].get("variants", []):
                stats = v["metrics"].get(metric)
                if stats and stats.get("mean") is not None:
                    series.setdefault(v["name"], []).append(
                        {"x": x, "mean": stats["mean"], "lo": stats.get("ci_low"), "hi": stats.get("ci_high")})
        if series:
            limits = ", ".join(f"{v}: {t:g}" for (v, m), t in sorted(thresholds.items()) if m == metric)
            title = f"{label} over runs" + (f" (thresholds {limits})" if limits else "")
            plots.append(series_plot(series, names, title, "audit run", label, width=640))
    rows = [_run_row(run) for run in runs]
    body = H.section("trends", "Metrics over runs", f'<div class="plots">{"".join(plots)}</div>',
                     "Mean over each run's audited images with its 95% interval; one line per variant.")
    body += H.section("runs", "Runs", H.table(["Run", "generated", "corpus fingerprint", "images", "errors"], rows))
    return H.page("dualtok audits over time", f"{len(runs)} audit runs", body, [("trends", "Trends"), ("runs", "Runs")])


def _run_row(run: dict[str, Any]) -> list[str]:
    """A run's row of the index table: a link to its report, when, which corpus, how many images."""
    summary, counts = run["summary"], run["summary"].get("counts", {})
    return [f'<a href="{H.text(run["name"])}/index.html">{H.text(run["name"])}</a>', H.text(summary.get("generated_at")),
            f'<span class="mono">{H.text(summary.get("corpus_fingerprint"))}</span>',
            str(counts.get("audited", "")), str(counts.get("errors", ""))]


def write_index(output: str, thresholds: dict[tuple[str, str], float],
                storage_options: dict[str, Any] | None = None) -> str:
    """Rewrite `<parent of output>/index.html` from every run beside `output`; returns its URI."""
    parent = parent_folder(output)
    runs = load_runs(parent, storage_options)
    fs, _ = filesystem(parent, storage_options)
    uri = join(parent, INDEX_FILE)
    commit_bytes(fs, fs._strip_protocol(uri), render_index(runs, thresholds).encode())
    logger.info("audit index over %d runs: %s", len(runs), uri)
    return uri


__all__ = ["INDEX_FILE", "crossed_thresholds", "load_runs", "parse_thresholds", "render_index", "write_index"]
