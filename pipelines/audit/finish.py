"""The end of an audit run: everything committed so far -> summary.json, index.html, a run record.

Regenerated on every run from the committed slice tables, so the report of a resumed audit is
the same as a clean run's, and a partial audit (max_slices) says how much it covers.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pyarrow as pa

from dualtok.pipelines.io import schemas as S
from dualtok.pipelines.audit.plan import (
    ERRORS_DIR,
    REPORT_FILE,
    RUNS_DIR,
    SUMMARY_FILE,
    TABLES_DIR,
    AuditLayout,
    AuditPlan,
    AuditRunSummary,
    AuditSetup,
)
from dualtok.pipelines.audit.summary import ablation_points, ranked, shard_summaries, variant_summaries
from dualtok.pipelines.audit.stats import corpus_fingerprint
from dualtok.pipelines.audit.report import render_audit_report
from dualtok.pipelines.io.outputs import count_reasons, package_versions, reason_label
from dualtok.pipelines.io.storage import join

logger = logging.getLogger(__name__)


def _reason_counts(errors: pa.Table) -> dict[str, int]:
    return count_reasons(map(reason_label, errors[S.STAGE].to_pylist(), errors[S.REASON].to_pylist()))


def _sample_text(plan: AuditPlan) -> str:
    spec = plan.sample
    amount = f"{spec.size} rows" if spec.size is not None else f"a {spec.fraction:g} fraction of the rows"
    return f"{amount}, seed {spec.seed}"


def _notes(plan: AuditPlan, slices: int, committed: int) -> list[str]:
    notes = list(plan.weights.skipped_notes())
    if committed < slices:
        notes.append(f"Partial audit: {committed} of {slices} slices are done; rerun the same command to finish "
                     "(finished slices are skipped).")
    return notes


def build_summary(plan: AuditPlan, audit: AuditSetup, sample: pa.Table, table: pa.Table, errors: pa.Table,
                  run_id: str, slices: int, committed: int) -> dict[str, Any]:
    variants = [{"name": v.name, "kind": v.kind, "guide_size": v.guide_size, "num_guide_tokens": v.num_guide_tokens,
                 "num_semantic_tokens": v.num_semantic_tokens, "diffusion": v.diffusion} for v in audit.variants]
    names = [v["name"] for v in variants]
    primary = "dual" if "dual" in names else names[0]
    report = plan.report
    summaries = variant_summaries(table, variants)
    return {
        "kind": "audit", "schema_version": S.AUDIT_SCHEMA_VERSION, "fingerprint": audit.fingerprint,
        "run_id": run_id, "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "corpus": plan.corpus, "corpus_fingerprint": corpus_fingerprint(audit.markers), "output": plan.output,
        "bundle": audit.bundle,
        "settings": {"sample": _sample_text(plan), "slice_size": plan.slice_size, **vars(plan.render),
                     "variants": ", ".join(names)},
        "report": vars(report), "config": plan.resolved_config, "versions": package_versions(),
        "counts": {"sampled": sample.num_rows, "audited": len(set(zip(table[S.SHARD].to_pylist(), table[S.INDEX].to_pylist()))),
                   "errors": errors.num_rows, "slices": slices, "slices_committed": committed},
        "variants": summaries,
        "ablation": ablation_points(summaries),
        "shards": shard_summaries(table, errors, names),
        "ranked_by": {"variant": primary, "metric": S.PSNR},
        "worst": ranked(table, primary, report.worst_k, worst=True),
        "best": ranked(table, primary, report.best_k, worst=False),
        "errors_by_reason": _reason_counts(errors),
        "notes": _notes(plan, slices, committed),
    }


def finish_audit(plan: AuditPlan, audit: AuditSetup, layout: AuditLayout, sample: pa.Table, run_id: str,
                 started: float, slices_skipped: int, slices_committed: int) -> AuditRunSummary:
    done = sorted(layout.committed())
    slices = len(set(sample[S.SLICE].to_pylist()))
    table = layout.read_table(TABLES_DIR, done, S.AUDIT_SCHEMA)
    errors = layout.read_table(ERRORS_DIR, done, S.AUDIT_ERRORS_SCHEMA)
    summary = build_summary(plan, audit, sample, table, errors, run_id, slices, len(done))
    stats = None
    if plan.corpus_stats:
        from dualtok.pipelines.audit.stats import corpus_statistics

        stats = corpus_statistics(plan.corpus, plan.storage_options or None)
    summary["this_run"] = {"slices_skipped": slices_skipped, "slices_committed": slices_committed,
                           "seconds": round(time.monotonic() - started, 3)}
    layout.write(json.dumps(summary, indent=1, sort_keys=True, default=str).encode(), SUMMARY_FILE)
    if stats is not None:
        layout.write(json.dumps(stats, sort_keys=True).encode(), "corpus_stats.json")
    layout.write(render_audit_report(summary, table, errors, stats).encode(), REPORT_FILE)
    layout.write(json.dumps({k: summary[k] for k in ("run_id", "fingerprint", "counts", "this_run", "config",
                                                     "versions")}, indent=1, default=str).encode(),
                 RUNS_DIR, f"{run_id}.json")
    logger.info("audit report: %s", layout.path(REPORT_FILE))
    return AuditRunSummary(
        output=plan.output, report=_report_uri(plan.output), slices_total=slices, slices_skipped=slices_skipped,
        slices_committed=slices_committed, images=summary["counts"]["audited"], errors=errors.num_rows,
        seconds=time.monotonic() - started, bundle_fingerprint=audit.bundle["fingerprint"],
        variants=summary["variants"], untrained_parts=audit.bundle["untrained_parts"],
        errors_by_reason=summary["errors_by_reason"],
    )


def _report_uri(output: str) -> str:
    return join(output, REPORT_FILE)
