"""The sequence contract (corpus row <-> LLM sequence) and the streaming, resumable loader."""

from __future__ import annotations

import json
import shutil
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

from dualtok_core.errors import TokenInputError
from dualtok_core.sequences import SequenceContract, extend_tokenizer
from dualtok.pipelines.io import schemas as S
from dualtok.pipelines.sequences.loader import TokenSequenceDataset, collate_sequences

CAPTIONS = ["a cat on a mat", "a dog in the fog", "two birds over the sea", "an old red car"]
GUIDE_LEN, GUIDE_VOCAB, SEMANTIC_LEN, SEMANTIC_VOCAB = 4, 64, 3, 32
ROWS_PER_FILE = [3, 5, 2, 7, 4, 6]


def word_piece() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(CAPTIONS, trainers.WordPieceTrainer(vocab_size=80, special_tokens=["[PAD]", "[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


@pytest.fixture(scope="module")
def text_tokenizer() -> PreTrainedTokenizerFast:
    return word_piece()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """A corpus in the on-disk contract (data files + markers) whose rows are identifiable: row r of
    file f has guide ids (f, r, f, r) and semantic ids (r, f, 0)."""
    root = tmp_path_factory.mktemp("corpus")
    meta = {"guide_grid": 2, "guide_vocab": GUIDE_VOCAB, "semantic_tokens": SEMANTIC_LEN, "semantic_vocab": SEMANTIC_VOCAB}
    schema = S.corpus_schema(GUIDE_LEN, SEMANTIC_LEN, meta)
    (root / "data").mkdir()
    (root / "_committed").mkdir()
    for f, rows in enumerate(ROWS_PER_FILE):
        shard = f"{f:05d}"
        guide = np.array([[f, r, f, r] for r in range(rows)], np.uint16).reshape(-1)
        semantic = np.array([[r, f, 0] for r in range(rows)], np.uint16).reshape(-1)
        table = pa.Table.from_arrays([
            pa.array([f"{shard}-{r}" for r in range(rows)]), pa.array([shard] * rows), pa.array(range(rows), pa.int32()),
            pa.array([CAPTIONS[r % 4] if r % 3 else None for r in range(rows)]),
            pa.array([64] * rows, pa.int32()), pa.array([64] * rows, pa.int32()),
            pa.FixedSizeListArray.from_arrays(pa.array(guide, pa.uint16()), GUIDE_LEN),
            pa.FixedSizeListArray.from_arrays(pa.array(semantic, pa.uint16()), SEMANTIC_LEN),
        ], schema=schema)
        pq.write_table(table, root / "data" / f"{shard}.parquet")
        marker = {"shard": shard, "rows": rows, "errors": 0, "samples": rows, "data_file": f"data/{shard}.parquet",
                  "bundle_fingerprint": "b0", "dtype": "bfloat16"}
        (root / "_committed" / f"{shard}.json").write_text(json.dumps(marker))
    return str(root)


def contract(text_vocab: int) -> SequenceContract:
    return SequenceContract(text_vocab, GUIDE_VOCAB, GUIDE_LEN, SEMANTIC_VOCAB, SEMANTIC_LEN)


# ---- the contract ------------------------------------------------------------------------------
def test_sequence_layout_and_split_round_trip(text_tokenizer):
    c = contract(len(text_tokenizer))
    caption = text_tokenizer("a cat on a mat", add_special_tokens=False)["input_ids"]
    guide, semantic = np.array([5, 0, 63, 7]), np.array([31, 0, 2])
    seq = c.sequence(caption, guide, semantic, "t2i")
    t = len(text_tokenizer)
    assert seq.tolist() == [*caption, t, *(guide + t + 3), t + 1, *(semantic + t + 3 + GUIDE_VOCAB), t + 2]
    text, g, s = c.split(seq)
    assert text.tolist() == caption and g.tolist() == guide.tolist() and s.tolist() == semantic.tolist()
    i2t = c.sequence(caption, guide, semantic, "i2t")
    assert i2t[0] == c.boi and i2t[-len(caption):].tolist() == caption
    assert c.vocab_size == t + 3 + GUIDE_VOCAB + SEMANTIC_VOCAB
    assert SequenceContract.from_json(c.to_json()) == c


@pytest.mark.parametrize("mutate, message", [
    (lambda s, c: s[s != c.eoi], "one <boi> ... <eoi>"),
    (lambda s, c: np.concatenate([s, s]), "one <boi> ... <eoi>"),
    (lambda s, c: s[s != c.sep], "one <sep>"),
    (lambda s, c: np.delete(s, np.flatnonzero(s == c.sep)[0] - 1), r"guide ids must be \(B, 4\)"),
    (lambda s, c: np.where(s == s[np.flatnonzero(s == c.sep)[0] + 1], c.guide_offset, s), r"semantic ids must lie"),
])
def test_malformed_model_outputs_are_named_errors(text_tokenizer, mutate, message):
    c = contract(len(text_tokenizer))
    seq = c.sequence([3, 4], np.array([1, 2, 3, 4]), np.array([5, 6, 7]))
    with pytest.raises(TokenInputError, match=message):
        c.split(mutate(seq, c))


def test_extended_tokenizer_writes_and_reads_back_the_contract_ids(text_tokenizer, tmp_path):
    tok = word_piece()
    c = contract(len(tok))
    extend_tokenizer(tok, c)
    tok.save_pretrained(tmp_path / "tok")
    reloaded = PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok", local_files_only=True)
    assert len(reloaded) == c.vocab_size
    seq = c.sequence(reloaded("an old red car", add_special_tokens=False)["input_ids"], np.array([9, 8, 7, 63]),
                     np.array([0, 1, 31]))
    text = reloaded.decode(seq)  # what an LLM's output looks like as text
    assert "<|dualtok:boi|>" in text and "<|g:63|>" in text and "<|s:31|>" in text
    assert reloaded(text, add_special_tokens=False)["input_ids"] == seq.tolist()
    with pytest.raises(TokenInputError, match="has 79 ids|has .* ids but"):
        extend_tokenizer(reloaded, c)  # already extended: its size no longer matches the contract


# ---- the loader --------------------------------------------------------------------------------
def rows_in(ids: torch.Tensor, c: SequenceContract) -> list[tuple[int, int]]:
    """(file, row) of every image block in a stream of ids (guide ids are (f, r, f, r))."""
    ids = ids.tolist()
    return [(ids[i + 1] - c.guide_offset, ids[i + 2] - c.guide_offset) for i, v in enumerate(ids) if v == c.boi]


def run(dataset: TokenSequenceDataset, stop_after: int | None = None) -> dict[int, list[dict]]:
    """Items per slot in delivery order; with `stop_after`, only the first batches are consumed."""
    # spawn, never fork: this process holds Ray's and moto's threads by the time this test runs
    loader = DataLoader(dataset, batch_size=2, num_workers=2, multiprocessing_context="spawn",
                        collate_fn=None if dataset.seq_len else collate_sequences)
    per_slot: dict[int, list[dict]] = defaultdict(list)
    for n, batch in enumerate(loader):
        if stop_after is not None and n == stop_after:
            break
        dataset.consume(batch)
        for i in range(len(batch["slot"])):
            per_slot[int(batch["slot"][i])].append({k: v[i] for k, v in batch.items()})
    return per_slot


@pytest.mark.parametrize("seq_len", [None, 16])
def test_two_ranks_two_workers_see_every_row_once_and_resume_exactly(corpus, text_tokenizer, seq_len):
    c = contract(len(text_tokenizer))
    full: dict[int, list[dict]] = {}
    for rank in range(2):
        full.update(run(TokenSequenceDataset(corpus, text_tokenizer, seq_len=seq_len, rank=rank, world_size=2, seed=7)))
    assert sorted(full) == [0, 1, 2, 3]
    expected = [(f, r) for f, rows in enumerate(ROWS_PER_FILE) for r in range(rows)]
    if seq_len is None:  # every row exactly once across 2 ranks x 2 workers
        assert sorted(fr for items in full.values() for it in items for fr in rows_in(it["input_ids"], c)) == expected
    else:  # packed: a block may straddle chunks; each slot's chunks, joined, hold each of its rows once
        joined = {s: torch.cat([it["input_ids"][it["attention_mask"].bool()] for it in items]) for s, items in full.items()}
        assert sorted(fr for ids in joined.values() for fr in rows_in(ids, c)) == expected
        assert all(len(it["input_ids"]) == seq_len for items in full.values() for it in items)

    # another epoch is another order of the same rows
    orders = []
    for epoch in (0, 1):
        dataset = TokenSequenceDataset(corpus, text_tokenizer, rank=0, world_size=1, seed=7)
        dataset.set_epoch(epoch)
        orders.append([fr for it in iter(dataset) for fr in rows_in(it["input_ids"], c)])
    assert sorted(orders[0]) == sorted(orders[1]) == expected and orders[0] != orders[1]

    # rank 0 stops after 2 batches; a fresh dataset restored from its state delivers exactly the rest
    first = TokenSequenceDataset(corpus, text_tokenizer, seq_len=seq_len, rank=0, world_size=2, seed=7)
    before = run(first, stop_after=2)
    state = json.loads(json.dumps(first.state_dict()))  # it survives a JSON round trip (a checkpoint)
    resumed = TokenSequenceDataset(corpus, text_tokenizer, seq_len=seq_len, rank=0, world_size=2, seed=7)
    resumed.load_state_dict(state)
    after = run(resumed)
    for slot in (0, 1):
        joined = before.get(slot, []) + after.get(slot, [])
        assert [it["input_ids"].tolist() for it in joined] == [it["input_ids"].tolist() for it in full[slot]]


def test_restore_with_another_worker_count_is_refused(corpus, text_tokenizer):
    first = TokenSequenceDataset(corpus, text_tokenizer, rank=0, world_size=1)
    run(first, stop_after=1)
    single = TokenSequenceDataset(corpus, text_tokenizer, rank=0, world_size=1)
    single.load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="same world size and num_workers"):
        next(iter(single))  # num_workers=0: one slot where the saved state had two


# ---- dualtok export ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, text_tokenizer) -> str:
    folder = tmp_path_factory.mktemp("text-tokenizer")
    text_tokenizer.save_pretrained(str(folder))
    return str(folder)


def expected_sequences(corpus: str, text_tokenizer, order: str = "t2i") -> dict[str, np.ndarray]:
    """Row key -> its sequence by the contract, built here from the corpus files."""
    c = contract(len(text_tokenizer))
    out = {}
    for f, rows in enumerate(ROWS_PER_FILE):
        table = pq.read_table(f"{corpus}/data/{f:05d}.parquet")
        for r in range(rows):
            caption = table[S.CAPTION][r].as_py()
            text = text_tokenizer(caption, add_special_tokens=False)["input_ids"] if caption else []
            guide = np.array(table[S.GUIDE_TOKENS][r].as_py())
            semantic = np.array(table[S.SEMANTIC_TOKENS][r].as_py())
            out[table[S.KEY][r].as_py()] = c.sequence(text, guide, semantic, order)
    return out


def test_megatron_export_reads_back_with_megatron_core_split_by_key_and_resumes(
    ray_session, corpus, text_tokenizer, tokenizer_dir, tmp_path
):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from dualtok.pipelines.sequences.export import ExportConfig, heldout_mask, run_export

    corpus = str(shutil.copytree(corpus, tmp_path / "corpus"))  # this test re-tokenizes a shard of its own
    out = tmp_path / "export"
    config = ExportConfig(corpus=corpus, output=str(out), text_tokenizer=tokenizer_dir, format="megatron",
                          heldout_fraction=0.3, split_seed=7)
    summary = run_export(config)
    assert (summary.shards_committed, summary.shards_skipped) == (len(ROWS_PER_FILE), 0)
    expected = expected_sequences(corpus, text_tokenizer)
    keys = sorted(expected)
    held = {k for k, h in zip(keys, heldout_mask(keys, 0.3, 7)) if h}
    assert 0 < len(held) < len(keys)  # 27 rows, about 8 held out
    found: dict[str, list[list[int]]] = {"train": [], "heldout": []}
    manifest = json.loads((out / "manifest.json").read_text())
    # what made the tokens, from the corpus's markers: the bundle to decode generated ids with
    n = len(ROWS_PER_FILE)
    assert manifest["tokens_made_by"] == {"shards_by_bundle": {"b0": n}, "shards_by_dtype": {"bfloat16": n}}
    for split in ("train", "heldout"):
        for name in manifest["files"][split]:
            if name.endswith(".idx"):
                dataset = IndexedDataset(str(out / name[: -len(".idx")]))  # Megatron's own reader
                assert dataset.index.dtype == np.uint16
                found[split] += [dataset[i].tolist() for i in range(len(dataset))]
    want = lambda keep: sorted(expected[k].tolist() for k in keys if keep(k))
    assert sorted(found["train"]) == want(lambda k: k not in held)  # every row once, in its split
    assert sorted(found["heldout"]) == want(lambda k: k in held)
    assert summary.rows == {"train": len(keys) - len(held), "heldout": len(held)}
    # the contract and the extended tokenizer travel with the export; it decodes its own sequences
    from transformers import AutoTokenizer

    saved = SequenceContract.from_json((out / "contract.json").read_text())
    assert saved == contract(len(text_tokenizer))
    extended = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert len(extended) == saved.vocab_size
    _, guide, semantic = saved.split(found["train"][0])
    assert guide.shape == (GUIDE_LEN,) and semantic.shape == (SEMANTIC_LEN,)

    before = {p.name: p.stat().st_mtime_ns for p in (out / "train").iterdir()}
    again = run_export(config)
    assert (again.shards_committed, again.shards_skipped) == (0, len(ROWS_PER_FILE))
    assert {p.name: p.stat().st_mtime_ns for p in (out / "train").iterdir()} == before  # nothing rewritten
    # the corpus re-tokenizes one shard (a new run's marker): the next export redoes that shard only
    marker_file = Path(corpus) / "_committed" / "00002.json"
    marker_file.write_text(json.dumps({**json.loads(marker_file.read_text()), "run_id": "retokenized"}))
    redone = run_export(config)
    assert (redone.shards_committed, redone.shards_skipped) == (1, len(ROWS_PER_FILE) - 1)
    assert json.loads((out / "_committed" / "00002.json").read_text())["corpus_run_id"] == "retokenized"
    with pytest.raises(ValueError, match="holds an export with other settings.*heldout_fraction"):
        run_export(ExportConfig(corpus=corpus, output=str(out), text_tokenizer=tokenizer_dir, heldout_fraction=0.5,
                                split_seed=7))


def test_export_command_packs_each_shard_into_seq_len_parquet_chunks(ray_session, corpus, text_tokenizer,
                                                                     tokenizer_dir, tmp_path, capsys):
    """`dualtok export format=parquet seq_len=16 --json`, as a user runs it."""
    from dualtok.jobs.cli import main as cli

    out = tmp_path / "packed"
    assert cli(["export", f"corpus={corpus}", f"output={out}", f"text_tokenizer={tokenizer_dir}", "format=parquet",
                "seq_len=16", "order=i2t", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)  # stdout holds the one JSON object
    assert record["job"] == "export" and record["shards"]["committed"] == len(ROWS_PER_FILE)
    expected = expected_sequences(corpus, text_tokenizer, "i2t")
    for f, rows in enumerate(ROWS_PER_FILE):
        table = pq.read_table(out / "train" / f"{f:05d}.parquet")
        chunks = table["input_ids"].to_pylist()
        assert all(len(c) == 16 for c in chunks[:-1]) and 0 < len(chunks[-1]) <= 16
        flat = [t for c in chunks for t in c]  # the shard's sequences in row order, cut at 16
        assert flat == [t for r in range(rows) for t in expected[f"{f:05d}-{r}"].tolist()]
        meta = table.schema.metadata[b"dualtok.sequence_contract"]
        assert SequenceContract.from_json(meta) == contract(len(text_tokenizer))
    assert record["rows"] == {"train": sum(ROWS_PER_FILE), "heldout": 0}
    assert record["tokens"]["train"] == sum(len(s) for s in expected.values())
    assert cli(["export", f"corpus={tmp_path / 'nowhere'}", f"output={tmp_path / 'o2'}",
                f"text_tokenizer={tokenizer_dir}"]) == 2
    assert "holds no committed shards" in capsys.readouterr().err


def stream_split(remote: str, local: Path) -> dict[str, list[int]]:
    """key -> input_ids of every sample MosaicML's own StreamingDataset streams from an MDS split."""
    from dualtok.pipelines.sequences.export import streaming_base

    dataset = streaming_base().StreamingDataset(remote=remote, local=str(local), shuffle=False, batch_size=1)
    samples = [dataset[i] for i in range(len(dataset))]
    keys = [s["key"] for s in samples]
    assert len(set(keys)) == len(keys)  # no sample twice
    return {s["key"]: s["input_ids"].tolist() for s in samples}


def test_mds_export_to_s3_streams_back_with_mosaicml_streaming_and_resumes(ray_session, s3, corpus, text_tokenizer,
                                                                           tokenizer_dir, tmp_path):
    """`format=mds` on loopback S3: each split read back by `StreamingDataset(remote=s3://...)`,
    every row once, in the split its key hashes to; a rerun after a shard is re-tokenized redoes
    that shard alone and the split's merged index still covers every row."""
    from dualtok.pipelines.io.storage import StorageConfig
    from dualtok.pipelines.sequences.export import ExportConfig, heldout_mask, run_export

    bucket = s3.new_bucket()
    fs = s3.filesystem()
    fs.put(corpus, f"{bucket}/corpus", recursive=True)
    output = f"s3://{bucket}/export"
    config = ExportConfig(corpus=f"s3://{bucket}/corpus", output=output, text_tokenizer=tokenizer_dir, format="mds",
                          heldout_fraction=0.3, split_seed=7, storage=StorageConfig(endpoint_url=s3.url))
    summary = run_export(config)
    assert (summary.shards_committed, summary.shards_skipped) == (len(ROWS_PER_FILE), 0)
    expected = {k: v.tolist() for k, v in expected_sequences(corpus, text_tokenizer).items()}
    held = {k for k, h in zip(sorted(expected), heldout_mask(sorted(expected), 0.3, 7)) if h}
    assert 0 < len(held) < len(expected)
    for split, keep in (("train", lambda k: k not in held), ("heldout", lambda k: k in held)):
        streamed = stream_split(f"{output}/{split}", tmp_path / f"cache-{split}")
        assert streamed == {k: v for k, v in expected.items() if keep(k)}
    assert summary.rows == {"train": len(expected) - len(held), "heldout": len(held)}
    manifest = json.loads(fs.cat_file(f"{bucket}/export/manifest.json"))
    assert all(fs.exists(f"{bucket}/export/{name}") for split in manifest["files"] for name in manifest["files"][split])

    marker = f"{bucket}/corpus/_committed/00002.json"
    fs.pipe(marker, json.dumps({**json.loads(fs.cat_file(marker)), "run_id": "retokenized"}).encode())
    redone = run_export(config)
    assert (redone.shards_committed, redone.shards_skipped) == (1, len(ROWS_PER_FILE) - 1)
    streamed = stream_split(f"{output}/train", tmp_path / "cache-train-again")
    assert streamed == {k: v for k, v in expected.items() if k not in held}


def test_webdataset_export_reads_back_with_webdataset(ray_session, corpus, text_tokenizer, tokenizer_dir, tmp_path):
    """`format=webdataset`: each shard's tar read by the `webdataset` package, one sample per row,
    its key and its contract sequence; no clock or owner in the tar, so a re-export writes the same bytes."""
    import webdataset as wds

    from dualtok.pipelines.sequences.export import ExportConfig, run_export

    config = ExportConfig(corpus=corpus, output=str(tmp_path / "wds"), text_tokenizer=tokenizer_dir,
                          format="webdataset")
    assert run_export(config).shards_committed == len(ROWS_PER_FILE)
    expected = {k: v.tolist() for k, v in expected_sequences(corpus, text_tokenizer).items()}
    tars = sorted(str(p) for p in (tmp_path / "wds" / "train").glob("*.tar"))
    assert len(tars) == len(ROWS_PER_FILE)
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode())
    assert {s["key.txt"]: s["input_ids.npy"].tolist() for s in samples} == expected
    assert len(samples) == len(expected) and samples[0]["input_ids.npy"].dtype == np.uint16
    for path in tars:
        with tarfile.open(path) as tar:
            assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in tar.getmembers()} == {(0, 0, 0, "", 0o644)}


def test_mds_export_without_mosaicml_streaming_is_refused_before_ray_starts(monkeypatch, corpus, tokenizer_dir,
                                                                           tmp_path, capsys):
    from dualtok.jobs.cli import main as cli

    for name in [n for n in sys.modules if n == "streaming" or n.startswith("streaming.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "streaming", None)  # as if not installed: its import raises
    assert cli(["export", f"corpus={corpus}", f"output={tmp_path / 'mds'}", f"text_tokenizer={tokenizer_dir}",
                "format=mds"]) == 2
    err = capsys.readouterr().err
    assert "format=mds needs mosaicml-streaming" in err and "--no-deps" in err
    assert not (tmp_path / "mds").exists()
