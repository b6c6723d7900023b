"""The reconstruction audit: a seeded sample of a token corpus, re-rendered and scored, as tables
and an HTML report that people read.

    corpus rows (sampled, cut into slices) -> FetchOriginals (CPU tasks: source shards by
    (shard, index)) -> Reconstruct (actor pool; GPU when given) -> ScoreReconstruction (actor
    pool) -> driver: commits each slice whole (tables, errors, marker last), then the summary
    and the report from everything committed.

Exactly like tokenize, a slice is committed whole and a rerun skips committed slices; the sample
itself is written first (`sample.parquet`) and is what every rerun audits. An output that holds
an audit made with other settings is refused, so one folder never mixes two audits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import replace
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dualtok_core.bundle import DualTokenizer
from dualtok_core.errors import BundleError, DualtokError
from dualtok_core.presets import PARTS
from dualtok.pipelines.io import schemas as S
from dualtok.pipelines.audit.sample import assign_slices, committed_markers, corpus_metadata, read_rows, select_rows
from dualtok.pipelines.audit.scoring import ERROR_COUNT, ERRORS, ROWS, TABLE, ScoreReconstruction, ScoreSettings
from dualtok.pipelines.audit.stages import (
    MAIN_GUIDE,
    OK,
    PAYLOAD,
    FetchOriginals,
    Reconstruct,
    VariantSpec,
    pack,
)
from dualtok.pipelines.actors import BundleSource, add_actor_stage
from dualtok.pipelines.io.outputs import new_run_id, parquet_bytes
from dualtok.pipelines.progress import Progress, format_progress
from dualtok.pipelines.io.shard_ids import read_input_root
from dualtok.pipelines.audit.plan import (
    AUDIT_FILE,
    BASE_VARIANTS,
    ERRORS_DIR,
    MARKERS_DIR,
    SAMPLE_FILE,
    TABLES_DIR,
    AuditLayout,
    AuditMismatchError,
    AuditPlan,
    AuditRunSummary,
    AuditSetup,
)
from dualtok.pipelines.io.storage import common_root, list_shards, shard_id

logger = logging.getLogger(__name__)

_REASON_WIDTH = 1024  # payload text columns are fixed-width numpy strings (npz without pickle)


def build_variants(names: tuple[str, ...], tokenizer: DualTokenizer, guides: dict[str, DualTokenizer],
                   diffusions: tuple[str, ...] = ()) -> tuple[VariantSpec, ...]:
    """The requested variants for the bundle's guide, then dual/upsampled for every extra guide, then
    dual/semantic-only through every extra diffusion branch."""
    unknown = [n for n in names if n not in BASE_VARIANTS]
    if unknown:
        raise DualtokError(f"unknown variant {unknown[0]!r}; variants are {', '.join(BASE_VARIANTS)} "
                           "(guide resolutions come from guide_bundles)")
    semantic = tokenizer.num_semantic_tokens
    size, grid = tokenizer.guide_size, tokenizer.guide_grid
    specs = {
        "dual": VariantSpec("dual", "dual", MAIN_GUIDE, size, grid**2, semantic),
        "semantic-only": VariantSpec("semantic-only", "semantic-only", None, 0, 0, semantic),
        "guide-upsampled": VariantSpec("guide-upsampled", "guide-upsampled", MAIN_GUIDE, size, grid**2, 0),
    }
    out = [specs[n] for n in BASE_VARIANTS if n in names]
    for name, guide in sorted(guides.items(), key=lambda item: item[1].guide_size):
        g, tokens = guide.guide_size, guide.guide_grid**2
        if "dual" in names:
            out.append(VariantSpec(f"dual-{name}", "dual", name, g, tokens, semantic))
        if "guide-upsampled" in names:
            out.append(VariantSpec(f"guide-upsampled-{name}", "guide-upsampled", name, g, tokens, 0))
    for name in sorted(diffusions):
        if "dual" in names:
            out.append(VariantSpec(f"dual-{name}", "dual", MAIN_GUIDE, size, grid**2, semantic, diffusion=name))
        if "semantic-only" in names:
            out.append(VariantSpec(f"semantic-only-{name}", "semantic-only", None, 0, 0, semantic, diffusion=name))
    return tuple(out)


def guide_name(guide: DualTokenizer) -> str:
    return f"g{guide.guide_size}"


def diffusion_name(bundle: DualTokenizer) -> str:
    return bundle.diffusion_kind


def setup_diffusions(tokenizer: DualTokenizer, sources: dict[str, BundleSource]) -> dict[str, DualTokenizer]:
    """The extra diffusion branches' bundles (semantic + diffusion parts). Each must hold the corpus
    bundle's semantic branch: a condition from other weights would not be these tokens' meaning."""
    own = tokenizer.info.part_hashes["semantic"]
    loaded = {}
    for name, source in sources.items():
        bundle = source.load(("semantic", "diffusion"))
        if bundle.info.part_hashes["semantic"] != own:
            raise DualtokError(f"diffusion_bundles {source.spec}: its semantic branch is not the corpus bundle's "
                               "(other weights): its condition would not be these tokens' meaning")
        if name == tokenizer.diffusion_kind:
            raise DualtokError(f"diffusion_bundles {source.spec} is a {name} branch like the bundle's own")
        loaded[name] = bundle
    return loaded


def _check_corpus_bundle(tokenizer: DualTokenizer, meta: dict[str, Any], spec: str) -> None:
    """Tokens mean something only to the guide and semantic branches that made them."""
    missing = [c for c, key in ((S.GUIDE_TOKENS, "guide_grid"), (S.SEMANTIC_TOKENS, "semantic_tokens")) if key not in meta]
    if missing:
        raise DualtokError(f"the corpus has no {' or '.join(missing)} column (tokenized with streams=...); "
                           "an audit re-renders from both token streams")
    recorded = meta.get("part_hashes", {})
    for part in ("guide", "semantic"):
        if part in recorded and recorded[part] != tokenizer.info.part_hashes[part]:
            raise BundleError(
                f"the corpus's {part} tokens were made by weights {recorded[part][:16]}, but bundle {spec} has "
                f"{tokenizer.info.part_hashes[part][:16]}; audit with the bundle that tokenized the corpus "
                "(its diffusion part may differ)"
            )


def _source_uris(plan: AuditPlan, markers: dict[str, dict[str, Any]]) -> dict[str, str]:
    """corpus shard id -> source shard URI: the given sources, else what each marker recorded."""
    if not plan.sources:
        return {sid: m.get("shard_uri", "") for sid, m in markers.items()}
    uris = list_shards(list(plan.sources), plan.storage_options or None)
    # ids are paths under the corpus's recorded input root (date folders: 2026-12-01__00000); sources
    # somewhere else are the shards moved: their ids are paths under the root they share
    recorded = read_input_root(plan.corpus, plan.storage_options or None)
    root = recorded if recorded and all(uri.startswith(recorded) for uri in uris) else common_root(uris)
    given = {shard_id(uri, root): uri for uri in uris}
    return {sid: given.get(sid, "") for sid in markers}


def setup(plan: AuditPlan) -> AuditSetup:
    markers = committed_markers(plan.corpus, plan.storage_options or None)
    meta = corpus_metadata(plan.corpus, markers, plan.storage_options or None)
    tokenizer = plan.source.load(PARTS)
    _check_corpus_bundle(tokenizer, meta, plan.source.spec)
    guides = {name: src.load(("guide",)) for name, src in plan.guides.items()}
    diffusions = setup_diffusions(tokenizer, plan.diffusions)
    variants = build_variants(plan.variants, tokenizer, guides, tuple(diffusions))
    bundle = {"spec": plan.source.spec, "fingerprint": tokenizer.fingerprint, "preset": tokenizer.info.preset,
              "part_hashes": tokenizer.info.part_hashes, "weights": tokenizer.info.sources,
              "untrained_parts": tokenizer.info.untrained_parts, "guide_size": tokenizer.guide_size,
              "guide_tokens": tokenizer.guide_grid**2, "semantic_tokens": tokenizer.num_semantic_tokens,
              "extra_guides": {n: {"spec": plan.guides[n].spec, "guide_size": g.guide_size,
                                   "guide_tokens": g.guide_grid**2, "hash": g.info.part_hashes["guide"],
                                   "untrained": bool(g.info.untrained_parts)} for n, g in guides.items()},
              "diffusion_kind": tokenizer.diffusion_kind,
              "extra_diffusions": {n: {"spec": plan.diffusions[n].spec, "hash": d.info.part_hashes["diffusion"],
                                       "semantic_hash": d.info.part_hashes["semantic"],
                                       "untrained": "diffusion" in d.info.untrained_parts}
                                   for n, d in diffusions.items()}}
    settings = {"corpus": plan.corpus, "sample": vars(plan.sample), "slice_size": plan.slice_size,
                "render": vars(plan.render), "variants": [vars(v) for v in variants],
                "bundle": {k: bundle[k] for k in ("fingerprint", "extra_guides", "extra_diffusions")},
                "weights": vars(plan.weights)}
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return AuditSetup(markers, bundle, variants, tokenizer.guide_size, fingerprint, _source_uris(plan, markers))


# ---- the sample -------------------------------------------------------------------------------
def _fixed_sample(plan: AuditPlan, audit: AuditSetup, layout: AuditLayout) -> tuple[pa.Table, pa.Table | None]:
    """(slice, shard, index, key) of the whole sample, and its corpus rows when read just now.

    The first run draws the sample and writes it before anything else; later runs audit exactly
    that sample, even when the corpus has grown since, and refuse other settings.
    """
    if layout.exists(AUDIT_FILE):
        recorded = layout.read_json(AUDIT_FILE)
        if recorded["fingerprint"] != audit.fingerprint:
            raise AuditMismatchError(
                f"{plan.output} holds an audit with other settings (fingerprint {recorded['fingerprint']}, this run "
                f"{audit.fingerprint}); write to a new output, or rerun with the settings in {AUDIT_FILE}"
            )
        with layout.fs.open(layout.path(SAMPLE_FILE), "rb") as handle:
            return pq.read_table(handle, schema=S.AUDIT_SAMPLE_SCHEMA), None
    chosen = select_rows(plan.corpus, audit.markers, plan.sample, plan.storage_options or None)
    rows = assign_slices(read_rows(plan.corpus, audit.markers, chosen, plan.storage_options or None), plan.slice_size)
    sample = rows.select(S.AUDIT_SAMPLE_SCHEMA.names).cast(S.AUDIT_SAMPLE_SCHEMA)
    layout.write(parquet_bytes(sample), SAMPLE_FILE)
    record = {"fingerprint": audit.fingerprint, "corpus": plan.corpus, "bundle": audit.bundle,
              "sample": vars(plan.sample), "render": vars(plan.render), "slice_size": plan.slice_size,
              "variants": [vars(v) for v in audit.variants], "rows": sample.num_rows,
              "schema_version": S.AUDIT_SCHEMA_VERSION}
    layout.write(json.dumps(record, indent=1, sort_keys=True).encode(), AUDIT_FILE)
    logger.info("sampled %d rows into %d slices of %d", sample.num_rows,
                len(set(sample[S.SLICE].to_pylist())), plan.slice_size)
    return sample, rows


def _pending_rows(plan: AuditPlan, audit: AuditSetup, sample: pa.Table, rows: pa.Table | None,
                  pending: list[str]) -> pa.Table:
    """Corpus rows of the pending slices, with their slice column, sorted by (shard, index)."""
    keep = pa.array(pending, pa.string())
    wanted = sample.filter(pc.is_in(sample[S.SLICE], value_set=keep))
    if rows is None:
        chosen: dict[str, list[int]] = {}
        for shard, index in zip(wanted[S.SHARD].to_pylist(), wanted[S.INDEX].to_pylist()):
            chosen.setdefault(shard, []).append(index)
        rows = read_rows(plan.corpus, audit.markers, {k: np.array(v) for k, v in chosen.items()},
                         plan.storage_options or None)
        return rows.add_column(0, S.SLICE, wanted[S.SLICE])  # both sorted by (shard, index)
    return rows.filter(pc.is_in(rows[S.SLICE], value_set=keep))


def _tokens(column: pa.ChunkedArray, n: int) -> np.ndarray:
    return column.combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(n, -1).astype(np.uint16)


def slice_payload(rows: pa.Table, shard_uris: dict[str, str]) -> bytes:
    """One slice's rows as the row-aligned arrays the stages pass along."""
    n = rows.num_rows
    captions = rows[S.CAPTION].to_pylist()
    shards = rows[S.SHARD].to_pylist()
    return pack({
        S.KEY: np.array(rows[S.KEY].to_pylist(), dtype=str), S.SHARD: np.array(shards, dtype=str),
        S.INDEX: rows[S.INDEX].to_numpy().astype(np.int64),
        S.CAPTION: np.array([c or "" for c in captions], dtype=str),
        "has_caption": np.array([c is not None for c in captions], dtype=bool),
        S.SHARD_URI: np.array([shard_uris.get(s, "") for s in shards], dtype=str),
        S.GUIDE_TOKENS: _tokens(rows[S.GUIDE_TOKENS], n), S.SEMANTIC_TOKENS: _tokens(rows[S.SEMANTIC_TOKENS], n),
        "status": np.full(n, OK, dtype=np.int8), "stage": np.full(n, "", dtype="<U32"),
        "reason": np.full(n, "", dtype=f"<U{_REASON_WIDTH}"),
    })


# ---- the run ----------------------------------------------------------------------------------
def run_audit(plan: AuditPlan, progress: Callable[[Progress], None] | None = None) -> AuditRunSummary:
    """Audit every slice of the sample not yet committed under `plan.output`, then report.
    `progress` (a terminal's progress line) gets each committed slice; without it each commit is
    logged with the run's rate and ETA."""
    started = time.monotonic()
    run_id = new_run_id()
    audit = setup(plan)
    layout = AuditLayout(plan.output, plan.storage_options)
    sample, rows = _fixed_sample(plan, audit, layout)
    slices = sorted(set(sample[S.SLICE].to_pylist()))
    done = layout.committed()
    pending = [s for s in slices if s not in done]
    if plan.max_slices is not None:
        pending = pending[: plan.max_slices]
    logger.info("%d slices: %d already committed, %d to do", len(slices), len(done), len(pending))
    committed = 0
    if pending:
        plan = _with_expected_hashes(plan, audit)
        todo = _pending_rows(plan, audit, sample, rows, pending)
        items = [{S.SLICE: name, PAYLOAD: slice_payload(todo.filter(pc.equal(todo[S.SLICE], name)), audit.shard_uris)}
                 for name in pending]
        committed = _drain(_build_dataset(plan, audit, items), layout, run_id, audit.fingerprint, len(pending),
                           progress)
    from dualtok.pipelines.audit.finish import finish_audit  # the report's imports are only paid at the end

    return finish_audit(plan, audit, layout, sample, run_id, started, slices_skipped=len(done),
                        slices_committed=committed)


def _with_expected_hashes(plan: AuditPlan, audit: AuditSetup) -> AuditPlan:
    """Actors refuse weights that differ from what the driver saw (other code or files on a node)."""
    source = replace(plan.source, expected_hashes=audit.bundle["part_hashes"])
    guides = {n: replace(src, expected_hashes={"guide": audit.bundle["extra_guides"][n]["hash"]})
              for n, src in plan.guides.items()}
    extra = audit.bundle.get("extra_diffusions", {})
    diffusions = {n: replace(src, expected_hashes={"semantic": extra[n]["semantic_hash"],
                                                   "diffusion": extra[n]["hash"]})
                  for n, src in plan.diffusions.items()}
    return replace(plan, source=source, guides=guides, diffusions=diffusions)


def _build_dataset(plan: AuditPlan, audit: AuditSetup, items: list[dict[str, Any]]) -> Any:
    import ray

    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(FetchOriginals(plan.render.size, plan.storage_options), batch_size=1, num_cpus=plan.fetch_cpus)
    # One slice per call: the slice, not Ray's batching, decides which images share a forward pass.
    ds = add_actor_stage(ds, Reconstruct, replace(plan.reconstruct, batch_size=1), source=plan.source,
                         guides=plan.guides, variants=audit.variants, render=plan.render, diffusions=plan.diffusions)
    settings = ScoreSettings(output=plan.output, variants=audit.variants, guide_size=audit.guide_size,
                             weights=plan.weights, learned_batch=plan.score.batch_size,
                             storage_options=plan.storage_options)
    return add_actor_stage(ds, ScoreReconstruction, replace(plan.score, batch_size=1), settings=settings)


def _drain(dataset: Any, layout: AuditLayout, run_id: str, fingerprint: str, total: int,
           progress: Callable[[Progress], None] | None = None) -> int:
    """Commit each slice as it arrives: tables, then errors, then the marker."""
    done: set[str] = set()
    images, started = 0, time.monotonic()
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for i, name in enumerate(batch[S.SLICE]):
            name = str(name)
            layout.write(batch[TABLE][i], TABLES_DIR, f"{name}.parquet")
            layout.write(batch[ERRORS][i], ERRORS_DIR, f"{name}.parquet")
            marker = {"slice": name, "images": int(batch[ROWS][i]), "errors": int(batch[ERROR_COUNT][i]),
                      "run_id": run_id, "fingerprint": fingerprint,
                      "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            layout.write(json.dumps(marker, indent=1).encode(), MARKERS_DIR, f"{name}.json")
            done.add(name)
            images += marker["images"]
            now = Progress(done=len(done), total=total, images=images, seconds=time.monotonic() - started,
                           unit="slices")
            if progress is not None:
                progress(now)
            else:
                logger.info("committed slice %s: %d images, %d errors | %s", name, marker["images"],
                            marker["errors"], format_progress(now))
    if len(done) != total:
        raise RuntimeError(f"the audit pipeline ended with {total - len(done)} slices uncommitted")
    return len(done)
