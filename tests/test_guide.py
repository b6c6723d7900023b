"""Branch I: the guide VQ-VAE (shapes, round trips, losses, MoVQ init, codebook health)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import VQModel
from skimage import data

from dualtok_core.errors import BundleError, DualtokError, ImageInputError, TokenInputError
from dualtok_core.guide import PRESETS, GuideConfigError, GuideVQModel, codebook_usage
from dualtok_core.imaging import check_uint8_images, to_model_input
from tests.released_formats import TINY_MOVQ, save_movq

pytestmark = pytest.mark.timeout(120)

TINY = PRESETS["tiny"]
def build(seed: int = 0, **overrides) -> GuideVQModel:
    torch.manual_seed(seed)
    return GuideVQModel(**{**TINY, **overrides})


def build_fast(seed: int = 0, **overrides) -> GuideVQModel:
    """Training-path tests: 128 px in, 32 px guide, 4x4 grid; a quarter of the 256 px cost."""
    return build(seed, image_size=128, guide_size=32, **overrides)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Three real photos as the guide takes them: (3, 3, 256, 256) float in [0, 1]."""
    photos = [data.astronaut(), data.chelsea()[:, :300], data.coffee()[:, :400]]
    batch = np.stack([np.asarray(p)[:300, :300] for p in photos])  # (3, 300, 300, 3) uint8
    return to_model_input(check_uint8_images(batch), 256, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def small_images(images) -> torch.Tensor:
    """Two of the photos at 128 px: (2, 3, 128, 128)."""
    return F.interpolate(images[:2], size=(128, 128), mode="area")


@pytest.mark.parametrize("guide_size, tokens", [(128, 256), (64, 64), (32, 16), (16, 4)])
def test_guide_size_sets_token_count_and_guide_shape(images, guide_size, tokens):
    model = build(guide_size=guide_size).eval()
    grid = guide_size // 8
    assert model.config.grid_size == grid
    assert len(model.encoder.down_blocks) == int(math.log2(256 // grid)) + 1
    with torch.inference_mode():
        ids = model.encode(images[:2])
        guide = model.decode(ids)
    assert ids.shape == (2, tokens) and ids.dtype == torch.int64
    assert int(ids.min()) >= 0 and int(ids.max()) < TINY["num_vq_embeddings"]
    assert guide.shape == (2, 3, guide_size, guide_size) and guide.dtype == torch.float32
    assert float(guide.min()) >= 0.0 and float(guide.max()) <= 1.0


def test_save_load_round_trip_keeps_ids_and_config(images, tmp_path):
    model = build(guide_size=32, legacy=True).eval()
    images = images[:2]
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = GuideVQModel.from_pretrained(tmp_path).eval()
    assert loaded.config.grid_size == 4 and loaded.config.legacy is True
    assert loaded.encoder_widths == model.encoder_widths == (32, 64, 64, 64, 64, 64, 64)
    with torch.inference_mode():
        assert torch.equal(loaded.encode(images), model.encode(images))
        ids = model.encode(images)
        assert torch.equal(loaded.decode(ids), model.decode(ids))


def test_ids_are_deterministic_and_independent_of_batch(images):
    model = build().eval()
    with torch.inference_mode():
        first, second = model.encode(images), model.encode(images)
        one_by_one = torch.cat([model.encode(images[i : i + 1]) for i in range(len(images))])
    assert torch.equal(first, second)
    # A rerun that batches rows differently must write the same tokens.
    assert torch.equal(first, one_by_one)
    assert len(first.unique()) > 1


def test_same_seed_builds_same_weights():
    a, b, c = build(seed=3).state_dict(), build(seed=3).state_dict(), build(seed=4).state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not torch.equal(a["encoder.conv_in.weight"], c["encoder.conv_in.weight"])


def test_training_forward_losses_match_independent_computation(small_images):
    model = build_fast()
    out = model(small_images)
    for name in ("loss", "recon_loss", "codebook_loss", "commitment_loss"):
        assert torch.isfinite(out[name]) and out[name].ndim == 0
    # eq. 4-5: MSE against the input shrunk to the 32 px guide (antialiased bicubic), in [-1, 1].
    target = F.interpolate(small_images, size=(32, 32), mode="bicubic", antialias=True).clamp(0, 1)
    assert out.guide.shape == (2, 3, 32, 32) and out.ids.shape == (2, 16)
    torch.testing.assert_close(out.recon_loss, ((2 * out.guide - 1) - (2 * target - 1)).pow(2).mean())
    with torch.no_grad():
        z = model.encode_latents(small_images).permute(0, 2, 3, 1).reshape(-1, 4)  # (32, 4)
        z_q = model.codebook[out.ids.reshape(-1)]  # (32, 4)
        # The chosen codes really are the nearest ones.
        assert torch.equal(torch.cdist(z, model.codebook).argmin(1), out.ids.reshape(-1))
    torch.testing.assert_close(out.codebook_loss, (z - z_q).pow(2).mean())
    torch.testing.assert_close(out.commitment_loss, (z - z_q).pow(2).mean())
    torch.testing.assert_close(out.loss, out.recon_loss + out.codebook_loss + 0.25 * out.commitment_loss)


def test_gradients_reach_encoder_decoder_and_only_used_codes(small_images):
    model = build_fast()
    out = model(small_images)
    out.loss.backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.decoder.conv_out.weight.grad.abs().sum() > 0
    code_grad = model.codebook.grad.abs().sum(1)  # (K,)
    used = torch.zeros(TINY["num_vq_embeddings"], dtype=torch.bool)
    used[out.ids.reshape(-1)] = True
    assert bool((code_grad[used] > 0).all()) and bool((code_grad[~used] == 0).all())


@pytest.mark.parametrize("legacy, codebook_weight, commitment_weight", [(False, 1.0, 0.25), (True, 0.25, 1.0)])
def test_beta_weights_the_commitment_term_unless_legacy(small_images, legacy, codebook_weight, commitment_weight):
    model = build_fast(legacy=legacy)
    out = model(small_images[:1])
    params = [model.codebook, model.quant_conv.bias]
    # The reconstruction cannot reach the codebook (straight-through), so its gradient is the
    # codebook term's alone; quant_conv also gets recon gradients, so take the VQ part only.
    got = torch.autograd.grad(out.loss - out.recon_loss, params)
    z = model.encode_latents(small_images[:1])  # (1, 4, 4, 4), same weights, recomputed
    z_q = model.codebook[out.ids.reshape(-1)].view(1, 4, 4, 4).permute(0, 3, 1, 2)
    manual = codebook_weight * F.mse_loss(z_q, z.detach()) + commitment_weight * F.mse_loss(z, z_q.detach())
    want = torch.autograd.grad(manual, params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert float(got[0].abs().sum()) > 0 and float(got[1].abs().sum()) > 0


def test_a_few_steps_on_one_batch_lower_the_loss(small_images):
    model = build_fast()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        out = model(small_images)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


def test_bad_images_raise_image_input_error(images):
    model = build().eval()
    with pytest.raises(ImageInputError, match=r"256x256.*got 128x128"):
        model.encode(images[:, :, :128, :128])
    with pytest.raises(ImageInputError, match=r"\(B, 3, 256, 256\), got \(3, 4, 256, 256\)"):
        model.encode(torch.cat([images, images[:, :1]], dim=1))
    with pytest.raises(ImageInputError, match="float tensor"):
        model.encode((images * 255).to(torch.uint8))
    with pytest.raises(ImageInputError, match=r"\[0, 1\]"):
        model.encode(images * 255)


def test_bad_ids_raise_token_input_error():
    model = build().eval()
    with pytest.raises(TokenInputError, match=r"\[0, 256\); got values in \[256, 256\]"):
        model.decode(torch.full((1, 64), 256))
    with pytest.raises(TokenInputError, match=r"\(B, 64\), got \(1, 63\)"):
        model.decode(torch.zeros(1, 63, dtype=torch.int64))
    with pytest.raises(TokenInputError, match="integers"):
        model.decode(torch.zeros(1, 64))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(decoder_block_out_channels=(32, 48, 64, 64)), r"multiples of 32.*\[48\]"),
        (dict(decoder_block_out_channels=(32, 64, 64)), "4 entries"),
        (dict(grid_size=16), "grid_size must equal guide_size // 8 = 8"),
        (dict(guide_size=60), "multiple of 8"),
        (dict(image_size=240), "power of two"),
        (dict(encoder_block_out_channels=(32,) * 7), "7 entries but .* needs 6 encoder blocks"),
        (dict(num_vq_embeddings=70000), "uint16"),
        (dict(vq_embed_dim=8), r"vq_embed_dim \(8\) must equal latent_channels \(4\)"),
        (dict(encoder_block_out_channels=(32, 48)), "not divisible by norm_num_groups"),
    ],
)
def test_inconsistent_config_raises_guide_config_error(overrides, message):
    with pytest.raises(GuideConfigError, match=message):
        GuideVQModel(**{**TINY, **overrides})


@pytest.fixture(scope="module")
def movq_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("movq")
    return folder, save_movq(folder, seed=7)


def test_from_movq_copies_fitting_tensors_and_reports_the_rest(movq_dir):
    folder, movq = movq_dir
    model, report = GuideVQModel.from_movq(folder, guide_size=64)
    own = model.state_dict()
    assert model.config.decoder_block_out_channels == (32, 32, 64, 64)
    assert model.config.num_vq_embeddings == 256
    for name in ("quantize.embedding.weight", "decoder.conv_out.weight", "encoder.down_blocks.3.resnets.0.conv1.weight",
                 "encoder.mid_block.attentions.0.to_q.weight", "decoder.up_blocks.0.attentions.0.to_k.weight"):
        assert torch.equal(own[name], movq[name]), name
        assert name in report.loaded
    # MoVQ's attention (its block 3 of 4) moves to the guide's last block (6 of 6).
    moved = "encoder.down_blocks.{}.attentions.0.to_v.weight"
    assert torch.equal(own[moved.format(5)], movq[moved.format(3)])
    assert report.unused == [] and report.mismatched == {}
    # Left random: what MoVQ's x8 encoder does not have (block 3's downsampler, blocks 4-5's resnets).
    assert report.missing and all(
        n.startswith(("encoder.down_blocks.3.downsamplers", "encoder.down_blocks.4.", "encoder.down_blocks.5.resnets"))
        for n in report.missing
    )
    assert "encoder.down_blocks.4.resnets.0.conv1.weight" in report.left_random
    assert sorted(report.loaded + report.missing) == sorted(own)


def test_from_movq_reports_shape_mismatches_and_reads_shards(movq_dir, tmp_path):
    folder, movq = movq_dir
    _, report = GuideVQModel.from_movq(folder, num_vq_embeddings=512)
    assert report.mismatched == {"quantize.embedding.weight": ((256, 4), (512, 4))}
    assert "quantize.embedding.weight" in report.left_random
    save_movq(tmp_path / "movq", seed=7, max_shard_size="300KB")
    assert (tmp_path / "movq" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    sharded, sharded_report = GuideVQModel.from_movq(tmp_path)  # a pipeline folder holding movq/
    assert torch.equal(sharded.state_dict()["decoder.conv_in.weight"], movq["decoder.conv_in.weight"])
    assert len(sharded_report.loaded) == len(GuideVQModel.from_movq(folder)[1].loaded)


def test_from_movq_rejects_non_movq_folders(tmp_path):
    with pytest.raises(BundleError, match="no MoVQ config.json"):
        GuideVQModel.from_movq(tmp_path)
    VQModel(**{**TINY_MOVQ, "norm_type": "group"}).save_pretrained(tmp_path / "vq")
    with pytest.raises(BundleError, match="norm_type is 'group'"):
        GuideVQModel.from_movq(tmp_path / "vq")
    # Pickle weights are never read, even when they are all there is.
    VQModel(**TINY_MOVQ).save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert (tmp_path / "pickled" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(BundleError, match="no diffusion_pytorch_model.safetensors"):
        GuideVQModel.from_movq(tmp_path / "pickled")


def test_paper_preset_builds_on_meta_device():
    with torch.device("meta"):
        model = GuideVQModel(**PRESETS["paper"])
    assert all(p.is_meta for p in model.parameters())
    assert model.encoder_widths == (128, 256, 256, 512, 512, 512)
    assert model.num_tokens == 64 and model.codebook.shape == (16384, 4)
    # 91.4 M: Kandinsky 2.2 MoVQ's widths plus two 512-wide downsampling blocks.
    assert sum(p.numel() for p in model.parameters()) == 91_438_767


def test_codebook_usage_of_known_histograms():
    assert codebook_usage(torch.arange(256).repeat(3), 256) == (1.0, pytest.approx(256.0))
    assert codebook_usage(torch.arange(0, 256, 2).view(2, 64), 256) == (0.5, pytest.approx(128.0))
    assert codebook_usage(torch.full((4, 64), 9), 256) == (1 / 256, pytest.approx(1.0))
    with pytest.raises(TokenInputError, match=r"\[0, 256\)"):
        codebook_usage(torch.tensor([[0, 256]]), 256)


def test_reset_dead_codes_moves_unused_codes_onto_latents(small_images):
    model = build_fast()
    with torch.no_grad():
        z = model.encode_latents(small_images)  # (2, 4, 4, 4)
        before = model.nearest_codes(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)  # (32, 4)
    used = torch.bincount(before.reshape(-1), minlength=256) > 0
    old = model.codebook.detach().clone()
    restarted = model.reset_dead_codes(z, used, generator=torch.Generator().manual_seed(0))
    assert restarted == int((~used).sum()) > 0
    assert torch.equal(model.codebook[used], old[used])
    # Every restarted code now sits exactly on one of the latents.
    restarted_codes = model.codebook.detach()[~used]  # (n_dead, 4)
    assert bool((restarted_codes[:, None] == flat[None]).all(-1).any(1).all())
    with torch.no_grad():
        after = model.nearest_codes(z)
    assert codebook_usage(after, 256)[0] > codebook_usage(before, 256)[0]
    assert model.reset_dead_codes(z, torch.ones(256, dtype=torch.bool)) == 0
    with pytest.raises(DualtokError, match=r"\(N, 4\), got \(32, 3\)"):
        model.reset_dead_codes(flat[:, :3], used)
    with pytest.raises(DualtokError, match=r"bool tensor of shape \(256,\)"):
        model.reset_dead_codes(flat, used.long())
    # Fewer dead codes than latents: drawn without replacement, so no two restarts coincide.
    used = torch.ones(256, dtype=torch.bool)
    used[:20] = False
    assert model.reset_dead_codes(flat, used, generator=torch.Generator().manual_seed(1)) == 20
    assert len(model.codebook.detach()[:20].unique(dim=0)) == 20
