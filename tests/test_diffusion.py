"""Branch III: DDIM inversion + guided denoising on tiny random SD 1.x parts, and the SD folder layout."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMInverseScheduler,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from skimage import data as skdata
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from dualtok_core.diffusion import (
    PARTS,
    PRESETS,
    SD_SCHEDULER_CONFIG,
    DDIMTimesteps,
    DiffusionReconstructor,
)
from dualtok_core.errors import BundleError, DualtokError, ImageInputError, TokenInputError
from dualtok_core.imaging import check_uint8_images, resize_float, to_model_input
from tests.released_formats import save_stable_diffusion

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]

RUN = {"size": 32, "steps": 4, "strength": 1.0, "guidance": 3.0, "seed": 0}



@pytest.fixture(scope="module")
def model() -> DiffusionReconstructor:
    return DiffusionReconstructor.build_random(PRESETS["tiny"], seed=0)


@pytest.fixture(scope="module")
def cond(model: DiffusionReconstructor) -> torch.Tensor:
    return model.text_embeddings(["an astronaut in a white suit", "a tabby cat"])  # (2, 77, 32)


@pytest.fixture(scope="module")
def guide() -> torch.Tensor:
    """Two real photos as 16 px guides, (2, 3, 16, 16) in [0, 1]."""
    photos = [skdata.astronaut(), skdata.chelsea()]
    cpu = torch.device("cpu")
    images = [to_model_input(check_uint8_images(p[None]), 16, cpu, torch.float32) for p in photos]
    return torch.cat(images).contiguous()


@pytest.fixture(scope="module")
def saved(model: DiffusionReconstructor, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sd")
    model.save_pretrained(folder)
    return folder


class ZeroNoise(nn.Module):
    """UNet stand-in predicting epsilon == 0, so every DDIM step is a pure rescaling."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.inner = unet  # keeps config, device and dtype real

    @property
    def config(self):
        return self.inner.config

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor):
        return UNet2DConditionOutput(sample=torch.zeros_like(sample))


@dataclass
class Call:
    batch: int
    timestep: int
    cond: torch.Tensor


class Recording(nn.Module):
    """The real UNet, recording each call's batch, timestep and conditioning."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.inner = unet
        self.calls: list[Call] = []

    @property
    def config(self):
        return self.inner.config

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor):
        self.calls.append(Call(sample.shape[0], int(timestep), encoder_hidden_states.clone()))
        return self.inner(sample, timestep, encoder_hidden_states=encoder_hidden_states)


def with_unet(model: DiffusionReconstructor, unet: nn.Module) -> DiffusionReconstructor:
    config = dict(model.scheduler.config)
    return DiffusionReconstructor(model.vae, unet, model.text_encoder, model.tokenizer, config)


def test_ddim_inversion_with_a_zero_noise_model_round_trips_exactly(model, cond):
    zero = with_unet(model, ZeroNoise(model.unet))
    uncond = zero.unconditional_embedding()
    z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    schedule = zero.timesteps_for(10, 0.8)
    assert schedule.timesteps.tolist() == [701, 601, 501, 401, 301, 201, 101, 1]

    zt = zero.invert(z0, schedule, uncond)
    # eps == 0: each inverse step scales by sqrt(a_to / a_from); the product telescopes to
    # a_701 / a_0, where "clean" is alphas_cumprod[0] because SD sets set_alpha_to_one=False.
    alphas = zero.scheduler.alphas_cumprod
    torch.testing.assert_close(zt, z0 * (alphas[701] / alphas[0]).sqrt())

    back = zero.denoise(zt, schedule, cond, uncond, guidance=3.0)
    torch.testing.assert_close(back, z0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "mismatch",
    [
        lambda m: m.timesteps_for(10, 0.5),  # stops short: starts denoising at 401, not 701
        lambda m: m.timesteps_for(8, 0.8),  # another spacing: 626 ... 1
        lambda m: DDIMTimesteps(m.timesteps_for(10, 0.8).timesteps, 20),  # same list, half-size steps
    ],
)
def test_denoising_over_other_timesteps_does_not_round_trip(model, cond, mismatch):
    zero = with_unet(model, ZeroNoise(model.unet))
    uncond = zero.unconditional_embedding()
    z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    zt = zero.invert(z0, zero.timesteps_for(10, 0.8), uncond)
    back = zero.denoise(zt, mismatch(zero), cond, uncond, guidance=3.0)
    assert (back - z0).abs().max() > 0.05


def test_inverse_scheduler_shares_stable_diffusions_schedule(model):
    assert type(model.scheduler) is DDIMScheduler and type(model.inverse_scheduler) is DDIMInverseScheduler
    for key, value in SD_SCHEDULER_CONFIG.items():
        assert model.scheduler.config[key] == value, key
        assert model.inverse_scheduler.config[key] == value, key
    # The trap is real: the inverse scheduler's own defaults are not SD's.
    defaults = DDIMInverseScheduler().config
    assert (defaults.beta_schedule, defaults.steps_offset, defaults.set_alpha_to_one) == ("linear", 0, True)
    torch.testing.assert_close(model.inverse_scheduler.alphas_cumprod, model.scheduler.alphas_cumprod)
    assert model.inverse_scheduler.initial_alpha_cumprod == model.scheduler.final_alpha_cumprod


def test_same_seed_same_image_and_the_seed_drives_the_noise(model, guide, cond):
    first = model.reconstruct(guide, cond, **RUN)
    assert torch.equal(first, model.reconstruct(guide, cond, **RUN))
    # eta > 0 adds seeded noise at every step: the seed alone decides it.
    noisy = {**RUN, "eta": 1.0}
    assert torch.equal(model.reconstruct(guide, cond, **noisy), model.reconstruct(guide, cond, **noisy))
    reseeded = model.reconstruct(guide, cond, **{**noisy, "seed": 1})
    assert not torch.equal(model.reconstruct(guide, cond, **noisy), reseeded)

    kwargs = {"size": 32, "steps": 4, "guidance": 3.0}
    generated = model.generate(cond, seed=0, **kwargs)
    assert generated.shape == (2, 3, 32, 32)
    assert torch.equal(generated, model.generate(cond, seed=0, **kwargs))
    assert (generated - model.generate(cond, seed=1, **kwargs)).abs().max() > 1e-3


@pytest.mark.parametrize("guide_size", [16, 32])
@pytest.mark.parametrize("size", [32, 64])
def test_output_size_is_independent_of_the_guide_size(model, guide, cond, guide_size, size):
    out = model.reconstruct(resize_float(guide, guide_size), cond, **{**RUN, "size": size, "strength": 0.75})
    assert out.shape == (2, 3, size, size) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_the_guide_and_the_condition_both_shape_the_output(model, guide, cond):
    base = model.reconstruct(guide, cond, **RUN)
    assert (base - model.reconstruct(guide.flip(-1), cond, **RUN)).abs().max() > 1e-2
    assert (base - model.reconstruct(guide, cond.flip(0), **RUN)).abs().max() > 1e-3


def test_latents_are_the_scaled_vae_mean_and_decode_back_to_unit_range(model, guide):
    images = resize_float(guide, 32)  # (2, 3, 32, 32) in about [0, 1]
    scale = model.vae.config.scaling_factor
    assert scale == pytest.approx(0.18215)  # SD 1.x's, read from the VAE config
    with torch.no_grad():
        mean = model.vae.encode(images * 2 - 1).latent_dist.mean  # (2, 4, 16, 16)
        latents = model.encode(images)
        torch.testing.assert_close(latents, mean * scale)
        assert torch.equal(model.encode(images), latents)  # the mean, not a sample
        pixels = model.vae.decode(latents / scale).sample  # (2, 3, 32, 32) in about [-1, 1]
        torch.testing.assert_close(model.decode(latents), ((pixels + 1) / 2).clamp(0, 1))


def test_unconditional_embedding_is_the_text_encoding_of_the_empty_caption(model):
    ids = model.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids  # (1, 77)
    assert ids[0, :2].tolist() == [model.tokenizer.bos_token_id, model.tokenizer.eos_token_id]
    with torch.no_grad():
        expected = model.text_encoder(ids).last_hidden_state  # (1, 77, 32)
    uncond = model.unconditional_embedding()
    assert uncond.shape == (1, 77, 32)
    torch.testing.assert_close(uncond, expected)
    assert float(uncond.abs().amax()) > 0.1  # not zeros
    assert model.unconditional_embedding() is uncond  # cached
    assert "_uncond_cache" not in model.state_dict()  # and never saved as a weight

    captions = model.text_embeddings(["a cat", ""])
    assert captions.shape == (2, 77, 32)
    torch.testing.assert_close(captions[1:], uncond)
    assert (captions[0] - captions[1]).abs().max() > 1e-3


def test_save_load_round_trip_in_the_stable_diffusion_layout(model, guide, cond, saved):
    for part in PARTS:
        assert (saved / part).is_dir(), part
    weights = sorted(str(p.relative_to(saved)) for p in saved.rglob("*.safetensors"))
    assert weights == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert not list(saved.rglob("*.bin"))
    scheduler = json.loads((saved / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["beta_schedule"] == "scaled_linear" and scheduler["steps_offset"] == 1

    loaded = DiffusionReconstructor.from_pretrained(saved)
    assert torch.equal(loaded.reconstruct(guide, cond, **RUN), model.reconstruct(guide, cond, **RUN))
    assert loaded.config == model.config
    halves = DiffusionReconstructor.from_pretrained(saved, dtype=torch.bfloat16)
    assert {p.dtype for p in halves.parameters()} == {torch.bfloat16}

    # diffusers itself reads the folder as a Stable Diffusion pipeline.
    pipe = StableDiffusionPipeline.from_pretrained(saved)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.safety_checker is None


def test_config_is_unchanged_by_saving_and_loading(tmp_path):
    """The facade fingerprints `config` before saving and checks it after loading."""
    fresh = DiffusionReconstructor.build_random(PRESETS["tiny"], seed=2)
    before = fresh.config
    assert before["scheduler"]["beta_schedule"] == "scaled_linear"
    assert before["unet"]["cross_attention_dim"] == 32
    fresh.save_pretrained(tmp_path)
    assert fresh.config == before
    assert DiffusionReconstructor.from_pretrained(tmp_path, dtype=torch.bfloat16).config == before


@pytest.mark.parametrize("part", PARTS)
def test_a_missing_part_raises_a_bundle_error_naming_it(saved, tmp_path, part):
    folder = tmp_path / "sd"
    shutil.copytree(saved, folder)
    shutil.rmtree(folder / part)
    with pytest.raises(BundleError, match=f"no {part}/ subfolder"):
        DiffusionReconstructor.from_pretrained(folder)


def test_loads_a_folder_saved_by_stable_diffusion_pipeline(model, guide, cond, tmp_path):
    """What a real SD 1.x folder looks like: PNDM config, vocab.json + merges.txt, extra parts."""
    save_stable_diffusion(tmp_path, model.vae, model.unet, model.text_encoder, model.tokenizer)
    assert sorted(p.name for p in (tmp_path / "tokenizer").iterdir()) == [
        "merges.txt", "tokenizer_config.json", "vocab.json",
    ]
    scheduler = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "PNDMScheduler"
    assert not (tmp_path / "safety_checker").exists()

    loaded = DiffusionReconstructor.from_stable_diffusion(tmp_path)
    assert type(loaded.scheduler) is DDIMScheduler
    assert all(loaded.inverse_scheduler.config[k] == v for k, v in SD_SCHEDULER_CONFIG.items())
    caption = ["a tabby cat"]
    torch.testing.assert_close(loaded.text_embeddings(caption), model.text_embeddings(caption))
    assert torch.equal(loaded.reconstruct(guide, cond, **RUN), model.reconstruct(guide, cond, **RUN))


def test_guidance_one_skips_the_unconditional_pass(model, guide, cond):
    recording = Recording(model.unet)
    counted = with_unet(model, recording)
    uncond = counted.unconditional_embedding().expand(2, -1, -1)  # (2, 77, 32)

    counted.reconstruct(guide, cond, **{**RUN, "guidance": 1.0})
    plain, recording.calls = recording.calls, []
    counted.reconstruct(guide, cond, **{**RUN, "guidance": 4.0})
    guided = recording.calls

    # Inversion climbs, denoising descends, over the same four timesteps.
    assert [c.timestep for c in guided] == [1, 251, 501, 751, 751, 501, 251, 1]
    assert [c.timestep for c in plain] == [c.timestep for c in guided]
    assert [c.batch for c in plain] == [2] * 8
    assert [c.batch for c in guided] == [2] * 4 + [4] * 4  # one doubled batch: "" then cond
    for call in guided[:4] + plain[:4]:  # inversion: guidance 1, unconditional by default
        assert torch.equal(call.cond, uncond)
    for call in guided[4:]:
        assert torch.equal(call.cond[:2], uncond) and torch.equal(call.cond[2:], cond)
    for call in plain[4:]:
        assert torch.equal(call.cond, cond)

    recording.calls = []
    counted.reconstruct(guide, cond, **RUN, inversion_condition="semantic")
    assert all(torch.equal(call.cond, cond) for call in recording.calls[:4])


def test_classifier_free_guidance_extrapolates_from_the_unconditional_prediction(model, cond):
    """One denoising step equals DDIM's step on eps_u + g (eps_c - eps_u), each from its own UNet call."""
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    schedule = DDIMTimesteps(model.timesteps_for(4, 1.0).timesteps[:1], 4)  # just t = 751
    uncond = model.unconditional_embedding()
    with torch.no_grad():
        eps_u = model.unet(z, 751, encoder_hidden_states=uncond.expand(2, -1, -1)).sample
        eps_c = model.unet(z, 751, encoder_hidden_states=cond).sample
    model.scheduler.set_timesteps(4)
    expected = model.scheduler.step(eps_u + 5.0 * (eps_c - eps_u), 751, z).prev_sample
    guided = model.denoise(z, schedule, cond, uncond, guidance=5.0)
    torch.testing.assert_close(guided, expected, rtol=1e-4, atol=1e-5)
    assert (expected - model.scheduler.step(eps_c, 751, z).prev_sample).abs().max() > 1e-3


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"size": 33}, DualtokError, "multiple of the VAE factor 2"),
        ({"size": 0}, DualtokError, "multiple of the VAE factor"),
        ({"strength": 0.0}, DualtokError, r"strength must lie in \(0, 1\]"),
        ({"strength": 1.5}, DualtokError, r"strength must lie in \(0, 1\]"),
        ({"strength": 0.1}, DualtokError, "leaves no timestep"),
        ({"steps": 0}, DualtokError, "steps must be a positive int"),
        ({"guidance": 0.5}, DualtokError, "guidance"),
        ({"inversion_condition": "noise"}, DualtokError, "inversion_condition"),
        ({"cond": torch.zeros(2, 76, 32)}, TokenInputError, r"\(B, 77, 32\), got \(2, 76, 32\)"),
        ({"cond": torch.zeros(2, 77, 16)}, TokenInputError, r"\(B, 77, 32\), got \(2, 77, 16\)"),
        ({"cond": torch.zeros(77, 32)}, TokenInputError, r"got \(77, 32\)"),
        ({"cond": torch.zeros(3, 77, 32)}, TokenInputError, "cond has batch 3 but guide has batch 2"),
        ({"guide": torch.zeros(2, 1, 16, 16)}, ImageInputError, r"\(B, 3, g, g\)"),
        ({"guide": torch.zeros(2, 3, 16, 8)}, ImageInputError, r"\(B, 3, g, g\)"),
        ({"guide": torch.zeros(2, 3, 16, 16, dtype=torch.uint8)}, ImageInputError, "float tensor"),
        ({"guide": torch.full((2, 3, 16, 16), 255.0)}, ImageInputError, r"must lie in \[0, 1\]"),
    ],
)
def test_bad_input_is_named(model, guide, cond, change, error, message):
    kwargs = {**RUN, "guide": guide, "cond": cond, **change}
    with pytest.raises(error, match=message):
        model.reconstruct(kwargs.pop("guide"), kwargs.pop("cond"), **kwargs)


def test_generate_and_mismatched_parts_reject_bad_input(model, cond):
    with pytest.raises(DualtokError, match="multiple of the VAE factor 2"):
        model.generate(cond, size=31, steps=4, guidance=3.0, seed=0)
    wide_text = CLIPTextModel(CLIPTextConfig(**{**PRESETS["tiny"]["text_encoder"], "hidden_size": 64}))
    with pytest.raises(BundleError, match="hidden_size 64 != unet cross_attention_dim 32"):
        DiffusionReconstructor(model.vae, model.unet, wide_text, model.tokenizer, SD_SCHEDULER_CONFIG)


def test_build_random_is_seeded_and_leaves_the_global_generator_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = DiffusionReconstructor.build_random(PRESETS["tiny"], seed=0)
    assert torch.equal(torch.rand(3), expected)
    b = DiffusionReconstructor.build_random(PRESETS["tiny"], seed=0)
    c = DiffusionReconstructor.build_random(PRESETS["tiny"], seed=1)
    key = "unet.conv_in.weight"
    assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    assert not torch.equal(a.state_dict()[key], c.state_dict()[key])


@pytest.mark.parametrize("name, factor, dim", [("tiny", 2, 32), ("small", 8, 256), ("paper", 8, 768)])
def test_presets_build_on_the_meta_device(name, factor, dim):
    with torch.device("meta"):
        built = DiffusionReconstructor.build_random(PRESETS[name], seed=0)
    assert built.device.type == "meta"
    assert (built.vae_scale_factor, built.cross_attention_dim) == (factor, dim)
    if name == "paper":  # Stable Diffusion 1.x's published part sizes
        parts = ("unet", "vae", "text_encoder")
        counts = {part: sum(p.numel() for p in getattr(built, part).parameters()) for part in parts}
        assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    # The schedule is a real CPU table even on meta: SD's scaled_linear ends near 0.0047.
    assert np.isclose(built.scheduler.alphas_cumprod[-1].item(), 0.0047, atol=1e-4)
