"""CPU images/s of DualTokenizer.tokenize and .detokenize per preset, in one process.

    python benchmarks/core_throughput.py [--presets tiny small] [--batch 8] [--repeats 3]

Prints images/s (best of `repeats`, after one warm-up) and the thread count used; run it on an
idle machine, it measures absolute speed (the pipeline benchmarks report ratios instead).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from dualtok_core.bundle import DualTokenizer
from dualtok.pipelines.io.decode import DecodeConfig, decode_image
from dualtok.pipelines.shards.photos import encode_jpeg, sample_photos

DETOKENIZE = {"tiny": dict(size=64, steps=4), "small": dict(size=256, steps=10), "paper": dict(size=512, steps=25)}


def best_rate(fn, images: int, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return images / best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    photos = sample_photos(args.batch)
    images = np.stack([decode_image(encode_jpeg(im), DecodeConfig(size=256)).pixels for _, im, _ in photos])
    print(f"torch threads: {torch.get_num_threads()}, batch {args.batch}")
    for name in args.presets:
        tok = DualTokenizer.from_preset(name)
        tokens = tok.tokenize(images)
        settings = DETOKENIZE[name]
        tok_rate = best_rate(lambda: tok.tokenize(images), args.batch, args.repeats)
        few = slice(0, 2)
        detok_rate = best_rate(lambda: tok.detokenize(tokens.guide[few], tokens.semantic[few], **settings), 2, 1)
        print(f"{name:6s} tokenize {tok_rate:7.2f} images/s | detokenize ({settings['size']} px, "
              f"{settings['steps']} steps) {detok_rate:6.2f} images/s")


if __name__ == "__main__":
    main()
