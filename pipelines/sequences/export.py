"""`dualtok export`: a token corpus -> LLM training sequences in the files pretraining stacks read.

    corpus shards (committed, not yet exported) -> ExportShard (Ray Data tasks, one corpus shard per
    call: rows -> contract sequences -> optional packing -> train / heldout files, written where the
    task runs) -> driver: one marker per shard, last, then the manifest.

Formats (each shard's files under `<output>/<split>/`, split = train | heldout):
- `megatron`: Megatron-LM / NeMo indexed datasets, `<shard>.bin` + `<shard>.idx` (the `MMIDIDX`
  format of `megatron.core.datasets.indexed_dataset`), one document per sequence. List the
  prefixes in Megatron's `--data-path`; its GPTDataset packs documents into `--seq-length` itself.
- `parquet`: `<shard>.parquet` with `input_ids` (list<int32>) and, unpacked, the row's `key`:
  for Hugging Face `datasets`, Spark, DuckDB or any custom loader.
- `mds`: MosaicML Streaming, written by its own `MDSWriter`: `<shard>/index.json` + `shard.*.mds`
  (`input_ids` as `ndarray:uint16|int32`, unpacked also `key`), and `<split>/index.json`, rewritten
  at the end of each run, merging every exported shard's index as `streaming.base.util.merge_index`
  does, so `StreamingDataset(remote=<output>/train)` streams the whole split.
- `webdataset`: `<shard>.tar`, one sample per sequence: `<n>.input_ids.npy` and, unpacked, `<n>.key.txt`
  (`n` its 9-digit position in the shard: row keys may hold dots and slashes, which WebDataset
  splits sample names on).

Every sequence follows the contract in `dualtok_core.sequences` (written to `<output>/contract.json`,
into each Parquet file's metadata and the manifest); `<output>/tokenizer/` is the text tokenizer
extended with the contract's tokens, so an LLM trained on the export decodes its own output.

Exactly once and resumable like tokenize: a shard's files are written whole by its task, its
marker (`_committed/<shard>.json`) by the driver after them; a rerun skips shards whose marker
names the same corpus commit, and redoes one the corpus re-tokenized since. The held-out split is
by a hash of (split_seed, row key), so a row's split does not depend on the shard it is in or on
the run. With `seq_len`, each shard's sequences are concatenated in row order and cut into
`seq_len`-token chunks (the last one shorter): packing never crosses a shard, which keeps every
shard's output a function of that shard alone.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import io
import json
import logging
import struct
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dualtok.pipelines.cluster import RayConfig
from dualtok.pipelines.config import ConfigError
from dualtok.pipelines.io import schemas as S
from dualtok.pipelines.io.corpus import MARKERS_DIR
from dualtok.pipelines.io.outputs import OutputFolder, new_run_id, package_versions, parquet_bytes
from dualtok.pipelines.io.storage import StorageConfig, filesystem, join, local_copy
from dualtok.pipelines.shards.writer import add_tar_member

logger = logging.getLogger(__name__)

Format = Literal["megatron", "parquet", "mds", "webdataset"]
SPLITS = ("train", "heldout")
CONTRACT_FILE, TOKENIZER_DIR, MANIFEST_FILE = "contract.json", "tokenizer", "manifest.json"
MDS_INDEX = "index.json"  # MosaicML Streaming's index file name (`streaming.base.format.get_index_basename`)
_MEGATRON_HEADER = b"MMIDIDX\x00\x00"
_MEGATRON_DTYPES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}  # megatron.core's DType codes


@dataclass(frozen=True)
class ExportConfig:
    """What `dualtok export` takes."""

    corpus: str = ""  # the token corpus (the tokenize job's output)
    output: str = ""  # the export folder or URI: train/, heldout/, _committed/, contract.json, tokenizer/
    text_tokenizer: str = ""  # a transformers tokenizer folder (local or URI): the LLM's text ids
    format: Format = "megatron"  # megatron (.bin + .idx), parquet or webdataset (input_ids per row or chunk), mds (MosaicML)
    order: Literal["t2i", "i2t"] = "t2i"  # t2i: caption then image (generation); i2t: image then caption
    seq_len: int | None = None  # pack each shard's sequences into chunks of this many tokens; None: one per row
    heldout_fraction: float = 0.0  # share of rows (by a hash of their key) written to heldout/ instead of train/
    split_seed: int = 0  # the held-out hash's seed: another seed holds out other rows
    max_shards: int | None = None  # export at most this many pending shards this run
    task_cpus: float = 1.0  # CPUs each export task (one corpus shard) reserves
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()

    def __post_init__(self) -> None:
        for key in ("corpus", "output", "text_tokenizer"):
            if not getattr(self, key):
                raise ValueError(f"{key} is empty: export needs corpus, output and text_tokenizer")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.seq_len is not None and self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (or unset), got {self.seq_len}")
        if self.format == "mds":
            streaming_base()  # before Ray starts: a missing package is a config error, not a failed task


@dataclass
class ExportSummary:
    output: str
    shards_total: int
    shards_skipped: int
    shards_committed: int
    rows: dict[str, int]  # by split, in the whole export
    tokens: dict[str, int]  # by split, in the whole export
    sequences: dict[str, int]  # documents (megatron) or Parquet rows, by split
    seconds: float
    contract: dict[str, Any] = field(default_factory=dict)


# ---- the split and the formats (no Ray) ----------------------------------------------------------
def heldout_mask(keys: list[str], fraction: float, seed: int) -> np.ndarray:
    """True where a row goes to heldout/: the first 8 bytes of sha256(seed, key) below `fraction` of 2^64."""
    if fraction <= 0:
        return np.zeros(len(keys), dtype=bool)
    limit = int(fraction * 2**64)
    return np.array([int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode()).digest()[:8], "big") < limit
                     for key in keys], dtype=bool)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (Megatron's own choice below 65500), else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def pack(sequences: list[np.ndarray], seq_len: int) -> list[np.ndarray]:
    """Concatenate in order and cut into `seq_len` chunks; the last chunk keeps the remainder."""
    if not sequences:
        return []
    flat = np.concatenate(sequences)
    return [flat[i: i + seq_len] for i in range(0, len(flat), seq_len)]


def megatron_files(sequences: list[np.ndarray], dtype: np.dtype) -> tuple[bytes, bytes]:
    """(.bin, .idx) of an indexed dataset with one document per sequence, as Megatron writes them."""
    lengths = np.array([len(s) for s in sequences], dtype=np.int32)
    pointers = np.zeros(len(sequences), dtype=np.int64)
    if len(sequences) > 1:
        pointers[1:] = np.cumsum(lengths[:-1].astype(np.int64)) * dtype.itemsize
    documents = np.arange(len(sequences) + 1, dtype=np.int64)  # sequence i ends document i
    index = b"".join([
        _MEGATRON_HEADER, struct.pack("<Q", 1), struct.pack("<B", _MEGATRON_DTYPES[dtype]),
        struct.pack("<Q", len(sequences)), struct.pack("<Q", len(documents)),
        lengths.tobytes(), pointers.tobytes(), documents.tobytes(),
    ])
    data = b"".join(np.asarray(s, dtype=dtype).tobytes() for s in sequences)
    return data, index


def streaming_base() -> Any:
    """mosaicml-streaming's `streaming.base` (MDSWriter, StreamingDataset).

    The package's `__init__` also imports `streaming.vision`, which imports torchvision, and PyPI's
    torchvision does not import beside a local CPU torch build. Where that import is what fails,
    `streaming.base` is loaded without the package `__init__`: the MDS writer and reader use none of
    `streaming.vision`. Elsewhere (a GPU image with torchvision) it is the plain import."""
    try:
        import streaming.base as base

        return base
    except ModuleNotFoundError as err:
        if err.name in ("streaming", "streaming.base"):
            raise ConfigError("format=mds needs mosaicml-streaming: pip install --no-deps 'mosaicml-streaming==0.13.0' "
                              "plus dualtok's `mds` extra (its own dependencies, less torchvision)") from err
        if err.name != "torchvision":
            raise
    spec = importlib.util.find_spec("streaming")
    assert spec is not None  # found above: only its torchvision import failed
    sys.modules["streaming"] = importlib.util.module_from_spec(spec)  # the package, its __init__ not run
    import streaming.base as base

    return base


def mds_files(sequences: list[np.ndarray], keys: list[str] | None, dtype: np.dtype) -> dict[str, bytes]:
    """file name -> bytes of one MDS dataset holding `sequences` (and `keys`), as `MDSWriter` writes it:
    `index.json` and its `shard.*.mds` files."""
    columns = {"input_ids": f"ndarray:{dtype.name}", **({"key": "str"} if keys is not None else {})}
    with tempfile.TemporaryDirectory(prefix="dualtok-mds-") as tmp:
        with streaming_base().MDSWriter(out=tmp, columns=columns, compression=None) as writer:
            for i, sequence in enumerate(sequences):
                writer.write({"input_ids": np.asarray(sequence, dtype=dtype),
                              **({"key": keys[i]} if keys is not None else {})})
        return {path.name: path.read_bytes() for path in sorted(Path(tmp).iterdir())}


def webdataset_tar(sequences: list[np.ndarray], keys: list[str] | None, dtype: np.dtype) -> bytes:
    """One tar with a WebDataset sample per sequence: `<n>.input_ids.npy` (+ `<n>.key.txt`)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for n, sequence in enumerate(sequences):
            array = io.BytesIO()
            np.save(array, np.asarray(sequence, dtype=dtype), allow_pickle=False)
            members = {"input_ids.npy": array.getvalue(), **({"key.txt": keys[n].encode()} if keys is not None else {})}
            for suffix, data in members.items():
                add_tar_member(tar, f"{n:09d}.{suffix}", data)
    return buffer.getvalue()


def merged_mds_index(parts: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """One split's `index.json` over every exported shard's MDS files: each shard entry of each
    sub-folder's index, its file names made relative to the split, as `merge_index` writes it."""
    shards = []
    for folder in sorted(parts):
        for entry in parts[folder]:
            entry = copy.deepcopy(entry)
            for key in ("raw_data", "zip_data", "raw_meta", "zip_meta"):
                if entry.get(key):
                    entry[key]["basename"] = f"{folder}/{entry[key]['basename']}"
            shards.append(entry)
    return {"version": 2, "shards": shards}


# ---- one corpus shard -> its export files (runs in a Ray task) ----------------------------------------
@dataclass(frozen=True)
class ShardJob:
    """What the task for one corpus shard needs; pickled to the worker."""

    corpus: str
    output: str
    format: Format
    order: str
    seq_len: int | None
    heldout_fraction: float
    split_seed: int
    contract_json: str
    text_tokenizer: str
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False)


class ExportShard:
    """Ray Data callable: one row {shard, data_file} -> its files written, its counts returned."""

    def __init__(self, job: ShardJob) -> None:
        from dualtok_core.sequences import SequenceContract

        self.job = job
        self.contract = SequenceContract.from_json(job.contract_json)
        self.tokenizer = load_tokenizer(job.text_tokenizer, job.storage_options)
        self.dtype = token_dtype(self.contract.vocab_size)
        self.out = OutputFolder(job.output, job.storage_options)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        shard, data_file = str(row["shard"]), str(row["data_file"])
        fs, path = filesystem(join(self.job.corpus, data_file), self.job.storage_options or None)
        with fs.open(path, "rb") as handle:
            table = pq.read_table(handle, columns=[S.KEY, S.INDEX, S.CAPTION, S.GUIDE_TOKENS, S.SEMANTIC_TOKENS])
        n = table.num_rows
        guide = np.asarray(table[S.GUIDE_TOKENS].combine_chunks().flatten()).reshape(n, -1)
        semantic = np.asarray(table[S.SEMANTIC_TOKENS].combine_chunks().flatten()).reshape(n, -1)
        keys = [key if key else f"{shard}/{index}" for key, index in
                zip(table[S.KEY].to_pylist(), table[S.INDEX].to_pylist())]
        captions = table[S.CAPTION].to_pylist()
        texts = [self.tokenizer(c, add_special_tokens=False)["input_ids"] if c else [] for c in captions]
        sequences = [self.contract.sequence(t, guide[i], semantic[i], self.job.order) for i, t in enumerate(texts)]
        heldout = heldout_mask(keys, self.job.heldout_fraction, self.job.split_seed)
        counts: dict[str, Any] = {"shard": shard}
        for split, chosen in (("train", ~heldout), ("heldout", heldout)):
            rows = [i for i in range(n) if chosen[i]]
            items = [sequences[i] for i in rows]
            chunks = pack(items, self.job.seq_len) if self.job.seq_len else items
            mds = self._write(split, shard, chunks, None if self.job.seq_len else [keys[i] for i in rows])
            counts[split] = {"rows": len(rows), "sequences": len(chunks), "tokens": int(sum(len(c) for c in chunks)),
                             **({"mds_shards": mds} if mds is not None else {})}
        return {"result": json.dumps(counts)}

    def _write(self, split: str, shard: str, chunks: list[np.ndarray], keys: list[str] | None
               ) -> list[dict[str, Any]] | None:
        """A split's files for this shard; none when the split got no row here (the manifest lists
        only files that exist). For mds, the shard entries of the index it wrote (the driver merges
        them into the split's index from the markers, reading no file back)."""
        if not chunks:
            return [] if self.job.format == "mds" else None
        if self.job.format == "mds":
            files = mds_files(chunks, keys, self.dtype)
            for name in sorted(files, key=lambda n: n == MDS_INDEX):  # the index last: a reader opens it first
                self.out.write(files[name], split, shard, name)
            return json.loads(files[MDS_INDEX])["shards"]
        if self.job.format == "megatron":
            data, index = megatron_files(chunks, self.dtype)
            self.out.write(data, split, f"{shard}.bin")
            self.out.write(index, split, f"{shard}.idx")  # after the .bin: a reader opens the index first
        elif self.job.format == "webdataset":
            self.out.write(webdataset_tar(chunks, keys, self.dtype), split, f"{shard}.tar")
        else:
            columns: dict[str, Any] = {"input_ids": pa.array([c.astype(np.int32) for c in chunks],
                                                             pa.list_(pa.int32()))}
            if keys is not None:
                columns["key"] = pa.array(keys, pa.string())
            table = pa.table(columns).replace_schema_metadata({b"dualtok.sequence_contract": self.job.contract_json})
            self.out.write(parquet_bytes(table), split, f"{shard}.parquet")
        return None


def load_tokenizer(uri: str, storage_options: dict[str, Any] | None) -> Any:
    """The text tokenizer (a transformers folder, local or URI): the driver's and every task's."""
    from transformers import AutoTokenizer

    with local_copy(uri, storage_options or None) as folder:
        return AutoTokenizer.from_pretrained(str(folder))


# ---- the driver --------------------------------------------------------------------------------
def run_export(config: ExportConfig) -> ExportSummary:
    """Export every committed corpus shard not yet exported; markers and the manifest on the driver."""
    import ray

    from dualtok_core.sequences import SequenceContract, extend_tokenizer

    started = time.monotonic()
    options = config.storage.storage_options()
    corpus_markers = OutputFolder(config.corpus, options).markers(MARKERS_DIR, "shard")
    if not corpus_markers:
        raise ConfigError(f"corpus {config.corpus} holds no committed shards (no {MARKERS_DIR}/*.json)")
    metadata = _corpus_metadata(config.corpus, corpus_markers, options)
    tokenizer = load_tokenizer(config.text_tokenizer, options)
    contract = SequenceContract.for_corpus(metadata, len(tokenizer))
    out = OutputFolder(config.output, options)
    first_run = not _check_same_export(out, contract, config)
    done = out.markers(MARKERS_DIR, "shard")
    pending = [m for s, m in sorted(corpus_markers.items())
               if m["rows"] > 0 and (s not in done or done[s].get("corpus_run_id") != m.get("run_id"))]
    skipped = len([s for s, m in corpus_markers.items() if m["rows"] > 0]) - len(pending)
    if config.max_shards is not None:
        pending = pending[: config.max_shards]
    if first_run:  # a later run of the same export finds them written (the settings check above)
        _write_contract(out, contract, tokenizer, extend_tokenizer)
    logger.info("export: %d corpus shards, %d already exported, %d to do", len(corpus_markers), skipped, len(pending))
    if pending:
        job = ShardJob(corpus=config.corpus, output=config.output, format=config.format, order=config.order,
                       seq_len=config.seq_len, heldout_fraction=config.heldout_fraction,
                       split_seed=config.split_seed, contract_json=contract.to_json(),
                       text_tokenizer=config.text_tokenizer, storage_options=options)
        items = [{"shard": m["shard"], "data_file": m["data_file"]} for m in pending]
        runs = {m["shard"]: m.get("run_id") for m in pending}  # which corpus commit each export is of
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map(ExportShard, fn_constructor_kwargs={"job": job}, num_cpus=config.task_cpus,
                    compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, len(items))))
        for row in ds.iter_rows():
            counts = json.loads(row["result"])
            marker = {**counts, "corpus_run_id": runs[counts["shard"]], "format": config.format,
                      "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            out.write(json.dumps(marker, indent=1, sort_keys=True).encode(), MARKERS_DIR, f"{counts['shard']}.json")
            done[counts["shard"]] = marker
            logger.info("exported shard %s: %d train, %d heldout rows", counts["shard"], counts["train"]["rows"],
                        counts["heldout"]["rows"])
    return _finish(config, out, contract, done, corpus_markers, skipped, len(pending), started)


def _corpus_metadata(corpus: str, markers: dict[str, dict[str, Any]], options: dict[str, Any]) -> dict[str, Any]:
    """The corpus's dualtok metadata (token widths and vocabularies), from its first data file."""
    first = min(markers.values(), key=lambda m: (m["rows"] == 0, m["shard"]))  # one with rows, if any
    fs, path = filesystem(join(corpus, first["data_file"]), options or None)
    with fs.open(path, "rb") as handle:
        return S.read_metadata(pq.read_schema(handle))


def _check_same_export(out: OutputFolder, contract: Any, config: ExportConfig) -> bool:
    """One output holds one export: the same contract, format, order, packing and split. True when
    the output already holds this export."""
    recorded = out.read_json(MANIFEST_FILE)
    if recorded is None:
        return False
    mine = _settings(contract, config)
    theirs = recorded.get("settings", {})
    changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if changed:
        raise ConfigError(f"{config.output} holds an export with other settings ({', '.join(changed)}): "
                          "give another output")
    return True


def _settings(contract: Any, config: ExportConfig) -> dict[str, Any]:
    return {"contract": json.loads(contract.to_json()), "format": config.format, "order": config.order,
            "seq_len": config.seq_len, "heldout_fraction": config.heldout_fraction, "split_seed": config.split_seed}


def _write_contract(out: OutputFolder, contract: Any, tokenizer: Any, extend: Any) -> None:
    import tempfile
    from pathlib import Path

    out.write(contract.to_json().encode(), CONTRACT_FILE)
    extend(tokenizer, contract)
    with tempfile.TemporaryDirectory(prefix="dualtok-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        for path in sorted(Path(tmp).iterdir()):
            if path.is_file():
                out.write(path.read_bytes(), TOKENIZER_DIR, path.name)


def _finish(config: ExportConfig, out: OutputFolder, contract: Any, markers: dict[str, dict[str, Any]],
            corpus_markers: dict[str, dict[str, Any]], skipped: int, committed: int, started: float) -> ExportSummary:
    """The summary and the manifest, from every shard's marker (this run's and the earlier ones)."""
    from collections import Counter

    from dualtok.pipelines.config import to_dict

    total = len(corpus_markers)
    made = [corpus_markers[s] for s in markers if s in corpus_markers]
    # what made the tokens: the bundle to decode generated ids with, and the dtype it computed in
    made_by = {f"shards_by_{name}": dict(sorted(Counter(m.get(key) or "unrecorded" for m in made).items()))
               for name, key in (("bundle", "bundle_fingerprint"), ("dtype", "dtype"))}

    sums = {key: {split: sum(m[split][key] for m in markers.values()) for split in SPLITS}
            for key in ("rows", "tokens", "sequences")}
    summary = ExportSummary(output=config.output, shards_total=total, shards_skipped=skipped,
                            shards_committed=committed, rows=sums["rows"], tokens=sums["tokens"],
                            sequences=sums["sequences"], seconds=time.monotonic() - started,
                            contract=json.loads(contract.to_json()))
    if config.format == "mds":  # each split's index over every shard exported so far, from the markers
        for split in SPLITS:
            parts = {s: m[split]["mds_shards"] for s, m in markers.items() if m[split]["sequences"]}
            if parts:
                out.write(json.dumps(merged_mds_index(parts), sort_keys=True).encode(), split, MDS_INDEX)
    manifest = {"kind": "export", "run_id": new_run_id(), "config": to_dict(config), "versions": package_versions(),
                "settings": _settings(contract, config), "files": {
                    split: sorted(name for s, m in markers.items() if m[split]["sequences"]
                                  for name in _file_names(config.format, split, s, m[split]))
                    for split in SPLITS},
                "totals": sums, "shards": len(markers), "tokens_made_by": made_by}
    out.write_json(manifest, MANIFEST_FILE)
    return summary


def _file_names(kind: str, split: str, shard: str, counts: dict[str, Any]) -> list[str]:
    """The files one shard's split was exported to (as format `kind`), relative to the output."""
    if kind == "mds":
        return [f"{split}/{shard}/{MDS_INDEX}", *(f"{split}/{shard}/{entry['raw_data']['basename']}"
                                                  for entry in counts["mds_shards"])]
    extensions = {"megatron": ("bin", "idx"), "parquet": ("parquet",), "webdataset": ("tar",)}[kind]
    return [f"{split}/{shard}.{ext}" for ext in extensions]
