"""The facade, presets, bundles, metrics and the package's import hygiene."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from dualtok_core.bundle import DualTokenizer
from dualtok_core.errors import BundleError, ImageInputError, TokenInputError
from dualtok_core.metrics import psnr, ssim
from dualtok_core.presets import parameter_counts, preset_names

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    images = [skdata.astronaut(), skdata.chelsea(), skdata.coffee()]
    return np.stack([np.ascontiguousarray(im[:300, :300]) for im in images])  # (3, 300, 300, 3)


def test_dualtok_core_does_not_import_ray():
    code = "import sys, dualtok_core.bundle, dualtok_core.metrics; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tokenize_shapes_dtypes_and_ranges(tiny, photos):
    tokens = tiny.tokenize(photos)
    assert tokens.guide.shape == (3, tiny.guide_grid**2) and tokens.guide.dtype == np.uint16
    assert tokens.semantic.shape == (3, 32) and tokens.semantic.dtype == np.uint16
    assert tokens.guide.max() < tiny.guide_vocab and tokens.semantic.max() < tiny.semantic_vocab
    # a batch tokenizes the same as its images one by one (a pipeline batches rows arbitrarily)
    single = [tiny.tokenize(photos[i : i + 1]) for i in range(3)]
    np.testing.assert_array_equal(np.concatenate([t.guide for t in single]), tokens.guide)
    np.testing.assert_array_equal(np.concatenate([t.semantic for t in single]), tokens.semantic)


def test_cpu_encoders_go_image_by_image_and_compute_what_the_whole_batch_does(tiny, photos):
    """`per_image_on_cpu`: without autograd on a CPU the guide encoder and the VAE run one image at a
    time (faster: the activations fit in the caches); with autograd they get the whole batch. Both
    give the same latents, so the same ids."""
    from dualtok_core import imaging

    guide, vae = tiny.part("guide"), tiny.part("diffusion")
    x = tiny._model_input(photos, "guide")
    calls: list[int] = []
    with torch.no_grad():
        alone = imaging.per_image_on_cpu(lambda chunk: calls.append(len(chunk)) or guide.encode_latents(chunk), x)
        image_by_image = guide.encode_latents(x)
        latents = vae.encode(x)
    assert calls == [1, 1, 1]
    with torch.enable_grad():  # the whole batch at once, as in training
        whole = guide.encode_latents(x).detach()
        whole_vae = vae.encode.__wrapped__(vae, x)  # encode is no_grad-decorated: its undecorated body
    torch.testing.assert_close(image_by_image, whole, rtol=1e-3, atol=1e-4)  # float32 sums in another order
    torch.testing.assert_close(alone, whole, rtol=1e-3, atol=1e-4)  # float32 sums in another order
    torch.testing.assert_close(latents, whole_vae.detach(), rtol=1e-3, atol=1e-4)  # float32 sums in another order
    assert torch.equal(guide.nearest_codes(image_by_image), guide.nearest_codes(whole))


def test_guide_images_and_detokenize(tiny, photos):
    tokens = tiny.tokenize(photos[:2])
    guides = tiny.guide_images(tokens.guide)
    assert guides.shape == (2, tiny.guide_size, tiny.guide_size, 3) and guides.dtype == np.uint8
    out = tiny.detokenize(tokens.guide, tokens.semantic, size=64, steps=3, seed=5)
    assert out.shape == (2, 64, 64, 3) and out.dtype == np.uint8
    again = tiny.detokenize(tokens.guide, tokens.semantic, size=64, steps=3, seed=5)
    np.testing.assert_array_equal(out, again)  # same seed, same image
    bigger = tiny.detokenize(tokens.guide, tokens.semantic, size=128, steps=3, seed=5)
    assert bigger.shape == (2, 128, 128, 3)  # output size is independent of the token count


def test_save_load_round_trip_keeps_ids_and_fingerprint(tiny, photos, tmp_path):
    tiny.save_pretrained(tmp_path / "bundle")
    info = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert set(info["part_hashes"]) == {"guide", "semantic", "diffusion"}
    assert all(src.startswith("random-init") for src in info["sources"].values())
    loaded = DualTokenizer.from_pretrained(tmp_path / "bundle")
    assert loaded.fingerprint == tiny.fingerprint
    a, b = tiny.tokenize(photos), loaded.tokenize(photos)
    np.testing.assert_array_equal(a.guide, b.guide)
    np.testing.assert_array_equal(a.semantic, b.semantic)
    guide_only = DualTokenizer.from_pretrained(tmp_path / "bundle", parts=("guide",))
    assert set(guide_only.parts) == {"guide"}
    with pytest.raises(BundleError, match="without its 'semantic' part"):
        guide_only.encode_semantic(photos)


def test_bundle_on_s3_is_cached_once_and_a_rewritten_bundle_gets_a_fresh_entry(s3, tiny, photos, tmp_path,
                                                                                monkeypatch):
    import tempfile

    bucket = s3.new_bucket()
    fs = s3.filesystem()
    uri = f"s3://{bucket}/bundles/tiny"
    tiny.save_pretrained(uri)
    cache, scratch = tmp_path / "cache", tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where this process's temporary folders go
    loaded = DualTokenizer.from_pretrained(uri, parts=("guide", "semantic"), cache_dir=cache)
    np.testing.assert_array_equal(loaded.tokenize(photos).semantic, tiny.tokenize(photos).semantic)
    (entry,) = cache.iterdir()
    assert sorted(p.name for p in entry.iterdir()) == ["bundle.json", "guide", "semantic"]  # no half-copied part
    assert list(scratch.iterdir()) == []  # nothing left in the temporary folder either

    fs.rm(f"{bucket}/bundles/tiny/guide", recursive=True)  # a second load reads the cache, not the store
    again = DualTokenizer.from_pretrained(uri, parts=("guide",), cache_dir=cache)
    assert again.info.part_hashes["guide"] == tiny.info.part_hashes["guide"]

    other = DualTokenizer.from_preset("tiny", seed=1, parts=("guide",))
    other.save_pretrained(uri)  # the same URI, other weights: bundle.json changes, so does the entry
    fs.invalidate_cache()
    fresh = DualTokenizer.from_pretrained(uri, parts=("guide",), cache_dir=cache)
    assert fresh.info.part_hashes["guide"] == other.info.part_hashes["guide"] and len(list(cache.iterdir())) == 2
    with pytest.raises(BundleError, match="bundle.json is missing"):
        DualTokenizer.from_pretrained(f"s3://{bucket}/nothing", cache_dir=cache)


def test_from_pretrained_reads_a_bundle_from_the_local_hugging_face_cache(tiny, tmp_path, monkeypatch):
    """`org/name` resolves to its snapshot in the Hub cache, offline; a revision picks another."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / "models--dualtok--tiny"
    main, other = "a" * 40, "b" * 40
    tiny.save_pretrained(repo / "snapshots" / main)
    DualTokenizer.from_preset("tiny", seed=1).save_pretrained(repo / "snapshots" / other)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(main)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # as HF_HUB_CACHE=... would
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 would
    monkeypatch.chdir(tmp_path)  # no folder named dualtok/tiny here
    assert DualTokenizer.from_pretrained("dualtok/tiny", parts=("guide",)).fingerprint == \
        DualTokenizer.from_pretrained(repo / "snapshots" / main, parts=("guide",)).fingerprint
    seed1 = DualTokenizer.from_pretrained("dualtok/tiny", parts=("guide",), revision=other)
    assert seed1.info.part_hashes["guide"] != tiny.info.part_hashes["guide"]
    with pytest.raises(BundleError, match=r"holds no snapshot of it; dualtok downloads nothing.*hf download dualtok/other"):
        DualTokenizer.from_pretrained("dualtok/other")


def test_to_and_torch_dtype_behave_like_nn_module(tiny, tmp_path, photos, capfd):
    tiny.save_pretrained(tmp_path / "b")
    half = DualTokenizer.from_pretrained(tmp_path / "b", parts=("guide",), torch_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and next(half.part("guide").parameters()).dtype == torch.bfloat16
    half.to("cpu")  # a device alone keeps the dtype
    assert half.dtype == torch.bfloat16 and next(half.part("guide").parameters()).dtype == torch.bfloat16
    capfd.readouterr()
    half.to(torch.float32)  # a dtype alone keeps the device
    assert next(half.part("guide").parameters()).dtype == torch.float32 and half.device == torch.device("cpu")
    # every CPU actor casts: without diffusers' "modules that should be kept in float32: []" each time
    assert "kept in float32" not in capfd.readouterr().err
    assert half.encode_guide(photos).shape == (3, 64)  # bf16-rounded weights: other ids, same contract
    full = DualTokenizer.from_pretrained(tmp_path / "b", parts=("guide",), torch_dtype=torch.float32, device="cpu")
    np.testing.assert_array_equal(full.encode_guide(photos), tiny.encode_guide(photos))


def test_pil_images_of_any_size_and_mode_tokenize(tiny, photos):
    from PIL import Image

    square = Image.fromarray(np.ascontiguousarray(photos[0, :256, :256]))
    tokens = tiny.tokenize(square)  # one image, no batch axis needed
    expected = tiny.tokenize(photos[:1, :256, :256])
    np.testing.assert_array_equal(tokens.guide, expected.guide)
    np.testing.assert_array_equal(tokens.semantic, expected.semantic)
    wide = Image.fromarray(np.ascontiguousarray(photos[1, :200, :300]))
    rgba = square.convert("RGBA")
    gray = square.convert("L")
    mixed = tiny.tokenize([wide, rgba, gray])
    assert mixed.guide.shape == (3, 64) and mixed.semantic.shape == (3, 32)
    np.testing.assert_array_equal(mixed.guide[1], expected.guide[0])  # opaque alpha changes nothing
    with pytest.raises(ImageInputError, match=r"images\[1\] is a ndarray"):
        tiny.tokenize([square, photos[0]])


def test_bundle_errors_name_what_is_wrong(tiny, tmp_path):
    with pytest.raises(BundleError, match="bundle.json is missing"):
        DualTokenizer.from_pretrained(tmp_path)
    tiny.save_pretrained(tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "semantic")
    with pytest.raises(BundleError, match="no 'semantic' part"):
        DualTokenizer.from_pretrained(tmp_path / "b")
    # weights that do not match bundle.json's hash are refused
    info = json.loads((tmp_path / "b" / "bundle.json").read_text())
    info["part_hashes"]["guide"] = "0" * 64
    (tmp_path / "b" / "bundle.json").write_text(json.dumps(info))
    with pytest.raises(BundleError, match="guide weights do not match"):
        DualTokenizer.from_pretrained(tmp_path / "b", parts=("guide",))
    with pytest.raises(BundleError, match="unknown preset 'huge'"):
        DualTokenizer.from_preset("huge")


def test_bad_images_and_ids_get_clear_errors(tiny, photos):
    with pytest.raises(ImageInputError, match="uint8"):
        tiny.tokenize(photos.astype(np.float32))
    with pytest.raises(ImageInputError, match="3 channels"):
        tiny.tokenize(photos[..., :1])
    with pytest.raises(ImageInputError, match="add a batch axis"):
        tiny.tokenize(photos[0])
    with pytest.raises(TokenInputError, match=r"must lie in \[0, "):
        tiny.guide_images(np.full((1, tiny.guide_grid**2), tiny.guide_vocab, dtype=np.int64))
    with pytest.raises(TokenInputError, match="shape"):
        tiny.guide_images(np.zeros((1, 3), dtype=np.int64))
    with pytest.raises(TokenInputError, match="integers"):
        tiny.detokenize(np.zeros((1, tiny.guide_grid**2), np.float32), np.zeros((1, 32), np.int64))


def test_presets_build_on_meta_with_the_paper_shapes():
    assert preset_names() == ("tiny", "small", "paper")
    counts = parameter_counts("paper")
    # EVA ViT-g (~986M) + BERT-base Q-Former etc.; SD 1.x UNet+VAE+CLIP-L text (~1.07B); MoVQ-width guide
    assert 1.2e9 < counts["semantic"] < 1.3e9
    assert counts["diffusion"] == 1_066_235_307
    assert 5e7 < counts["guide"] < 2e8
    with torch.device("meta"):
        from dualtok_core.presets import build_parts, get_preset

        parts = build_parts(get_preset("paper"))
    semantic = parts["semantic"]
    assert semantic.vision_model.config.hidden_size == 1408 and semantic.vision_model.config.num_hidden_layers == 39
    assert semantic.config.codebook_size == 8192 and semantic.config.gen_dim == 768
    assert parts["diffusion"].cross_attention_dim == 768


def test_psnr_and_ssim_match_scikit_image_on_real_photos():
    rng = np.random.default_rng(0)
    for image in (skdata.astronaut(), skdata.coffee()):
        noisy = np.clip(image.astype(int) + rng.integers(-25, 26, image.shape), 0, 255).astype(np.uint8)
        assert psnr(image, noisy)[0] == pytest.approx(peak_signal_noise_ratio(image, noisy, data_range=255), abs=1e-9)
        expected = structural_similarity(image, noisy, channel_axis=-1, data_range=255)
        assert ssim(image, noisy)[0] == pytest.approx(expected, abs=1e-9)
    assert np.isinf(psnr(skdata.astronaut(), skdata.astronaut())[0])
    with pytest.raises(ImageInputError, match="differ in shape"):
        psnr(skdata.astronaut(), skdata.coffee())


def test_the_packaged_demo_bundle_loads_with_its_recorded_hashes_and_new_settings_change_them(tmp_path):
    """A bundle saved by an earlier version (jobs/demo_bundle) keeps its fingerprint: settings added
    since (per-branch preprocessing, SEED's heads) hash as absent at their defaults, and change the
    hash when set."""
    from dualtok.jobs.demo import DEMO_BUNDLE
    from dualtok_core.bundle import DualTokenizer, module_hash, read_bundle_info
    from dualtok_core.preprocess import Preprocess
    from dualtok_core.semantic import PRESETS, SemanticTokenizer

    tokenizer = DualTokenizer.from_pretrained(str(DEMO_BUNDLE))  # checks every part's hash against bundle.json
    assert tokenizer.fingerprint == read_bundle_info(DEMO_BUNDLE).fingerprint
    assert tokenizer.preprocess("semantic") == Preprocess(224) and tokenizer.preprocess("guide").fit == "center_crop"
    torch.manual_seed(0)
    default = module_hash(SemanticTokenizer(**PRESETS["tiny"]))
    torch.manual_seed(0)
    assert module_hash(SemanticTokenizer(**PRESETS["tiny"])) == default
    torch.manual_seed(0)
    assert module_hash(SemanticTokenizer(**PRESETS["tiny"], input_fit="resize")) != default
