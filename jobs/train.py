"""`dualtok train <stage>`: one stage of the tokenizer as a Ray Train job, ending in a bundle.

    dualtok train guide    inputs=s3://b/shards/ bundle=small output=s3://b/bundles/guide storage_path=s3://b/runs
    dualtok train qformer  inputs=... bundle=s3://b/bundles/guide text_tokenizer=/models/bert-base-uncased ...
    dualtok train codebook inputs=... bundle=s3://b/bundles/qformer ...
    dualtok train reverse  inputs=... bundle=s3://b/bundles/codebook ...

The stage configs and the Ray Train run live in `dualtok.pipelines.train`; this module is the command.
"""

from __future__ import annotations

import argparse

from dualtok.jobs.config import add_config_arguments, config_from_args
from dualtok.pipelines.train.config import STAGE_CONFIGS, TrainConfig
from dualtok.pipelines.train.run import TrainSummary, train


def print_summary(summary: TrainSummary) -> None:
    if summary.already_finished:
        print(f"train {summary.stage}: run {summary.run} already finished ({summary.steps} steps); nothing to do")
    else:
        speed = f", {summary.images_per_second:.1f} images/s" if summary.images_per_second else ""
        loss = f"; loss {summary.first_loss:.4g} -> {summary.last_loss:.4g}" if summary.last_loss is not None else ""
        print(f"train {summary.stage}: run {summary.run} finished {summary.steps} steps in {summary.seconds:.0f} s"
              f"{speed}{loss}")
    print(f"bundle:  {summary.output}  (fingerprint {summary.fingerprint}, from {summary.input_fingerprint})")
    print(f"run:     {summary.run_dir}  (checkpoints, metrics.jsonl)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stage", choices=list(STAGE_CONFIGS), help="the stage to train (paper sec. 3.1-3.2)")
    add_config_arguments(parser, TrainConfig, variants=STAGE_CONFIGS)
    parser.set_defaults(_config_type=lambda args: STAGE_CONFIGS[args.stage])  # --print-config


def run(args: argparse.Namespace) -> int:
    config = config_from_args(STAGE_CONFIGS[args.stage], args)
    print_summary(train(config))
    return 0
