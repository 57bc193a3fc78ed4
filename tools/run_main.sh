#!/usr/bin/env bash
# The main job: install (if needed), generate the built-in long-tailed dataset (if absent), train
# the synthetic config on it, evaluate on its validation split and print AP / AP50 / APr / APc /
# APf for box and mask. Extra arguments go to train_net.py, e.g.
#   bash tools/run_main.sh --config-file configs/Synthetic/mask_rcnn_R18_FPN_ce.yaml SOLVER.MAX_ITER 500
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/install/install.sh
CONFIG="configs/Synthetic/mask_rcnn_R18_FPN_seesaw.yaml"
if [ "${1:-}" = "--config-file" ]; then CONFIG="$2"; shift 2; fi
exec "${SEESAW_ECM_VENV:-$ROOT/.venv}/bin/python" train_net.py --config-file "$CONFIG" "$@"
