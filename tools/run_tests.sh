#!/usr/bin/env bash
# The test command: install (if needed), then the whole pytest suite (slow end-to-end runs
# included; add -m "not slow" for the quick part). Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/install/install.sh
exec "${SEESAW_ECM_VENV:-$ROOT/.venv}/bin/python" -m pytest tests "$@"
