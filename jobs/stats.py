"""`dualtok stats`: corpus statistics without reconstruction (also `dualtok audit --stats-only`).

Rows, errors by reason, token histograms, codebook usage and perplexity, dead codes and duplicate
token sequences, from one streaming pass over the corpus files on the driver (no Ray needed).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from dualtok.pipelines.io.storage import StorageConfig

from dualtok.jobs.config import add_config_arguments, config_from_args

logger = logging.getLogger(__name__)

STATS_FILE, STATS_REPORT = "stats.json", "stats.html"


@dataclass(frozen=True)
class StatsConfig:
    corpus: str = ""  # the token corpus (the tokenize job's output)
    output: str = ""  # where stats.json and stats.html go; empty: print only
    top_duplicates: int = 10  # most repeated token sequences listed, with example keys
    storage: StorageConfig = StorageConfig()

    def __post_init__(self) -> None:
        if not self.corpus:
            raise ValueError("corpus is empty: give the token corpus URI (the tokenize job's output)")
        if self.top_duplicates < 0:
            raise ValueError(f"top_duplicates must be >= 0, got {self.top_duplicates}")


def write_statistics(corpus: str, output: str, storage_options: dict[str, Any],
                     top_duplicates: int = 10) -> dict[str, Any]:
    """Compute the statistics; when `output` is set, also commit stats.json and stats.html there."""
    from dualtok.pipelines.audit.report import render_stats_report
    from dualtok.pipelines.audit.stats import corpus_statistics
    from dualtok.pipelines.io.outputs import OutputFolder

    stats = corpus_statistics(corpus, storage_options or None, top_duplicates)
    if output:
        out = OutputFolder(output, storage_options)
        generated = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        out.write(json.dumps(stats, sort_keys=True).encode(), STATS_FILE)
        out.write(render_stats_report(stats, generated).encode(), STATS_REPORT)
        logger.info("corpus statistics written to %s", out.uri(STATS_REPORT))
    return stats


def print_statistics(stats: dict[str, Any], output: str, as_json: bool = False) -> None:
    """The statistics on stdout: a few lines for people, or with `as_json` one JSON object only."""
    from dualtok.pipelines.io.storage import join

    if as_json:
        record = {"job": "stats", "exit_code": 0, "output": output or None,
                  "report": join(output, STATS_REPORT) if output else None, "statistics": stats}
        print(json.dumps(record, sort_keys=True, default=str))
        return
    print(f"corpus:  {stats['corpus']}  ({stats['shards']} shards, fingerprint {stats['corpus_fingerprint']}, "
          f"bundle {stats['bundle_fingerprint']})")
    print(f"rows:    {stats['rows']} of {stats['samples']} samples; {stats['errors']} errors")
    for reason, count in stats["by_reason"].items():
        print(f"           {count:>8}  {reason}")
    for name, s in stats["streams"].items():
        codes = (f"usage {s['codes_used']}/{s['vocab']} ({s['usage']:.1%}), perplexity {s['perplexity']:.1f}, "
                 f"{s['dead_codes']} dead codes; ") if "vocab" in s else ""
        print(f"{name + ':':<16} {codes}{s['duplicate_rows']} duplicate rows in {s['duplicate_groups']} groups")
    if output:
        print(f"report:  {join(output, STATS_REPORT)}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, StatsConfig)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(StatsConfig, args)
    stats = write_statistics(config.corpus, config.output, config.storage.storage_options(), config.top_duplicates)
    print_statistics(stats, config.output, as_json=getattr(args, "json", False))
    return 0
