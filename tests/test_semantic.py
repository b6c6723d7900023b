"""Branch II: the SEED-style semantic tokenizer on tiny random models (and `paper` on the meta device)."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, BertTokenizerFast

from dualtok_core.errors import BundleError, DualtokError, ImageInputError, TokenInputError
from dualtok_core.imaging import check_uint8_images, to_model_input
from dualtok_core.qformer import causal_query_mask
from dualtok_core.semantic import PRESETS, STAGE_TRAINABLE, SemanticTokenizer, contrastive_loss
from tests.released_formats import save_blip2

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]


CAPTIONS = [
    "a portrait of an astronaut in a white space suit with a flag",
    "a ginger tabby cat looking at the camera",
    "a cup of coffee on a saucer with a spoon",
    "a rocket standing on the launch pad",
]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    batch = [to_model_input(check_uint8_images(p[None]), 224, torch.device("cpu"), torch.float32) for p in photos]
    return torch.cat(batch).contiguous()  # (4, 3, 224, 224)


@pytest.fixture(scope="module")
def text_tokenizer() -> BertTokenizerFast:
    """A BERT-style WordPiece tokenizer trained offline on the captions (the bundle ships a real one)."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(CAPTIONS, trainers.WordPieceTrainer(vocab_size=150, special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[(name, tok.token_to_id(name)) for name in ("[CLS]", "[SEP]")]
    )
    names = dict(unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    return BertTokenizerFast(tokenizer_object=tok, **names)


@pytest.fixture(scope="module")
def captions(text_tokenizer) -> dict[str, torch.Tensor]:
    batch = text_tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def tiny(seed: int = 0, **overrides) -> SemanticTokenizer:
    torch.manual_seed(seed)
    return SemanticTokenizer(**{**PRESETS["tiny"], **overrides}).eval()


def stage_loss(model: SemanticTokenizer, stage: str, images, captions, target) -> torch.Tensor:
    if stage == "qformer":
        image_feat, text_feat = model.image_text_features(images, **captions)
        return contrastive_loss(image_feat, text_feat, model.temperature)
    if stage == "codebook":
        return model.reconstruction_loss(images).loss
    return model.generation_loss(target, images=images)


@pytest.fixture(scope="module")
def gen_target() -> torch.Tensor:
    return torch.randn(4, 77, PRESETS["tiny"]["gen_dim"], generator=torch.Generator().manual_seed(7))


# ---- shapes, round trip, determinism ---------------------------------------------------------
def test_shapes_dtypes_and_ranges(images, captions, text_tokenizer):
    model = tiny()
    assert len(text_tokenizer) <= model.qformer.config.vocab_size
    ids = model.encode(images)
    assert ids.shape == (4, 32) and ids.dtype == torch.int64
    assert int(ids.min()) >= 0 and int(ids.max()) < model.config.codebook_size
    causal = model.causal_embeddings(images)
    assert causal.shape == (4, 32, 32) and causal.dtype == torch.float32
    # Different photos give different causal embeddings: the Q-Former reads the image.
    assert (causal[0] - causal[1]).abs().max() > 1e-3
    quantized = model.quantize(causal)
    assert torch.equal(quantized.ids, ids) and quantized.quantized.shape == (4, 32, 32)
    assert model.decode_embeddings(ids).shape == (4, 32, 32)
    assert model.generation_embeddings(ids).shape == (4, 77, 32)
    image_feat, text_feat = model.image_text_features(images, **captions)
    assert image_feat.shape == text_feat.shape == (4, 16)
    torch.testing.assert_close(image_feat.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(text_feat.norm(dim=-1), torch.ones(4))


def test_decoded_ids_equal_straight_through_path(images):
    """decode_embeddings(ids) is what the eq. 7 training path decodes (the straight-through value)."""
    model = tiny()
    causal = model.causal_embeddings(images)
    out = model.quantize(causal)
    torch.testing.assert_close(model.decode_embeddings(out.ids), model.decoder(out.quantized), atol=1e-5, rtol=1e-5)


def test_straight_through_carries_the_cosine_loss_to_the_codebook_input(images):
    model = tiny()
    model.freeze_for_stage("codebook")
    model.reconstruction_loss(images).cosine_loss.backward()  # no VQ terms: only the straight-through path
    assert model.quantizer.project_in[0].weight.grad.abs().sum() > 0
    assert model.quantizer.codebook.weight.grad is None or model.quantizer.codebook.weight.grad.abs().sum() == 0


def test_save_load_roundtrip_and_determinism(images, tmp_path):
    model = tiny()
    ids = model.encode(images)
    assert torch.equal(ids, model.encode(images))
    assert torch.equal(ids, tiny(seed=0).encode(images))  # same seed, same weights, same ids
    assert not torch.equal(model.decode_embeddings(ids), tiny(seed=1).decode_embeddings(ids))
    model.save_pretrained(tmp_path)
    loaded = SemanticTokenizer.from_pretrained(tmp_path).eval()
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(model.config)
    assert torch.equal(loaded.encode(images), ids)
    assert torch.equal(loaded.generation_embeddings(ids), model.generation_embeddings(ids))


# ---- the causal Q-Former ---------------------------------------------------------------------
def test_causal_query_mask_values():
    mask = causal_query_mask(4, torch.float32, torch.device("cpu"))
    assert mask.shape == (1, 1, 4, 4)
    assert torch.equal(mask[0, 0].tril(), torch.zeros(4, 4))
    assert bool((mask[0, 0].triu(1)[torch.ones(4, 4).triu(1).bool()] == torch.finfo(torch.float32).min).all())


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_causal_mask_is_causal(images, attn):
    """Changing query k leaves queries < k unchanged and changes queries >= k; without the mask
    the earlier queries change too (so this test can fail)."""
    k = 10
    causal_model = tiny(attn_implementation=attn)
    plain_model = tiny(attn_implementation=attn, causal_queries=False)
    plain_model.load_state_dict(causal_model.state_dict())
    for model, causal in ((causal_model, True), (plain_model, False)):
        before = model.causal_embeddings(images[:2])
        with torch.no_grad():
            model.query_tokens[:, k] += torch.randn(model.query_tokens.shape[-1]) * 0.5
        after = model.causal_embeddings(images[:2])
        change = (after - before).abs().amax(dim=(0, 2))  # (32,) largest change per query
        assert bool((change[k:] > 1e-3).all()), change
        if causal:
            torch.testing.assert_close(after[:, :k], before[:, :k], atol=1e-6, rtol=0)
        else:
            assert bool((change[:k] > 1e-3).all()), change


# ---- losses and training stages --------------------------------------------------------------
def test_contrastive_loss_values():
    feats = torch.eye(4)
    # Temperature 0.5 makes the logits 2 * I: each row's CE is log(e^2 + 3) - 2, in both directions.
    expected = torch.log(torch.tensor(np.e**2 + 3)) - 2
    torch.testing.assert_close(contrastive_loss(feats, feats, 0.5, label_smoothing=0.0), expected)
    # BLIP-2 clamps the temperature to [0.001, 0.5].
    torch.testing.assert_close(contrastive_loss(feats, feats, 2.0, label_smoothing=0.0), expected)
    aligned = contrastive_loss(feats, feats, 0.07, label_smoothing=0.0)
    shuffled = contrastive_loss(feats, feats[[1, 0, 3, 2]], 0.07, label_smoothing=0.0)
    assert aligned < 1e-5 and shuffled > 10
    # SEED's label smoothing (0.1) is the default, and it puts a floor under a perfect match.
    assert contrastive_loss(feats, feats, 0.01) == contrastive_loss(feats, feats, 0.01, label_smoothing=0.1)
    floor = contrastive_loss(feats, feats, 0.01, label_smoothing=0.1)
    assert floor > 0.1 and contrastive_loss(feats, feats, 0.01, label_smoothing=0.0) < 1e-6
    with pytest.raises(DualtokError, match="same"):
        contrastive_loss(feats, torch.eye(3), 0.07)


def test_stage_table_covers_every_trainable_part_once():
    model = tiny()
    parts = {name.split(".")[0] for name, _ in model.named_parameters()}
    listed = [name for names in STAGE_TRAINABLE.values() for name in names]
    assert len(listed) == len(set(listed))
    assert set(listed) == parts - {"vision_model"}


@pytest.mark.parametrize("stage", list(STAGE_TRAINABLE))
def test_stage_loss_is_finite_and_grads_reach_only_stage_params(stage, images, captions, gen_target):
    model = tiny()
    model.freeze_for_stage(stage)
    trainable = model.stage_parameters(stage)
    loss = stage_loss(model, stage, images, captions, gen_target)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for name, param in model.named_parameters():
        if name in trainable:
            assert param.requires_grad and param.grad is not None and torch.isfinite(param.grad).all(), name
        else:
            assert not param.requires_grad and param.grad is None, name
    for part in STAGE_TRAINABLE[stage]:
        grads = [p.grad.abs().sum() for n, p in trainable.items() if n.split(".")[0] == part]
        assert sum(grads) > 0, part


@pytest.mark.parametrize("stage", list(STAGE_TRAINABLE))
def test_a_few_steps_lower_each_stage_loss(stage, images, captions, gen_target):
    model = tiny()
    model.freeze_for_stage(stage)
    optimizer = torch.optim.Adam(model.stage_parameters(stage).values(), lr=1e-3)
    losses = []
    for _ in range(10):
        loss = stage_loss(model, stage, images, captions, gen_target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_freeze_for_stage_sets_modes_and_survives_train(images):
    model = tiny()
    model.freeze_for_stage("codebook")
    assert model.quantizer.training and model.decoder.training
    for frozen in (model.vision_model, model.qformer, model.reverse_qformer, model.text_embeddings):
        assert not frozen.training
        assert not any(p.requires_grad for p in frozen.parameters())
    model.train()  # what a training loop calls each epoch: frozen parts must stay in eval
    assert model.decoder.training and not model.qformer.training and not model.vision_model.training
    model.freeze_for_stage("reverse")
    assert model.reverse_qformer.training and not model.decoder.training
    assert not model.quantizer.codebook.weight.requires_grad
    with pytest.raises(DualtokError, match="guide"):
        model.freeze_for_stage("guide")


# ---- bad input -------------------------------------------------------------------------------
def test_bad_images_raise(images):
    model = tiny()
    with pytest.raises(ImageInputError, match="224x224"):
        model.encode(torch.rand(2, 3, 112, 112))
    with pytest.raises(ImageInputError, match=r"\(B, 3, 224, 224\)"):
        model.encode(torch.rand(2, 4, 224, 224))
    with pytest.raises(ImageInputError, match=r"\(B, 3, 224, 224\)"):
        model.encode(torch.rand(3, 224, 224))
    with pytest.raises(ImageInputError, match="float"):
        model.encode((images * 255).to(torch.uint8))
    with pytest.raises(ImageInputError, match=r"\[0, 1\]"):
        model.encode(images * 255)


def test_bad_ids_and_targets_raise(images, captions):
    model = tiny()
    with pytest.raises(TokenInputError, match=r"\[0, 512\)"):
        model.generation_embeddings(torch.full((1, 32), 512))
    with pytest.raises(TokenInputError, match=r"\(B, 32\)"):
        model.generation_embeddings(torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(TokenInputError, match="integers"):
        model.decode_embeddings(torch.zeros(1, 32))
    with pytest.raises(TokenInputError, match="vocab_size"):
        model.image_text_features(images, captions["input_ids"] + 1000, captions["attention_mask"])
    with pytest.raises(DualtokError, match="target"):
        model.generation_loss(torch.zeros(4, 77, 8), images=images)
    with pytest.raises(DualtokError, match="exactly one"):
        model.generation_loss(torch.zeros(4, 77, 32))
    with pytest.raises(DualtokError, match="causal embeddings"):
        model.quantize(torch.zeros(2, 16, 32))


# ---- BLIP-2 initialisation -------------------------------------------------------------------
def test_from_blip2_retrieval_copies_and_matches_transformers(tmp_path, images, captions):
    blip = save_blip2(Blip2ForImageTextRetrieval, tmp_path, text_input=True)
    model, report = SemanticTokenizer.from_blip2(tmp_path, causal_queries=False, **_tiny_heads())
    model.eval()
    patch = "embeddings.patch_embedding.weight"
    assert torch.equal(model.vision_model.state_dict()[patch], blip.vision_model.state_dict()[patch])
    key = "encoder.layer.1.crossattention.attention.key.weight"
    assert torch.equal(model.qformer.state_dict()[key], blip.qformer.state_dict()[key])
    assert torch.equal(model.query_tokens, blip.query_tokens)
    assert torch.equal(model.text_embeddings.word_embeddings.weight, blip.embeddings.word_embeddings.weight)
    assert report.random_parts == [
        "decoder", "generation_proj", "generation_queries", "quantizer", "reverse_qformer", "temperature",
    ]
    assert report.unused == ["itm_head"]
    # With the mask off, our image and text paths are BLIP-2's own (the wiring is right).
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        vit = blip.vision_model(pixel_values=(images - mean) / std).last_hidden_state
        queries = blip.query_tokens.expand(4, -1, -1)
        ref = blip.qformer(query_embeds=queries, encoder_hidden_states=vit).last_hidden_state
        ref_text = blip.qformer(
            query_embeds=blip.embeddings(input_ids=captions["input_ids"]), query_length=0,
            attention_mask=captions["attention_mask"],
        ).last_hidden_state[:, 0]
        ref_text_feat = torch.nn.functional.normalize(blip.text_projection(ref_text), dim=-1)
        torch.testing.assert_close(model.causal_embeddings(images), ref, atol=1e-5, rtol=1e-5)
        text_feat = model.image_text_features(images, **captions)[1]
        torch.testing.assert_close(text_feat, ref_text_feat, atol=1e-5, rtol=1e-5)


def _tiny_heads() -> dict:
    keep = ("codebook_size", "codebook_dim", "decoder_layers", "decoder_heads", "num_generation_tokens", "gen_dim",
            "reverse_qformer_config")
    return {key: PRESETS["tiny"][key] for key in keep}


def test_from_blip2_generation_checkpoint_reports_text_parts_random(tmp_path, images):
    blip = save_blip2(Blip2ForConditionalGeneration, tmp_path, text_input=False)
    model, report = SemanticTokenizer.from_blip2(tmp_path, **_tiny_heads())
    assert torch.equal(model.query_tokens, blip.query_tokens)
    assert "vision_model" in report.loaded_parts and "vision_model" not in report.random_parts
    # OPT checkpoints drop BLIP-2's text FFN and text embeddings: those stay random.
    assert "qformer.encoder.layer.0.intermediate.dense.weight" in report.left_random
    assert "qformer.encoder.layer.0.intermediate_query.dense.weight" in report.loaded
    assert {"text_embeddings", "vision_proj", "text_proj", "quantizer"} <= set(report.random_parts)
    assert {"language_model", "language_projection"} <= set(report.unused)
    assert model.encode(images).shape == (4, 32)
    with pytest.raises(BundleError, match="image_size"):
        SemanticTokenizer.from_blip2(tmp_path, image_size=256)
    with pytest.raises(BundleError, match="config.json"):
        SemanticTokenizer.from_blip2(tmp_path / "missing")


# ---- presets -------------------------------------------------------------------------------------
def test_paper_preset_builds_on_meta_with_paper_shapes():
    with torch.device("meta"):
        model = SemanticTokenizer(**PRESETS["paper"])
    vit = sum(p.numel() for p in model.vision_model.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert vit == 985_952_256  # EVA ViT-g/14, 39 layers, 1408 wide (BLIP-2 drops the 40th)
    assert 1.15e9 < total < 1.3e9
    assert model.vision_model.embeddings.position_embedding.shape == (1, 257, 1408)
    assert model.query_tokens.shape == (1, 32, 768) and model.generation_queries.shape == (1, 77, 768)
    assert model.quantizer.codebook.weight.shape == (8192, 32)
    assert len(model.decoder.blocks) == 4 and len(model.reverse_qformer.encoder.layer) == 4
    assert sum(layer.has_cross_attention for layer in model.qformer.encoder.layer) == 6
    assert model.generation_proj.out_features == 768


def test_small_preset_keeps_the_paper_structure():
    with torch.device("meta"):
        model = SemanticTokenizer(**PRESETS["small"])
    assert model.vision_model.embeddings.position_embedding.shape[1] == 257
    assert model.quantizer.codebook.weight.shape == (8192, 32)
    assert model.generation_queries.shape[1] == 77 and len(model.decoder.blocks) == 4
    assert [layer.has_cross_attention for layer in model.qformer.encoder.layer] == [True, False] * 2
