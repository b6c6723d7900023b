"""`dualtok audit`: reconstruction audits of a token corpus (Ray Data), or with `--stats-only`
the corpus statistics alone: from its config (`dualtok.pipelines.audit.config`) to the pipeline and an exit code."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from dualtok.jobs.checks import EXIT_TOO_MANY_ERRORS, check_bundle, check_output, too_many_errors
from dualtok.jobs.config import add_config_arguments, config_from_args
from dualtok.pipelines.audit.config import AuditConfig, plan_from_config
from dualtok.pipelines.audit.index import parse_thresholds
from dualtok.pipelines.cluster import init_ray
from dualtok.pipelines.config import ConfigError
from dualtok.pipelines.progress import quiet_ray_data, terminal_progress

logger = logging.getLogger(__name__)

def summary_record(summary: Any, exit_code: int, crossed: list[str]) -> dict[str, Any]:
    """The run as one JSON object (`--json`): counts, each variant's mean metrics, thresholds crossed."""
    variants = {v["name"]: {"images": v["images"], "images_per_second": v["images_per_second"],
                            **{m: stats.get("mean") for m, stats in v["metrics"].items()}} for v in summary.variants}
    return {"job": "audit", "exit_code": exit_code, "output": summary.output, "report": summary.report,
            "slices": {"total": summary.slices_total, "committed": summary.slices_committed,
                       "skipped": summary.slices_skipped},
            "images": summary.images, "errors": summary.errors, "errors_by_reason": dict(summary.errors_by_reason),
            "seconds": round(summary.seconds, 3), "bundle_fingerprint": summary.bundle_fingerprint,
            "untrained_parts": list(summary.untrained_parts), "variants": variants, "thresholds_crossed": crossed}


def print_summary(summary: Any, exit_code: int = 0, crossed: list[str] | None = None, as_json: bool = False) -> None:
    """The run's summary on stdout: a table for people, or with `as_json` one JSON object only."""
    if as_json:
        print(json.dumps(summary_record(summary, exit_code, crossed or []), sort_keys=True, default=str))
        return
    print(f"audit: {summary.slices_committed} slices done this run, {summary.slices_skipped} already done "
          f"(of {summary.slices_total}); {summary.images} images audited, {summary.errors} errors, "
          f"{summary.seconds:.1f} s")
    print(f"{'variant':<24}{'tokens g+s':>12}{'PSNR':>9}{'SSIM':>8}{'images/s':>10}")
    for v in summary.variants:
        psnr, ssim = v["metrics"].get("psnr", {}), v["metrics"].get("ssim", {})
        speed = v["images_per_second"]
        print(f"{v['name']:<24}{v['num_guide_tokens']:>6}+{v['num_semantic_tokens']:<5}"
              f"{_mean(psnr, 2):>9}{_mean(ssim, 3):>8}{(f'{speed:.3f}' if speed else '-'):>10}")
    print(f"report: {summary.report}  (bundle {summary.bundle_fingerprint})")
    if summary.untrained_parts:
        print(f"NOTE: the {', '.join(summary.untrained_parts)} weights are random-initialised (untrained): "
              "the audit exercises the pipeline but its scores carry no meaning.")


def _mean(stats: dict[str, Any], digits: int) -> str:
    return "-" if stats.get("mean") is None else f"{stats['mean']:.{digits}f}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, AuditConfig)
    parser.add_argument("--stats-only", action="store_true",
                        help="corpus statistics only, no reconstruction (same as stats_only=true)")


def check_paths(config: AuditConfig) -> None:
    """Before Ray starts: the corpus is a token corpus, the bundle (when given) is a bundle or a
    preset, the output can be created."""
    from dualtok.pipelines.io.storage import filesystem, join

    options = config.storage.storage_options()
    fs, path = filesystem(join(config.corpus, "manifest.json"), options or None)
    if not fs.exists(path):
        there = fs.exists(fs._parent(path))
        raise ConfigError(f"corpus {config.corpus} " + ("is not a token corpus: missing manifest.json" if there
                                                        else "does not exist"))
    if config.bundle:
        check_bundle(config.bundle, options)
    check_output(config.output, options)


def run(args: argparse.Namespace) -> int:
    """Exit codes: 0 done; 2 a config or input error (checked before Ray starts); 4 more than
    `max_error_fraction` of the sampled images could not be audited (the audit is still written)."""
    config = config_from_args(AuditConfig, args)
    check_paths(config)
    if args.stats_only or config.stats_only:
        from dualtok.jobs.stats import print_statistics, write_statistics

        stats = write_statistics(config.corpus, config.output, config.storage.storage_options())
        print_statistics(stats, config.output, as_json=getattr(args, "json", False))
        return 0
    summary, code, crossed = audit(config, args)
    too_many = summary.error_fraction > config.max_error_fraction
    print_summary(summary, code, crossed, as_json=getattr(args, "json", False))
    for line in crossed:
        print(f"dualtok audit: threshold crossed: {line}", file=sys.stderr)
    if too_many:
        message = too_many_errors(summary.errors, summary.images + summary.errors, summary.errors_by_reason,
                                  config.max_error_fraction)
        print(f"dualtok audit: error: {message}", file=sys.stderr)
    return code


def audit(config: AuditConfig, args: argparse.Namespace | None = None) -> tuple[Any, int, list[str]]:
    """Plan, run, index and check thresholds: (summary, exit code, thresholds crossed). `args`
    carries the global flags (progress display, verbosity); None: no progress display."""
    from dualtok.pipelines.audit.pipeline import run_audit

    plan = plan_from_config(config)
    init_ray(config.ray)
    quiet_ray_data(getattr(args, "verbose", 0))  # before the dataset is built: it copies the context
    reporter = terminal_progress(args, "audit") if args is not None else None
    try:
        summary = run_audit(plan, progress=reporter)
    finally:
        if reporter is not None:
            reporter.close()
    crossed = _after_audit(config, summary)
    too_many = summary.error_fraction > config.max_error_fraction
    return summary, EXIT_TOO_MANY_ERRORS if too_many or crossed else 0, crossed


def _after_audit(config: AuditConfig, summary: Any) -> list[str]:
    """The nightly part: rewrite the cross-run index when asked; the thresholds this run crosses."""
    from dualtok.pipelines.audit.index import crossed_thresholds, write_index

    thresholds = parse_thresholds(config.thresholds)
    if config.run_index:
        write_index(config.output, thresholds, config.storage.storage_options() or None)
    return crossed_thresholds(summary.variants, thresholds)
