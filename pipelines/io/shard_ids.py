"""Which id each input shard has in a corpus, whatever other shards a run lists.

A shard's id is its path under the corpus's *input root* (`storage.shard_id`: `/` -> `__`, no
suffix), and the root is fixed once per corpus, in `<output>/_corpus.json`, created by a
conditional write on the corpus's first run. The root is, in order:
- `input_root` from the config, when set (it must equal the recorded root, if there is one);
- the recorded root;
- for a corpus written before roots were recorded, the root its commit markers imply (then
  recorded);
- on a corpus's first run, the common folder of the shards it lists (then recorded).
If the root were recomputed from each run's listing, a first run on `day1/00000.tar` would write
`00000`, a second run on `day1/` + `day2/` would write `day1__00000` again (the same samples twice),
and a different `runS/00000.tar` would be skipped as done. Nightly date folders
(`s3://b/2026-12-01/00000.tar`) therefore need `input_root=s3://b/` from the first night on
(ids `2026-12-01__00000`); without it the first night's folder becomes the root and the next
night's shards are refused, never given colliding ids.

Every listed shard that already has a commit marker must be the shard that marker records: an id
two different shards map to (`a/b.tar` and `a__b.tar`, `x.tar` and `x.tar.gz`) is an error, never
a skip.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import fsspec

from dualtok.pipelines.io.storage import (
    ShardIdentityError,
    common_root,
    create_exclusive,
    filesystem,
    full_uri,
    join,
    shard_id,
)

logger = logging.getLogger(__name__)

CORPUS_FILE = "_corpus.json"
_FIX = ("shard ids are paths under the corpus's input root, so the root is fixed when a corpus is first "
        "written: list only shards under it, or write these shards to a new output with input_root= set to "
        "a folder above all of them (for nightly date folders, the prefix above the dates, e.g. s3://bucket/)")


def normalize_root(root: str, storage_options: dict[str, Any] | None = None) -> str:
    """A root as listed shard URIs spell it (absolute local path, or scheme://bucket/...), ending in '/'."""
    fs, path = filesystem(root, storage_options)
    return full_uri(fs, path).rstrip("/") + "/"


def assign_shard_ids(uris: list[str], output: str, committed: dict[str, dict[str, Any]], input_root: str | None,
                     run_id: str, storage_options: dict[str, Any] | None = None) -> dict[str, str]:
    """shard id -> URI for the listed shards under the corpus's input root; on a corpus's first run
    (or its first since roots were recorded) the root is recorded. Raises `ShardIdentityError`,
    before anything is written, for a shard outside the root, a root that disagrees with the
    recorded one, or an id another shard has."""
    fs, _ = filesystem(output, storage_options)
    path = fs._strip_protocol(join(output, CORPUS_FILE))
    recorded = read_input_root(output, storage_options)
    given = normalize_root(input_root, storage_options) if input_root else None
    root, source = _choose_root(given, recorded, committed, uris)
    ids = _ids_under(root, source, uris)
    _check_markers(ids, committed)
    if recorded is None:
        _record_root(fs, path, root, source, run_id)
    return ids


def read_input_root(output: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """The input root recorded in the corpus's `_corpus.json`, or None if there is none yet."""
    fs, _ = filesystem(output, storage_options)
    uri = join(output, CORPUS_FILE)
    try:
        text = fs.cat_file(fs._strip_protocol(uri))
    except FileNotFoundError:
        return None
    try:
        return str(json.loads(text)["input_root"])
    except (ValueError, KeyError, TypeError) as err:
        raise ShardIdentityError(f"{uri} is not a corpus record (no input_root in it: {err}); it fixes the "
                                 "corpus's shard ids: restore it from a backup, or write to a new output") from err


def _choose_root(given: str | None, recorded: str | None, committed: dict[str, dict[str, Any]],
                 uris: list[str]) -> tuple[str, str]:
    """(root, where it comes from)."""
    if recorded is not None:
        _same_root(given, recorded, f"the root recorded in {CORPUS_FILE} when the corpus was first written")
        return recorded, f"recorded in {CORPUS_FILE}"
    implied = _root_from_markers(committed)
    if implied is not None:
        _same_root(given, implied, "the root the corpus's commit markers were written under")
        return implied, "implied by the corpus's commit markers"
    if given is not None:
        return given, "input_root"
    return common_root(uris), "the common folder of the first run's shards"


def _same_root(given: str | None, root: str, what: str) -> None:
    if given is not None and given != root:
        raise ShardIdentityError(
            f"input_root {given} differs from {what}, {root}: every committed shard's id is its path under "
            f"{root}, so another root would give shards new ids and tokenize them twice. Set input_root={root} "
            "(or leave it unset), or write to a new output")


def _root_from_markers(committed: dict[str, dict[str, Any]]) -> str | None:
    """The root a corpus written before roots were recorded used: `shard_uri` minus the id's path.
    Markers that imply different roots mean earlier runs listed different folders (and may have
    given one shard two ids): no root fits them all."""
    roots: dict[str, str] = {}
    for sid, marker in sorted(committed.items()):
        root = _root_of(str(marker.get("shard_uri") or ""), sid)
        if root is not None:
            roots.setdefault(root, sid)
    if len(roots) > 1:
        found = "; ".join(f"{root} (shard {sid})" for root, sid in sorted(roots.items())[:4])
        raise ShardIdentityError(
            f"the corpus's commit markers were written under different input roots: {found}. Runs that listed "
            "different folders gave its shards ids under different roots, so it may hold a shard twice; "
            "write to a new output")
    return next(iter(roots), None)


def _root_of(uri: str, sid: str) -> str | None:
    """The folder prefix of `uri` under which it has id `sid`, if any."""
    for end in (i + 1 for i, ch in enumerate(uri) if ch == "/"):
        if shard_id(uri, uri[:end]) == sid:
            return uri[:end]
    return None


def _ids_under(root: str, source: str, uris: list[str]) -> dict[str, str]:
    outside = [uri for uri in uris if not uri.startswith(root)]
    if outside:
        more = f" (and {len(outside) - 1} more)" if len(outside) > 1 else ""
        raise ShardIdentityError(
            f"input shard {outside[0]}{more} is outside the corpus's input root {root} ({source}); {_FIX}")
    ids: dict[str, str] = {}
    for uri in uris:
        sid = shard_id(uri, root)
        if sid in ids:
            raise ShardIdentityError(
                f"input shards {ids[sid]} and {uri} both map to shard id {sid!r} under {root}: rename one of them")
        ids[sid] = uri
    return ids


def _check_markers(ids: dict[str, str], committed: dict[str, dict[str, Any]]) -> None:
    """A listed shard whose id has a marker must be the shard the marker was committed for."""
    clashes = [(sid, uri, committed[sid].get("shard_uri")) for sid, uri in sorted(ids.items())
               if sid in committed and committed[sid].get("shard_uri") != uri]
    if clashes:
        sid, uri, theirs = clashes[0]
        more = f" ({len(clashes) - 1} more shards clash the same way)" if len(clashes) > 1 else ""
        raise ShardIdentityError(
            f"input shard {uri} has id {sid!r}, but the corpus committed that id for {theirs or 'an unnamed shard'}"
            f"{more}: two different shards cannot share an id. Rename the input, or write it to a new output")


def _record_root(fs: fsspec.AbstractFileSystem, path: str, root: str, source: str, run_id: str) -> None:
    body = {"input_root": root, "source": source, "run_id": run_id,
            "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if create_exclusive(fs, path, json.dumps(body, indent=1).encode()):
        logger.info("recorded the corpus's input root %s (%s)", root, source)
        return
    theirs = json.loads(fs.cat_file(path)).get("input_root")  # another writer got there first
    if theirs != root:
        raise ShardIdentityError(f"another run recorded the input root {theirs} for this corpus while this run "
                                 f"chose {root}; rerun to use the recorded root")
