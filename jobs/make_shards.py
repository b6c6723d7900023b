"""`dualtok shards`: write WebDataset shards (img2dataset's layout) from a folder, a path list, or sample photos.

Credentials for s3:// come from the standard AWS environment variables or profile; only the
endpoint is given here, and nothing about credentials is printed.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dualtok_core.errors import DualtokError
from dualtok.pipelines.config import ConfigError
from dualtok.pipelines.shards.photos import write_sample_shards
from dualtok.pipelines.shards.writer import (
    DEFAULT_PATH_COLUMN,
    ShardWriterConfig,
    ShardWriteSummary,
    sources_from_folder,
    sources_from_table,
    write_shards,
)

_DEFAULTS = ShardWriterConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-folder", metavar="PATH", help="folder of images (recursive; captions from <name>.txt)")
    source.add_argument("--from-table", metavar="PATH", help=".parquet or .csv listing image paths (and captions)")
    source.add_argument("--sample-photos", type=int, metavar="N",
                        help="N photos made from scikit-image's samples (JPEG, quality 90)")
    parser.add_argument("--output", required=True, metavar="URI",
                        help="folder or prefix for the shards (path, file://, s3://)")
    parser.add_argument("--per-shard", type=int, default=_DEFAULTS.samples_per_shard, metavar="N",
                        help="samples per shard")
    parser.add_argument("--images", choices=["keep", "jpeg"], default=_DEFAULTS.images,
                        help="keep: original bytes as they are; jpeg: re-encode to JPEG")
    parser.add_argument("--quality", type=int, default=_DEFAULTS.jpeg_quality, help="JPEG quality for --images jpeg")
    parser.add_argument("--path-column", default=DEFAULT_PATH_COLUMN, help="path column of --from-table")
    parser.add_argument("--caption-column", default=None,
                        help="caption column of --from-table (default: 'caption' when the table has one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --sample-photos variants")
    parser.add_argument("--workers", type=int, default=_DEFAULTS.workers, help="shards written at once")
    parser.add_argument("--overwrite", action="store_true",
                        help="rewrite shards an earlier run already finished from the same input")
    parser.add_argument("--endpoint-url", metavar="URL", help="S3-compatible endpoint (else AWS_ENDPOINT_URL or AWS)")


def run(args: argparse.Namespace) -> int:
    try:
        summary = _write(args)
    except (DualtokError, ConfigError) as err:  # the user's input is wrong: say what, no traceback
        print(f"dualtok shards: error: {err}", file=sys.stderr)
        return 2
    _print_summary(summary)
    return 0


def _write(args: argparse.Namespace) -> ShardWriteSummary:
    options: dict[str, Any] = {"client_kwargs": {"endpoint_url": args.endpoint_url}} if args.endpoint_url else {}
    if args.sample_photos is not None:
        return write_sample_shards(args.output, args.sample_photos, args.per_shard, args.seed, options or None)
    config = ShardWriterConfig(
        samples_per_shard=args.per_shard, images=args.images, jpeg_quality=args.quality,
        workers=args.workers, overwrite=args.overwrite,
    )
    if args.from_folder is not None:
        sources = sources_from_folder(args.from_folder, options or None)
    else:
        sources = sources_from_table(args.from_table, args.path_column, args.caption_column, options or None)
    return write_shards(sources, args.output, config, options or None)


def _print_summary(summary: ShardWriteSummary) -> None:
    skipped = f" ({summary.skipped_shards} already done, skipped)" if summary.skipped_shards else ""
    print(f"{len(summary.shards)} shards in {summary.output}{skipped}")
    print(f"{summary.samples} samples: {summary.successes} written, {summary.failed} failed")
    for reason, count in summary.failures.items():
        print(f"  {reason}: {count}")
