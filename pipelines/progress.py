"""How far a run is: counts, rate and ETA as one line, and Ray's own progress output turned down.

A run reports progress in one of two ways, chosen by the job: on a terminal a single line redrawn in
place (`TerminalProgress`), in logs one INFO line per committed shard. Both format the same
`Progress` with `format_progress`, a pure function of counts and time, so the two never disagree.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any, TextIO

logger = logging.getLogger(__name__)

# Ray Data's own loggers: its 9-line progress block every 10 s and per-dataset INFO lines.
_RAY_DATA_LOGGERS = ("ray.data",)
_RAY_PROGRESS_LOGGER = "ray.data._internal.progress"  # warns "Progress bars disabled" when we disable them


@dataclass(frozen=True)
class Progress:
    """Where a run stands: units (shards, slices) committed of those to do, images, seconds since start."""

    done: int
    total: int
    images: int
    seconds: float
    unit: str = "shards"  # what `done` counts: a run commits whole shards (tokenize) or slices (audit)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        """Seconds left at the rate of units so far; None before the first (no rate to go on)."""
        if self.done == 0 or self.seconds <= 0:
            return None
        return (self.total - self.done) * self.seconds / self.done


def format_duration(seconds: float | None) -> str:
    """`1h02m`, `3m05s`, `42s`; `?` when unknown. Whole seconds: an ETA is not more precise than that."""
    if seconds is None:
        return "?"
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def format_progress(progress: Progress) -> str:
    """One line: `shards 3/10 | 2400 images | 41.2 images/s | ETA 2m50s`."""
    p = progress
    percent = 100 * p.done / p.total if p.total else 100.0
    return (f"{p.unit} {p.done}/{p.total} ({percent:.0f}%) | {p.images} images | "
            f"{p.images_per_second:.1f} images/s | elapsed {format_duration(p.seconds)} | "
            f"ETA {format_duration(p.eta_seconds)}")


class TerminalProgress:
    """A progress line redrawn in place on a terminal (`\\r`, padded over the previous line).

    Call it with each `Progress`; `close()` ends the line so later output starts on a fresh one."""

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self._width = 0
        self._drawn = False

    def __call__(self, progress: Progress) -> None:
        line = f"{self.label}: {format_progress(progress)}"
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = max(self._width, len(line))
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def terminal_progress(args: Any, label: str) -> TerminalProgress | None:
    """A progress line redrawn on stderr when stderr is a terminal and neither -q nor --json is given;
    None otherwise (the pipeline then logs one line per committed shard)."""
    if getattr(args, "quiet", False) or getattr(args, "json", False) or not sys.stderr.isatty():
        return None
    return TerminalProgress(label)


def quiet_ray_data(verbose: int = 0) -> None:
    """Turn off Ray Data's progress bars and INFO logs unless `verbose` >= 2 (-vv, the CLI's "every
    library's logs") asks for them; -v alone is dualtok's own debug logs.

    Call before the dataset is built (a dataset copies the context it is created in). The
    `E core_worker.cc ... max_restarts > 0` line Ray prints for actor pools (ray#53727) comes from
    the C++ core worker's own log, not Python logging: it cannot be silenced from here without
    hiding every real core-worker error too (RAY_BACKEND_LOG_LEVEL), so it stays.
    """
    from ray.data import DataContext

    loud = verbose >= 2
    DataContext.get_current().enable_progress_bars = loud
    for name in _RAY_DATA_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if loud else logging.WARNING)
    logging.getLogger(_RAY_PROGRESS_LOGGER).setLevel(logging.INFO if loud else logging.ERROR)


__all__ = ["Progress", "TerminalProgress", "format_duration", "format_progress", "quiet_ray_data"]
