"""What a run shows: the progress line, report plots and HTML pieces, the nightly
thresholds and the bounded-memory duplicate counts of the corpus statistics."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest

from dualtok.pipelines.audit import html as H
from dualtok.pipelines.audit.index import crossed_thresholds, parse_thresholds, render_index
from dualtok.pipelines.audit.stats import StreamCounter, corpus_fingerprint
from dualtok.pipelines.progress import Progress, TerminalProgress, format_duration, format_progress
from dualtok.pipelines.audit.svg import rank_frequency


# ---- progress --------------------------------------------------------------------------------
def test_progress_line_states_counts_rate_and_eta():
    line = format_progress(Progress(done=3, total=10, images=2400, seconds=60.0))
    # 7 shards left at 20 s a shard: 140 s
    assert line == "shards 3/10 (30%) | 2400 images | 40.0 images/s | elapsed 1m00s | ETA 2m20s"
    assert "ETA ?" in format_progress(Progress(0, 4, 0, 5.0))  # no shard done: no rate to estimate from
    assert [format_duration(s) for s in (None, 42.4, 185, 3720)] == ["?", "42s", "3m05s", "1h02m"]


def test_terminal_progress_redraws_one_line_in_place():
    stream = io.StringIO()
    bar = TerminalProgress("tokenize", stream)
    bar(Progress(0, 2, 100, 10.0))
    bar(Progress(2, 2, 200, 10.0))
    bar.close()
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n") and text.count("\r") == 2
    last = text.split("\r")[-1]
    assert last.startswith("tokenize: shards 2/2 (100%) | 200 images | 20.0 images/s")


# ---- report pieces -----------------------------------------------------------------------------
def test_codebook_usage_plot_is_log_log():
    counts = np.zeros(4096)
    counts[:23] = np.arange(23, 0, -1) * 10  # 23 used codes of 4096, counts 230 .. 10
    svg = rank_frequency(counts, "guide codebook: usage by rank")
    ticks = re.findall(r'text-anchor="middle">([0-9,]+)</text>', svg)
    assert ticks == ["1", "10", "100", "1,000"]  # powers of ten along the rank axis
    assert re.findall(r'class="ytick"[^>]*>([0-9,]+)<', svg) == ["1", "10", "100"]
    xs = [float(p.split(",")[0]) for p in re.search(r'class="rank-line" points="([^"]+)"', svg).group(1).split()]
    left, right = 46, 520 - 12
    # on a linear rank axis the 23 used codes would span 22/4095 of the width (~2.5 px); here about 37 %
    assert xs[0] == left and (xs[-1] - left) / (right - left) > 0.35
    assert "4073 dead codes from rank 24" in svg


def test_thumbnails_link_their_image_and_captions_wrap_at_words():
    html = H.figure("images/00000/0/dual.png", "dual<br>18.20 dB")
    assert '<a href="images/00000/0/dual.png" target="_blank"><img src="images/00000/0/dual.png"' in html
    assert "break-all" not in H.CSS and "overflow-wrap: break-word" in H.CSS


# ---- nightly audits ----------------------------------------------------------------------------
def _variant(name: str, psnr: float, lpips: float | None = None) -> dict:
    metrics = {"psnr": {"mean": psnr, "ci_low": psnr - 1, "ci_high": psnr + 1}}
    if lpips is not None:
        metrics["lpips"] = {"mean": lpips, "ci_low": None, "ci_high": None}
    return {"name": name, "metrics": metrics}


def test_thresholds_are_checked_at_start_and_crossed_in_the_right_direction():
    with pytest.raises(ValueError, match="not <variant>.<metric>"):
        parse_thresholds({"dual.psnx": 18})
    with pytest.raises(ValueError, match="must be a number"):
        parse_thresholds({"dual.psnr": "high"})
    limits = parse_thresholds({"dual.psnr": 18.0, "dual.lpips": 0.4, "guide-upsampled.psnr": 10})
    ok = [_variant("dual", 19.0, lpips=0.3), _variant("guide-upsampled", 12.0)]
    assert crossed_thresholds(ok, limits) == []
    bad = [_variant("dual", 17.5, lpips=0.45)]
    assert crossed_thresholds(bad, limits) == [
        "dual.lpips = 0.45 is above its threshold 0.4", "dual.psnr = 17.5 is below its threshold 18",
        "guide-upsampled.psnr: no value in this audit (threshold 10)"]


def test_index_page_plots_each_metric_over_the_runs_in_date_order():
    runs = [{"name": day, "summary": {"generated_at": f"{day}T03:00:00Z", "corpus_fingerprint": f"fp{day[-1]}",
                                      "counts": {"audited": 9, "errors": 1},
                                      "variants": [_variant("dual", psnr), _variant("semantic-only", psnr - 5)]}}
            for day, psnr in (("2026-12-01", 18.0), ("2026-12-02", 19.5))]
    html = render_index(runs, parse_thresholds({"dual.psnr": 18.0}))
    assert html.count("<svg") == 1  # only PSNR has values
    assert "PSNR (dB) over runs (thresholds dual: 18)" in html
    assert html.count("<polyline") == 2  # one line per variant across both runs
    assert html.index('href="2026-12-01/index.html"') < html.index('href="2026-12-02/index.html"')
    assert "fp2" in html


# ---- corpus statistics -------------------------------------------------------------------------
def test_duplicate_counts_spilled_to_disk_equal_exact_counts():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 4000, dtype=np.uint64)
    hashes = np.concatenate([base, base[:300], base[:40], base[:5]])  # 300 groups; 5 sequences 4 times
    results = []
    for max_buffered in (10**9, 97):  # all in memory; spilled into partitions every ~100 hashes
        counter = StreamCounter(0)
        counter.hashes.max_buffered = max_buffered
        for chunk in np.array_split(rng.permutation(hashes), 29):
            counter.add(None, chunk)
        assert counter.hashes.spilled == (max_buffered == 97)
        results.append(counter.result(False, top_duplicates=5))
        assert not counter.hashes.spilled  # the temp files are gone
    unique, counts = np.unique(hashes, return_counts=True)
    for result in results:
        assert result["sequences"] == hashes.size and result["unique_sequences"] == unique.size == 4000
        assert result["duplicate_rows"] == 345 and result["duplicate_groups"] == 300
        assert sorted(h for h, _ in result["_top_hashes"]) == sorted(int(h) for h in base[:5])
        assert {c for _, c in result["_top_hashes"]} == {4}


def test_corpus_fingerprint_changes_with_any_committed_shard():
    markers = {"00000": {"rows": 8, "errors": 0, "samples": 8, "shard_version": "a", "bundle_fingerprint": "b"}}
    first = corpus_fingerprint(markers)
    assert len(first) == 16 and first == corpus_fingerprint(json.loads(json.dumps(markers)))
    assert corpus_fingerprint({**markers, "00001": markers["00000"]}) != first
    assert corpus_fingerprint({"00000": {**markers["00000"], "shard_version": "c"}}) != first
