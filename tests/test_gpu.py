"""GPU checks (run with `bash scripts/test.sh -m gpu` on a CUDA machine; deselected elsewhere).

bf16 weights change the features slightly, so ids may differ from fp32 where two codes are
nearly equidistant; the agreement bound below is what a healthy bf16 path keeps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dualtok_core.bundle import DualTokenizer
from tests.shard_factory import photo_images

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.timeout(600),
]


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    from dualtok.pipelines.io.decode import DecodeConfig, decode_image
    from tests.shard_factory import encode

    return np.stack([decode_image(encode(im), DecodeConfig(size=256)).pixels for im in photo_images(16, seed=1)])


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_bf16_cuda_tokens_agree_with_fp32_cpu(preset, images):
    cpu = DualTokenizer.from_preset(preset, parts=("guide", "semantic"))
    gpu = DualTokenizer.from_preset(preset, parts=("guide", "semantic")).to("cuda", torch.bfloat16)
    ref, got = cpu.tokenize(images), gpu.tokenize(images)
    assert got.guide.shape == ref.guide.shape and got.semantic.dtype == np.uint16
    assert (got.guide == ref.guide).mean() > 0.9
    assert (got.semantic == ref.semantic).mean() > 0.8


def test_detokenize_on_cuda_is_seeded(images):
    tok = DualTokenizer.from_preset("small").to("cuda", torch.bfloat16)
    tokens = tok.tokenize(images[:2])
    a = tok.detokenize(tokens.guide, tokens.semantic, size=256, steps=10, seed=3)
    b = tok.detokenize(tokens.guide, tokens.semantic, size=256, steps=10, seed=3)
    assert a.shape == (2, 256, 256, 3)
    np.testing.assert_array_equal(a, b)


def test_tokenize_pipeline_on_gpu_actors(ray_session, tmp_path):
    import pyarrow.parquet as pq

    from dualtok.jobs.cli import main as cli
    from dualtok.pipelines.shards.photos import write_sample_shards

    write_sample_shards(str(tmp_path / "shards"), count=32, per_shard=8)
    assert cli(["tokenize", f"inputs={tmp_path / 'shards'}", f"output={tmp_path / 'corpus'}", "bundle=small",
                "encoder.gpus_per_actor=1"]) == 0
    assert pq.read_table(tmp_path / "corpus" / "data").num_rows == 32
