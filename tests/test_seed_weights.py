"""SEED's released tokenizers: a bundle assembled from them gives the reference implementation's ids.

The checkpoints are tiny, random and written in the released key layout and dtypes
(`tests/seed_reference.py`, which also holds SEED's forward pass written from their code).
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage import data
from transformers import Blip2ForConditionalGeneration

from dualtok_core.bundle import DualTokenizer
from dualtok_core.errors import BundleError
from dualtok_core.pretrained import assemble_bundle
from dualtok_core.semantic import SemanticTokenizer
from dualtok.jobs.cli import main as cli
from tests.released_formats import save_blip2
from tests.seed_reference import save_seed_checkpoint

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("one_thread")]

# What SEED's release lacks, so stays random: the Q-Former's text path, the contrastive heads and
# the paper's 77-token Reverse Q-Former (SEED decodes through unCLIP instead).
SEED_RANDOM = [
    "generation_proj", "generation_queries", "qformer.encoder.layer.0.intermediate", "qformer.encoder.layer.0.output",
    "qformer.encoder.layer.1.intermediate", "qformer.encoder.layer.1.output", "reverse_qformer", "temperature",
    "text_embeddings", "text_proj", "vision_proj",
]


@pytest.fixture(scope="module")
def releases(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("seed")
    return {head: (root / head / "seed_quantizer.pt", save_seed_checkpoint(root / head / "seed_quantizer.pt", head))
            for head in ("mlp", "qformer")}


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """Real photos as SEED's processor sees them: the whole image resized to 224 x 224, bicubic."""
    images = [data.astronaut(), data.coffee(), data.chelsea()]
    return np.stack([np.asarray(Image.fromarray(im).resize((224, 224), Image.BICUBIC)) for im in images])


@pytest.mark.parametrize("head", ["mlp", "qformer"])  # SEED-LLaMA's seed_quantizer.pt, SEED-1's
def test_seed_release_gives_the_reference_ids_decoded_embeddings_and_unclip_embeddings(releases, photos, head):
    path, reference = releases[head]
    model, report = SemanticTokenizer.from_seed(path.parent)
    model.eval()
    images = torch.from_numpy(photos).permute(0, 3, 1, 2).float() / 255  # (3, 3, 224, 224)

    ref_ids, ref_causal = reference.get_codebook_indices(images)
    with torch.no_grad():
        causal = model.causal_embeddings(images)
        ids = model.encode(images)
        decoded = model.decode_embeddings(ids)
        unclip = model.image_embeddings(ids)
    assert len(set(ref_ids.flatten().tolist())) >= 3 and not torch.equal(ref_ids[0], ref_ids[1])  # not degenerate
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(causal, ref_causal, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(decoded, reference.reconstruct(ref_ids), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(unclip, reference.get_codebook_entry(ref_ids), atol=1e-4, rtol=1e-4)
    assert unclip.shape == (3, 24) and model.config.image_head == head

    assert report.random_modules == SEED_RANDOM
    assert report.unused == sorted(k for k in reference.state_dict() if k.endswith("position_ids"))
    assert "SEED" in report.summary()


def test_bundle_from_seed_tokenizes_photos_like_the_reference_and_keeps_its_ids_after_save(
    releases, photos, tmp_path, capsys
):
    path, reference = releases["mlp"]
    tokenizer, reports = assemble_bundle("tiny", blip2=None, movq=None, stable_diffusion=None, seed_tokenizer=path)
    assert "every tensor that makes its semantic ids came from the checkpoint" in reports["semantic"].summary()
    assert tokenizer.info.sources["semantic"].endswith(f"from SEED {path}")
    images = torch.from_numpy(photos).permute(0, 3, 1, 2).float() / 255
    expected, _ = reference.get_codebook_indices(images)
    np.testing.assert_array_equal(tokenizer.encode_semantic(photos), expected.numpy())

    # The same release converted to safetensors (what a model store that refuses pickles holds).
    state = torch.load(path, weights_only=True)
    (tmp_path / "converted").mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "converted" / "seed_quantizer.safetensors")
    converted, _ = SemanticTokenizer.from_seed(tmp_path / "converted")
    np.testing.assert_array_equal(converted.eval().encode(images).numpy(), expected.numpy())

    tokenizer.save_pretrained(tmp_path / "bundle")
    again = DualTokenizer.from_pretrained(str(tmp_path / "bundle"))
    np.testing.assert_array_equal(again.encode_semantic(photos), expected.numpy())
    semantic = again.part("semantic")
    assert semantic.config.vision_post_norm_eps == 1e-5 and semantic.vision_model.post_layernorm.eps == 1e-5

    assert cli(["bundle", "--preset", "tiny", "--seed-tokenizer", str(path), "--output", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "SEED" in out and "every tensor that makes its semantic ids came from the checkpoint" in out
    np.testing.assert_array_equal(
        DualTokenizer.from_pretrained(str(tmp_path / "cli")).encode_semantic(photos), expected.numpy()
    )


def _truncated(state, path):
    torch.save(state, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _pickled_object(state, path):
    torch.save({**state, "args": argparse.Namespace(lr=1e-4)}, path)


def _missing(state, path):
    torch.save({k: v for k, v in state.items() if k != "visual_encoder.cls_token"}, path)


def _shape(state, path):
    state = dict(state)
    state["encode_task_layer.2.weight"] = torch.zeros(9, state["encode_task_layer.2.weight"].shape[1])
    torch.save(state, path)


def _layer_scale(state, path):
    torch.save({**state, "visual_encoder.blocks.0.gamma_1": torch.ones(176)}, path)


def _not_a_state_dict(state, path):
    torch.save([1, 2, 3], path)


@pytest.mark.parametrize("damage, message", [
    (_truncated, r"not a readable SEED checkpoint .*weights_only"),
    (_pickled_object, r"not a readable SEED checkpoint .*convert such a file"),
    (_missing, r"no visual_encoder\.cls_token"),
    (_shape, r"quantizer\.project_in\.2\.weight is \(9, 48\) in the checkpoint, \(8, 48\)"),
    (_layer_scale, r"visual_encoder\.blocks\.0\.gamma_1: a tensor .* cannot map"),
    (_not_a_state_dict, r"holds a list, not a state dict"),
])
def test_a_damaged_seed_checkpoint_fails_naming_the_problem_and_writes_no_bundle(
    releases, tmp_path, capsys, damage, message
):
    state = torch.load(releases["mlp"][0], weights_only=True)
    bad = tmp_path / "seed_quantizer.pt"
    damage(state, bad)
    with pytest.raises(BundleError, match=message):
        SemanticTokenizer.from_seed(bad)
    assert cli(["bundle", "--preset", "tiny", "--seed-tokenizer", str(bad), "--output", str(tmp_path / "b")]) == 2
    assert f"SEED tokenizer checkpoint {bad}: " in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_a_stage2_blip2_warns_that_the_contrastive_heads_stay_random(tmp_path, capsys):
    save_blip2(Blip2ForConditionalGeneration, tmp_path / "opt", text_input=False)
    assert cli(["bundle", "--preset", "tiny", "--blip2", str(tmp_path / "opt"), "--output", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "WARNING: the contrastive projections (vision_proj, text_proj) stay random" in out
    assert "blip2-itm-vit-g" in out and "its semantic ids mean nothing until trained: random quantizer" in out


def test_the_decode_and_encode_stages_cut_each_branch_as_its_bundle_says(releases, tmp_path):
    """A SEED bundle's semantic branch sees the whole image resized to 224 (SEED's processor), its
    guide branch the centre square at 256; a bundle with default preprocessing decodes as before."""
    from dualtok.pipelines.actors import BundleSource, StageResources
    from dualtok.pipelines.io import schemas as S
    from dualtok.pipelines.io.read import DecodeImages
    from dualtok.pipelines.tokenize.config import ImageConfig, decode_inputs
    from dualtok.pipelines.tokenize.encode import EncodeTokens
    from dualtok_core.preprocess import Preprocess
    from tests.shard_factory import encode

    path, reference = releases["mlp"]
    bundle, _ = assemble_bundle("tiny", blip2=None, movq=None, stable_diffusion=None, seed_tokenizer=path)
    bundle.save_pretrained(tmp_path / "bundle")
    source = BundleSource(str(tmp_path / "bundle"))
    image, semantic = decode_inputs(source, "both")
    assert (image, semantic) == (Preprocess(256), Preprocess(224, "resize"))
    assert decode_inputs(source, "semantic") == (Preprocess(224, "resize"), None)
    assert decode_inputs(BundleSource("tiny"), "both") == (Preprocess(256), None)  # default bundles: unchanged

    wide = [data.astronaut()[:, :400], data.coffee(), data.chelsea()]  # not square: crop and resize differ
    n = len(wide)
    batch = {S.ROW_KIND: np.array([S.SAMPLE] * n), S.INDEX: np.arange(n), S.STAGE: np.array([""] * n, dtype=object),
             S.REASON: np.array([""] * n, dtype=object),
             S.IMAGE_BYTES: np.array([encode(im, "PNG") for im in wide], dtype=object)}
    decoded = DecodeImages(ImageConfig().decode(image, semantic)).columns(batch)
    assert decoded[S.IMAGE].shape == (n, 256, 256, 3) and decoded[S.SEMANTIC_IMAGE].shape == (n, 224, 224, 3)
    out = EncodeTokens(source, StageResources(), streams=("guide", "semantic"))(decoded)
    assert S.SEMANTIC_IMAGE not in out.column_names and S.IMAGE not in out.column_names

    squashed = np.stack([np.asarray(Image.fromarray(im).resize((224, 224), Image.BICUBIC)) for im in wide])
    expected, _ = reference.get_codebook_indices(torch.from_numpy(squashed).permute(0, 3, 1, 2).float() / 255)
    columns = S.inflight_columns(out)
    np.testing.assert_array_equal(columns[S.SEMANTIC_TOKENS], expected.numpy())
    crops = np.stack([Preprocess(256).apply(Image.fromarray(im)) for im in wide])
    np.testing.assert_array_equal(columns[S.GUIDE_TOKENS], bundle.encode_guide(crops))
    # PIL input through the Python API: each branch cut its own way, the same ids
    tokens = bundle.tokenize([Image.fromarray(im) for im in wide])
    np.testing.assert_array_equal(tokens.semantic, expected.numpy())
    np.testing.assert_array_equal(tokens.guide, columns[S.GUIDE_TOKENS])


@pytest.fixture(scope="module")
def unclip_folder(tmp_path_factory):
    from tests.released_formats import save_stable_unclip

    path = tmp_path_factory.mktemp("unclip") / "stable-diffusion-2-1-unclip"
    return path, save_stable_unclip(path, embed_dim=24)  # the SEED checkpoints' image embeddings are 24-d


def test_unclip_generation_equals_diffusers_stable_unclip_pipeline(unclip_folder):
    from dualtok_core.unclip import UnCLIPReconstructor, load_reconstructor

    path, pipe = unclip_folder
    model = load_reconstructor(path)
    assert isinstance(model, UnCLIPReconstructor) and model.embed_dim == 24
    embeds = torch.randn(2, 24, generator=torch.Generator().manual_seed(1))
    seed, steps, size, guidance = 3, 4, 64, 3.0
    ours = model.generate(embeds, size=size, steps=steps, guidance=guidance, seed=seed)
    # the same draws: the embedding noise first, then the starting latents, from one seeded generator
    generator = torch.Generator().manual_seed(seed)
    torch.randn(embeds.shape, generator=generator)
    side = size // model.vae_scale_factor
    latents = torch.randn((2, 4, side, side), generator=generator) * model.scheduler.init_noise_sigma
    pipe.scheduler = model.scheduler  # DDIM, as the released folder configures it
    reference = pipe(prompt=[""] * 2, image_embeds=embeds, latents=latents, noise_level=0,
                     generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                     guidance_scale=guidance, output_type="pt",
                     height=size, width=size).images
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)
    with pytest.raises(Exception, match=r"image embeddings \(B, 24\)"):
        model.generate(torch.zeros(2, 77, 32), size=size, steps=steps, guidance=guidance, seed=seed)


def test_a_seed_and_unclip_bundle_decodes_through_the_unclip_branch(releases, unclip_folder, photos, tmp_path, capsys):
    seed_path, reference = releases["mlp"]
    unclip_path, _ = unclip_folder
    out = tmp_path / "bundle"
    assert cli(["bundle", "--preset", "tiny", "--seed-tokenizer", str(seed_path), "--unclip", str(unclip_path),
                "--output", str(out)]) == 0
    assert "Stable unCLIP" in capsys.readouterr().out
    bundle = DualTokenizer.from_pretrained(str(out))
    assert bundle.diffusion_kind == "unclip"
    tokens = bundle.tokenize(photos[:2])
    expected = reference.get_codebook_entry(torch.from_numpy(tokens.semantic.astype(np.int64)))
    torch.testing.assert_close(bundle.condition(tokens.semantic), expected, atol=1e-4, rtol=1e-4)
    images = bundle.detokenize(tokens.guide, tokens.semantic, size=64, steps=4, strength=0.5, seed=0)
    again = bundle.detokenize(tokens.guide, tokens.semantic, size=64, steps=4, strength=0.5, seed=0)
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8 and np.array_equal(images, again)
    assert bundle.generate_from_semantic(tokens.semantic, size=64, steps=4).shape == (2, 64, 64, 3)
    # an unCLIP UNet cannot take a semantic branch without SEED's image head
    assert cli(["bundle", "--preset", "tiny", "--unclip", str(unclip_path), "--output", str(tmp_path / "x")]) == 2
    assert "no image-embedding head" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_the_audit_renders_the_same_tokens_through_both_diffusion_kinds(releases, unclip_folder, photos, tmp_path):
    """audit diffusion_bundles: a SEED bundle with SD's text-conditioned UNet, and the same SEED tokens
    through the unCLIP UNet, side by side (the audit's Reconstruct stage, as an actor runs it)."""
    from dualtok.pipelines.actors import BundleSource, StageResources
    from dualtok.pipelines.audit.pipeline import build_variants, setup_diffusions
    from dualtok.pipelines.audit.stages import OK, Reconstruct, RenderSettings
    from dualtok.pipelines.io import schemas as S
    from tests.released_formats import tiny_stable_diffusion

    seed_path, _ = releases["mlp"]
    text, extra = tmp_path / "text", tmp_path / "unclip"
    tiny_stable_diffusion(tmp_path / "sd")
    for out, flag, folder in ((text, "--stable-diffusion", tmp_path / "sd"), (extra, "--unclip", unclip_folder[0])):
        assert cli(["bundle", "--preset", "tiny", "--seed-tokenizer", str(seed_path), flag, str(folder),
                    "--output", str(out)]) == 0
    main = DualTokenizer.from_pretrained(str(text))
    diffusions = setup_diffusions(main, {"unclip": BundleSource(str(extra))})
    variants = build_variants(("dual", "semantic-only"), main, {}, tuple(diffusions))
    assert [v.name for v in variants] == ["dual", "semantic-only", "dual-unclip", "semantic-only-unclip"]

    render = RenderSettings(size=64, steps=4, strength=0.5, guidance=2.0, seed=0, chunk=2)
    stage = Reconstruct(BundleSource(str(text)), {}, variants, render, StageResources(),
                        diffusions={"unclip": BundleSource(str(extra))})
    tokens = main.tokenize(photos[:2])
    payload = {S.KEY: np.array(["a", "b"]), "status": np.array([OK, OK]), S.GUIDE_TOKENS: tokens.guide,
               S.SEMANTIC_TOKENS: tokens.semantic}
    out = stage._reconstruct("slice-0", payload)
    unclip = DualTokenizer.from_pretrained(str(extra))
    np.testing.assert_array_equal(out["recon.dual-unclip"], unclip.detokenize(
        tokens.guide, tokens.semantic, size=64, steps=4, strength=0.5, guidance=2.0, seed=out_seed(stage)))
    assert not np.array_equal(out["recon.dual"], out["recon.dual-unclip"])
    assert out["recon.semantic-only-unclip"].shape == (2, 64, 64, 3)

    other = tmp_path / "other"  # a semantic branch with other weights: its condition is not these tokens'
    assert cli(["bundle", "--preset", "tiny", "--seed", "1", "--unclip", str(unclip_folder[0]),
                "--seed-tokenizer", str(releases["qformer"][0]), "--output", str(other)]) == 0
    with pytest.raises(Exception, match="its semantic branch is not the corpus bundle's"):
        setup_diffusions(main, {"unclip": BundleSource(str(other))})


def out_seed(stage) -> int:
    from dualtok.pipelines.audit.stages import chunk_seed

    return chunk_seed(stage.render.seed, "slice-0", 0)
