"""After the test suite: end every process that still carries the run's tag in its environment.

`scripts/test.sh` exports DUALTOK_TEST_RUN before pytest; every process the suite starts inherits
it (Ray's raylet and workers, moto, subprocess drivers, chromium). Ray's processes exit on their own
shortly after `ray.shutdown()`, so stragglers get a grace period; whatever is still there after it
outlived the suite: it is listed, killed, and the exit status is 1.

    python scripts/reap_test_processes.py TAG [--grace SECONDS]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from pathlib import Path


def tagged(tag: str) -> dict[int, str]:
    """pid -> command line of every live process whose environment holds DUALTOK_TEST_RUN=tag."""
    needle = f"DUALTOK_TEST_RUN={tag}".encode()
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in (os.getpid(), os.getppid()):
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or a zombie
            continue
    return found


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("tag")
    parser.add_argument("--grace", type=float, default=20.0)
    args = parser.parse_args()
    deadline = time.monotonic() + args.grace
    left = tagged(args.tag)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = tagged(args.tag)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
            os.kill(pid, signal.SIGKILL)
    if left:
        print(f"{len(left)} process(es) outlived the test suite and were killed:", file=sys.stderr)
        for pid, cmd in sorted(left.items()):
            print(f"  {pid}: {cmd[:200]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
