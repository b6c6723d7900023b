#!/usr/bin/env bash
# Sets up and runs the test suite on a fresh machine: the README's test command, and what CI runs.
#   bash scripts/test.sh            # the default suite (no GPU tests)
#   bash scripts/test.sh -m slow    # extra pytest arguments pass through
set -euo pipefail
cd "$(dirname "$0")/.."

# torch==2.13.0 is the local CPU build; naming it keeps pip from fetching a multi-GB CUDA build.
python -m pip install --quiet --disable-pip-version-check torch==2.13.0 -e ".[test]"
# MosaicML Streaming reads `dualtok export format=mds` back; --no-deps: it declares torchvision, which
# would replace the CPU torch (its own imports are in the `mds` extra, installed just above). The
# requirements it declares and does not need (torchvision, numpy<2.2, cloud SDKs) are known: not warned.
python -m pip install --quiet --disable-pip-version-check --no-deps --no-warn-conflicts "mosaicml-streaming==0.13.0"

# The audit report is checked in a real headless browser (Debian's chromium).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the report browser test will be skipped" >&2
fi

# Every process the suite starts (Ray's, moto's, drivers, browsers) inherits this tag; after pytest
# ends, however it ends, anything still carrying it is reported and killed, and the run fails.
export DUALTOK_TEST_RUN="$$-$(date +%s%N)"
rc=0
python -m pytest -q -ra --durations=25 "$@" || rc=$?
python scripts/reap_test_processes.py "$DUALTOK_TEST_RUN" || { [ "$rc" = 0 ] && rc=1; }
exit "$rc"
