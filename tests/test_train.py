"""Training: the Ray-free stage steps (losses fall, frozen parts stay put, checkpoints resume
exactly, the global-batch contrastive loss), and `dualtok train` on a local Ray cluster with
loopback S3 (two workers per stage, exports that load, a killed worker, reruns)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import ray.cloudpickle
import torch
from ray.train import UserCallback

from dualtok_core.bundle import DualTokenizer
from dualtok_core.errors import BundleError, DualtokError
from dualtok_core.imaging import to_model_input
from dualtok_core.semantic import STAGE_TRAINABLE
from dualtok_core.training import LRSchedule, build_optimizer, build_scheduler, optimizer_step
from dualtok_core.training_stages import STAGES, CodebookStage, CodeUsage, QFormerStage, StageContext, tokenize_captions
from dualtok.jobs.cli import main as cli
from dualtok.pipelines.train.config import STAGE_CONFIGS
from dualtok.pipelines.train.run import train
from dualtok.pipelines.train.state import (
    TEXT_TOKENIZER_DIR, RunLayout, apply_training_state, capture_training_state, read_checkpoint, rng_state,
    save_checkpoint,
)
from dualtok.pipelines.io import schemas as S
from dualtok.pipelines.config import ConfigError, load_config
from dualtok.pipelines.shards.photos import BASE_PHOTOS, sample_photos, write_sample_shards
from dualtok.pipelines.train.data import KeepTrainingSamples, train_text_tokenizer

pytestmark = pytest.mark.timeout(900)

TINY_QFORMER_VOCAB = 512  # semantic.PRESETS["tiny"]["qformer_config"]["vocab_size"]


# ---- fixtures -----------------------------------------------------------------------------------
def build_text_tokenizer(folder: Path, captions: list[str], vocab_size: int = 200) -> Path:
    """A BERT-style WordPiece tokenizer trained offline on `captions`, saved as transformers does."""
    return Path(train_text_tokenizer(captions, str(folder), vocab_size))


@pytest.fixture(scope="module")
def text_tokenizer(tmp_path_factory) -> Path:
    captions = [caption for _, _, caption in sample_photos(64)] + [c for _, c in BASE_PHOTOS.values()]
    folder = build_text_tokenizer(tmp_path_factory.mktemp("text") / "tokenizer", captions)
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(str(folder))) <= TINY_QFORMER_VOCAB
    return folder


@pytest.fixture(scope="module")
def photos() -> list[tuple[str, np.ndarray, str]]:
    return sample_photos(4, seed=3)


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train") / "shards"
    write_sample_shards(str(root), count=16, per_shard=8, seed=1)
    return root



def images_at(photos: list, size: int) -> torch.Tensor:
    batch = [to_model_input(torch.from_numpy(np.ascontiguousarray(image))[None], size, torch.device("cpu"),
                            torch.float32) for _, image, _ in photos]
    return torch.cat(batch).contiguous()  # (B, 3, size, size)


def fixed_batch(name: str, stage, photos: list, tokenizer_dir: Path, diffusion) -> dict[str, torch.Tensor]:
    batch = {"images": images_at(photos, stage.image_size)}
    captions = [caption for _, _, caption in photos]
    if name == "qformer":
        from transformers import AutoTokenizer

        ids, mask = tokenize_captions(AutoTokenizer.from_pretrained(str(tokenizer_dir)), captions, 32)
        batch.update(input_ids=ids, attention_mask=mask)
    elif name == "reverse":
        batch["target"] = diffusion.text_embeddings(captions)  # (B, 77, 32)
    return batch


def fresh_branch(part: str) -> torch.nn.Module:
    return DualTokenizer.from_preset("tiny", seed=0, parts=(part,)).part(part)


def state_by_prefix(module: torch.nn.Module, keep) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in module.state_dict().items() if keep(n.split(".")[0])}


# ---- Ray-free: schedule, configs, data stages, metrics files -------------------------------------
def test_lr_schedule_warms_up_linearly_then_decays_by_cosine_to_min():
    schedule = LRSchedule(lr=1e-4, total_steps=110, warmup_steps=10, warmup_lr=1e-6, min_lr=1e-5)
    assert schedule.lr_at(0) == pytest.approx(1e-6)
    assert schedule.lr_at(5) == pytest.approx(1e-6 + (1e-4 - 1e-6) * 0.5)
    assert schedule.lr_at(10) == pytest.approx(1e-4)
    assert schedule.lr_at(60) == pytest.approx(1e-5 + (1e-4 - 1e-5) * 0.5)  # half-way down the cosine
    assert schedule.lr_at(110) == pytest.approx(1e-5) and schedule.lr_at(500) == pytest.approx(1e-5)
    decay = [schedule.lr_at(s) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(decay))
    param = torch.nn.Parameter(torch.zeros(2, 2))
    optimizer = build_optimizer([("w", param)], 1e-4, 0.05)
    scheduler = build_scheduler(optimizer, schedule)
    seen = []
    for _ in range(12):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([schedule.lr_at(s) for s in range(12)])
    with pytest.raises(DualtokError, match="min_lr"):
        LRSchedule(lr=1e-4, total_steps=10, min_lr=1e-3)


def test_stage_configs_default_to_seed_values_and_reject_bad_keys():
    base = ["inputs=s3://b/shards/", "bundle=tiny", "output=/tmp/out", "storage_path=/tmp/runs"]
    qformer = load_config(STAGE_CONFIGS["qformer"], None, base)
    assert (qformer.lr, qformer.min_lr, qformer.warmup_lr, qformer.warmup_steps) == (3e-5, 3e-6, 3e-7, 2000)
    assert (qformer.weight_decay, qformer.batch_size, qformer.label_smoothing) == (0.05, 64, 0.1)
    codebook = load_config(STAGE_CONFIGS["codebook"], None, base)
    assert (codebook.lr, codebook.min_lr, codebook.warmup_lr, codebook.batch_size) == (1e-4, 1e-5, 1e-6, 256)
    guide = load_config(STAGE_CONFIGS["guide"], None, [*base, "num_workers=8", "resources_per_worker={CPU: 4}"])
    assert guide.num_workers == 8 and guide.resources_per_worker == {"CPU": 4} and guide.dead_code_every == 100
    with pytest.raises(ConfigError, match="storage_path"):
        load_config(STAGE_CONFIGS["reverse"], None, base[:2])
    with pytest.raises(ConfigError, match="text_tokenizer"):  # the guide stage has no text tokenizer
        load_config(STAGE_CONFIGS["guide"], None, [*base, "text_tokenizer=/x"])
    with pytest.raises(ConfigError, match="steps must be >= 1|steps"):
        load_config(STAGE_CONFIGS["codebook"], None, [*base, "steps=0"])


def test_keep_training_samples_drops_error_rows_and_captionless_samples():
    images = np.arange(5 * 4 * 4 * 3, dtype=np.uint8).reshape(5, 4, 4, 3)
    captions = np.array(["a cat", None, "  ", "a dog", "x"], dtype=object)
    batch = {S.ROW_KIND: np.array([S.SAMPLE, S.SAMPLE, S.SAMPLE, S.SAMPLE, S.END]), S.CAPTION: captions,
             S.IMAGE: images, S.KEY: np.array(list("abcde"), dtype=object)}
    kept = KeepTrainingSamples(require_captions=True)(batch)
    assert set(kept) == {S.IMAGE, S.CAPTION} and kept[S.CAPTION].tolist() == ["a cat", "a dog"]
    np.testing.assert_array_equal(kept[S.IMAGE], images[[0, 3]])
    loose = KeepTrainingSamples(require_captions=False)(batch)
    assert loose[S.CAPTION].tolist() == ["a cat", "", "  ", "a dog"]
    assert loose[S.IMAGE].shape == (4, 4, 4, 3)


def test_metrics_intervals_merge_in_step_order_and_a_redone_interval_replaces_its_rows(tmp_path):
    layout = RunLayout(str(tmp_path), "run-a")
    layout.write_metrics([{S.TRAIN_STEP: 3, S.TRAIN_LOSS: 3.0}, {S.TRAIN_STEP: 4, S.TRAIN_LOSS: 4.0}])
    layout.write_metrics([{S.TRAIN_STEP: 1, S.TRAIN_LOSS: 1.0}, {S.TRAIN_STEP: 2, S.TRAIN_LOSS: 2.0}])
    layout.write_metrics([{S.TRAIN_STEP: 3, S.TRAIN_LOSS: 0.3}, {S.TRAIN_STEP: 4, S.TRAIN_LOSS: 0.4}])  # redone
    rows = layout.write_merged_metrics()
    assert [(r[S.TRAIN_STEP], r[S.TRAIN_LOSS]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 0.3), (4, 0.4)]
    lines = (tmp_path / "run-a" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)[S.TRAIN_STEP] for line in lines] == [1, 2, 3, 4]
    assert layout.finished() is None
    layout.write_finished({"steps": 4})
    assert layout.finished() == {"steps": 4}


def test_ray_storage_goes_through_fsspec_for_object_stores(s3, tmp_path):
    import pyarrow.fs as pafs

    bucket = s3.new_bucket()
    path, fs = RunLayout(f"s3://{bucket}/runs", "r", s3.storage_options).ray_storage()
    assert path == f"{bucket}/runs" and isinstance(fs, pafs.PyFileSystem)
    with fs.open_output_stream(f"{bucket}/runs/r/probe.txt") as out:  # through the loopback endpoint
        out.write(b"ok")
    assert s3.filesystem().cat_file(f"{bucket}/runs/r/probe.txt") == b"ok"
    local, none = RunLayout(f"file://{tmp_path}", "r").ray_storage()
    assert local == str(tmp_path) and none is None


# ---- Ray-free: every stage learns, and only its own parts ----------------------------------------
def trained_parts(name: str):
    """Whether a top-level part of the stage's branch trains."""
    if name == "guide":
        return lambda part: True
    if STAGES[name].part == "diffusion":
        return lambda part: part == STAGES[name].trained
    return lambda part: part in STAGE_TRAINABLE[name]


@pytest.mark.parametrize("name", ["qformer", "codebook", "reverse", "guide", "vae", "unet"])
def test_stage_lowers_its_loss_on_a_fixed_batch_and_trains_only_its_parts(
    name, photos, text_tokenizer, tiny, one_thread
):
    from transformers import AutoTokenizer

    cls = STAGES[name]
    model = fresh_branch(cls.part)
    torch.manual_seed(0)
    # Built and fed as the Ray Train worker does: the stage declares its parts and its inputs.
    context = StageContext(text_tokenizer=AutoTokenizer.from_pretrained(str(text_tokenizer)), model=model)
    stage = cls.from_bundle(tiny, context)
    # The guide trains at 2 images (its encoder runs at 256 px) with a dead-code restart each
    # step: without it the codebook trails the fast-moving encoder and the VQ terms grow.
    used = photos[:2] if name == "guide" else photos
    batch = stage.inputs(images_at(used, stage.image_size), [caption for _, _, caption in used])
    expected = {"qformer": {"images", "input_ids", "attention_mask"}, "reverse": {"images", "target"},
                "unet": {"images", "cond"}}
    assert set(batch) == expected.get(name, {"images"})
    trains = trained_parts(name)
    frozen_before = state_by_prefix(model, lambda part: not trains(part))
    trained_before = state_by_prefix(model, trains)
    optimizer = build_optimizer(stage.named_trainable_parameters(), 1e-3, 0.0)
    scheduler = build_scheduler(optimizer, LRSchedule(lr=1e-3, total_steps=100))
    usage = CodeUsage(stage.codebook_size) if name == "guide" else None
    losses = []
    for _ in range(8 if name == "guide" else 12):
        result = optimizer_step(stage, optimizer, scheduler, [batch], max_grad_norm=1.0)
        losses.append(result.loss)
        assert set(result.terms) == set(cls.loss_terms)
        if usage is not None:
            usage.update(result.ids)
            with torch.no_grad():
                model.reset_dead_codes(model.encode_latents(batch["images"]), usage.used, torch.Generator().manual_seed(0))
            usage.reset()
    if name == "unet":  # fresh noise and timesteps each step: compare the ends of the run
        assert sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses
    else:
        assert losses[-1] < 0.7 * losses[0], losses
    for key, before in frozen_before.items():  # bit-identical, and never handed a gradient
        assert torch.equal(model.state_dict()[key], before), key
    frozen_params = [p for n, p in model.named_parameters() if not trains(n.split(".")[0])]
    assert all(p.grad is None and not p.requires_grad for p in frozen_params)
    if cls.part == "diffusion":
        assert getattr(model, cls.trained).training
        assert not any(getattr(model, part).training for part in ("vae", "unet", "text_encoder") if not trains(part))
    elif name != "guide":
        modules = [getattr(model, part) for part in STAGE_TRAINABLE[name]]
        assert not model.vision_model.training
        assert all(m.training for m in modules if isinstance(m, torch.nn.Module))
    changed = [k for k, before in trained_before.items() if not torch.equal(model.state_dict()[k], before)]
    assert len(changed) >= 0.8 * len(trained_before)


@pytest.mark.parametrize("name", ["codebook", "vae", "unet"])
def test_checkpoint_restores_weights_optimizer_schedule_and_rng_exactly(name, photos, tmp_path, one_thread):
    """Three steps straight equal one step, a checkpoint, a restore and two more steps, bit for bit;
    the unet stage draws captions dropped, timesteps and noise from the RNG the checkpoint keeps."""
    schedule = LRSchedule(lr=1e-3, total_steps=4, warmup_steps=1, warmup_lr=1e-5, min_lr=1e-4)
    cls = STAGES[name]
    captions = [caption for _, _, caption in photos]

    def setup():
        stage = cls(fresh_branch(cls.part))
        optimizer = build_optimizer(stage.named_trainable_parameters(), schedule.lr, 0.05)
        return stage, optimizer, build_scheduler(optimizer, schedule)

    def step(stage, optimizer, scheduler):
        optimizer_step(stage, optimizer, scheduler, [stage.inputs(images_at(photos, stage.image_size), captions)])

    torch.manual_seed(7)
    straight = setup()
    for _ in range(3):
        step(*straight)
    torch.manual_seed(7)
    stage, optimizer, scheduler = setup()
    step(stage, optimizer, scheduler)
    state = capture_training_state(1, optimizer, scheduler, None, [rng_state()], None)
    save_checkpoint(tmp_path, stage, state, {"stage": name, "step": 1})
    expected_draw = torch.rand(3)

    torch.manual_seed(123)  # whatever the restarted process drew before, the checkpoint's RNG wins
    resumed = setup()
    tensors, loaded, meta = read_checkpoint(tmp_path)  # weights_only=True load of the training state
    resumed[0].load_trainable_state(tensors)
    assert apply_training_state(loaded, resumed[1], resumed[2], None, rank=0, world=1, seed=0) == 1
    assert meta["step"] == 1 and torch.equal(torch.rand(3), expected_draw)
    apply_training_state(loaded, resumed[1], resumed[2], None, rank=0, world=1, seed=0)  # undo the probe draw
    for _ in range(2):
        step(*resumed)
    assert resumed[2].last_epoch == 3 and resumed[1].param_groups[0]["lr"] == pytest.approx(schedule.lr_at(3))
    final, reference = resumed[0].trainable_state(), straight[0].trainable_state()
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[k], reference[k]) for k in final)
    dropped = next(k for k in tensors if not k.startswith("_"))
    with pytest.raises(DualtokError, match="missing"):
        resumed[0].load_trainable_state({k: v for k, v in tensors.items() if k != dropped})
    if name == "vae":  # the latents' running std travels in the checkpoint and sets the export's scaling
        std = float(tensors[cls.STD_KEY])
        assert 0 < std and resumed[0].model.vae.config.scaling_factor == pytest.approx(1 / std)


def _ddp_qformer_gradients(rank: int, port: int, batch: dict, out: str) -> None:
    """One of two gloo ranks: its half of the batch through DDP(QFormerStage) with all-gathered features."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from dualtok.pipelines.train.worker import all_gather_with_grad

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    stage = QFormerStage(fresh_branch("semantic"), gather=all_gather_with_grad)
    half = {k: v.chunk(2)[rank] for k, v in batch.items()}
    module = DistributedDataParallel(stage)
    module(**half).loss.backward()  # returns once DDP's gradient all-reduce has completed on both ranks
    if rank == 0:
        torch.save({n: p.grad for n, p in stage.named_trainable_parameters()}, out)
    # Leave without running destructors. Freeing the DDP module frees its Reducer, the last owner of
    # the gloo process group, whose destructor joins gloo's worker thread while holding the GIL; a
    # worker thread still destroying a finished all-reduce needs the GIL to drop a Python reference
    # it holds: both wait forever (seen with py-spy --native in ~1 of 6 suite runs, spawned or forked:
    # the 15-minute hang once blamed on fork). Nothing is left to do here that a destructor would do.
    os._exit(0)


def _single_qformer_gradients(rank: int, batch: dict, out: str) -> None:
    """The reference: the whole batch through QFormerStage in one fresh process, one thread like the ranks."""
    torch.set_num_threads(1)
    stage = QFormerStage(fresh_branch("semantic"))
    stage(**batch).loss.backward()
    torch.save({n: p.grad for n, p in stage.named_trainable_parameters()}, out)


def test_contrastive_gradients_under_ddp_equal_the_single_process_global_batch(photos, text_tokenizer, tmp_path):
    import torch.multiprocessing as mp

    from tests.conftest import free_port

    batch = fixed_batch("qformer", QFormerStage(fresh_branch("semantic")), photos, text_tokenizer, None)
    reference, out = str(tmp_path / "single.pt"), str(tmp_path / "grads.pt")
    # Spawned, never forked: by now this process runs Ray's gRPC and core-worker threads and a moto
    # child, and a forked rank inherits whatever locks those threads held at the fork (a rank once
    # sat in futex_wait for 15 minutes). Spawned ranks start from a fresh interpreter. The reference
    # runs in one too: computed in the suite's own process after the other files' tests it once
    # differed from the ranks (vision_proj.weight) while the same test alone matched, so both sides
    # now start from the same clean state.
    mp.start_processes(_single_qformer_gradients, args=(batch, reference), nprocs=1, join=True,
                       start_method="spawn")
    mp.start_processes(_ddp_qformer_gradients, args=(free_port(), batch, out), nprocs=2, join=True,
                       start_method="spawn")
    single, gathered = torch.load(reference, weights_only=True), torch.load(out, weights_only=True)
    assert gathered.keys() == single.keys()
    for name, grad in single.items():
        # DDP averages two ranks whose losses both cover the whole (gathered) batch.
        torch.testing.assert_close(gathered[name], grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_guide_from_movq_weights_trains_and_exports_with_the_other_parts_unchanged(
    tmp_path, tiny, photos, one_thread
):
    from dualtok.pipelines.train.state import ExportRequest, branch_for_stage, export_bundle
    from dualtok.pipelines.actors import BundleSource
    from tests.released_formats import save_movq

    movq = save_movq(tmp_path / "movq")
    model = branch_for_stage("guide", tiny, str(tmp_path / "movq"), None)
    assert torch.equal(model.decoder.conv_out.weight, movq["decoder.conv_out.weight"])  # copied by name
    assert model.config.guide_size == tiny.part("guide").config.guide_size
    stage = STAGES["guide"](model)
    optimizer = build_optimizer(stage.named_trainable_parameters(), 1e-3, 0.0)
    scheduler = build_scheduler(optimizer, LRSchedule(lr=1e-3, total_steps=1))
    optimizer_step(stage, optimizer, scheduler, [{"images": images_at(photos[:1], 256)}])
    (tmp_path / "ckpt").mkdir()
    state = capture_training_state(1, optimizer, scheduler, None, [rng_state()], None)
    save_checkpoint(tmp_path / "ckpt", stage, state, {"stage": "guide", "step": 1})
    request = ExportRequest(stage="guide", source=BundleSource("tiny"), output=str(tmp_path / "out"),
                            provenance="trained: stage guide, test", init_from_movq=str(tmp_path / "movq"))
    export_bundle(request, tmp_path / "ckpt")
    exported = DualTokenizer.from_pretrained(tmp_path / "out")
    assert_same_tensors(exported.part("guide"), model)
    assert_same_tensors(exported.part("semantic"), tiny.part("semantic"))
    assert_same_tensors(exported.part("diffusion"), tiny.part("diffusion"))
    assert exported.info.sources["guide"] == "trained: stage guide, test"


# ---- weights load from safetensors only -------------------------------------------------------------
@pytest.mark.parametrize(("part", "weights", "pickle_name"), [
    ("guide", "guide/diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    ("diffusion", "diffusion/text_encoder/model.safetensors", "pytorch_model.bin"),
    ("diffusion", "diffusion/unet/diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
])
def test_a_bundle_part_holding_only_pickle_weights_is_refused_with_how_to_convert(part, weights, pickle_name,
                                                                                  tmp_path):
    from safetensors.torch import load_file

    bundle = tmp_path / "bundle"
    DualTokenizer.from_preset("tiny", parts=(part,)).save_pretrained(bundle)
    assert DualTokenizer.from_pretrained(bundle, parts=(part,)).part(part) is not None  # loads as saved
    safe = bundle / weights
    torch.save(load_file(str(safe)), safe.with_name(pickle_name))  # the same tensors, as a pickle
    safe.unlink()
    with pytest.raises(BundleError, match=rf"only pickle weights \({pickle_name}\).*safetensors only.*"
                                          r"save_pretrained\(folder, safe_serialization=True\)") as err:
        DualTokenizer.from_pretrained(bundle, parts=(part,))
    assert str(safe.parent) in str(err.value)


# ---- plan checks (no Ray) --------------------------------------------------------------------------
def test_plan_refuses_a_text_tokenizer_bigger_than_the_qformer_vocab_and_missing_assets(tmp_path, local_shards):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dualtok.pipelines.train.plan import plan_training

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(600)}}
    big = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    big.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=big, unk_token="[UNK]", pad_token="[PAD]")
    fast.save_pretrained(str(tmp_path / "big"))
    base = [f"inputs={local_shards}", "bundle=tiny", f"output={tmp_path}/out", f"storage_path={tmp_path}/runs"]
    with pytest.raises(BundleError, match="602 tokens but the Q-Former embeds 512"):
        plan_training(load_config(STAGE_CONFIGS["qformer"], None, [*base, f"text_tokenizer={tmp_path}/big"]))
    with pytest.raises(BundleError, match="needs the Q-Former's text tokenizer"):
        plan_training(load_config(STAGE_CONFIGS["qformer"], None, base))
    with pytest.raises(BundleError, match="holds no MoVQ config.json"):
        plan_training(load_config(STAGE_CONFIGS["guide"], None, [*base, f"init_from_movq={tmp_path}/nothing"]))
    with pytest.raises(BundleError, match="needs the diffusion part"):
        DualTokenizer.from_preset("tiny", parts=("semantic",)).save_pretrained(tmp_path / "semantic-only")
        plan_training(load_config(STAGE_CONFIGS["reverse"], None, [*base[:1], f"bundle={tmp_path}/semantic-only",
                                                                   *base[2:]]))


# ---- Ray Train end to end --------------------------------------------------------------------------
def two_worker_overrides(inputs: str, bundle: str, output: str, storage_path: str, steps: int, every: int) -> list[str]:
    return [f"inputs={inputs}", f"bundle={bundle}", f"output={output}", f"storage_path={storage_path}",
            "num_workers=2", "batch_size=2", f"steps={steps}", f"checkpoint_every={every}", "lr=0.001",
            "warmup_steps=0", "min_lr=0.0001", "shuffle_buffer=0"]


def assert_same_tensors(a: torch.nn.Module, b: torch.nn.Module, keep=lambda name: True) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    names = [n for n in sa if keep(n.split(".")[0])]
    assert names and all(torch.equal(sa[n], sb[n]) for n in names)


def assert_trained(a: torch.nn.Module, b: torch.nn.Module, keep) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert any(not torch.equal(sa[n], sb[n]) for n in sa if keep(n.split(".")[0]))


def assert_tokenizes(bundle: DualTokenizer, photos: list) -> None:
    images = np.stack([to_model_input(torch.from_numpy(np.ascontiguousarray(im))[None], 256, torch.device("cpu"),
                                      torch.float32)[0].permute(1, 2, 0).mul(255).round().byte().numpy()
                       for _, im, _ in photos])
    tokens = bundle.tokenize(images)
    assert tokens.guide.shape == (len(photos), 64) and tokens.semantic.shape == (len(photos), 32)


@pytest.mark.slow  # one 2-worker Ray Train run on loopback S3: ~1 min on 2 cores
def test_guide_trains_on_s3_with_two_workers_exports_a_bundle_and_a_rerun_does_nothing(
    ray_session, s3, tiny, photos, capsys
):
    fs, bucket = s3.filesystem(), s3.new_bucket()
    write_sample_shards(f"s3://{bucket}/shards", count=16, per_shard=8, seed=2, storage_options=s3.storage_options)
    command = ["train", "guide", *two_worker_overrides(f"s3://{bucket}/shards/", "tiny", f"s3://{bucket}/bundles/guide",
                                                        f"s3://{bucket}/runs", steps=4, every=2),
               "dead_code_every=2", f"storage.endpoint_url={s3.url}", "name=guide-s3"]
    assert cli(command) == 0
    assert "finished 4 steps" in capsys.readouterr().out

    exported = DualTokenizer.from_pretrained(f"s3://{bucket}/bundles/guide", storage_options=s3.storage_options)
    provenance = f"trained: stage guide, run guide-s3, steps 4, from {tiny.fingerprint}"
    assert exported.info.sources["guide"] == provenance
    assert exported.info.sources["semantic"] == tiny.info.sources["semantic"]
    assert_same_tensors(exported.part("semantic"), tiny.part("semantic"))
    assert_same_tensors(exported.part("diffusion"), tiny.part("diffusion"))
    assert_trained(exported.part("guide"), tiny.part("guide"), lambda part: True)
    assert_tokenizes(exported, photos)

    fs.invalidate_cache()
    rows = [json.loads(line) for line in fs.cat_file(f"{bucket}/runs/guide-s3/metrics.jsonl").decode().splitlines()]
    assert [r[S.TRAIN_STEP] for r in rows] == [1, 2, 3, 4] and all(r[S.TRAIN_RESUMED_FROM] == 0 for r in rows)
    assert all(0 < r[S.TRAIN_CODEBOOK_USAGE] <= 1 and r[S.TRAIN_CODEBOOK_PERPLEXITY] >= 1 for r in rows)
    assert [S.TRAIN_DEAD_CODES in r for r in rows] == [False, True, False, True]
    assert rows[0][S.TRAIN_LR] == pytest.approx(1e-3) and rows[-1][S.TRAIN_LR] < rows[0][S.TRAIN_LR]
    checkpoints = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/runs/guide-s3") if "checkpoint_0" in p)
    assert checkpoints == ["checkpoint_0000000002", "checkpoint_0000000004"]

    marker_before = fs.cat_file(f"{bucket}/runs/guide-s3/_finished.json")
    assert cli(command) == 0  # the same command again: nothing retrains, nothing is rewritten
    assert "already finished" in capsys.readouterr().out
    fs.invalidate_cache()
    assert fs.cat_file(f"{bucket}/runs/guide-s3/_finished.json") == marker_before
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/runs/guide-s3") if "checkpoint_0" in p) == checkpoints


@pytest.mark.slow  # four 1-worker Ray Train runs, then a held-out tokenize and audit: ~2 min on 2 cores
def test_recipe_chains_stages_through_exported_bundles_audits_held_out_shards_and_a_rerun_does_nothing(
    ray_session, local_shards, tiny, photos, tmp_path, capsys
):
    """`dualtok recipe`: vae, unet, qformer, reverse from a changed preset (the guide and codebook
    stages run in the guide-on-S3 and kill tests), each reading the previous stage's bundle; the
    Q-Former's text tokenizer is trained on the captions; the held-out shards are tokenized with the
    last bundle and audited; the same command again retrains and rewrites nothing."""
    heldout = tmp_path / "heldout"
    write_sample_shards(str(heldout), count=4, per_shard=4, seed=9)
    command = ["recipe", f"inputs={local_shards}", f"heldout={heldout}", "bundle=tiny", f"output={tmp_path}/r",
               "stages=[reverse, qformer, unet, vae]", "preset_overrides={guide: {guide_size: 32}}",
               "every_stage={batch_size: 2, steps: 2, checkpoint_every: 2, lr: 0.001, warmup_steps: 0, "
               "min_lr: 0.0001, dead_code_every: 1}", "stage={unet: {caption_dropout: 0.5}}",
               "audit={sample_size: 2, steps: 2, size: 32}", "tokenize={encoder: {actors: 1}}"]
    assert cli(command) == 0
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "r" / "recipe.json").read_text())
    assert list(record["stages"]) == ["vae", "unet", "qformer", "reverse"]  # STAGES order, whatever the list's
    init = DualTokenizer.from_pretrained(tmp_path / "r" / "bundles" / "init")
    assert init.guide_size == 32 and init.info.untrained_parts == ["diffusion", "guide", "semantic"]
    previous = init
    for stage, step in record["stages"].items():
        assert step["steps"] == 2 and not step["already_finished"] and step["worker_cpu_seconds"] > 0
        exported = DualTokenizer.from_pretrained(step["bundle"])
        cls = STAGES[stage]
        trains = trained_parts(stage)
        assert_trained(exported.part(cls.part), previous.part(cls.part), trains)
        assert_same_tensors(exported.part(cls.part), previous.part(cls.part), lambda part, t=trains: not t(part))
        for other in {"guide", "semantic", "diffusion"} - {cls.part}:
            assert_same_tensors(exported.part(other), previous.part(other))
        assert exported.info.sources[cls.part].startswith(f"trained: stage {stage}, run {stage}, steps 2")
        previous = exported
    vae = DualTokenizer.from_pretrained(record["stages"]["vae"]["bundle"]).part("diffusion").vae
    assert vae.config.scaling_factor != init.part("diffusion").vae.config.scaling_factor  # 1 / the latents' std
    assert (tmp_path / "r" / "text_tokenizer" / "tokenizer.json").is_file()
    assert (tmp_path / "r" / "bundles" / "reverse" / TEXT_TOKENIZER_DIR / "tokenizer.json").is_file()
    assert previous.tokenize(photos[0][1][None]).guide.shape == (1, 16)

    held = record["heldout"]
    assert held["images"] == 4 and held["audited"] == 2 and held["errors"] == 0
    assert {"dual", "semantic-only", "guide-upsampled"} <= set(held["variants"])
    summary = json.loads((tmp_path / "r" / "heldout" / "audit" / "summary.json").read_text())
    assert summary["bundle"]["fingerprint"] == previous.fingerprint and "dual" in out

    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "r" / "bundles").rglob("*") if p.is_file()}
    assert cli(command) == 0
    again = json.loads((tmp_path / "r" / "recipe.json").read_text())
    assert all(step["already_finished"] for step in again["stages"].values())
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "r" / "bundles").rglob("*") if p.is_file()} == before


def test_recipe_plan_builds_and_checks_every_step_before_anything_runs(tmp_path):
    from dualtok.jobs.recipe import RecipeConfig, plan_recipe

    base = [f"inputs={tmp_path}/shards", "bundle=tiny", f"output={tmp_path}/r"]
    plan = plan_recipe(load_config(RecipeConfig, None, [*base, "heldout=h", "guide_sizes=[16]",
                                                        "every_stage={steps: 5, dead_code_every: 7}"]))
    assert [c.STAGE for c in plan.stages] == list(STAGE_CONFIGS)  # all of them, in the from-scratch order
    assert [c.bundle for c in plan.stages[1:]] == [c.output for c in plan.stages[:-1]]
    assert all(c.steps == 5 for c in plan.stages) and plan.stages[0].dead_code_every == 7
    assert plan.guides[0][1].output.endswith("bundles/guide-16px") and plan.audit.guide_bundles == [
        plan.guides[0][1].output]
    assert plan.tokenize.bundle == plan.audit.bundle == plan.stages[-1].output
    with pytest.raises(ConfigError, match="stage.vae.*kl_wieght"):  # a misspelt key fails before any work
        plan_recipe(load_config(RecipeConfig, None, [*base, "stage={vae: {kl_wieght: 1}}"]))
    with pytest.raises(ConfigError, match="every_stage.*typo_key|typo_key"):
        plan_recipe(load_config(RecipeConfig, None, [*base, "every_stage={typo_key: 1}"]))
    with pytest.raises(ConfigError, match="output: the recipe sets these"):
        load_config(RecipeConfig, None, [*base, "every_stage={output: x}"])
    with pytest.raises(ConfigError, match="stages must name"):
        load_config(RecipeConfig, None, [*base, "stages=[guide, decoder]"])
    with pytest.raises(ConfigError, match="not a preset|not one"):
        plan_recipe(load_config(RecipeConfig, None, [f"inputs={tmp_path}/s", f"bundle={tmp_path}/b",
                                                     f"output={tmp_path}/r", "guide_sizes=[16]"]))


# The Ray Train controller unpickles the callback below; pytest imports this file under a module
# name the controller cannot import, so this module's classes travel by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class KillWorkerAtCheckpoints(UserCallback):
    """Test only: SIGKILL a Ray Train worker once the first worker group has registered a
    checkpoint, and again once the group Ray Train restarted has registered one of its own.

    Runs in the Ray Train controller, whose parent is the node's raylet: the workers are its
    siblings, titled `ray::RayTrainWorker...`. Keying on registered checkpoints (not on step
    numbers) keeps the kills in step with what the controller will restore from.
    """

    def __init__(self) -> None:
        self.kills = 0

    def after_report(self, run_context, metrics, checkpoint) -> None:
        import psutil

        if checkpoint is None or self.kills >= 2:
            return
        restarted = metrics[0][S.TRAIN_RESUMED_FROM] > 0
        if restarted != (self.kills == 1):
            return
        raylet = psutil.Process(os.getpid()).parent()
        workers = [p for p in raylet.children() if p.status() != psutil.STATUS_ZOMBIE
                   and "RayTrainWorker" in " ".join(p.cmdline()[:1])]
        os.kill(max(workers, key=lambda p: p.create_time()).pid, signal.SIGKILL)
        self.kills += 1


@pytest.mark.slow  # three worker-group starts on 2 cores: ~2 min
def test_killed_workers_resume_from_checkpoints_and_a_rerun_continues_the_step_counter(
    ray_session, local_shards, tmp_path
):
    import ray.train

    steps, every = 12, 3
    # One worker per group start (each start imports torch): two DDP ranks run in the guide-on-S3 test.
    overrides = overriding(two_worker_overrides(str(local_shards), "tiny", str(tmp_path / "out"),
                                                str(tmp_path / "runs"), steps, every),
                           "max_failures=1", "name=killed", "num_workers=1")
    config = load_config(STAGE_CONFIGS["codebook"], None, overrides)
    # First kill: Ray Train restarts the workers from the latest checkpoint (max_failures=1).
    # Second kill: the run fails; rerunning the same command resumes from its latest checkpoint.
    with pytest.raises(ray.train.TrainingFailedError):
        train(config, callbacks=[KillWorkerAtCheckpoints()])
    layout = RunLayout(str(tmp_path / "runs"), "killed")
    assert layout.finished() is None and not (tmp_path / "out").exists()
    summary = train(config)
    assert summary.steps == steps and not summary.already_finished

    rows = layout.read_metrics()
    assert [r[S.TRAIN_STEP] for r in rows] == list(range(1, steps + 1))  # each step exactly once
    starts = sorted({r[S.TRAIN_RESUMED_FROM] for r in rows})
    assert len(starts) == 3 and starts[0] == 0 and all(s % every == 0 and 0 < s < steps for s in starts[1:]), starts
    for start in starts:  # a restarted worker group continues right after its checkpoint
        assert min(r[S.TRAIN_STEP] for r in rows if r[S.TRAIN_RESUMED_FROM] == start) == start + 1
    assert DualTokenizer.from_pretrained(tmp_path / "out").info.sources["semantic"].endswith(
        f"steps {steps}, from {DualTokenizer.from_preset('tiny').fingerprint}"
    )
    assert train(config).already_finished


def files_holding(root: Path, needles: list[str]) -> list[str]:
    """Every file under `root` whose bytes contain one of `needles`."""
    found = []
    for path in (p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        found += [f"{path}: {n}" for n in needles if n.encode() in data]
    return found


def overriding(base: list[str], *items: str) -> list[str]:
    """`base` overrides with `items` in place of the same keys (a key given twice is a config error)."""
    keys = {item.partition("=")[0] for item in items}
    return [item for item in base if item.partition("=")[0] not in keys] + list(items)


@pytest.mark.slow  # two 1-worker Ray Train runs on 2 cores: ~2 min
def test_a_rerun_with_another_config_stops_or_starts_a_new_run_and_no_credential_reaches_the_run(
    ray_session, s3, tmp_path, capsys, caplog, monkeypatch
):
    """Run 1 (inputs on loopback S3 with storage.key/secret set) dies after its first checkpoint.
    A rerun with another lr stops before training, naming lr; with on_config_change=new_run it
    trains a new run, and the old one stays as it was. No file the runs wrote (the local
    storage_path, the exported bundle, Ray's session logs) nor the job's output holds the credentials."""
    import ray
    import ray.train

    key, secret = "AKIAZ7DUALTOKTESTKEY", f"dualtok-secret-{os.getpid()}-xq7"  # moto accepts any credentials
    monkeypatch.setenv("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")  # Ray Train then stores each run's state
    bucket = s3.new_bucket()
    write_sample_shards(f"s3://{bucket}/shards", count=8, per_shard=8, seed=4, storage_options=s3.storage_options)
    runs, out = tmp_path / "runs", tmp_path / "out"
    base = overriding(two_worker_overrides(f"s3://{bucket}/shards/", "tiny", str(out), str(runs), steps=4, every=2),
                      "num_workers=1", "max_failures=0", "name=changes", f"storage.endpoint_url={s3.url}",
                      f"storage.key={key}", f"storage.secret={secret}")
    with pytest.raises(ray.train.TrainingFailedError):
        train(load_config(STAGE_CONFIGS["codebook"], None, base), callbacks=[KillWorkerAtCheckpoints()])
    old = RunLayout(str(runs), "changes")
    assert old.has_checkpoints() and old.finished() is None and old.record()["identity"]["lr"] == 0.001
    snapshot = sorted(str(p) for p in (runs / "changes").rglob("*"))

    changed = overriding(base, "lr=0.002", "steps=6")
    with pytest.raises(DualtokError, match=r"run changes .*lr: 0\.001 -> 0\.002; steps: 4 -> 6\. Rerun .*new_run"):
        train(load_config(STAGE_CONFIGS["codebook"], None, changed))
    resumable = overriding(base, "num_workers=2", "batch_size=1", "grad_accumulation=1", "checkpoint_every=3")
    assert train_plan_name(resumable) == "changes"  # same global batch (2), other policies: the same run
    with pytest.raises(DualtokError, match="global_batch: 2 -> 4"):
        train_plan_name(overriding(base, "grad_accumulation=2"))

    assert cli(["train", "codebook", *changed, "on_config_change=new_run"]) == 0
    (new_run,) = [p.name for p in runs.iterdir() if p.name != "changes"]
    assert new_run.startswith("changes-") and f"run {new_run} finished 6 steps" in capsys.readouterr().out
    record = RunLayout(str(runs), new_run).record()
    assert record["replaces"] == "changes" and record["identity"]["lr"] == 0.002
    assert record["config"]["storage"]["secret"] == "***"
    assert [r[S.TRAIN_STEP] for r in RunLayout(str(runs), new_run).read_metrics()] == [1, 2, 3, 4, 5, 6]
    provenance = DualTokenizer.from_pretrained(out).info.sources["semantic"]
    assert provenance.startswith(f"trained: stage codebook, run {new_run}")
    assert sorted(str(p) for p in (runs / "changes").rglob("*")) == snapshot and old.finished() is None
    assert train_plan_name([*changed, "on_config_change=new_run"]) == new_run  # a rerun resumes the new run

    logs = Path(ray._private.worker._global_node.get_session_dir_path())
    assert files_holding(tmp_path, [key, secret]) == [] and files_holding(logs, [key, secret]) == []
    # Ray Train's stored run state (its state actor, which the dashboard and export events serve)
    # keeps str() of train_loop_config: the plan is there, its credentials masked (both runs).
    from ray.train.v2._internal.state.state_actor import get_state_actor

    states = ray.get(get_state_actor().get_train_runs.remote()).values()
    stored = json.dumps([run.model_dump() for run in states if run.name in ("changes", new_run)], default=str)
    assert stored.count("WorkerPlan(") == 2 and "'secret': ***" in stored
    assert key not in stored and secret not in stored
    captured = capsys.readouterr()
    assert all(key not in text and secret not in text for text in (captured.out, captured.err, caplog.text))


def train_plan_name(overrides: list[str]) -> str:
    from dualtok.pipelines.train.plan import plan_training

    return plan_training(load_config(STAGE_CONFIGS["codebook"], None, overrides)).layout.name
