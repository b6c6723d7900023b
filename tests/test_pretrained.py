"""Assembling a bundle from released-format checkpoints: tiny MoVQ, BLIP-2 and SD 1.x folders."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from skimage import data
from transformers import Blip2ForImageTextRetrieval

from dualtok_core.bundle import DualTokenizer
from dualtok_core.checkpoints import RANDOM_INIT, random_prefixes
from dualtok_core.errors import BundleError
from dualtok_core.pretrained import assemble_bundle
from dualtok.jobs.cli import main as cli
from dualtok.jobs.make_bundle import fetch_checkpoint
from tests.released_formats import save_blip2, save_movq, tiny_stable_diffusion

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("one_thread")]

SEMANTIC_RANDOM = ["decoder", "generation_proj", "generation_queries", "quantizer", "reverse_qformer", "temperature"]
# The guide encoder is deeper than MoVQ's: MoVQ's x8 encoder has nothing for these.
GUIDE_RANDOM = ["encoder.down_blocks.3.downsamplers", "encoder.down_blocks.4", "encoder.down_blocks.5.resnets"]



@pytest.fixture(scope="module")
def released(tmp_path_factory) -> dict:
    """The three tiny released folders and the tensors they hold."""
    root = tmp_path_factory.mktemp("released")
    movq = save_movq(root / "movq")
    blip = save_blip2(Blip2ForImageTextRetrieval, root / "blip2", text_input=True).state_dict()
    sd = tiny_stable_diffusion(root / "sd").state_dict()
    return {"root": root, "movq": movq, "blip2": blip, "sd": sd}


@pytest.fixture(scope="module")
def assembled(released):
    root = released["root"]
    return assemble_bundle("tiny", blip2=root / "blip2", movq=root / "movq", stable_diffusion=root / "sd")


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    return np.stack([data.astronaut()[:256, :256], data.coffee()[:256, :256]])  # (2, 256, 256, 3) uint8


def test_full_assembly_copies_checkpoint_tensors_and_takes_the_rest_from_the_preset(released, assembled):
    tokenizer, reports = assembled
    guide, semantic, diffusion = (tokenizer.part(p).state_dict() for p in ("guide", "semantic", "diffusion"))
    assert torch.equal(guide["decoder.conv_in.weight"], released["movq"]["decoder.conv_in.weight"])
    key = "qformer.encoder.layer.1.crossattention.attention.key.weight"
    assert torch.equal(semantic[key], released["blip2"][key])
    assert torch.equal(semantic["query_tokens"], released["blip2"]["query_tokens"])
    assert torch.equal(diffusion["unet.conv_in.weight"], released["sd"]["unet.conv_in.weight"])
    # Widths come from the checkpoints, the rest from the tiny preset.
    config = tokenizer.part("guide").config
    assert tuple(config.encoder_block_out_channels) == (32, 32, 64, 64)  # MoVQ's; tiny's own are (32, 64)
    assert config.guide_size == 64 and config.num_vq_embeddings == 256
    semantic_config = tokenizer.part("semantic").config
    assert semantic_config.qformer_config["initializer_range"] == 0.02  # BLIP-2's, not tiny's 0.2
    assert semantic_config.codebook_size == 512 and semantic_config.codebook_dim == 8 and semantic_config.gen_dim == 32

    assert reports["guide"].random_modules == GUIDE_RANDOM
    assert reports["guide"].mismatched == {} and reports["guide"].unused == []
    assert reports["semantic"].random_modules == SEMANTIC_RANDOM
    assert reports["semantic"].unused == ["itm_head"]
    assert reports["diffusion"].fully_loaded and len(reports["diffusion"].loaded) == len(released["sd"])
    assert sorted(reports["guide"].loaded + reports["guide"].left_random) == sorted(guide)


def test_sources_name_the_checkpoints_and_what_stayed_random(released, assembled):
    tokenizer, reports = assembled
    root = released["root"]
    sources = tokenizer.info.sources
    assert sources["diffusion"] == f"Stable Diffusion {root / 'sd'} (all {len(released['sd'])} tensors)"
    assert sources["guide"].startswith(f"{RANDOM_INIT} (preset tiny, seed 0) for 20 of 327 tensors [")
    assert f"from MoVQ {root / 'movq'}" in sources["guide"] and "encoder.down_blocks.4" in sources["guide"]
    assert f"from BLIP-2 {root / 'blip2'}" in sources["semantic"] and "reverse_qformer" in sources["semantic"]
    # Random codebooks and encoder blocks make meaningless tokens: those parts count as untrained.
    assert tokenizer.info.untrained_parts == ["guide", "semantic"]
    assert "20 left random (encoder.down_blocks.3.downsamplers" in reports["guide"].summary()


def test_assembled_bundle_saves_loads_tokenizes_and_detokenizes(assembled, photos, tmp_path):
    tokenizer, _ = assembled
    tokenizer.save_pretrained(tmp_path / "bundle")
    loaded = DualTokenizer.from_pretrained(tmp_path / "bundle")
    assert loaded.fingerprint == tokenizer.fingerprint and loaded.info.sources == tokenizer.info.sources
    tokens = loaded.tokenize(photos)
    assert tokens.guide.shape == (2, 64) and tokens.semantic.shape == (2, 32)
    assert np.array_equal(tokens.semantic, tokenizer.tokenize(photos).semantic)
    images = loaded.detokenize(tokens.guide, tokens.semantic, size=32, steps=2)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8 and images.std() > 0


def test_assembly_is_seeded(released, assembled):
    root = released["root"]
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)  # whatever the caller's generator holds, the random tensors are the same
    again, _ = assemble_bundle("tiny", blip2=root / "blip2", movq=root / "movq", stable_diffusion=root / "sd")
    assert again.fingerprint == assembled[0].fingerprint
    assert torch.equal(torch.rand(3), expected)  # and that generator is left as it was
    other, _ = assemble_bundle("tiny", blip2=root / "blip2", movq=None, stable_diffusion=None, seed=1)
    hashes, first = other.info.part_hashes, assembled[0].info.part_hashes
    assert hashes["semantic"] != first["semantic"]  # the random codebook follows the seed...
    loaded = set(assembled[1]["semantic"].loaded)
    for name, tensor in other.part("semantic").state_dict().items():
        if name in loaded:  # ...the BLIP-2 tensors do not
            assert torch.equal(tensor, assembled[0].part("semantic").state_dict()[name]), name


def test_only_movq_leaves_the_other_parts_as_the_preset_builds_them(released, tmp_path):
    root = released["root"]
    out = tmp_path / "bundle"
    assert cli(["bundle", "--preset", "tiny", "--movq", str(root / "movq"), "--guide-size", "32",
                "--output", str(out)]) == 0
    info = json.loads((out / "bundle.json").read_text())
    assert info["sources"]["semantic"] == info["sources"]["diffusion"] == f"{RANDOM_INIT} (preset tiny, seed 0)"
    assert f"from MoVQ {root / 'movq'}" in info["sources"]["guide"]
    preset = DualTokenizer.from_preset("tiny", seed=0, parts=("semantic", "diffusion"))
    for part in ("semantic", "diffusion"):
        assert info["part_hashes"][part] == preset.info.part_hashes[part]
    loaded = DualTokenizer.from_pretrained(out, parts=("guide",))
    assert loaded.guide_size == 32 and loaded.guide_grid == 4
    assert loaded.info.untrained_parts == ["guide"]


def test_guide_settings_that_reshape_a_checkpoint_tensor_leave_it_random_and_say_so(released):
    root = released["root"]
    tokenizer, reports = assemble_bundle(
        "tiny", blip2=None, movq=root / "movq", stable_diffusion=None, guide_overrides={"num_vq_embeddings": 512},
    )
    assert reports["guide"].mismatched == {"quantize.embedding.weight": ((256, 4), (512, 4))}
    assert "quantize" in reports["guide"].random_modules
    assert "quantize" in tokenizer.info.sources["guide"] and tokenizer.guide_vocab == 512
    assert "1 of them shape-mismatched (quantize.embedding.weight)" in reports["guide"].summary()
    with pytest.raises(BundleError, match="unknown guide setting"):
        assemble_bundle("tiny", blip2=None, movq=root / "movq", stable_diffusion=None, guide_overrides={"size": 1})


def test_checkpoints_whose_widths_do_not_fit_the_preset_are_refused(released, tmp_path, capsys):
    root = released["root"]
    sd = tmp_path / "sd"
    shutil.copytree(root / "sd", sd)
    config = json.loads((sd / "unet" / "config.json").read_text())
    (sd / "unet" / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 64}))
    with pytest.raises(BundleError, match=r"cross-attends to 64-wide .* 32-wide generation embeddings \(gen_dim\)"):
        assemble_bundle("tiny", blip2=None, movq=None, stable_diffusion=sd)
    assert cli(["bundle", "--preset", "tiny", "--stable-diffusion", str(sd), "--output", str(tmp_path / "b")]) == 2
    assert "cross-attends to 64-wide" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()

    blip2 = tmp_path / "blip2"
    shutil.copytree(root / "blip2", blip2)
    config = json.loads((blip2 / "config.json").read_text())
    config["qformer_config"].update(hidden_size=30, num_attention_heads=5)
    (blip2 / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="Q-Former is 30 wide.* 4 heads"):
        assemble_bundle("tiny", blip2=blip2, movq=None, stable_diffusion=None)


def test_pickle_only_weights_are_refused(released, tmp_path):
    sd = tmp_path / "sd"
    shutil.copytree(released["root"] / "sd", sd)
    (sd / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    unet = {k.removeprefix("unet."): v for k, v in released["sd"].items() if k.startswith("unet.")}
    torch.save(unet, sd / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(BundleError, match="unet has no diffusion_pytorch_model.safetensors"):
        assemble_bundle("tiny", blip2=None, movq=None, stable_diffusion=sd)


def test_random_prefixes_are_the_shortest_all_random_subtrees():
    names = ["a.x", "a.y", "b.c.x", "b.c.y", "b.d", "e"]
    assert random_prefixes(names, {"a.x", "a.y", "b.c.x", "e"}) == ["a", "b.c.x", "e"]
    assert random_prefixes(names, set()) == []


def _upload_released(s3, released) -> dict[str, str]:
    """The folders on S3 as a model store holds them, with files the loaders must not fetch."""
    fs, bucket, root = s3.filesystem(), s3.new_bucket(), released["root"]
    fs.put(f"{root / 'sd'}/", f"{bucket}/sd/", recursive=True)
    fs.put(f"{root / 'blip2'}/", f"{bucket}/blip2/", recursive=True)
    fs.put(f"{root / 'movq'}/", f"{bucket}/kandinsky/movq/", recursive=True)  # a decoder pipeline folder
    junk = ("sd/safety_checker/model.safetensors", "sd/v1-5-pruned.ckpt", "blip2/pytorch_model.bin",
            "sd/unet/diffusion_pytorch_model.fp16.safetensors", "kandinsky/unet/diffusion_pytorch_model.safetensors")
    for path in junk:
        fs.pipe_file(f"{bucket}/{path}", b"not for dualtok")
    return {name: f"s3://{bucket}/{name}" for name in ("sd", "blip2", "kandinsky", "bundle")}


def test_cli_assembles_from_checkpoints_on_s3(s3, released, assembled, capsys, tmp_path):
    uris = _upload_released(s3, released)
    fetched = fetch_checkpoint(uris["sd"], "stable-diffusion", tmp_path / "sd", s3.storage_options)
    files = sorted(p.relative_to(fetched).as_posix() for p in fetched.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(released["root"] / "sd").as_posix()
                           for p in (released["root"] / "sd").rglob("*")
                           if p.is_file() and not p.is_relative_to(released["root"] / "sd" / "feature_extractor"))

    args = ["bundle", "--preset", "tiny", "--blip2", uris["blip2"], "--movq", uris["kandinsky"],
            "--stable-diffusion", uris["sd"], "--output", uris["bundle"], "--endpoint-url", s3.url]
    assert cli(args) == 0
    printed = capsys.readouterr().out
    # Same checkpoints and seed as the local assembly: the same weights, so the same fingerprint.
    assert f"fingerprint {assembled[0].fingerprint}" in printed
    assert "guide      MoVQ s3://" in printed and "20 left random" in printed
    assert "NOTE: guide, semantic hold random tensors (listed above)" in printed

    loaded = DualTokenizer.from_pretrained(uris["bundle"], storage_options=s3.storage_options)
    assert loaded.fingerprint == assembled[0].fingerprint
    assert loaded.info.sources["diffusion"].startswith(f"Stable Diffusion {uris['sd']} (all ")
    assert f"from BLIP-2 {uris['blip2']}" in loaded.info.sources["semantic"]
    assert cli(args) == 2  # an existing bundle is kept unless --overwrite
    assert "already holds a bundle" in capsys.readouterr().err
