"""A streaming PyTorch dataset over a token corpus: sequences by the contract, packed, resumable.

    dataset = TokenSequenceDataset("s3://b/corpus", text_tokenizer, seq_len=2048)
    loader = DataLoader(dataset, batch_size=8, num_workers=2)  # unpacked: collate_fn=collate_sequences
    for batch in loader:
        dataset.consume(batch)          # the main process's record of what training has seen
        ...
    torch.save(dataset.state_dict(), "loader.pt")   # beside the model checkpoint
    # after a restart: dataset.load_state_dict(torch.load("loader.pt")), then a new DataLoader

How it splits the work: the corpus's committed shard files are permuted per epoch (seed, epoch)
and dealt round-robin to `world_size * num_workers` slots (rank-major), so each (rank, worker)
reads its own files; rows within a file are permuted per (seed, epoch, file). Each slot turns its
rows into sequences (`dualtok_core.sequences`), concatenates them and cuts `seq_len` chunks (no
padding except a slot's last chunk), or yields one sequence per row when `seq_len` is None.

Why it resumes exactly: every item carries its slot and the position just after its last token
(row number within the slot's epoch stream, token offset within that row). `consume` keeps the
latest position per slot in the main process, whatever order the DataLoader's workers deliver in;
a restored dataset starts each slot at its position, so no token is repeated or skipped. A restore
must use the same world size and worker count (the slots would differ): it is checked.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dualtok_core.sequences import Order, SequenceContract
from dualtok.pipelines.io import schemas as S
from dualtok.pipelines.io.corpus import MARKERS_DIR
from dualtok.pipelines.io.outputs import OutputFolder
from dualtok.pipelines.io.storage import filesystem

STATE_VERSION = 1


class TokenSequenceDataset(IterableDataset):
    def __init__(self, corpus: str, text_tokenizer: Any, *, order: Order = "t2i", seq_len: int | None = None,
                 pad_id: int = 0, shuffle: bool = True, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, storage_options: dict[str, Any] | None = None) -> None:
        self.corpus, self.storage_options = corpus, storage_options
        self.text_tokenizer, self.order, self.seq_len, self.pad_id = text_tokenizer, order, seq_len, pad_id
        self.shuffle, self.seed = shuffle, seed
        dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if dist_on else 0)
        self.world_size = world_size if world_size is not None else (
            torch.distributed.get_world_size() if dist_on else 1)
        self.files = committed_files(corpus, storage_options)  # [(uri, rows)] in shard order
        fs, _ = filesystem(corpus, storage_options)
        with fs.open(self.files[0][0], "rb") as handle:
            first = pq.read_schema(handle)
        self.contract = SequenceContract.for_corpus(S.read_metadata(first), len(text_tokenizer))
        self.epoch = 0
        self.positions: dict[int, tuple[int, int]] = {}  # slot -> (row, token offset) consumed so far
        self.slots: int | None = None

    # ---- the training loop's side ------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.positions = epoch, {}

    def consume(self, batch: dict[str, torch.Tensor]) -> None:
        """Record what a delivered batch holds; call it for every batch training used."""
        slots, rows, offsets = (batch[k].reshape(-1).tolist() for k in ("slot", "row", "offset"))
        self.slots = int(batch["slots"].reshape(-1)[0])
        for slot, row, offset in zip(slots, rows, offsets):
            self.positions[slot] = (row, offset)

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "epoch": self.epoch, "slots": self.slots, "seed": self.seed,
                "positions": {int(k): list(v) for k, v in self.positions.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION or state.get("seed") != self.seed:
            raise ValueError(f"loader state {state.get('version')}/seed {state.get('seed')} does not fit this "
                             f"dataset (version {STATE_VERSION}, seed {self.seed})")
        self.epoch, self.slots = int(state["epoch"]), state["slots"]
        self.positions = {int(k): (int(v[0]), int(v[1])) for k, v in state["positions"].items()}

    # ---- the workers' side -------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        slots, slot = self.world_size * workers, self.rank * workers + worker
        if self.slots is not None and self.positions and self.slots != slots:
            raise ValueError(f"the saved loader position is for {self.slots} (rank, worker) slots, this run has "
                             f"{slots}: resume with the same world size and num_workers")
        row, offset = self.positions.get(slot, (0, 0))
        sequences = self._sequences(slot, slots, row)
        chunks = self._chunks(sequences, row, offset) if self.seq_len else self._whole(sequences)
        for ids, mask, (next_row, next_offset) in chunks:
            yield {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                   "slot": torch.tensor(slot), "slots": torch.tensor(slots),
                   "row": torch.tensor(next_row), "offset": torch.tensor(next_offset)}

    def _sequences(self, slot: int, slots: int, start: int) -> Iterator[tuple[int, np.ndarray]]:
        """(row number in this slot's epoch stream, sequence) from row `start` on."""
        order = np.arange(len(self.files))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.files))
        fs, _ = filesystem(self.corpus, self.storage_options)
        row = 0
        for f in order[slot::slots]:
            path, count = self.files[f]
            if row + count <= start:  # whole file already consumed: not even opened
                row += count
                continue
            table = pq.read_table(path, filesystem=fs, columns=[S.CAPTION, S.GUIDE_TOKENS, S.SEMANTIC_TOKENS])
            inner = np.arange(table.num_rows)
            if self.shuffle:
                inner = np.random.default_rng([self.seed, self.epoch, int(f)]).permutation(table.num_rows)
            guide = np.asarray(table[S.GUIDE_TOKENS].combine_chunks().flatten()).reshape(table.num_rows, -1)
            semantic = np.asarray(table[S.SEMANTIC_TOKENS].combine_chunks().flatten()).reshape(table.num_rows, -1)
            captions = table[S.CAPTION].to_pylist()
            skip = max(start - row, 0)
            for j, i in enumerate(inner[skip:], start=skip):
                text = self.text_tokenizer(captions[i], add_special_tokens=False)["input_ids"] if captions[i] else []
                yield row + j, self.contract.sequence(text, guide[i], semantic[i], self.order)
            row += count

    def _whole(self, sequences: Iterator[tuple[int, np.ndarray]]):
        for row, seq in sequences:
            yield seq, np.ones_like(seq), (row + 1, 0)

    def _chunks(self, sequences: Iterator[tuple[int, np.ndarray]], start_row: int, start_offset: int):
        """Concatenate sequences and cut `seq_len` chunks; each chunk ends at a (row, offset) position."""
        buffer: list[np.ndarray] = []
        filled, row = 0, start_row
        for row, seq in sequences:
            if row == start_row and start_offset:
                seq = seq[start_offset:]  # the part of this row an earlier chunk already held
                base = start_offset
            else:
                base = 0
            while len(seq):
                take = min(self.seq_len - filled, len(seq))
                buffer.append(seq[:take])
                filled += take
                seq, base = seq[take:], base + take
                if filled == self.seq_len:
                    position = (row, base) if len(seq) else (row + 1, 0)
                    yield np.concatenate(buffer), np.ones(self.seq_len, np.int64), position
                    buffer, filled = [], 0
        if filled:
            ids = np.full(self.seq_len, self.pad_id, np.int64)
            ids[:filled] = np.concatenate(buffer)
            mask = (np.arange(self.seq_len) < filled).astype(np.int64)
            yield ids, mask, (row + 1, 0)


def committed_files(corpus: str, storage_options: dict[str, Any] | None = None) -> list[tuple[str, int]]:
    """(data file path on the corpus's filesystem, rows) of every committed shard, in shard order;
    empty shards left out. Only committed shards: a shard a crashed run left half-written is unseen."""
    markers = OutputFolder(corpus, storage_options).markers(MARKERS_DIR, "shard")
    if not markers:
        raise FileNotFoundError(f"{corpus} is not a token corpus: no {MARKERS_DIR}/*.json markers")
    fs, _ = filesystem(corpus, storage_options)
    base = fs._strip_protocol(corpus).rstrip("/")
    files = [(f"{base}/{m['data_file']}", int(m["rows"])) for _, m in sorted(markers.items()) if m["rows"] > 0]
    if not files:
        raise FileNotFoundError(f"{corpus} holds no committed rows")
    return files


def collate_sequences(items: list[dict[str, torch.Tensor]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """DataLoader `collate_fn` for unpacked sequences (`seq_len=None`): right-pads `input_ids` with
    `pad_id` (and `attention_mask` with 0) to the batch's longest sequence."""
    longest = max(len(it["input_ids"]) for it in items)
    out = {k: torch.stack([it[k] for it in items]) for k in ("slot", "slots", "row", "offset")}
    out["input_ids"] = torch.full((len(items), longest), pad_id, dtype=torch.int64)
    out["attention_mask"] = torch.zeros((len(items), longest), dtype=torch.int64)
    for i, it in enumerate(items):
        out["input_ids"][i, : len(it["input_ids"])] = it["input_ids"]
        out["attention_mask"][i, : len(it["input_ids"])] = 1
    return out
