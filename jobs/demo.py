"""`dualtok demo`: the README's first command. No arguments, no downloads, a local Ray.

1. writes WebDataset shards of the photos scikit-image ships (img2dataset's layout);
2. tokenizes them through the real pipeline (`dualtok tokenize`) with the bundle shipped in the
   package (`DEMO_BUNDLE`): the `tiny` bundle trained from scratch by the reproduction recipe
   (benchmarks/reproduction/recipe.yaml, 39 photos, 64 px renders; its bundle.json names the
   recipe, the data and the code that made it);
3. prints where the corpus is and a few rows, and re-renders a few images from their tokens
   (guide image + diffusion) into PNG strips beside the originals.
It says plainly what the weights are: a 3-million-parameter tokenizer trained on 39 photos for
about an hour of CPU, which renders the layout and colours of a photo, not its detail; and, with
`--preset`, that preset weights are random-initialised.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

# The tiny bundle trained by benchmarks/reproduction/recipe.yaml (docs/reproduction.md), shipped as package data.
DEMO_BUNDLE = Path(__file__).resolve().parent / "demo_bundle"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="dualtok-demo", help="where shards, corpus and images go")
    parser.add_argument("--photos", type=int, default=64, help="how many sample photos to tokenize")
    parser.add_argument("--per-shard", type=int, default=16)
    parser.add_argument("--bundle", default=str(DEMO_BUNDLE),
                        help="the bundle to tokenize with (default: the trained demo bundle shipped in the package)")
    parser.add_argument("--preset", choices=["tiny", "small"],
                        help="tokenize with a preset's random-initialised weights instead of --bundle")
    parser.add_argument("--reconstruct", type=int, default=4, help="images to re-render from tokens (0: none)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps for the re-rendering")


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
    bundle = args.preset or args.bundle
    config = TokenizeConfig(inputs=[str(shards)], output=str(corpus), bundle=bundle, read_cpus=read_cpus,
                            encoder=encoder, ray=RayConfig())
    plan = plan_from_config(config)
    init_ray(config.ray, min_cpus=plan.required_cpus)
    summary = run_tokenize(plan)
    print_summary(summary)
    _show_rows(corpus)
    if args.reconstruct > 0:
        _reconstruct(corpus, workdir, bundle, args)
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


def _reconstruct(corpus: Path, workdir: Path, bundle: str, args: argparse.Namespace) -> None:
    """Re-render the first rows from their tokens: PNG strips of original | guide | reconstruction,
    each shown at 256 px (the demo bundle renders 64 px: nearest-neighbour enlarged, not upscaled)."""
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    from dualtok_core.bundle import DualTokenizer
    from dualtok.pipelines.io.shards import iter_samples

    table = pq.read_table(corpus / "data").slice(0, args.reconstruct)
    guide_ids = np.stack(table["guide_tokens"].to_numpy(zero_copy_only=False)).astype(np.int64)
    semantic_ids = np.stack(table["semantic_tokens"].to_numpy(zero_copy_only=False)).astype(np.int64)
    tokenizer = DualTokenizer.from_preset(args.preset) if args.preset else DualTokenizer.from_pretrained(bundle)
    size = int(tokenizer.part("diffusion").vae.config.sample_size)
    guides = tokenizer.guide_images(guide_ids)
    images = tokenizer.detokenize(guide_ids, semantic_ids, size=size, steps=args.steps)
    originals = _originals(table, workdir / "shards", iter_samples)
    out = workdir / "reconstructions"
    out.mkdir(parents=True, exist_ok=True)
    show = 256
    for key, guide, image in zip(table["key"].to_pylist(), guides, images):
        panels = [originals.get(key), guide, image]
        strip = np.concatenate([_square(p, show) for p in panels if p is not None], axis=1)
        Image.fromarray(strip).save(out / f"{key}.png")
    print(f"\nre-rendered {len(images)} images at {size} px from their tokens (original | guide | "
          f"reconstruction): {out}")
    if tokenizer.info.untrained_parts:
        print("NOTE: these come from random-initialised weights: expect noise, not photos. Train the stages "
              "(`dualtok recipe`, `dualtok train ...`) or load released weights into a bundle for real reconstructions.")
    elif tokenizer.info.provenance:
        print("NOTE: the demo bundle is a 3M-parameter tokenizer trained from scratch on 39 photos for about an "
              "hour of CPU (benchmarks/reproduction/recipe.yaml): it keeps a photo's layout and colours, not its "
              "detail. Real use needs a bundle trained at scale or made from released weights (`dualtok bundle`).")


def _originals(table, shards: Path, iter_samples) -> dict[str, "np.ndarray"]:
    """The re-rendered rows' original images, read back from their source shards in `shards`."""
    import io

    import numpy as np
    from PIL import Image

    wanted, found = set(table["key"].to_pylist()), {}
    for shard in sorted(set(table["shard"].to_pylist())):
        for sample in iter_samples(str(shards / f"{shard}.tar")):
            if sample.key in wanted and sample.image_bytes() is not None:
                found[sample.key] = np.asarray(Image.open(io.BytesIO(sample.image_bytes()[1])).convert("RGB"))
    return found


def _square(image: "np.ndarray", size: int) -> "np.ndarray":
    """The centre square of `image`, resized to `size` (nearest when enlarging, to show pixels as they are)."""
    import numpy as np
    from PIL import Image

    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    crop = Image.fromarray(np.ascontiguousarray(image[top:top + side, left:left + side]))
    return np.asarray(crop.resize((size, size), Image.NEAREST if side < size else Image.BICUBIC))
