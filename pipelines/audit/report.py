"""The audit's HTML report, and the corpus-statistics report, as pages people read.

Built from `summary.json` (the numbers) and the per-image table (which images to show, where
their PNGs are). The page is one file with inline CSS and SVG plots; images are relative links
to `images/...` beside it, so the output folder can be copied anywhere, an S3 bucket included.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dualtok.pipelines.audit import html as H
from dualtok.pipelines.io import schemas as S
from dualtok.pipelines.audit.svg import PALETTE, histogram, rank_frequency, series_plot

METRIC_LABELS = {
    S.PSNR: "PSNR (dB) &uarr;", S.SSIM: "SSIM &uarr;", S.PSNR_GUIDE: "PSNR @ guide size &uarr;",
    S.SSIM_GUIDE: "SSIM @ guide size &uarr;", S.LPIPS: "LPIPS &darr;", S.CLIP_SCORE: "CLIP score &uarr;",
    S.CLIP_SIMILARITY: "CLIP image sim. &uarr;",
}


def render_audit_report(summary: dict[str, Any], table: pa.Table, errors: pa.Table,
                        stats: dict[str, Any] | None) -> str:
    """The whole report page as a string."""
    variants = summary["variants"]
    body = [_banner(summary), _results(summary), _plots(summary, table),
            _images(summary, table), _shards(summary), _errors(summary, errors)]
    nav = [("results", "Results"), ("plots", "Plots"), ("images", "Images"), ("worst", "Worst / best"),
           ("shards", "Per shard"), ("errors", "Errors")]
    if stats is not None:
        body.append(stats_section(stats))
        nav.append(("corpus", "Corpus statistics"))
    body.append(_provenance(summary))
    nav.append(("settings", "Settings"))
    counts = summary["counts"]
    subtitle = (f"corpus {_mono(summary['corpus'])} (fingerprint {_mono(summary.get('corpus_fingerprint'))}) &middot; "
                f"{counts['audited']} images audited of {counts['sampled']} sampled, {counts['errors']} errors &middot; "
                f"{len(variants)} variants &middot; bundle {_mono(summary['bundle']['fingerprint'])}"
                f" &middot; generated {H.text(summary['generated_at'])}")
    return H.page("dualtok reconstruction audit", subtitle, "".join(body), nav)


def _banner(summary: dict[str, Any]) -> str:
    warnings = []
    untrained = summary["bundle"].get("untrained_parts") or []
    if untrained:
        warnings.append(f"The {', '.join(untrained)} weights of this bundle are random-initialised (untrained): "
                        "the pipeline is exercised, but the reconstructions and their scores carry no meaning.")
    return H.notes(warnings, "warn") + H.notes(summary.get("notes", []))


def _results(summary: dict[str, Any]) -> str:
    variants = summary["variants"]
    metrics = [m for m in METRIC_LABELS if any(m in v["metrics"] for v in variants)]
    headers = ["Variant", "#guide tokens", "#semantic tokens", *(METRIC_LABELS[m] for m in metrics),
               "images", "images/s"]
    rows = []
    for v in variants:
        digits = {S.PSNR: 2, S.PSNR_GUIDE: 2, S.CLIP_SCORE: 2}
        rows.append([f"<b>{H.text(v['name'])}</b>", str(v["num_guide_tokens"]), str(v["num_semantic_tokens"]),
                     *(H.interval(v["metrics"].get(m), digits.get(m, 3)) for m in metrics),
                     str(v["images"]), H.number(v["images_per_second"], 3)])
    intro = ("Mean over the audited images with its 95% interval (Student t), laid out like the paper's Table 2. "
             f"&ldquo;@ guide size&rdquo; compares both images resized to {summary['bundle']['guide_size']} px. "
             "images/s is reconstruction throughput per actor (wall time of the variant's forward passes).")
    return H.section("results", "Results", H.table(headers, rows, table_id="results-table"), intro)


def _shared_edges(table: pa.Table, metric: str, bins: int = 20) -> np.ndarray:
    values = table[metric].to_numpy(zero_copy_only=False).astype(np.float64) if table.num_rows else np.zeros(0)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.linspace(0.0, 1.0, bins + 1)
    low, high = float(finite.min()), float(finite.max())
    return np.linspace(low, high if high > low else low + 1.0, bins + 1)


def _plots(summary: dict[str, Any], table: pa.Table) -> str:
    panels = []
    for metric, label in ((S.PSNR, "PSNR (dB)"), (S.SSIM, "SSIM")):
        edges = _shared_edges(table, metric)
        for n, v in enumerate(summary["variants"]):
            part = table.filter(pc.equal(table[S.VARIANT], v["name"])) if table.num_rows else table
            values = part[metric].to_numpy(zero_copy_only=False).astype(np.float64)
            panels.append(histogram(values, edges, f"{v['name']}: {label}", label, PALETTE[n % len(PALETTE)]))
    body = f'<h3>Histograms per variant</h3><div class="plots">{"".join(panels)}</div>'
    body += "<h3>PSNR against the number of guide tokens</h3>" + _ablation(summary)
    return H.section("plots", "Plots", body)


def _ablation(summary: dict[str, Any]) -> str:
    points = summary["ablation"]
    categories = sorted({p["guide_tokens"] for p in points})
    series: dict[str, list[dict[str, float | None]]] = {}
    for p in points:
        series.setdefault(p["series"], []).append(
            {"x": categories.index(p["guide_tokens"]), "mean": p["mean"], "lo": p["ci_low"], "hi": p["ci_high"]})
    labels = [f"{c} ({_guide_px(points, c)})" for c in categories]
    plot = series_plot(series, labels, "Mean PSNR (95% interval) by guide tokens", "guide tokens (guide size)",
                       "PSNR (dB)") if points else ""
    sizes = sorted({p["guide_size"] for p in points if p["guide_size"]})
    note = ""
    if len(sizes) < 2:
        only = f"{sizes[0]} px" if sizes else "none"
        message = (f"Only one guide resolution is available ({only}); the paper's sec. 4.2 ablation (16/32/64/128 "
                   "px) needs guide_bundles=[...] with guide branches at other resolutions. 0 tokens is "
                   "the semantic-only variant.")
        note = H.notes([message])
    return note + plot


def _guide_px(points: list[dict[str, Any]], tokens: int) -> str:
    sizes = {p["guide_size"] for p in points if p["guide_tokens"] == tokens and p["guide_size"]}
    return f"{min(sizes)} px" if sizes else "no guide"


def _image_rows(table: pa.Table) -> dict[tuple[str, int], dict[str, Any]]:
    """(shard, index) -> key, caption, original, guides and reconstructions with their PSNR."""
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for r in table.to_pylist():
        entry = rows.setdefault((r[S.SHARD], r[S.INDEX]), {"key": r[S.KEY], "caption": r[S.CAPTION],
                                                           "original": r[S.ORIGINAL_PATH], "guides": {}, "recon": {}})
        if r[S.GUIDE_PATH]:
            entry["guides"].setdefault(r[S.GUIDE_PATH], r[S.GUIDE_SIZE])
        entry["recon"][r[S.VARIANT]] = (r[S.RECONSTRUCTION_PATH], r[S.PSNR], r[S.SSIM])
    return rows


def _row_html(entry: dict[str, Any], shard: str, index: int, variants: list[str]) -> str:
    figures = [H.figure(entry["original"], "original")]
    for path, size in sorted(entry["guides"].items(), key=lambda item: (item[1], item[0])):
        origin = " (corpus)" if path.endswith("/guide.png") else " (re-encoded)"
        figures.append(H.figure(path, f"guide {size} px{origin}", guide=True))
    for name in variants:
        if name in entry["recon"]:
            path, psnr, ssim = entry["recon"][name]
            figures.append(H.figure(path, f"{H.text(name)}<br>{psnr:.2f} dB &middot; SSIM {ssim:.3f}"))
    label = f"<b>{H.text(entry['key'])}</b><br>{H.text(shard)} #{index}<br><i>{H.text(entry['caption'] or '')}</i>"
    return H.image_row(label, figures)


def _images(summary: dict[str, Any], table: pa.Table) -> str:
    rows = _image_rows(table)
    names = [v["name"] for v in summary["variants"]]
    shown = sorted(rows)[: summary["report"]["grid_images"]]
    grid = "".join(_row_html(rows[k], k[0], k[1], names) for k in shown)
    body = H.section("images", "Images", f'<div class="grid">{grid}</div>',
                     f"The first {len(shown)} audited images: original | guide image(s) | each variant.")
    primary = summary.get("ranked_by", {}).get("variant")
    parts = []
    for title, key in (("Worst", "worst"), ("Best", "best")):
        picked = [rows[(p["shard"], p["index"])] for p in summary.get(key, [])]
        html = "".join(_row_html(e, p["shard"], p["index"], names) for e, p in zip(picked, summary.get(key, [])))
        parts.append(f"<h3>{title} {len(picked)} by PSNR of {H.text(primary)}</h3><div class=\"grid\">{html}</div>")
    return body + H.section("worst", "Worst and best images", "".join(parts))


def _shards(summary: dict[str, Any]) -> str:
    names = [v["name"] for v in summary["variants"]]
    headers = ["Shard", "images", "errors", *(f"{H.text(n)} PSNR / SSIM" for n in names)]
    rows = []
    for s in summary["shards"]:
        cells = []
        for n in names:
            m = s["variants"].get(n)
            cells.append(f"{H.number(m['psnr'], 2)} / {H.number(m['ssim'], 3)}" if m else "&ndash;")
        rows.append([H.text(s["shard"]), str(s["images"]), str(s["errors"]), *cells])
    return H.section("shards", "Per shard", H.table(headers, rows, table_id="shards-table"))


def _errors(summary: dict[str, Any], errors: pa.Table) -> str:
    if errors.num_rows == 0:
        return H.section("errors", "Errors", "<p>No sampled row failed.</p>")
    by_reason = [[H.text(k), str(v)] for k, v in summary["errors_by_reason"].items()]
    listed = [[H.text(r[S.KEY]), H.text(r[S.SHARD]), str(r[S.INDEX]), H.text(r[S.STAGE]), H.text(r[S.REASON])]
              for r in errors.slice(0, 100).to_pylist()]
    body = H.table(["Reason", "rows"], by_reason) + H.table(["Key", "Shard", "Index", "Stage", "Reason"], listed, 2)
    intro = f"{errors.num_rows} sampled rows could not be audited; they are left out of every number above."
    return H.section("errors", "Errors", body, intro)


def _percent(fraction: float | None) -> str:
    """A fraction shown as the CLI shows it (`11.7%`): one unit for one number everywhere."""
    return "&ndash;" if fraction is None else f"{100 * fraction:.1f}%"


def _mono(value: object) -> str:
    return f'<span class="mono">{H.text(value)}</span>'


def _provenance(summary: dict[str, Any]) -> str:
    b = summary["bundle"]
    rows = [["bundle", H.text(b["spec"])], ["fingerprint", _mono(b["fingerprint"])],
            ["preset", H.text(b.get("preset"))],
            ["guide", f"{b['guide_size']} px, {b['guide_tokens']} tokens"], ["semantic tokens", str(b["semantic_tokens"])]]
    rows += [[f"{H.text(part)} weights", f"{H.text(b['weights'].get(part))}<br>{_mono(h[:16])}"]
             for part, h in sorted(b["part_hashes"].items())]
    rows += [[f"extra guide {H.text(n)}", f"{H.text(g['spec'])} ({g['guide_size']} px, {g['guide_tokens']} tokens)"]
             for n, g in sorted(b.get("extra_guides", {}).items())]
    rows += [[H.text(k), H.text(v)] for k, v in summary["settings"].items()]
    rows += [["run", H.text(summary["run_id"])], ["audit fingerprint", _mono(summary["fingerprint"])],
             ["corpus fingerprint", _mono(summary.get("corpus_fingerprint"))]]
    body = H.table(["", ""], rows, left=2, table_id="settings-table")
    body += H.details("resolved config", json.dumps(summary.get("config", {}), indent=2, sort_keys=True))
    body += H.details("package versions", json.dumps(summary.get("versions", {}), indent=2, sort_keys=True))
    return H.section("settings", "Settings and provenance", body)


# ---- corpus statistics ----------------------------------------------------------------------
def stats_section(stats: dict[str, Any]) -> str:
    overview = [["shards", str(stats["shards"])], ["samples read", str(stats["samples"])], ["rows", str(stats["rows"])],
                ["errors", str(stats["errors"])], ["caption coverage", _percent(stats["caption_coverage"])]]
    overview += [[f"image {k} (min / mean / max)", f"{v['min']} / {H.number(v['mean'], 1)} / {v['max']}"]
                 for k, v in stats["image_sizes"].items()]
    body = "<h3>Overview</h3>" + H.table(["", ""], overview, left=2, table_id="stats-overview")
    if stats["by_reason"]:
        body += "<h3>Errors by reason</h3>" + H.table(["Reason", "rows"], [[H.text(k), str(v)] for k, v in stats["by_reason"].items()])
    rows, plots = [], []
    for name, s in stats["streams"].items():
        codes = [str(s["vocab"]), str(s["codes_used"]), _percent(s["usage"]), H.number(s["perplexity"], 1),
                 str(s["dead_codes"])] if "vocab" in s else ["&ndash;"] * 5
        rows.append([H.text(name), *codes, str(s["sequences"]), str(s["unique_sequences"]), str(s["duplicate_rows"]),
                     str(s["duplicate_groups"])])
        if "histogram" in s:
            plots.append(rank_frequency(np.asarray(s["histogram"]), f"{name} codebook: usage by rank"))
    headers = ["Stream", "vocab", "codes used", "usage", "perplexity", "dead codes", "sequences", "unique",
               "duplicate rows", "duplicate groups"]
    body += "<h3>Token streams</h3>" + H.table(headers, rows, table_id="stats-streams")
    body += f'<div class="plots">{"".join(plots)}</div>'
    dupes = [[H.text(name), str(d["count"]), H.text(", ".join(d["examples"]))]
             for name, s in stats["streams"].items() for d in s["top_duplicates"]]
    if dupes:
        body += "<h3>Most repeated token sequences</h3>" + H.table(["Stream", "rows", "examples (shard/key)"], dupes)
    intro = ("Computed from every committed corpus file. Perplexity is exp(entropy) of the code distribution: "
             "the number of equally used codes it is worth. Duplicate rows repeat an earlier row's whole sequence.")
    return H.section("corpus", "Corpus statistics", body, intro)


def render_stats_report(stats: dict[str, Any], generated_at: str) -> str:
    subtitle = (f"corpus {_mono(stats['corpus'])} (fingerprint {_mono(stats.get('corpus_fingerprint'))}) &middot; bundle {_mono(stats.get('bundle_fingerprint'))} "
                f"&middot; generated {escape(generated_at)}")
    warn = ""
    if stats.get("untrained_parts"):
        message = (f"The corpus was tokenized with random-initialised {', '.join(stats['untrained_parts'])} "
                   "weights: its tokens exercise the pipeline but carry no meaning.")
        warn = H.notes([message], "warn")
    return H.page("dualtok corpus statistics", subtitle, warn + stats_section(stats), [("corpus", "Corpus statistics")])
