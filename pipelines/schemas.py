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
