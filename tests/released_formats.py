"""Tiny random checkpoints saved exactly as the released ones are, for offline tests.

- MoVQ: Kandinsky 2.2's `movq/` folder, a diffusers `VQModel(norm_type="spatial")`.
- BLIP-2: a transformers `Blip2ForImageTextRetrieval` (stage 1, ITM/ITC heads) or
  `Blip2ForConditionalGeneration` (with an OPT language model) folder.
- Stable Diffusion 1.x: a `StableDiffusionPipeline` folder (vae/unet/text_encoder/tokenizer/scheduler,
  a PNDM scheduler config, a CLIP tokenizer as vocab.json + merges.txt, and parts dualtok ignores).

Widths are the `tiny` presets' where branches must agree (the UNet cross-attends to 32-wide
embeddings, the tiny semantic branch's gen_dim), so a tiny bundle assembles from these folders.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import PNDMScheduler, StableDiffusionPipeline, VQModel
from torch import nn
from transformers import Blip2Config, OPTConfig, PreTrainedModel, PreTrainedTokenizerBase

from dualtok_core.diffusion import PRESETS as DIFFUSION_PRESETS
from dualtok_core.diffusion import SD_SCHEDULER_CONFIG, DiffusionReconstructor

# A tiny MoVQ with Kandinsky 2.2's layout (attention last down / first up), widths the tiny
# guide decoder can take whole.
TINY_MOVQ = dict(
    block_out_channels=(32, 32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",),
    up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3,
    layers_per_block=1, latent_channels=4, vq_embed_dim=4, num_vq_embeddings=256,
    norm_num_groups=32, norm_type="spatial",
)

TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=224, patch_size=16,
)
TINY_QFORMER = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=512,
    max_position_embeddings=64, cross_attention_frequency=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)
TINY_OPT = dict(
    hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32, vocab_size=99,
    word_embed_proj_dim=16, max_position_embeddings=64,
)


def save_movq(path: str | Path, seed: int = 7, max_shard_size: str | None = None) -> dict[str, torch.Tensor]:
    """A tiny MoVQ saved in diffusers' format at `path`; returns its state dict."""
    torch.manual_seed(seed)
    movq = VQModel(**TINY_MOVQ)
    if max_shard_size is None:
        movq.save_pretrained(path)
    else:  # a sharded checkpoint with an index, as large releases are
        movq.save_pretrained(path, max_shard_size=max_shard_size)
    return movq.state_dict()


def save_blip2(cls: type[PreTrainedModel], path: str | Path, text_input: bool) -> PreTrainedModel:
    """A tiny BLIP-2 of class `cls` saved in transformers' format at `path`; returns the model."""
    torch.manual_seed(3)
    config = Blip2Config(
        vision_config=TINY_VISION,
        qformer_config={**TINY_QFORMER, "use_qformer_text_input": text_input},
        text_config=OPTConfig(**TINY_OPT).to_dict(),
        num_query_tokens=32,
        image_text_hidden_size=16,
    )
    model = cls(config).eval()
    with torch.no_grad():  # transformers zero-initialises the queries; make them distinguishable
        model.query_tokens.normal_(std=0.5)
    model.save_pretrained(path)
    return model


def save_stable_diffusion(
    path: str | Path, vae: nn.Module, unet: nn.Module, text_encoder: nn.Module, tokenizer: PreTrainedTokenizerBase
) -> Path:
    """The parts saved as a released SD 1.x folder: PNDM config, vocab.json + merges.txt, extra parts."""
    root = Path(path)
    pndm = PNDMScheduler.from_config({**SD_SCHEDULER_CONFIG, "skip_prk_steps": True})
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=pndm, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(root)
    (root / "feature_extractor").mkdir()
    (root / "feature_extractor" / "preprocessor_config.json").write_text('{"crop_size": 224}')
    # Released SD folders ship CLIP's tokenizer as BPE files, not tokenizer.json.
    tokenizer_dir = root / "tokenizer"
    for item in tokenizer_dir.iterdir():
        item.unlink()
    (tokenizer_dir / "vocab.json").write_text(json.dumps(tokenizer.get_vocab()))
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\n")
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    return root


def tiny_stable_diffusion(path: str | Path, seed: int = 5) -> DiffusionReconstructor:
    """Tiny random SD 1.x parts (the `tiny` diffusion preset) saved as a released folder at `path`."""
    model = DiffusionReconstructor.build_random(DIFFUSION_PRESETS["tiny"], seed=seed)
    save_stable_diffusion(path, model.vae, model.unet, model.text_encoder, model.tokenizer)
    return model


# stable-diffusion-2-1-unclip's schedules: v-prediction DDIM, and the squared-cosine DDPM that noises
# the image embedding.
UNCLIP_SCHEDULER = {**SD_SCHEDULER_CONFIG, "prediction_type": "v_prediction", "timestep_spacing": "leading"}
UNCLIP_NOISING = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "epsilon"}


def save_stable_unclip(path: str | Path, embed_dim: int, seed: int = 6):
    """A tiny `StableUnCLIPImg2ImgPipeline` saved in its released layout (with the image encoder and
    feature extractor dualtok does not use); returns the pipeline, DDIM scheduler and all."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableUnCLIPImg2ImgPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig
    from transformers import CLIPVisionModelWithProjection

    from dualtok_core.diffusion import byte_level_clip_tokenizer

    tiny = DIFFUSION_PRESETS["tiny"]
    torch.manual_seed(seed)
    normalizer = StableUnCLIPImageNormalizer(embedding_dim=embed_dim)
    with torch.no_grad():
        normalizer.mean.normal_(std=0.1)
        normalizer.std.uniform_(0.5, 1.5)
    pipe = StableUnCLIPImg2ImgPipeline(
        feature_extractor=CLIPImageProcessor(crop_size=32, size=32),
        image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=32,
            patch_size=4, projection_dim=embed_dim)),
        image_normalizer=normalizer,
        image_noising_scheduler=DDPMScheduler(**UNCLIP_NOISING),
        tokenizer=byte_level_clip_tokenizer(),
        text_encoder=CLIPTextModel(CLIPTextConfig(**tiny["text_encoder"])),
        unet=UNet2DConditionModel(**tiny["unet"], class_embed_type="projection",
                                  projection_class_embeddings_input_dim=2 * embed_dim),
        scheduler=DDIMScheduler(**UNCLIP_SCHEDULER),
        vae=AutoencoderKL(**tiny["vae"]),
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return pipe
