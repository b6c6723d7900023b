"""Reconstruction audits and corpus statistics, end to end on local Ray + loopback S3 (`tiny`).

One module corpus: 2 shards x 4 sample photos (`write_sample_shards`) plus a shard with broken
samples, tokenized by `dualtok tokenize`. The audit reads its originals from a copy of the
source shards in which one image is corrupt and one shard is missing, so bad rows are exercised.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import tarfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from dualtok_core.bundle import BundleInfo, DualTokenizer
from dualtok_core.guide import PRESETS as GUIDE_PRESETS
from dualtok_core.guide import GuideVQModel
from dualtok.jobs.cli import main as cli
from dualtok.pipelines.io import schemas as S
from dualtok.pipelines.shards.photos import write_sample_shards
from tests.shard_factory import encode, photo_images, sample_members, tar_bytes

pytestmark = pytest.mark.timeout(900)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
AUDIT_ARGS = ["sample_fraction=1.0", "size=64", "steps=2", "slice_size=4", "reconstruct.batch_size=2",
              "report.grid_images=3", "report.worst_k=2", "report.best_k=2"]
VARIANTS = {  # name -> (guide size, guide tokens, semantic tokens) for tiny (64 px guide) + a 32 px guide
    "dual": (64, 64, 32), "semantic-only": (0, 0, 32), "guide-upsampled": (64, 64, 0),
    "dual-g32": (32, 16, 32), "guide-upsampled-g32": (32, 16, 0),
}


def _retar(data: bytes, replace: dict[str, bytes]) -> bytes:
    """The same tar with some members' bytes replaced (same names, same order)."""
    members = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            members.append((member.name, replace.get(member.name, tar.extractfile(member).read())))
    return tar_bytes(members)


def _save_guide_bundle(uri: str, guide_size: int, storage_options: dict) -> None:
    kwargs = dict(GUIDE_PRESETS["tiny"], guide_size=guide_size)
    model = GuideVQModel(**kwargs).eval()
    info = BundleInfo(preset=None, sources={"guide": f"random-init (test guide at {guide_size} px)"})
    DualTokenizer({"guide": model}, info).save_pretrained(uri, storage_options=storage_options)


@pytest.fixture(scope="module")
def world(ray_session, s3):
    """S3 layout: shards/ (tokenized), sources/ (what the audit reads), corpus/, guide32/."""
    fs, bucket = s3.filesystem(), s3.new_bucket()
    root = f"s3://{bucket}"
    write_sample_shards(f"{root}/shards", count=8, per_shard=4, storage_options=s3.storage_options)
    good = encode(photo_images(1, seed=4)[0])
    broken = sample_members("bad-0", good, "fine") + [("bad-1.jpg", b"not an image"), ("bad-2.txt", b"no image")]
    fs.pipe_file(f"{bucket}/shards/zz-broken.tar", tar_bytes(broken))
    # one encoder actor: the audit is under test here, not tokenize's sizing (each actor start imports torch)
    assert cli(["tokenize", f"inputs={root}/shards/", f"output={root}/corpus", "bundle=tiny", "encoder.actors=1"]) == 0
    # sources: shard 00000 as it is, shard 00001 with its third image truncated, no zz-broken
    fs.copy(f"{bucket}/shards/00000.tar", f"{bucket}/sources/00000.tar")
    original = fs.cat_file(f"{bucket}/shards/00001.tar")
    with tarfile.open(fileobj=io.BytesIO(original)) as tar:
        jpgs = sorted(m.name for m in tar if m.name.endswith(".jpg"))
    corrupt = jpgs[2]
    fs.pipe_file(f"{bucket}/sources/00001.tar", _retar(original, {corrupt: b"\xff\xd8\xff" + b"\0" * 64}))
    _save_guide_bundle(f"{root}/guide32", 32, s3.storage_options)
    return {"fs": fs, "bucket": bucket, "root": root, "corrupt_key": corrupt[: -len(".jpg")]}


@pytest.fixture(scope="module")
def audit(world):
    root = world["root"]
    args = ["audit", f"corpus={root}/corpus", f"output={root}/audit", f"sources={root}/sources/",
            f"guide_bundles=[{root}/guide32]", *AUDIT_ARGS]
    assert cli(args) == 0
    return {**world, "args": args, "out": f"{world['bucket']}/audit"}


def _read(fs, path: str) -> pa.Table:
    fs.invalidate_cache()
    files = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
    return pa.concat_tables([pq.read_table(fs.open(p, "rb")) for p in files])


def _png(fs, path: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(fs.cat_file(path))))


# ---- the audit ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_audit_writes_every_output_and_reports_bad_rows(audit):
    fs, out = audit["fs"], audit["out"]
    sample = pq.read_table(fs.open(f"{out}/sample.parquet", "rb"))
    assert sample.num_rows == 9 and sample[S.SLICE].to_pylist() == ["00000"] * 4 + ["00001"] * 4 + ["00002"]
    table, errors = _read(fs, f"{out}/tables"), _read(fs, f"{out}/errors")
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.find(f"{out}/_committed")) == [f"0000{i}.json" for i in range(3)]
    reasons = {(r[S.SHARD], r[S.KEY]): (r[S.STAGE], r[S.REASON]) for r in errors.to_pylist()}
    assert reasons[("00001", audit["corrupt_key"])][0] == "decode"
    assert reasons[("zz-broken", "bad-0")] == ("fetch", "no source shard is known for this corpus shard (give sources=...)")
    assert len(reasons) == 2 and table.num_rows == 7 * len(VARIANTS)
    for name, (guide_size, guide_tokens, semantic_tokens) in VARIANTS.items():
        rows = table.filter(pc.equal(table[S.VARIANT], name))
        assert rows.num_rows == 7
        assert set(rows[S.GUIDE_SIZE].to_pylist()) == {guide_size}
        assert set(rows[S.NUM_GUIDE_TOKENS].to_pylist()) == {guide_tokens}
        assert set(rows[S.NUM_SEMANTIC_TOKENS].to_pylist()) == {semantic_tokens}
    assert table[S.LPIPS].null_count == table[S.CLIP_SCORE].null_count == table.num_rows  # no weights: skipped

    summary = json.loads(fs.cat_file(f"{out}/summary.json"))
    assert summary["counts"]["audited"] + summary["counts"]["errors"] == summary["counts"]["sampled"] == 9
    assert [v["name"] for v in summary["variants"]] == list(VARIANTS)
    for v in summary["variants"]:
        values = table.filter(pc.equal(table[S.VARIANT], v["name"]))[S.PSNR].to_numpy()
        assert v["metrics"][S.PSNR]["mean"] == pytest.approx(values.mean(), rel=1e-12)
        assert v["metrics"][S.PSNR]["ci_low"] < v["metrics"][S.PSNR]["mean"] < v["metrics"][S.PSNR]["ci_high"]
        assert v["images_per_second"] > 0
    assert any("LPIPS skipped" in n for n in summary["notes"]) and any("CLIP score skipped" in n for n in summary["notes"])
    assert {p["guide_tokens"] for p in summary["ablation"]} == {0, 16, 64}
    assert len(summary["worst"]) == len(summary["best"]) == 2
    assert summary["worst"][0][S.PSNR] <= summary["best"][0][S.PSNR]
    for name in ("audit.json", "index.html", "corpus_stats.json"):
        assert fs.exists(f"{out}/{name}")


@pytest.mark.slow
def test_reported_psnr_and_ssim_equal_scikit_image_on_the_saved_images(audit):
    fs, out = audit["fs"], audit["out"]
    table = _read(fs, f"{out}/tables")
    originals = {}
    for row in table.to_pylist():
        if row[S.ORIGINAL_PATH] not in originals:
            originals[row[S.ORIGINAL_PATH]] = _png(fs, f"{out}/{row[S.ORIGINAL_PATH]}")
        original, recon = originals[row[S.ORIGINAL_PATH]], _png(fs, f"{out}/{row[S.RECONSTRUCTION_PATH]}")
        assert original.shape == recon.shape == (64, 64, 3)
        assert row[S.PSNR] == pytest.approx(peak_signal_noise_ratio(original, recon, data_range=255), rel=1e-9)
        assert row[S.SSIM] == pytest.approx(structural_similarity(original, recon, channel_axis=-1, data_range=255),
                                             rel=1e-7, abs=1e-9)
        # output size == the bundle's guide size here: "at guide size" must not resample at all
        assert row[S.PSNR_GUIDE] == pytest.approx(row[S.PSNR], rel=1e-12)
        if row[S.GUIDE_PATH]:
            side = VARIANTS[row[S.VARIANT]][0]
            assert _png(fs, f"{out}/{row[S.GUIDE_PATH]}").shape == (side, side, 3)


@pytest.mark.slow
def test_rerun_skips_finished_slices_redoes_lost_ones_identically_and_refuses_other_settings(audit):
    fs, out = audit["fs"], audit["out"]
    before = _read(fs, f"{out}/tables").drop_columns([S.SECONDS])
    kept = {p: fs.cat_file(p) for p in fs.find(f"{out}/_committed") if not p.endswith("00001.json")}
    fs.rm(f"{out}/_committed/00001.json")
    fs.rm(f"{out}/tables/00001.parquet")
    assert cli(audit["args"]) == 0
    fs.invalidate_cache()
    assert {p: fs.cat_file(p) for p in kept} == kept  # finished slices were not redone
    this_run = json.loads(fs.cat_file(f"{out}/summary.json"))["this_run"]
    assert (this_run["slices_skipped"], this_run["slices_committed"]) == (2, 1)
    assert len(fs.find(f"{out}/runs")) == 2
    after = _read(fs, f"{out}/tables").drop_columns([S.SECONDS])
    assert after.equals(before)  # the redone slice reproduces every number and path

    assert cli([*audit["args"], "steps=3"]) == 2  # another audit into the same folder is refused
    fs.invalidate_cache()
    assert json.loads(fs.cat_file(f"{out}/audit.json"))["render"]["steps"] == 2


class _ReportDom(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.tables: dict[str, int] = {}
        self._table: str | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attributes = dict(attrs)
        if tag == "img":
            self.images.append(attributes["src"])
        elif tag == "table" and attributes.get("id"):
            self._table = attributes["id"]
            self.tables[self._table] = 0
        elif tag == "tr" and self._table is not None:
            self.tables[self._table] += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); the report's "
                                              "browser rendering is not checked")
def test_report_renders_in_headless_chromium_from_a_copied_folder(audit, tmp_path):
    fs, out = audit["fs"], audit["out"]
    fs.invalidate_cache()
    local = tmp_path / "report"
    fs.get(f"{out}/", f"{local}/", recursive=True)  # the folder, copied anywhere, still works
    page = (local / "index.html").as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--allow-file-access-from-files"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    parsed = _ReportDom()
    parsed.feed(dom)
    assert parsed.tables["results-table"] == 1 + len(VARIANTS)  # header + one row per variant
    assert parsed.tables["shards-table"] == 1 + 3
    for name in VARIANTS:
        assert f"<b>{name}</b>" in dom
    # grid (3 rows) + worst (2) + best (2): original, two guides, five variants each
    assert len(parsed.images) == 7 * (1 + 2 + len(VARIANTS))
    assert all((local / src).is_file() for src in parsed.images)
    assert dom.count('target="_blank"><img') == len(parsed.images)  # every thumbnail links its full image
    fingerprint = json.loads((local / "summary.json").read_text())["corpus_fingerprint"]
    assert len(fingerprint) == 16 and dom.count(fingerprint) == 2  # the subtitle and the settings table
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "audit-report.png"
    shot.unlink(missing_ok=True)
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1280,2400", page],
                   capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2400, 1280)
    # the photos and plots are drawn: far more colours than a page of text
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 2000


@pytest.mark.slow
def test_nightly_index_beside_the_audit_and_a_crossed_threshold_exits_4(audit, tmp_path, capsys):
    fs, bucket = audit["fs"], audit["bucket"]
    nightly = tmp_path / "nightly.yaml"
    nightly.write_text("thresholds: {dual.psnr: 1000.0}\nrun_index: true\n")
    capsys.readouterr()
    assert cli(["--json", "audit", "-c", str(nightly), *audit["args"][1:]]) == 4  # finished slices: skipped
    record = json.loads(capsys.readouterr().out)
    psnr = record["variants"]["dual"]["psnr"]
    assert record["exit_code"] == 4 and record["thresholds_crossed"] == [
        f"dual.psnr = {psnr:.4g} is below its threshold 1000"]
    fs.invalidate_cache()
    index = fs.cat_file(f"{bucket}/index.html").decode()  # in the audit folder's parent
    assert 'href="audit/index.html"' in index and "PSNR (dB) over runs (thresholds dual: 1000)" in index
    assert index.count("<svg") == 2  # PSNR and SSIM: the tests have no LPIPS or CLIP weights


# ---- statistics ------------------------------------------------------------------------------
def _direct_statistics(fs, corpus: str) -> dict:
    """The numbers computed straight from the corpus files with pyarrow and Python sets."""
    data, errors = _read(fs, f"{corpus}/data"), _read(fs, f"{corpus}/errors")
    meta = S.read_metadata(pq.read_schema(fs.open(f"{corpus}/data/00000.parquet", "rb")))
    heads = [r.split(":")[0] for r in errors[S.REASON].to_pylist()]
    by_reason: dict[str, int] = {}
    for stage, head in zip(errors[S.STAGE].to_pylist(), heads):
        by_reason[f"{stage}: {head}"] = by_reason.get(f"{stage}: {head}", 0) + 1
    out = {"rows": data.num_rows, "errors": errors.num_rows, "by_reason": by_reason,
           "caption_coverage": 1 - data[S.CAPTION].null_count / data.num_rows, "streams": {}}
    sequences = {}
    for name, column, vocab in (("guide", S.GUIDE_TOKENS, meta["guide_vocab"]),
                                ("semantic", S.SEMANTIC_TOKENS, meta["semantic_vocab"])):
        counts = pc.value_counts(pc.list_flatten(data[column])).to_pylist()
        total = sum(c["counts"] for c in counts)
        p = np.array([c["counts"] for c in counts]) / total
        sequences[name] = [tuple(s) for s in data[column].to_pylist()]
        out["streams"][name] = {"codes_used": len(counts), "dead_codes": vocab - len(counts),
                                "usage": len(counts) / vocab, "perplexity": math.exp(-(p * np.log(p)).sum()),
                                "tokens": total, "duplicate_rows": len(sequences[name]) - len(set(sequences[name]))}
    joint = list(zip(sequences["guide"], sequences["semantic"]))
    out["streams"]["guide+semantic"] = {"duplicate_rows": len(joint) - len(set(joint))}
    return out


def test_stats_only_equals_a_direct_pyarrow_computation(world, capsys):
    fs, root, bucket = world["fs"], world["root"], world["bucket"]
    assert cli(["audit", "--stats-only", f"corpus={root}/corpus", f"output={root}/stats-a"]) == 0
    capsys.readouterr()
    assert cli(["stats", f"corpus={root}/corpus", f"output={root}/stats-b", "top_duplicates=3", "--json"]) == 0
    printed = capsys.readouterr().out
    fs.invalidate_cache()
    stats = json.loads(fs.cat_file(f"{bucket}/stats-a/stats.json"))
    summary = json.loads(printed)  # --json: one JSON object and nothing else on stdout
    assert (summary["job"], summary["exit_code"], summary["report"]) == ("stats", 0, f"{root}/stats-b/stats.html")
    assert summary["statistics"] == json.loads(fs.cat_file(f"{bucket}/stats-b/stats.json"))
    direct = _direct_statistics(fs, f"{bucket}/corpus")
    assert stats["rows"] == direct["rows"] == 9 and stats["samples"] == 11
    assert stats["errors"] == direct["errors"] == 2 and stats["by_reason"] == direct["by_reason"]
    assert stats["caption_coverage"] == pytest.approx(direct["caption_coverage"])
    for name, expected in direct["streams"].items():
        got = stats["streams"][name]
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-12), (name, key)
    assert sum(stats["streams"]["guide"]["histogram"]) == direct["streams"]["guide"]["tokens"]
    assert fs.exists(f"{bucket}/stats-a/stats.html")
    other = json.loads(fs.cat_file(f"{bucket}/stats-b/stats.json"))
    assert {k: v for k, v in other.items() if k != "streams"} == {k: v for k, v in stats.items() if k != "streams"}


# ---- pieces, without Ray -----------------------------------------------------------------------
def test_sample_is_seeded_nested_and_independent_of_everything_else(world):
    from dualtok.pipelines.audit.sample import SampleSpec, committed_markers, select_rows

    corpus, options = f"{world['root']}/corpus", None
    markers = committed_markers(corpus, options)
    flat = lambda chosen: {(s, int(i)) for s, idx in chosen.items() for i in idx}
    five = flat(select_rows(corpus, markers, SampleSpec(size=5, seed=3), options))
    assert len(five) == 5 and five == flat(select_rows(corpus, markers, SampleSpec(size=5, seed=3), options))
    three = flat(select_rows(corpus, markers, SampleSpec(size=3, seed=3), options))
    assert three < five  # bottom-k: a smaller sample is part of a larger one with the same seed
    reversed_markers = dict(reversed(list(markers.items())))
    assert flat(select_rows(corpus, reversed_markers, SampleSpec(size=5, seed=3), options)) == five
    assert flat(select_rows(corpus, markers, SampleSpec(size=5, seed=4), options)) != five
    assert len(flat(select_rows(corpus, markers, SampleSpec(fraction=1.0), options))) == 9


def test_mean_interval_is_the_student_t_interval():
    from scipy import stats

    from dualtok.pipelines.audit.summary import mean_interval

    values = np.array([21.5, 23.0, 19.25, 25.0, 22.0, np.inf])
    got = mean_interval(values)
    finite = values[:-1]
    low, high = stats.t.interval(0.95, len(finite) - 1, loc=finite.mean(), scale=stats.sem(finite))
    assert (got["n"], got["n_infinite"]) == (5, 1)
    assert got["mean"] == pytest.approx(finite.mean()) and (got["ci_low"], got["ci_high"]) == pytest.approx((low, high))
    assert mean_interval(np.array([3.0]))["ci_low"] is None and mean_interval(np.zeros(0))["mean"] is None


def test_audit_config_rejects_what_it_cannot_do():
    from dualtok.pipelines.audit.config import AuditConfig
    from dualtok.pipelines.config import ConfigError, load_config

    base = ["corpus=s3://b/c", "output=s3://b/a"]
    config = load_config(AuditConfig, None, [*base, "reconstruct.batch_size=8", "variants=[dual]", "sample_fraction=0.1"])
    assert config.reconstruct.batch_size == 8 and config.variants == ["dual"] and config.sample_fraction == 0.1
    with pytest.raises(ConfigError, match="sample_size or sample_fraction, not both"):
        load_config(AuditConfig, None, [*base, "sample_size=4", "sample_fraction=0.5"])
    with pytest.raises(ConfigError, match="variants must be"):
        load_config(AuditConfig, None, [*base, "variants=[dual, guide-16]"])
    with pytest.raises(ConfigError, match="lpips_linear"):
        load_config(AuditConfig, None, [*base, "metrics.lpips_alexnet=/x.pth"])


def test_fetch_originals_reports_missing_changed_and_absent_sources(tmp_path):
    from dualtok.pipelines.audit.stages import FAILED, OK, FetchOriginals
    from dualtok.pipelines.io.decode import DecodeConfig, decode_image

    images = [encode(im) for im in photo_images(2, seed=1)]
    shard = tmp_path / "a.tar"
    shard.write_bytes(tar_bytes(sample_members("k0", images[0], None) + sample_members("k1", images[1], None)))
    uris = [str(shard), str(shard), str(shard), str(tmp_path / "gone.tar")]
    payload = {S.KEY: np.array(["k0", "other", "k9", "k0"]), S.INDEX: np.array([0, 1, 7, 0]),
               S.SHARD_URI: np.array(uris), "status": np.zeros(4, np.int8),
               "stage": np.full(4, "", "<U32"), "reason": np.full(4, "", "<U1024")}
    out = FetchOriginals(size=32)._fetch("00000", payload)
    assert out["status"].tolist() == [OK, FAILED, FAILED, FAILED]
    assert "index 1 holds key 'k1', the corpus has 'other'" in out["reason"][1]
    assert out["reason"][2].endswith("has no sample at index 7")
    assert out["reason"][3].endswith("gone.tar does not exist")
    np.testing.assert_array_equal(out["original"][0], decode_image(images[0], DecodeConfig(size=32, min_side=1)).pixels)


def _perceptual_weights(folder: Path):
    """Random weights in the real formats: torchvision AlexNet, lpips v0.1 heads, a transformers CLIP folder."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from dualtok_core.diffusion import byte_level_clip_tokenizer
    from dualtok.pipelines.audit.perceptual import PerceptualWeights, _alexnet_features

    torch.manual_seed(0)
    torch.save({f"features.{k}": v for k, v in _alexnet_features().state_dict().items()}, folder / "alexnet.pth")
    torch.save({f"lin{k}.model.1.weight": torch.rand(1, w, 1, 1) for k, w in enumerate((64, 192, 384, 256, 256))},
               folder / "alex.pth")
    tok = byte_level_clip_tokenizer()
    text = {"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 77, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    vision = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
              "num_attention_heads": 4}
    clip = folder / "clip"
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(clip)
    tok.save_pretrained(clip)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip)
    return PerceptualWeights(clip=str(clip), lpips_alexnet=str(folder / "alexnet.pth"),
                             lpips_linear=str(folder / "alex.pth"))


def _reference_lpips(weights, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """LPIPS written out with functional ops from the two state dicts (the lpips package's formula)."""
    import torch
    import torch.nn.functional as F

    net = torch.load(weights.lpips_alexnet, weights_only=True)
    heads = torch.load(weights.lpips_linear, weights_only=True)
    shift, scale = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(x):
        x = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1 - shift) / scale
        out = []
        for conv, stride, pad, pool in ((0, 4, 2, False), (3, 1, 2, True), (6, 1, 1, True), (8, 1, 1, False), (10, 1, 1, False)):
            if pool:
                x = F.max_pool2d(x, 3, 2)
            x = F.relu(F.conv2d(x, net[f"features.{conv}.weight"], net[f"features.{conv}.bias"], stride, pad))
            out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    with torch.no_grad():
        return sum(F.conv2d((fa - fb) ** 2, heads[f"lin{k}.model.1.weight"]).mean(dim=(1, 2, 3))
                   for k, (fa, fb) in enumerate(zip(taps(a), taps(b)))).numpy()


def test_score_reconstruction_metrics_images_and_learned_metrics(tmp_path):
    from dualtok.pipelines.audit.scoring import ScoreReconstruction, ScoreSettings
    from dualtok.pipelines.audit.stages import FAILED, VariantSpec
    from dualtok_core.preprocess import Preprocess
    from dualtok.pipelines.actors import StageResources

    weights = _perceptual_weights(tmp_path)
    originals = np.stack([Preprocess(128).apply(Image.fromarray(im)) for im in photo_images(3, seed=2)])
    checker = np.where((np.indices((128, 128)).sum(0) % 2)[None, :, :, None] == 0, 24, -24)  # pure high frequency
    payload = {S.KEY: np.array(["a", "b", "c"]), S.SHARD: np.array(["s"] * 3), S.INDEX: np.arange(3),
               S.CAPTION: np.array(["a photo", "", "x"]), "has_caption": np.array([True, False, True]),
               "status": np.array([0, 0, FAILED], np.int8), "stage": np.array(["", "", "fetch"], "<U32"),
               "reason": np.array(["", "", "source gone"], "<U1024"), "original": originals,
               "recon.same": originals.copy(), "recon.checker": np.clip(originals + checker, 0, 255).astype(np.uint8),
               "seconds.same": np.full(3, 0.5), "seconds.checker": np.full(3, 0.5)}
    variants = tuple(VariantSpec(n, "semantic-only", None, 0, 0, 32) for n in ("same", "checker"))
    stage = ScoreReconstruction(ScoreSettings(str(tmp_path / "out"), variants, guide_size=16, weights=weights),
                                StageResources())
    rows, errors = stage.score_slice("00000", payload)
    assert errors == [{S.SLICE: "00000", S.KEY: "c", S.SHARD: "s", S.INDEX: 2, S.STAGE: "fetch", S.REASON: "source gone"}]
    by = {(r[S.KEY], r[S.VARIANT]): r for r in rows}
    assert len(rows) == 4 and math.isinf(by[("a", "same")][S.PSNR]) and by[("a", "same")][S.LPIPS] == 0.0
    checked = by[("a", "checker")]
    # the checkerboard is detail the guide size cannot hold: invisible at 16 px, costly at 128 px
    assert checked[S.PSNR_GUIDE] > checked[S.PSNR] + 15
    assert checked[S.LPIPS] == pytest.approx(float(_reference_lpips(weights, originals[:1], payload["recon.checker"][:1])[0]),
                                             rel=1e-4)
    assert by[("a", "same")][S.CLIP_SIMILARITY] == pytest.approx(1.0, abs=1e-5)
    assert 0.0 <= checked[S.CLIP_SCORE] <= 100.0 and by[("b", "checker")][S.CLIP_SCORE] is None
    saved = np.asarray(Image.open(tmp_path / "out" / checked[S.RECONSTRUCTION_PATH]))
    np.testing.assert_array_equal(saved, payload["recon.checker"][0])
    assert not (tmp_path / "out" / "images" / "s" / f"{2:09d}").exists()  # failed rows write nothing
