"""What an audit run is made of, shared by the pipeline that runs it and the step that reports it:
the plan the job resolves, the driver's setup, the run summary, and the files under its output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dualtok_core.errors import DualtokError
from dualtok.pipelines.actors import BundleSource, StageResources
from dualtok.pipelines.audit.perceptual import PerceptualWeights
from dualtok.pipelines.audit.sample import SampleSpec
from dualtok.pipelines.audit.stages import RenderSettings, VariantSpec
from dualtok.pipelines.io.outputs import OutputFolder

BASE_VARIANTS = ("dual", "semantic-only", "guide-upsampled")
TABLES_DIR, ERRORS_DIR, MARKERS_DIR, RUNS_DIR = "tables", "errors", "_committed", "runs"
SAMPLE_FILE, AUDIT_FILE, SUMMARY_FILE, REPORT_FILE = "sample.parquet", "audit.json", "summary.json", "index.html"

class AuditMismatchError(DualtokError):
    """The output already holds an audit made with other settings."""


@dataclass(frozen=True)
class ReportSettings:
    grid_images: int = 8  # rows of the original | guide | variants grid
    worst_k: int = 4  # lowest-scoring images shown per variant
    best_k: int = 4  # highest-scoring images shown per variant


@dataclass(frozen=True)
class AuditPlan:
    """Everything an audit run needs, resolved from an `AuditConfig` by `plan_from_config`
    (audit/config.py). No defaults here: they live in the config, once."""

    corpus: str
    output: str
    source: BundleSource
    guides: dict[str, BundleSource] = field(hash=False)  # name (g32) -> guide bundle
    diffusions: dict[str, BundleSource] = field(hash=False)  # kind (unclip, text) -> bundle of another diffusion branch
    variants: tuple[str, ...]
    sample: SampleSpec
    sources: tuple[str, ...]  # source shards; () = each corpus shard's recorded shard_uri
    render: RenderSettings
    slice_size: int
    reconstruct: StageResources
    score: StageResources
    fetch_cpus: float
    weights: PerceptualWeights
    report: ReportSettings
    corpus_stats: bool
    max_slices: int | None
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False)
    resolved_config: dict[str, Any] = field(default_factory=dict, hash=False)


@dataclass
class AuditRunSummary:
    output: str
    report: str
    slices_total: int
    slices_skipped: int
    slices_committed: int
    images: int  # audited images in the whole output (all runs)
    errors: int
    seconds: float
    bundle_fingerprint: str
    variants: list[dict[str, Any]]
    untrained_parts: list[str]
    errors_by_reason: dict[str, int] = field(default_factory=dict)  # the output's error rows by reason

    @property
    def error_fraction(self) -> float:
        """Error rows per sampled image in the output: what the job's `max_error_fraction` gate compares."""
        total = self.images + self.errors
        return self.errors / total if total else 0.0


@dataclass(frozen=True)
class AuditSetup:
    """What the driver resolves once: markers, bundle info, variants and the settings fingerprint."""

    markers: dict[str, dict[str, Any]]
    bundle: dict[str, Any]
    variants: tuple[VariantSpec, ...]
    guide_size: int
    fingerprint: str
    shard_uris: dict[str, str]


class AuditLayout(OutputFolder):
    """The audit's files under its output URI (see `io/schemas.py` for the tables)."""

    def __init__(self, output: str, storage_options: dict[str, Any]) -> None:
        super().__init__(output, storage_options)
        self.output = output

    def committed(self) -> dict[str, dict[str, Any]]:
        """Markers of the slices already done: slice -> marker."""
        return self.markers(MARKERS_DIR, "slice")

    def read_table(self, folder: str, slices: list[str], schema: pa.Schema) -> pa.Table:
        tables = []
        for name in sorted(slices):
            with self.fs.open(self.path(folder, f"{name}.parquet"), "rb") as handle:
                tables.append(pq.read_table(handle, schema=schema))
        return pa.concat_tables(tables) if tables else schema.empty_table()
