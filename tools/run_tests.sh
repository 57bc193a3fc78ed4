#!/usr/bin/env bash
# The test command: install (if needed), the test-only extras (mmdetection for the converter's
# parity tests: tools/install/requirements-test.lock, --no-deps, so the pinned environment is
# not changed), then the whole pytest suite (slow end-to-end runs included; add -m "not slow"
# for the quick part). Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/install/install.sh
PY="${SEESAW_ECM_VENV:-$ROOT/.venv}/bin/python"
PIP_FIND_LINKS="" PIP_DISABLE_PIP_VERSION_CHECK=1 "$PY" -m pip install --no-input -q \
    --progress-bar off --no-deps --require-hashes -r tools/install/requirements-test.lock
exec "$PY" -m pytest tests "$@"
