"""`dualtok tokenize`: the main job, from its config to the pipeline and an exit code.

Exit codes: 0 every pending shard committed; 2 a config or input error, or another run holds the
output (nothing was run: a wrong key, no bundle=, an input that does not exist or a folder without
shards, a path that is not a bundle, an output that cannot be created, a shard outside the corpus's
root; all checked before Ray starts); 3 partial failure: some shards failed this run (a storage fault
that outlived the retries, a tar that cannot be read to its end), are listed with the reason, and are
not committed: the others are, and the next run redoes the failed ones; also a run that lost its
output lease part-way; 4 too many bad samples: more than `max_error_fraction` of this run's samples
are error rows (what was done is committed: the rows are right, the input is bad). Anything else
(1) is a failure of the job itself.

Resources left unset size themselves to what Ray reports (`default_resources`): one encoder actor per
GPU and 4 read actors per GPU on GPU clusters, the cores filled on CPU-only ones. The config type,
the sizing and the plan live with the pipeline (`dualtok.pipelines.tokenize.config`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any


from dualtok.jobs.checks import EXIT_TOO_MANY_ERRORS, check_bundle, check_output, too_many_errors
from dualtok.jobs.config import add_config_arguments, config_from_args
from dualtok.pipelines.cluster import init_ray
from dualtok.pipelines.io.lease import LeaseLostError
from dualtok.pipelines.io.storage import list_shard_objects
from dualtok.pipelines.progress import format_duration, quiet_ray_data, terminal_progress
from dualtok.pipelines.tokenize.config import Resources, TokenizeConfig, plan_from_config, resolve_resources
from dualtok.pipelines.tokenize.pipeline import RunSummary, run_tokenize

logger = logging.getLogger(__name__)

EXIT_PARTIAL_FAILURE = 3  # some shards failed this run; the rest committed (0 = all, 2 = config/input error)
def summary_record(summary: RunSummary, exit_code: int) -> dict[str, Any]:
    """The run as one JSON object (`--json`): what a scheduler needs to decide what happens next."""
    return {
        "job": "tokenize", "exit_code": exit_code, "output": summary.output,
        "shards": {"total": summary.shards_total, "committed": summary.shards_committed,
                   "skipped": summary.shards_skipped, "failed": dict(summary.shards_failed)},
        "images": summary.images, "errors": summary.errors, "samples": summary.samples,
        "errors_by_reason": dict(summary.errors_by_reason), "seconds": round(summary.seconds, 3),
        "images_per_second": round(summary.images_per_second, 3), "storage_retries": summary.storage_retries,
        "bundle_fingerprint": summary.bundle_fingerprint, "dtype": summary.dtype,
        "untrained_parts": list(summary.untrained_parts),
    }


def print_summary(summary: RunSummary, exit_code: int = 0, as_json: bool = False) -> None:
    """The run's summary on stdout: a few lines for people, or with `as_json` one JSON object only."""
    if as_json:
        print(json.dumps(summary_record(summary, exit_code), sort_keys=True))
        return
    print(
        f"tokenize: {summary.shards_committed} shards committed, {summary.shards_skipped} already done "
        f"(of {summary.shards_total}); {summary.images} images, {summary.errors} errors, "
        f"{summary.images_per_second:.1f} images/s in {format_duration(summary.seconds)}"
    )
    computed = f", computed in {summary.dtype}" if summary.dtype else ""
    print(f"corpus:   {summary.output}  (bundle {summary.bundle_fingerprint}{computed})")
    if summary.storage_retries:
        print(f"storage:  {summary.storage_retries} store retries while reading shards")
    if summary.shards_failed:
        print(f"FAILED:   {len(summary.shards_failed)} shards were not committed; the next run redoes them:")
        for shard, reason in summary.shards_failed.items():
            print(f"  {shard}: {' '.join(reason.split())}")  # one line per shard
    if summary.untrained_parts:
        print(f"NOTE: the {', '.join(summary.untrained_parts)} weights are random-initialised (untrained): "
              "the tokens exercise the pipeline but carry no meaning.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TokenizeConfig)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(TokenizeConfig, args)
    try:
        summary, code = tokenize(config, args)
    except LeaseLostError as err:  # shards committed before the loss stand; the rest are the next run's
        print(f"dualtok tokenize: stopped: {err}", file=sys.stderr)
        return EXIT_PARTIAL_FAILURE
    print_summary(summary, code, as_json=getattr(args, "json", False))
    if code == EXIT_TOO_MANY_ERRORS:
        message = too_many_errors(summary.errors, summary.samples, summary.errors_by_reason, config.max_error_fraction)
        print(f"dualtok tokenize: error: {message}", file=sys.stderr)
    return code


def tokenize(config: TokenizeConfig, args: argparse.Namespace | None = None) -> tuple[RunSummary, int]:
    """Check the inputs before Ray starts, size the resources to the cluster, run: (summary, exit code).
    `args` carries the global flags (progress display, verbosity); None: no progress display."""
    options = config.storage.storage_options()
    shards = list_shard_objects(config.inputs, options or None)  # once, before Ray: a wrong path fails in a second
    check_bundle(config.bundle, options)
    check_output(config.output, options)
    init_ray(config.ray, min_cpus=_explicit_cpus(config))
    plan = plan_from_config(config, _cluster_resources(config))
    quiet_ray_data(getattr(args, "verbose", 0))  # before the dataset is built: it copies the context
    reporter = terminal_progress(args, "tokenize") if args is not None else None
    try:
        summary = run_tokenize(plan, shards, progress=reporter)
    finally:
        if reporter is not None:
            reporter.close()
    too_many = summary.error_fraction > config.max_error_fraction
    return summary, EXIT_TOO_MANY_ERRORS if too_many else EXIT_PARTIAL_FAILURE if summary.shards_failed else 0


def _explicit_cpus(config: TokenizeConfig) -> float:
    """CPUs a local cluster needs for the resources the user set (sized ones fit any cluster)."""
    explicit = resolve_resources(config, cpus=1, gpus=0)
    return explicit.read_cpus + explicit.encoder.actors * explicit.encoder.cpus_per_actor


def _cluster_resources(config: TokenizeConfig) -> Resources:
    """`resolve_resources` for the cluster Ray reports now, logged in one line."""
    import ray

    total = ray.cluster_resources()
    node_cpus = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=None)
    resources = resolve_resources(config, total.get("CPU", 1.0), total.get("GPU", 0.0), node_cpus or None)
    enc = resources.encoder
    logger.info("resources (cluster: %g CPUs, %g GPUs): %d-%s encoder actors x (%g CPU, %g GPU, batch %d), "
                "up to %d read actors x %g CPU", total.get("CPU", 0), total.get("GPU", 0), enc.actors,
                enc.max_actors or enc.actors, enc.cpus_per_actor, enc.gpus_per_actor, enc.batch_size,
                resources.read_actors, resources.read_cpus)
    return resources
