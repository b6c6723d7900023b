"""Column names and Arrow schemas of every table dualtok writes. The one place they live.

Tables:
- token corpus (`data/<shard-id>.parquet`): one row per successfully tokenized image;
- errors (`errors/<shard-id>.parquet`): one row per sample that could not be tokenized;
  both end with the run's `passthrough` columns (source fields as nullable strings), if it asked for any;
- commit markers (`_committed/<shard-id>.json`): per-shard counts, written last.
`rows + errors == samples read`, per shard and in total.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

CORPUS_SCHEMA_VERSION = 1
METADATA_KEY = b"dualtok"

# Columns shared by every per-sample table.
KEY, SHARD, INDEX = "key", "shard", "index_in_shard"
CAPTION, WIDTH, HEIGHT = "caption", "width", "height"
GUIDE_TOKENS, SEMANTIC_TOKENS = "guide_tokens", "semantic_tokens"
STAGE, REASON = "stage", "reason"

# In-flight columns of the Ray Data pipeline (never written to the corpus).
IMAGE = "image"  # (S, S, 3) uint8 square crop at the encoder's input size
SEMANTIC_IMAGE = "semantic_image"  # (s, s, 3) uint8: the semantic branch's own input, where its preprocessing differs
ROW_KIND = "row_kind"  # SAMPLE, ERROR or END (one END row per shard carries the sample count)
SHARD_SAMPLES = "shard_samples"  # on END rows: samples read from the shard; -1 elsewhere
SHARD_URI = "shard_uri"
# On END rows: the object the read stage read (its size in bytes and `storage.object_version`: the
# ETag on object stores), and the storage retries it took. An END row whose REASON is not empty
# means the shard FAILED this run (a storage fault that outlived the retries, or a tar that cannot
# be read to its end): the writer drops its rows and does not commit it; the next run redoes it.
SHARD_BYTES, SHARD_VERSION, SHARD_RETRIES = "shard_bytes", "shard_version", "shard_retries"
SAMPLE, ERROR, END = 0, 1, 2
# After the encoder a shard's SAMPLE rows are written to part files where they were encoded; the
# driver gets one PART row per file instead (its name and row count), or, when the store refused
# the write, one with the REASON: the shard fails this run. Only ERROR, END and PART rows reach it.
PART = 3
PART_FILE, PART_ROWS = "part_file", "part_rows"

IMAGE_BYTES = "image_bytes"  # the sample's image member, from the read stage to the decode stage
# A passthrough field travels as "source:<name>" (a string), so that no field name can meet an
# in-flight column; the corpus and errors tables name it <name>.
SOURCE_PREFIX = "source:"

# Error stages.
STAGE_READ, STAGE_DECODE, STAGE_ENCODE = "read", "decode", "encode"
STAGE_STORAGE = "storage"  # on a failed shard's END row: the store, not the data, failed

# Arrow types of every in-flight column. Each stage builds its output table with these
# (`inflight_table`), so no type is ever inferred: a block whose captions are all missing is still
# a string column, and merges with the next block. The stages' outputs:
#   read:    ROW_KIND KEY SHARD INDEX CAPTION IMAGE_BYTES STAGE REASON SHARD_SAMPLES SHARD_BYTES SHARD_VERSION SHARD_RETRIES,
#            and a passthrough_column per passthrough field
#   decode:  the read columns less IMAGE_BYTES, plus IMAGE WIDTH HEIGHT (and SEMANTIC_IMAGE)
#   encode:  the decode columns less IMAGE and SEMANTIC_IMAGE, plus the token column of each stream; then
#            (`corpus.TokenParts`, in the encoder's process) SAMPLE rows become part files and PART rows
#            (PART_FILE, PART_ROWS), and the token columns stop there
INFLIGHT_TYPES: dict[str, pa.DataType] = {
    SHARD_URI: pa.string(), ROW_KIND: pa.int8(), KEY: pa.string(), SHARD: pa.string(), INDEX: pa.int64(),
    CAPTION: pa.string(), IMAGE_BYTES: pa.large_binary(),  # large: a block may pass 2 GiB of members
    STAGE: pa.string(), REASON: pa.string(), SHARD_SAMPLES: pa.int64(), SHARD_BYTES: pa.int64(),
    SHARD_VERSION: pa.string(), SHARD_RETRIES: pa.int32(), WIDTH: pa.int32(), HEIGHT: pa.int32(),
    PART_FILE: pa.string(), PART_ROWS: pa.int64(),
}
# (N, ...) arrays travel as Arrow's fixed-shape tensor (stored as a fixed-size list of the element
# type), which Ray Data hands to the next stage as one (N, ...) ndarray. The shape comes from the
# array: IMAGE (N, S, S, 3) uint8, token columns (N, length) uint16.
INFLIGHT_TENSORS: dict[str, pa.DataType] = {
    IMAGE: pa.uint8(), SEMANTIC_IMAGE: pa.uint8(), GUIDE_TOKENS: pa.uint16(), SEMANTIC_TOKENS: pa.uint16(),
}


def passthrough_column(name: str) -> str:
    """The in-flight column that carries passthrough field `name`."""
    return SOURCE_PREFIX + name


def inflight_type(name: str) -> pa.DataType:
    """The Arrow type of in-flight column `name` (not a tensor); KeyError for a column without one."""
    if name.startswith(SOURCE_PREFIX):
        return pa.string()
    if name not in INFLIGHT_TYPES:
        raise KeyError(f"in-flight column {name!r} has no Arrow type in schemas.INFLIGHT_TYPES")
    return INFLIGHT_TYPES[name]


def inflight_table(columns: dict[str, np.ndarray]) -> pa.Table:
    """A stage's output columns -> a table with the explicit in-flight types; a column without one,
    or a tensor of the wrong element type, is an error of the stage, not something to guess."""
    fields, arrays = [], []
    for name, values in columns.items():
        if name in INFLIGHT_TENSORS:
            array = _tensor_array(name, np.asarray(values), INFLIGHT_TENSORS[name])
        else:
            # from_pandas: a null that Ray handed over as NaN (an all-null object column) stays null
            array = pa.array(values, inflight_type(name), from_pandas=True)
        fields.append(pa.field(name, array.type))
        arrays.append(array)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _tensor_array(name: str, values: np.ndarray, element: pa.DataType) -> pa.Array:
    if values.ndim < 2 or values.dtype != element.to_pandas_dtype():
        raise TypeError(f"in-flight column {name!r} must be an (N, ...) {element} array, got {values.dtype} "
                        f"of shape {values.shape}")
    shape = list(values.shape[1:])
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), element)
    storage = pa.FixedSizeListArray.from_arrays(flat, int(np.prod(shape)))
    return pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(element, shape), storage)


def inflight_columns(table: pa.Table) -> dict[str, np.ndarray]:
    """An in-flight table -> the numpy batch Ray Data hands the next stage (tensors as (N, ...) arrays,
    strings and bytes as object arrays): for calling stages one after another without Ray."""
    out = {}
    for name, column in zip(table.column_names, table.columns):
        if isinstance(column.type, pa.FixedShapeTensorType):
            element = column.type.value_type.to_pandas_dtype()
            storage = column.combine_chunks().storage.flatten()
            out[name] = storage.to_numpy(zero_copy_only=False).astype(element, copy=False).reshape(
                (len(column), *column.type.shape))
        else:
            out[name] = column.to_numpy(zero_copy_only=False)
    return out


def corpus_schema(guide_len: int | None, semantic_len: int | None, metadata: dict[str, Any],
                  passthrough: tuple[str, ...] = ()) -> pa.Schema:
    """Corpus schema; a token column is present only for the streams the run produces, and the
    `passthrough` columns (nullable strings, named in the metadata's "passthrough") come last."""
    check_passthrough(passthrough)
    fields = [
        pa.field(KEY, pa.string(), nullable=False),
        pa.field(SHARD, pa.string(), nullable=False),
        pa.field(INDEX, pa.int32(), nullable=False),
        pa.field(CAPTION, pa.string(), nullable=True),
        pa.field(WIDTH, pa.int32(), nullable=False),
        pa.field(HEIGHT, pa.int32(), nullable=False),
    ]
    if guide_len is not None:
        fields.append(pa.field(GUIDE_TOKENS, pa.list_(pa.uint16(), guide_len), nullable=False))
    if semantic_len is not None:
        fields.append(pa.field(SEMANTIC_TOKENS, pa.list_(pa.uint16(), semantic_len), nullable=False))
    if passthrough:
        metadata = {**metadata, "passthrough": list(passthrough)}
    fields += _passthrough_fields(passthrough)
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})


ERRORS_SCHEMA = pa.schema(
    [
        pa.field(KEY, pa.string(), nullable=True),  # null when the tar broke before a key was read
        pa.field(SHARD, pa.string(), nullable=False),
        pa.field(INDEX, pa.int32(), nullable=False),
        pa.field(STAGE, pa.string(), nullable=False),
        pa.field(REASON, pa.string(), nullable=False),
    ]
)
# The corpus's own columns and the errors table's: a passthrough field may take none of these names.
OWN_COLUMNS = (KEY, SHARD, INDEX, CAPTION, WIDTH, HEIGHT, GUIDE_TOKENS, SEMANTIC_TOKENS, STAGE, REASON)


def errors_schema(passthrough: tuple[str, ...] = ()) -> pa.Schema:
    """The errors table, with the run's passthrough columns last (a failed row is traceable too)."""
    check_passthrough(passthrough)
    return pa.schema([*ERRORS_SCHEMA, *_passthrough_fields(passthrough)])


def check_passthrough(names: tuple[str, ...] | list[str]) -> None:
    """Passthrough field names must be distinct, non-empty, and not the corpus's or errors' own columns."""
    for name in names:
        if not name or not name.strip():
            raise ValueError(f"passthrough names an empty column: {list(names)}")
        if name in OWN_COLUMNS:
            table = "errors table" if name in (STAGE, REASON) else "corpus"
            raise ValueError(f"passthrough column {name!r} clashes with the {table}'s own column {name!r} (the "
                             f"tables' own columns: {', '.join(OWN_COLUMNS)}); leave it out of passthrough")
    repeated = sorted({name for name in names if list(names).count(name) > 1})
    if repeated:
        raise ValueError(f"passthrough names {', '.join(map(repr, repeated))} more than once: {list(names)}")


def _passthrough_fields(passthrough: tuple[str, ...]) -> list[pa.Field]:
    return [pa.field(name, pa.string(), nullable=True) for name in passthrough]


def read_metadata(schema: pa.Schema) -> dict[str, Any]:
    """The dualtok metadata a corpus file carries (fingerprint, grid, vocab sizes, versions)."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


# ---- reconstruction audits (pipelines/audit/) ------------------------------------------------
# Layout under an audit's output URI:
#   sample.parquet              the sampled corpus rows and the slice each belongs to (AUDIT_SAMPLE_SCHEMA)
#   tables/<slice>.parquet      one row per (sampled image, variant) with its metrics (AUDIT_SCHEMA)
#   errors/<slice>.parquet      sampled rows that could not be audited, and why (AUDIT_ERRORS_SCHEMA)
#   _committed/<slice>.json     written last: the slice is done
AUDIT_SCHEMA_VERSION = 1
SLICE, VARIANT = "slice", "variant"
GUIDE_SIZE, NUM_GUIDE_TOKENS, NUM_SEMANTIC_TOKENS = "guide_size", "num_guide_tokens", "num_semantic_tokens"
PSNR, SSIM, PSNR_GUIDE, SSIM_GUIDE = "psnr", "ssim", "psnr_at_guide_size", "ssim_at_guide_size"
LPIPS, CLIP_SCORE, CLIP_SIMILARITY = "lpips", "clip_score", "clip_image_similarity"
SECONDS = "seconds"  # reconstruction wall time of this image and variant (its share of the chunk)
ORIGINAL_PATH, GUIDE_PATH, RECONSTRUCTION_PATH = "original_path", "guide_path", "reconstruction_path"

AUDIT_SAMPLE_SCHEMA = pa.schema(
    [
        pa.field(SLICE, pa.string(), nullable=False),
        pa.field(SHARD, pa.string(), nullable=False),
        pa.field(INDEX, pa.int32(), nullable=False),
        pa.field(KEY, pa.string(), nullable=False),
    ]
)

AUDIT_SCHEMA = pa.schema(
    [
        pa.field(SLICE, pa.string(), nullable=False),
        pa.field(KEY, pa.string(), nullable=False),
        pa.field(SHARD, pa.string(), nullable=False),
        pa.field(INDEX, pa.int32(), nullable=False),
        pa.field(CAPTION, pa.string(), nullable=True),
        pa.field(VARIANT, pa.string(), nullable=False),
        pa.field(GUIDE_SIZE, pa.int32(), nullable=False),  # 0: the variant uses no guide
        pa.field(NUM_GUIDE_TOKENS, pa.int32(), nullable=False),
        pa.field(NUM_SEMANTIC_TOKENS, pa.int32(), nullable=False),
        pa.field(PSNR, pa.float64(), nullable=False),  # dB at the output size; inf when identical
        pa.field(SSIM, pa.float64(), nullable=False),
        pa.field(PSNR_GUIDE, pa.float64(), nullable=False),  # both images resized to the bundle's guide size
        pa.field(SSIM_GUIDE, pa.float64(), nullable=False),
        pa.field(LPIPS, pa.float64(), nullable=True),  # null: no LPIPS weights were given
        pa.field(CLIP_SCORE, pa.float64(), nullable=True),  # null: no CLIP model, or no caption
        pa.field(CLIP_SIMILARITY, pa.float64(), nullable=True),
        pa.field(SECONDS, pa.float64(), nullable=False),
        pa.field(ORIGINAL_PATH, pa.string(), nullable=False),  # relative to the audit's output URI
        pa.field(GUIDE_PATH, pa.string(), nullable=True),
        pa.field(RECONSTRUCTION_PATH, pa.string(), nullable=False),
    ]
)

AUDIT_ERRORS_SCHEMA = pa.schema(
    [
        pa.field(SLICE, pa.string(), nullable=False),
        pa.field(KEY, pa.string(), nullable=True),
        pa.field(SHARD, pa.string(), nullable=False),
        pa.field(INDEX, pa.int32(), nullable=False),
        pa.field(STAGE, pa.string(), nullable=False),  # fetch, decode, reconstruct, score
        pa.field(REASON, pa.string(), nullable=False),
    ]
)


# ---- training metrics (pipelines/train/state.py) --------------------------------------------
# `<storage_path>/<run>/metrics/<last step>.jsonl` (one file per checkpoint interval) and
# `<run>/metrics.jsonl` (all, in step order): one JSON object per optimizer step, global over
# the workers. Loss terms of other stages are absent from a row (null when read with this schema).
TRAIN_STEP, TRAIN_EPOCH, TRAIN_LR, TRAIN_LOSS = "step", "epoch", "lr", "loss"
TRAIN_GRAD_NORM, TRAIN_SECONDS, TRAIN_IMAGES_PER_SECOND = "grad_norm", "step_seconds", "images_per_second"
# step_seconds = data_seconds (waiting for and converting the micro-batches) + compute_seconds
# (forward, backward, optimizer) + the rest (metrics all-reduce, the previous step's report).
TRAIN_DATA_SECONDS, TRAIN_COMPUTE_SECONDS = "data_seconds", "compute_seconds"
TRAIN_RESUMED_FROM = "resumed_from"  # the checkpoint step this worker group started from (0: fresh)
TRAIN_CODEBOOK_USAGE, TRAIN_CODEBOOK_PERPLEXITY = "codebook_usage", "codebook_perplexity"
TRAIN_DEAD_CODES = "dead_codes_restarted"
TRAIN_CPU_SECONDS = "worker_cpu_seconds"  # CPU time of the rank-0 worker process over the step (all its threads)


def train_metrics_schema(loss_terms: tuple[str, ...]) -> pa.Schema:
    """The rows of a run's `metrics.jsonl`: the common columns, then the stage's own loss terms
    (`TrainingStage.loss_terms` in dualtok_core/training_stages.py)."""
    return pa.schema(
        [
            pa.field(TRAIN_STEP, pa.int64(), nullable=False),
            pa.field(TRAIN_EPOCH, pa.int64(), nullable=False),
            pa.field(TRAIN_LR, pa.float64(), nullable=False),
            pa.field(TRAIN_LOSS, pa.float64(), nullable=False),
            pa.field(TRAIN_GRAD_NORM, pa.float64(), nullable=False),
            pa.field(TRAIN_SECONDS, pa.float64(), nullable=False),
            pa.field(TRAIN_DATA_SECONDS, pa.float64(), nullable=False),
            pa.field(TRAIN_COMPUTE_SECONDS, pa.float64(), nullable=False),
            pa.field(TRAIN_IMAGES_PER_SECOND, pa.float64(), nullable=False),
            pa.field(TRAIN_RESUMED_FROM, pa.int64(), nullable=False),
            pa.field(TRAIN_CODEBOOK_USAGE, pa.float64(), nullable=True),
            pa.field(TRAIN_CODEBOOK_PERPLEXITY, pa.float64(), nullable=True),
            pa.field(TRAIN_DEAD_CODES, pa.int64(), nullable=True),
            pa.field(TRAIN_CPU_SECONDS, pa.float64(), nullable=True),
            *[pa.field(term, pa.float64(), nullable=True) for term in loss_terms],
        ]
    )


# ---- shard index (`dualtok shards`): the img2dataset-style `<shard>.parquet` beside each tar ----
SHARD_INDEX_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("source", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_message", pa.string()),
    ]
)
