"""`dualtok demo`: the README's first command. No arguments, no downloads, a local Ray.

1. writes WebDataset shards of the photos scikit-image ships (img2dataset's layout);
2. tokenizes them with the `small` preset through the real pipeline (`dualtok tokenize`);
3. prints where the corpus is and a few rows, and re-renders a couple of images from their
   tokens (guide image + diffusion) into PNGs so there is something to look at.
It says plainly that preset weights are random-initialised.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="dualtok-demo", help="where shards, corpus and images go")
    parser.add_argument("--photos", type=int, default=64, help="how many sample photos to tokenize")
    parser.add_argument("--per-shard", type=int, default=16)
    parser.add_argument("--preset", default="small", choices=["tiny", "small"])
    parser.add_argument("--reconstruct", type=int, default=2, help="images to re-render from tokens (0: none)")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps for the re-rendering")


def run(args: argparse.Namespace) -> int:
    from dualtok.pipelines.cluster import RayConfig, init_ray
    from dualtok.pipelines.tokenize.config import TokenizeConfig, cpu_node_resources, plan_from_config
    from dualtok.jobs.tokenize import print_summary
    from dualtok.pipelines.shards.photos import write_sample_shards
    from dualtok.pipelines.tokenize.pipeline import run_tokenize

    workdir = Path(args.workdir).resolve()
    shards, corpus = workdir / "shards", workdir / "corpus"
    written = write_sample_shards(str(shards), count=args.photos, per_shard=args.per_shard)
    print(f"shards:   {len(written.shards)} WebDataset shards of {written.successes} photos in {shards}")
    read_cpus, encoder = cpu_node_resources(os.cpu_count() or 1)  # the demo runs on this machine's CPUs
    config = TokenizeConfig(inputs=[str(shards)], output=str(corpus), bundle=args.preset, read_cpus=read_cpus,
                            encoder=encoder, ray=RayConfig())
    plan = plan_from_config(config)
    init_ray(config.ray, min_cpus=plan.required_cpus)
    summary = run_tokenize(plan)
    print_summary(summary)
    _show_rows(corpus)
    if args.reconstruct > 0:
        _reconstruct(corpus, workdir, args)
    print(f"\nnext: dualtok tokenize inputs={shards} output=<your corpus> bundle=<your bundle>  "
          "(see README.md for S3, clusters, training and audits)")
    return 0


def _show_rows(corpus: Path) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(corpus / "data")
    print(f"\n{table.num_rows} rows; schema: " + ", ".join(f"{f.name}: {f.type}" for f in table.schema))
    for row in table.slice(0, 3).to_pylist():
        guide, semantic = row["guide_tokens"], row["semantic_tokens"]
        print(f"  {row['key']}  {row['width']}x{row['height']}  {row['caption']!r}\n"
              f"    guide ({len(guide)}): {guide[:12]} ...\n    semantic ({len(semantic)}): {semantic[:12]} ...")


def _reconstruct(corpus: Path, workdir: Path, args: argparse.Namespace) -> None:
    """Re-render the first rows from their tokens and save original-size-free PNG strips."""
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    from dualtok_core.bundle import DualTokenizer

    table = pq.read_table(corpus / "data").slice(0, args.reconstruct)
    guide_ids = np.stack(table["guide_tokens"].to_numpy(zero_copy_only=False)).astype(np.int64)
    semantic_ids = np.stack(table["semantic_tokens"].to_numpy(zero_copy_only=False)).astype(np.int64)
    tokenizer = DualTokenizer.from_preset(args.preset)
    guides = tokenizer.guide_images(guide_ids)
    images = tokenizer.detokenize(guide_ids, semantic_ids, size=256, steps=args.steps)
    out = workdir / "reconstructions"
    out.mkdir(parents=True, exist_ok=True)
    for key, guide, image in zip(table["key"].to_pylist(), guides, images):
        strip = np.concatenate([np.asarray(Image.fromarray(guide).resize((256, 256), Image.NEAREST)), image], axis=1)
        Image.fromarray(strip).save(out / f"{key}.png")
    print(f"\nre-rendered {len(images)} images from their tokens (guide | reconstruction): {out}")
    if tokenizer.info.untrained_parts:
        print("NOTE: these come from random-initialised weights: expect noise, not photos. Train the stages "
              "(`dualtok train ...`) or load released weights into a bundle for real reconstructions.")
