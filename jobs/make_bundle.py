"""`dualtok bundle`: assemble a bundle from released BLIP-2 or SEED / MoVQ / SD 1.x weights, or a preset.

    dualtok bundle --preset paper --blip2 s3://models/blip2-itm-vit-g --movq s3://models/kandinsky-2-2-decoder \
        --stable-diffusion s3://models/stable-diffusion-v1-5 --output s3://models/dualtok-paper
    dualtok bundle --preset paper --seed-tokenizer s3://models/seed-llama/seed_quantizer.pt ...

A checkpoint may be a local folder or any fsspec URI; a remote one is first copied to a temporary
folder, and only what the loaders read is copied (configs, tokenizer files, safetensors weights of the
parts dualtok uses, SEED's `seed_quantizer.pt`, which is read with weights_only=True), never other
pickles, other frameworks' weights, fp16 variants or unused pipeline parts.
"""

from __future__ import annotations

import argparse
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

from dualtok.pipelines.io.storage import StorageConfig
from dualtok.pipelines.io.storage import filesystem, join

logger = logging.getLogger(__name__)

# Where in a released folder each loader reads ("" is the folder itself).
CHECKPOINT_FOLDERS: dict[str, tuple[str, ...]] = {
    "blip2": ("",),
    "movq": ("", "movq"),  # a MoVQ folder, or a Kandinsky 2.2 decoder pipeline holding movq/
    "stable-diffusion": ("", "vae", "unet", "text_encoder", "tokenizer", "scheduler"),
    "seed-tokenizer": ("",),
    "unclip": ("", "vae", "unet", "text_encoder", "tokenizer", "scheduler", "image_normalizer",
               "image_noising_scheduler"),
}
_SEED_FILES = frozenset({"seed_quantizer.pt", "seed_quantizer.safetensors", "model.safetensors"})
_CONFIG_FILES = frozenset({
    "config.json", "model_index.json", "scheduler_config.json", "vocab.json", "merges.txt", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
})
# model.safetensors, diffusion_pytorch_model-00001-of-00003.safetensors, and their index files.
_WEIGHT_FILE = re.compile(r"(diffusion_pytorch_model|model)(-\d+-of-\d+)?\.safetensors(\.index\.json)?")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", required=True, help="tiny, small or paper: the shapes no checkpoint fixes")
    parser.add_argument("--blip2", metavar="URI", help="BLIP-2 folder in transformers format (ViT + Q-Former); "
                        "the stage-1 retrieval checkpoint (blip2-itm-vit-g) keeps the contrastive heads")
    parser.add_argument("--seed-tokenizer", metavar="URI",
                        help="SEED / SEED-LLaMA tokenizer: seed_quantizer.pt (read with weights_only=True) or its "
                             "safetensors conversion, or the folder holding it; instead of --blip2")
    parser.add_argument("--movq", metavar="URI",
                        help="Kandinsky 2.2 MoVQ folder in diffusers format, or a decoder pipeline with movq/")
    parser.add_argument("--stable-diffusion", metavar="URI", help="Stable Diffusion 1.x folder in diffusers format")
    parser.add_argument("--unclip", metavar="URI",
                        help="stable-diffusion-2-1-unclip folder in diffusers format: SEED's decoder, conditioned on "
                             "the image embeddings of --seed-tokenizer's unCLIP head; instead of --stable-diffusion")
    parser.add_argument("--semantic-fit", choices=("resize", "center_crop"), default="resize",
                        help="how a semantic branch loaded from --blip2 / --seed-tokenizer sees an image: resized "
                             "whole to 224 x 224, as BLIP-2 and SEED were trained (default), or its centre square")
    parser.add_argument("--guide-size", type=int, metavar="PX",
                        help="guide image size, 16/32/64/128 (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every tensor left at its random init")
    parser.add_argument("--output", required=True, metavar="URI", help="bundle folder (path, file://, s3://)")
    parser.add_argument("--overwrite", action="store_true", help="replace a bundle already at --output")
    parser.add_argument("--endpoint-url", metavar="URL", help="S3-compatible endpoint (else AWS_ENDPOINT_URL or AWS)")


def run(args: argparse.Namespace) -> int:
    from dualtok_core.errors import BundleError
    from dualtok_core.pretrained import assemble_bundle

    options = StorageConfig(endpoint_url=args.endpoint_url).storage_options()
    fs, root = filesystem(join(args.output, "bundle.json"), options or None)
    if fs.exists(root) and not args.overwrite:
        raise BundleError(f"{args.output} already holds a bundle; pass --overwrite to replace it")
    if args.stable_diffusion and args.unclip:
        raise BundleError("give one diffusion checkpoint: --stable-diffusion or --unclip, not both")
    given = {"blip2": args.blip2, "seed-tokenizer": args.seed_tokenizer, "movq": args.movq,
             "stable-diffusion": args.stable_diffusion, "unclip": args.unclip}
    overrides = {"guide_size": args.guide_size} if args.guide_size is not None else {}
    with tempfile.TemporaryDirectory(prefix="dualtok-checkpoints-") as tmp:
        local = {
            kind: fetch_checkpoint(uri, kind, Path(tmp) / kind, options) if uri else None
            for kind, uri in given.items()
        }
        tokenizer, reports = assemble_bundle(
            args.preset, blip2=local["blip2"], movq=local["movq"],
            stable_diffusion=local["stable-diffusion"] or local["unclip"],
            seed_tokenizer=local["seed-tokenizer"], semantic_fit=args.semantic_fit, seed=args.seed,
            guide_overrides=overrides,
            origins={"semantic": args.blip2 or args.seed_tokenizer, "guide": args.movq,
                     "diffusion": args.stable_diffusion or args.unclip},
        )
        tokenizer.save_pretrained(args.output, storage_options=options or None)
    for part, report in reports.items():
        print(f"{part:10s} {report.summary()}")
    print(f"bundle     {args.output}  (preset {args.preset}, fingerprint {tokenizer.fingerprint})")
    if tokenizer.info.untrained_parts:
        print(f"NOTE: {', '.join(tokenizer.info.untrained_parts)} hold random tensors (listed above); "
              "docs/weights.md says which training stages fit them.")
    return 0


def fetch_checkpoint(uri: str, kind: str, target: Path, storage_options: dict[str, Any]) -> Path:
    """A local folder holding the checkpoint: `uri` itself when local, else a copy of what the loader reads."""
    from dualtok_core.errors import BundleError

    if "://" not in uri or uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    fs, root = filesystem(uri, storage_options or None)
    root = root.rstrip("/")
    if kind == "seed-tokenizer" and fs.isfile(root):  # a SEED release is one file
        target.mkdir(parents=True, exist_ok=True)
        fs.get_file(root, str(target / root.rpartition("/")[2]))
        return target / root.rpartition("/")[2]
    wanted = [path for path in fs.find(root) if _wanted(path[len(root):].lstrip("/"), kind)]
    if not wanted:
        raise BundleError(f"{uri} holds no {kind} checkpoint files (config.json, *.safetensors)")
    for path in wanted:
        local = target / path[len(root):].lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(path, str(local))
    logger.info("fetched %d files of %s to %s", len(wanted), uri, target)
    return target


def _wanted(relative: str, kind: str) -> bool:
    folder, _, name = relative.rpartition("/")
    if kind == "seed-tokenizer":
        return folder == "" and name in _SEED_FILES
    return folder in CHECKPOINT_FOLDERS[kind] and (name in _CONFIG_FILES or bool(_WEIGHT_FILE.fullmatch(name)))
