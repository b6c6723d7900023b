"""The tokenize pipeline's model stage: decoded images -> guide and/or semantic token columns.

Works without Ray (tests call it directly); `add_actor_stage` puts it on a dataset as an actor
pool. Rows are SAMPLE, ERROR or END (see `io/schemas.py`); the encoder touches SAMPLE rows only,
and in a run (`parts`) writes them to the run's part files in its own process (`io/token_parts.py`).
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import torch

from dualtok.pipelines.actors import BundleSource, StageResources, pick_device, pick_dtype
from dualtok.pipelines.io import schemas as S
from dualtok.pipelines.io.token_parts import TokenParts

logger = logging.getLogger(__name__)

_STREAM_COLUMNS = {"guide": S.GUIDE_TOKENS, "semantic": S.SEMANTIC_TOKENS}


class EncodeTokens:
    """IMAGE -> the token columns of every requested stream, both branches in one actor.

    One stage rather than one per branch: the decoded image crosses the object store once (into
    this actor) and never comes back out, and an actor pool splits the CPUs/GPUs by actor count
    instead of by a guess of the branches' relative cost. Only SAMPLE rows are encoded.
    """

    def __init__(self, source: BundleSource, resources: StageResources, streams: tuple[str, ...],
                 parts: TokenParts | None = None) -> None:
        unknown = sorted(set(streams) - set(_STREAM_COLUMNS))
        if unknown or not streams:
            raise ValueError(f"streams must be a non-empty subset of {sorted(_STREAM_COLUMNS)}, got {streams}")
        self.streams = tuple(streams)
        self.parts = parts  # the run's part files: SAMPLE rows are written here and go no further
        self.device = pick_device(resources.device)
        self.dtype = pick_dtype(resources.dtype, self.device)
        if self.device.type == "cpu":
            torch.set_num_threads(resources.torch_threads)
        self.tokenizer = source.load(self.streams).to(self.device, self.dtype)
        self.encoders = {"guide": self.tokenizer.encode_guide, "semantic": self.tokenizer.encode_semantic}
        self.lengths = {"guide": self.tokenizer.guide_grid**2 if "guide" in self.streams else 0,
                        "semantic": self.tokenizer.num_semantic_tokens if "semantic" in self.streams else 0}
        logger.info("EncodeTokens: loaded %s %s (%s) on %s/%s, %d torch threads", source.spec, "+".join(self.streams),
                    self.tokenizer.fingerprint, self.device, self.dtype, torch.get_num_threads())

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """The batch less IMAGE, plus a token column per stream, typed as `schemas.inflight_table` says."""
        rows = np.flatnonzero(batch[S.ROW_KIND] == S.SAMPLE)
        # (N, S, S, 3) uint8, SAMPLE rows only; the semantic branch's own input where the decode made one
        own = {"semantic": S.SEMANTIC_IMAGE} if S.SEMANTIC_IMAGE in batch else {}
        images = {stream: batch[own.get(stream, S.IMAGE)][rows] for stream in self.streams}
        out = {k: v for k, v in batch.items() if k not in (S.IMAGE, S.SEMANTIC_IMAGE)}  # only tokens go on
        for stream in self.streams:
            tokens = np.zeros((len(batch[S.ROW_KIND]), self.lengths[stream]), dtype=np.uint16)
            if len(rows):
                tokens[rows] = self.encoders[stream](images[stream])  # (N, length) uint16
            out[_STREAM_COLUMNS[stream]] = tokens
        return S.inflight_table(self.parts(out) if self.parts is not None else out)
