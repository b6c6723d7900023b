"""`dualtok export`: a token corpus -> LLM training sequences (Megatron-LM / NeMo indexed datasets,
MosaicML Streaming MDS, WebDataset tars or Parquet), by the sequence contract, with an optional
held-out split and packing; resumable per shard.

    dualtok export corpus=s3://b/corpus output=s3://b/export text_tokenizer=/models/llama-tokenizer \
        format=megatron heldout_fraction=0.01

Exit codes: 0 done; 2 a config or input error (checked before Ray starts: no corpus, no tokenizer,
an output holding an export with other settings, format=mds without mosaicml-streaming).
"""

from __future__ import annotations

import argparse
import json
import sys

from dualtok.jobs.checks import check_output
from dualtok.jobs.config import add_config_arguments, config_from_args
from dualtok.pipelines.cluster import init_ray
from dualtok.pipelines.io.corpus import MARKERS_DIR
from dualtok.pipelines.io.storage import filesystem, join
from dualtok.pipelines.progress import format_duration
from dualtok.pipelines.sequences.export import ExportConfig, ExportSummary, run_export


def print_summary(summary: ExportSummary, as_json: bool = False) -> None:
    if as_json:
        record = {"job": "export", "exit_code": 0, "output": summary.output,
                  "shards": {"total": summary.shards_total, "committed": summary.shards_committed,
                             "skipped": summary.shards_skipped},
                  "rows": summary.rows, "tokens": summary.tokens, "sequences": summary.sequences,
                  "seconds": round(summary.seconds, 3), "contract": summary.contract}
        print(json.dumps(record, sort_keys=True))
        return
    print(f"export: {summary.shards_committed} shards exported, {summary.shards_skipped} already done "
          f"(of {summary.shards_total}) in {format_duration(summary.seconds)}")
    for split in ("train", "heldout"):
        print(f"  {split + ':':<9}{summary.rows[split]} rows -> {summary.sequences[split]} sequences, "
              f"{summary.tokens[split]} tokens")
    print(f"output:   {summary.output}  (contract {summary.contract.get('version')}, vocabulary "
          f"{summary.contract.get('text_vocab')} text ids + image ids; tokenizer/ holds the extended tokenizer)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, ExportConfig)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(ExportConfig, args)
    options = config.storage.storage_options()
    fs, markers = filesystem(join(config.corpus, MARKERS_DIR), options or None)
    if not fs.exists(markers):
        print(f"dualtok export: error: corpus {config.corpus} holds no committed shards (no {MARKERS_DIR}/ folder)",
              file=sys.stderr)
        return 2
    check_output(config.output, options)
    init_ray(config.ray, min_cpus=config.task_cpus)
    print_summary(run_export(config), as_json=getattr(args, "json", False))
    return 0
