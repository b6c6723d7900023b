"""Column names and Arrow schemas of every table dualtok writes. The one place they live.

Tables:
- token corpus (`data/<shard-id>.parquet`): one row per successfully tokenized image;
- errors (`errors/<shard-id>.parquet`): one row per sample that could not be tokenized;
- commit markers (`_committed/<shard-id>.json`): per-shard counts, written last.
`rows + errors == samples read`, per shard and in total.
"""

from __future__ import annotations

import json
from typing import Any

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
ROW_KIND = "row_kind"  # SAMPLE, ERROR or END (one END row per shard carries the sample count)
SHARD_SAMPLES = "shard_samples"  # on END rows: samples read from the shard; -1 elsewhere
SHARD_URI = "shard_uri"
SAMPLE, ERROR, END = 0, 1, 2

# Error stages.
STAGE_READ, STAGE_DECODE, STAGE_ENCODE = "read", "decode", "encode"


def corpus_schema(guide_len: int | None, semantic_len: int | None, metadata: dict[str, Any]) -> pa.Schema:
    """Corpus schema; a token column is present only for the streams the run produces."""
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


def read_metadata(schema: pa.Schema) -> dict[str, Any]:
    """The dualtok metadata a corpus file carries (fingerprint, grid, vocab sizes, versions)."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


# ---- training metrics (jobs/train_state.py) -------------------------------------------------
# `<storage_path>/<run>/metrics/<last step>.jsonl` (one file per checkpoint interval) and
# `<run>/metrics.jsonl` (all, in step order): one JSON object per optimizer step, global over
# the workers. Loss terms of other stages are absent from a row (null when read with this schema).
TRAIN_STEP, TRAIN_EPOCH, TRAIN_LR, TRAIN_LOSS = "step", "epoch", "lr", "loss"
TRAIN_GRAD_NORM, TRAIN_SECONDS, TRAIN_IMAGES_PER_SECOND = "grad_norm", "step_seconds", "images_per_second"
TRAIN_RESUMED_FROM = "resumed_from"  # the checkpoint step this worker group started from (0: fresh)
TRAIN_CODEBOOK_USAGE, TRAIN_CODEBOOK_PERPLEXITY = "codebook_usage", "codebook_perplexity"
TRAIN_DEAD_CODES = "dead_codes_restarted"
# The stage modules' loss terms (dualtok_core/training_stages.py), by stage.
TRAIN_LOSS_TERMS = {
    "guide": ("recon_loss", "codebook_loss", "commitment_loss"),
    "qformer": ("contrastive_loss", "temperature"),
    "codebook": ("cosine_loss", "codebook_loss", "commitment_loss"),
    "reverse": ("generation_loss",),
}

TRAIN_METRICS_SCHEMA = pa.schema(
    [
        pa.field(TRAIN_STEP, pa.int64(), nullable=False),
        pa.field(TRAIN_EPOCH, pa.int64(), nullable=False),
        pa.field(TRAIN_LR, pa.float64(), nullable=False),
        pa.field(TRAIN_LOSS, pa.float64(), nullable=False),
        pa.field(TRAIN_GRAD_NORM, pa.float64(), nullable=False),
        pa.field(TRAIN_SECONDS, pa.float64(), nullable=False),
        pa.field(TRAIN_IMAGES_PER_SECOND, pa.float64(), nullable=False),
        pa.field(TRAIN_RESUMED_FROM, pa.int64(), nullable=False),
        pa.field(TRAIN_CODEBOOK_USAGE, pa.float64(), nullable=True),
        pa.field(TRAIN_CODEBOOK_PERPLEXITY, pa.float64(), nullable=True),
        pa.field(TRAIN_DEAD_CODES, pa.int64(), nullable=True),
        *[
            pa.field(term, pa.float64(), nullable=True)
            for term in dict.fromkeys(t for terms in TRAIN_LOSS_TERMS.values() for t in terms)
        ],
    ]
)
