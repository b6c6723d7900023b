"""The sequence contract: how one corpus row becomes one LLM training sequence, and back.

Version `dualtok-seq/1` fixes, for a text tokenizer of T ids (`len(tokenizer)`, added tokens
included) and a bundle's two codebooks:

    ids [0, T)                      the text tokenizer's own ids, unchanged
    T + 0, T + 1, T + 2             <|dualtok:boi|>, <|dualtok:sep|>, <|dualtok:eoi|>
    [G0, G0 + guide_vocab)          guide ids,    G0 = T + 3
    [S0, S0 + semantic_vocab)       semantic ids, S0 = G0 + guide_vocab

    image block = <boi> guide ids (the h x w grid, row-major) <sep> semantic ids (causal order) <eoi>
    "t2i" (generation):  caption ids, image block
    "i2t" (captioning):  image block, caption ids

Why this layout: text ids stay where the language model has them (its embedding rows are
reused, new rows are appended, as SEED-LLaMA shifts image ids by the text vocabulary); the three
special tokens come before the image ids so that their ids do not move when a bundle's codebook
sizes change. Layout first (guide), then content (semantic): the guide stream is a few tokens and
fixes where things are, the semantic stream then says what they are, and each stream keeps the order
its tokenizer made it in (raster for the VQ-VAE grid, causal for the Q-Former).

The contract is plain data (`to_json`), written into every export's metadata, and can extend a
Hugging Face tokenizer with one added token per id (`extend_tokenizer`), so an LLM trained on an
export decodes its own outputs: `contract.split(ids)` -> caption ids, guide ids, semantic ids ->
`DualTokenizer.detokenize`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from dualtok_core.errors import TokenInputError

CONTRACT_VERSION = "dualtok-seq/1"
SPECIAL_TOKENS = ("<|dualtok:boi|>", "<|dualtok:sep|>", "<|dualtok:eoi|>")
Order = Literal["t2i", "i2t"]


@dataclass(frozen=True)
class SequenceContract:
    """The shared vocabulary and the order of one image's tokens in a sequence."""

    text_vocab: int
    guide_vocab: int
    guide_len: int  # h * w of the guide grid
    semantic_vocab: int
    semantic_len: int
    version: str = CONTRACT_VERSION

    def __post_init__(self) -> None:
        if self.version != CONTRACT_VERSION:
            raise TokenInputError(f"sequence contract {self.version!r} is not {CONTRACT_VERSION!r}, which this "
                                  "dualtok reads; re-export with this version")
        if min(self.text_vocab, self.guide_vocab, self.guide_len, self.semantic_vocab, self.semantic_len) < 1:
            raise TokenInputError(f"sequence contract sizes must be >= 1: {self}")

    # ---- ids -------------------------------------------------------------------------------
    @property
    def boi(self) -> int:
        return self.text_vocab

    @property
    def sep(self) -> int:
        return self.text_vocab + 1

    @property
    def eoi(self) -> int:
        return self.text_vocab + 2

    @property
    def guide_offset(self) -> int:
        return self.text_vocab + len(SPECIAL_TOKENS)

    @property
    def semantic_offset(self) -> int:
        return self.guide_offset + self.guide_vocab

    @property
    def vocab_size(self) -> int:
        """Rows the language model's embedding needs."""
        return self.semantic_offset + self.semantic_vocab

    @property
    def image_len(self) -> int:
        return self.guide_len + self.semantic_len + 3

    @classmethod
    def for_corpus(cls, metadata: dict[str, Any], text_vocab: int) -> "SequenceContract":
        """From a corpus file's dualtok metadata (`schemas.read_metadata`) and a text tokenizer's size."""
        missing = [k for k in ("guide_grid", "guide_vocab", "semantic_tokens", "semantic_vocab") if k not in metadata]
        if missing:
            raise TokenInputError(f"the corpus metadata lacks {missing}: sequences need both streams "
                                  "(tokenize with streams=both)")
        return cls(text_vocab=text_vocab, guide_vocab=int(metadata["guide_vocab"]),
                   guide_len=int(metadata["guide_grid"]) ** 2, semantic_vocab=int(metadata["semantic_vocab"]),
                   semantic_len=int(metadata["semantic_tokens"]))

    # ---- building --------------------------------------------------------------------------
    def image_block(self, guide: np.ndarray, semantic: np.ndarray) -> np.ndarray:
        """Corpus ids (B, guide_len) and (B, semantic_len) -> shared-vocabulary ids (B, image_len)."""
        guide, semantic = np.atleast_2d(guide), np.atleast_2d(semantic)
        self._check(guide, self.guide_len, self.guide_vocab, "guide")
        self._check(semantic, self.semantic_len, self.semantic_vocab, "semantic")
        n = guide.shape[0]
        column = np.full((n, 1), 0, dtype=np.int64)
        return np.concatenate([
            column + self.boi, guide.astype(np.int64) + self.guide_offset,
            column + self.sep, semantic.astype(np.int64) + self.semantic_offset, column + self.eoi,
        ], axis=1)

    def sequence(self, caption_ids: list[int] | np.ndarray, guide: np.ndarray, semantic: np.ndarray,
                 order: Order = "t2i") -> np.ndarray:
        """One row's training sequence (int64), caption ids as the text tokenizer gave them."""
        text = np.asarray(caption_ids, dtype=np.int64).reshape(-1)
        if text.size and (text.min() < 0 or text.max() >= self.text_vocab):
            raise TokenInputError(f"caption ids must lie in [0, {self.text_vocab}): got {text.min()}..{text.max()}")
        image = self.image_block(guide, semantic)[0]
        if order == "t2i":
            return np.concatenate([text, image])
        if order == "i2t":
            return np.concatenate([image, text])
        raise TokenInputError(f"order must be 't2i' or 'i2t', got {order!r}")

    # ---- mapping back ----------------------------------------------------------------------
    def split(self, ids: list[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A sequence (e.g. an LLM's output) -> (text ids outside the image, guide ids, semantic ids),
        the image ids back in each codebook's own range. Exactly one well-formed image block is
        required; anything else is an error that says what is wrong (LLMs miscount tokens)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        starts, ends = np.flatnonzero(ids == self.boi), np.flatnonzero(ids == self.eoi)
        if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
            raise TokenInputError(f"expected one <boi> ... <eoi> image block, found {len(starts)} <boi> and "
                                  f"{len(ends)} <eoi>")
        block = ids[starts[0] + 1: ends[0]]
        seps = np.flatnonzero(block == self.sep)
        if len(seps) != 1:
            raise TokenInputError(f"the image block needs one <sep> between the streams, found {len(seps)}")
        guide, semantic = block[: seps[0]] - self.guide_offset, block[seps[0] + 1:] - self.semantic_offset
        self._check(guide[None], self.guide_len, self.guide_vocab, "guide")
        self._check(semantic[None], self.semantic_len, self.semantic_vocab, "semantic")
        text = np.concatenate([ids[: starts[0]], ids[ends[0] + 1:]])
        return text, guide.astype(np.uint16), semantic.astype(np.uint16)

    def _check(self, ids: np.ndarray, length: int, vocab: int, stream: str) -> None:
        if ids.ndim != 2 or ids.shape[1] != length:
            raise TokenInputError(f"{stream} ids must be (B, {length}), got shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise TokenInputError(f"{stream} ids must lie in [0, {vocab}), got {ids.min()}..{ids.max()}")

    # ---- metadata and tokenizers -----------------------------------------------------------
    def token_strings(self) -> list[str]:
        """The added tokens in id order, from `boi` on: specials, then one per guide and semantic id."""
        width_g, width_s = len(str(self.guide_vocab - 1)), len(str(self.semantic_vocab - 1))
        return [*SPECIAL_TOKENS, *(f"<|g:{i:0{width_g}d}|>" for i in range(self.guide_vocab)),
                *(f"<|s:{i:0{width_s}d}|>" for i in range(self.semantic_vocab))]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "SequenceContract":
        return cls(**json.loads(text))


def extend_tokenizer(tokenizer: Any, contract: SequenceContract) -> Any:
    """Add the contract's tokens to a Hugging Face tokenizer (in place) so that their ids are the
    contract's; `tokenizer.save_pretrained(folder)` then writes a `tokenizer.json` an LLM stack loads."""
    if len(tokenizer) != contract.text_vocab:
        raise TokenInputError(f"the tokenizer has {len(tokenizer)} ids but the contract was made for "
                              f"{contract.text_vocab}: build the contract from this tokenizer")
    strings = contract.token_strings()
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    tokenizer.add_tokens(strings[len(SPECIAL_TOKENS):])
    got = tokenizer.convert_tokens_to_ids([strings[0], strings[-1]])
    if got != [contract.boi, contract.vocab_size - 1] or len(tokenizer) != contract.vocab_size:
        raise TokenInputError(f"the tokenizer placed the added tokens at {got}, not at {contract.boi} and "
                              f"{contract.vocab_size - 1}: it already held some of them")
    return tokenizer
