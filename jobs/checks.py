"""Checks a job makes on its inputs before it starts Ray, and on its error rate after it ran.

Before: a typo in a path or bundle name fails in a second, with a message that says what is wrong,
instead of after a local Ray start (~20 s) or deep inside a stage. Each raises `ConfigError` (the
CLI's exit code 2); the input listing raises `InputListingError` from `dualtok.pipelines.io.storage` ("does not
exist", "no .tar or .parquet shards under ..."). After: a run whose samples are mostly errors has committed
correct rows, but its input is bad; the job exits `EXIT_TOO_MANY_ERRORS` so a scheduler notices.
"""

from __future__ import annotations

import os
from typing import Any

from dualtok.pipelines.config import BUNDLE_REQUIRED, ConfigError
from dualtok.pipelines.io.storage import STORE_ERRORS, filesystem, join

EXIT_TOO_MANY_ERRORS = 4  # more than max_error_fraction of the run's samples are error rows

def is_preset(spec: str) -> bool:
    from dualtok_core.presets import preset_names

    return spec in preset_names()


def check_bundle(spec: str, storage_options: dict[str, Any] | None = None) -> None:
    """`spec` names a preset, or a folder/URI that holds a bundle (its bundle.json)."""
    if not spec:
        raise ConfigError(BUNDLE_REQUIRED)
    if is_preset(spec):
        return
    fs, path = filesystem(join(spec, "bundle.json"), storage_options or None)
    try:
        if fs.exists(path):
            return
        folder_exists = fs.exists(fs._parent(path))
    except STORE_ERRORS as err:
        raise ConfigError(f"bundle {spec} cannot be read: {type(err).__name__}: {err}") from err
    if not folder_exists:
        raise ConfigError(f"bundle {spec} does not exist (and is not a preset: tiny, small, paper)")
    raise ConfigError(f"not a bundle: missing bundle.json in {spec}")


def check_output(uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """The output can be created: on a local disk its nearest existing folder is writable and nothing
    on the way is a file; on an object store its bucket exists (writes are checked by the lease)."""
    fs, path = filesystem(uri, storage_options or None)
    if "://" not in uri or uri.startswith("file://"):
        _check_local_output(path, uri)
        return
    bucket = path.split("/", 1)[0]
    try:
        found = fs.exists(bucket)
    except STORE_ERRORS as err:
        raise ConfigError(f"output {uri}: its bucket {bucket} cannot be reached: {type(err).__name__}: {err}") from err
    if not found:
        raise ConfigError(f"output {uri}: bucket {bucket} does not exist")


def _check_local_output(path: str, uri: str) -> None:
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"output {uri} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output {uri} is not writable: no write permission on {existing}")


def too_many_errors(errors: int, samples: int, reasons: dict[str, int], limit: float) -> str:
    """The error gate's message: the fraction, the limit, and the commonest reasons."""
    top = "; ".join(f"{count} x {reason}" for reason, count in sorted(reasons.items(), key=lambda r: -r[1])[:3])
    return (f"{errors} of {samples} samples ({errors / max(samples, 1):.1%}) are errors, over max_error_fraction="
            f"{limit:g}; top reasons: {top or 'none recorded'}. What was done is committed; fix the input "
            "or raise max_error_fraction (1.0: no limit)")
