"""The plain script users write instead of `dualtok tokenize`: the baseline of the benchmark.

A torch `DataLoader` over the WebDataset shards (the `webdataset` package), the pipeline's own
decode (`dualtok.pipelines.io.decode.decode_image`), the same bundle and batch size, and one `.npy` per
image, as LlamaGen's `extract_codes_c2i.py` writes its codes. Nothing here is tuned beyond what
such a script does; `--workers` is the one knob the benchmark sweeps to give it its best case.

    python benchmarks/plain_dataloader.py --inputs 's3://bucket/shards/{00000..00015}.tar' \
        --output /tmp/codes --workers 1 --batch-size 16

It computes in float32 unless `--dtype bfloat16`: the weights as the bundle stores them, as such a
script does unless its author casts them.

S3 is read through fsspec (`AWS_ENDPOINT_URL` and the usual AWS variables pick the endpoint).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

import fsspec
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from dualtok.pipelines.io.decode import DecodeConfig, decode_image
from dualtok.pipelines.actors import BundleSource

logger = logging.getLogger(__name__)


def _open_with_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> Any:
    """webdataset has no s3:// opener; users register fsspec's, which is what this is."""
    return fsspec.open(url, mode).open()


wds.gopen_schemes["s3"] = _open_with_fsspec


def _decoder(size: int) -> Any:
    config = DecodeConfig(size=size)

    def decode(sample: dict[str, Any]) -> tuple[str, np.ndarray]:
        return sample["__key__"], decode_image(sample["jpg"], config).pixels  # (S, S, 3) uint8

    return decode


def make_loader(inputs: str, size: int, batch_size: int, workers: int) -> DataLoader:
    dataset = (
        wds.WebDataset(inputs, shardshuffle=False, empty_check=False)
        .map(_decoder(size))
    )
    # webdataset splits shards across DataLoader workers; each worker batches its own samples.
    return DataLoader(dataset.batched(batch_size, partial=True), batch_size=None, num_workers=workers,
                      prefetch_factor=4 if workers else None, persistent_workers=False)


def extract(inputs: str, output: str, bundle: str, batch_size: int, workers: int, seed: int = 0,
            dtype: str = "float32") -> dict[str, Any]:
    """Tokenize every image of `inputs` into `output/<key>.npy` (guide ids then semantic ids, uint16)."""
    started = time.monotonic()
    tokenizer = BundleSource(bundle, seed=seed).load(("guide", "semantic")).to(getattr(torch, dtype))
    size = max(tokenizer.part("guide").config.image_size, tokenizer.part("semantic").config.image_size)
    os.makedirs(output, exist_ok=True)
    images = 0
    for keys, pixels in make_loader(inputs, size, batch_size, workers):
        guide = tokenizer.encode_guide(pixels)  # (B, h*w) uint16
        semantic = tokenizer.encode_semantic(pixels)  # (B, 32) uint16
        for i, key in enumerate(keys):
            np.save(os.path.join(output, f"{key}.npy"), np.concatenate([guide[i], semantic[i]]))
        images += len(keys)
    if not images:
        raise RuntimeError(f"no images read from {inputs}")
    seconds = time.monotonic() - started
    return {"images": images, "seconds": seconds, "images_per_second": images / seconds, "workers": workers,
            "batch_size": batch_size, "torch_threads": torch.get_num_threads(), "dtype": dtype}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", required=True, help="shard URL(s), webdataset brace syntax")
    parser.add_argument("--output", required=True, help="local folder for the .npy files")
    parser.add_argument("--bundle", default="small", help="preset name or bundle path/URI")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader worker processes (0: decode inline)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    # float32: the weights as a bundle stores them, what a script that does not cast them computes in
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", help="write the result here as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = extract(args.inputs, args.output, args.bundle, args.batch_size, args.workers, args.seed, args.dtype)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
