"""Feeding training: WebDataset shards -> Ray Data -> (image, caption) rows, and captions -> ids.

    shard URIs -> ReadShards -> DecodeImages (at the trained branch's input size)
               -> KeepTrainingSamples (good samples only; with a caption where the stage needs one)

The same stages as the tokenize pipeline read and decode, so a corpus that tokenizes also
trains. Ray Train splits the dataset across workers (`get_dataset_shard`) and streams it; each
pass over the shards is one epoch, and a worker starts the next pass when its share runs out.
Bad samples, which the tokenize job records in its errors table, are simply skipped here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dualtok_core.errors import BundleError, DualtokError
from dualtok.pipelines.io import schemas as S
from dualtok.pipelines.io.decode import DecodeConfig
from dualtok.pipelines.io.read import DecodeImages, ReadShards
from dualtok.pipelines.io.storage import local_copy

logger = logging.getLogger(__name__)

TRAINING_COLUMNS = (S.IMAGE, S.CAPTION)


@dataclass(frozen=True)
class TrainingDataConfig:
    """How shards become training rows; `image_size` is the trained branch's input size."""

    image_size: int
    require_captions: bool = False
    read_cpus: float = 1.0
    max_pixels: int = 64_000_000
    min_side: int = 16
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class KeepTrainingSamples:
    """Decoded rows -> the SAMPLE rows (with a non-blank caption if required), image + caption only."""

    require_captions: bool = False

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep = batch[S.ROW_KIND] == S.SAMPLE
        captions = batch[S.CAPTION]
        if self.require_captions:
            keep &= np.array([isinstance(c, str) and bool(c.strip()) for c in captions], dtype=bool)
        rows = np.flatnonzero(keep)
        kept_captions = np.empty(len(rows), dtype=object)
        kept_captions[:] = [captions[i] if isinstance(captions[i], str) else "" for i in rows]
        return {S.IMAGE: batch[S.IMAGE][rows], S.CAPTION: kept_captions}


def training_dataset(shards: list[str], config: TrainingDataConfig) -> Any:
    """A lazy Ray Data dataset of training rows read from `shards` (URIs, as `list_shards` gives)."""
    import ray

    if not shards:
        raise DualtokError("no input shards to train on")
    items = [{S.SHARD: uri.rsplit("/", 1)[-1], S.SHARD_URI: uri} for uri in shards]
    decode = DecodeConfig(size=config.image_size, max_pixels=config.max_pixels, min_side=config.min_side)
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(ReadShards(config.storage_options), batch_size=1, num_cpus=config.read_cpus)
    ds = ds.map_batches(DecodeImages(decode), batch_size=32, num_cpus=config.read_cpus)
    ds = ds.map_batches(KeepTrainingSamples(config.require_captions), batch_size=None, num_cpus=config.read_cpus)
    # The stream is re-read every epoch inside the workers; per-epoch progress bars would bury the metrics.
    ds.context.enable_progress_bars = False
    return ds


# ---- captions -> Q-Former text ids ----------------------------------------------------------
def load_text_tokenizer(uri: str, vocab_size: int, storage_options: dict[str, Any] | None = None) -> Any:
    """The Q-Former's BERT-style text tokenizer from a folder (local or URI) in transformers' format.

    Its vocabulary must fit the Q-Former's word embeddings (`vocab_size`): a bigger one would index
    past them, a different one would silently mean other words.
    """
    from transformers import AutoTokenizer

    with local_copy(uri, storage_options) as folder:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if len(tokenizer) > vocab_size:
        raise BundleError(
            f"text tokenizer {uri} has {len(tokenizer)} tokens but the Q-Former embeds {vocab_size}: "
            "use the tokenizer the Q-Former was trained with"
        )
    if tokenizer.pad_token_id is None:
        raise BundleError(f"text tokenizer {uri} has no pad token; batches of captions need one")
    return tokenizer


def train_text_tokenizer(captions: list[str], folder: str, vocab_size: int, max_length: int = 32) -> str:
    """A BERT-style WordPiece tokenizer (lower-cased, [CLS] ... [SEP]) trained offline on `captions`,
    saved in transformers' format to the local `folder`: the Q-Former's text tokenizer for a bundle
    trained from scratch, whose vocabulary (at most `vocab_size`) is what the captions use."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if not captions:
        raise DualtokError("no captions to train a text tokenizer on: the qformer stage needs captioned samples")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(captions, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    tokenizer.post_processor = processors.BertProcessing(
        ("[SEP]", tokenizer.token_to_id("[SEP]")), ("[CLS]", tokenizer.token_to_id("[CLS]"))
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=max_length)
    fast.save_pretrained(folder)
    return folder
