#!/usr/bin/env bash
# The main job. With no arguments: install (if needed), generate the demo variant of the
# built-in long-tailed dataset (if absent), train and evaluate softmax CE, Seesaw and ECM on it
# with the same model, schedule and seed (configs/Demo/cascade_mask_rcnn_R18_FPN_*.yaml, three
# runs side by side, one thread each), and print one table: box and mask AP, AP50, APr, APc,
# APf per loss with its change against CE. From a fresh clone, install included: 10-12 minutes
# on 2 CPU cores (docs/BENCHMARKS.md "The main job"). The run folders stay
# in output/demo/ (long_tail_benchmark.json, long_tail_per_class_ap.png, cascade_<loss>/seed1/
# with each model and its logs).
# With arguments: one training run of train_net.py, as before, e.g.
#   bash tools/run_main.sh --config-file configs/Synthetic/mask_rcnn_R18_FPN_ce.yaml SOLVER.MAX_ITER 500
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/install/install.sh
PY="${SEESAW_ECM_VENV:-$ROOT/.venv}/bin/python"
if [ $# -eq 0 ]; then
  exec "$PY" -m benchmarks.long_tail --config-dir configs/Demo --archs cascade \
    --losses ce seesaw ecm --seeds 1 --jobs 3 --baseline ce --output-dir output/demo
fi
CONFIG="configs/Synthetic/mask_rcnn_R18_FPN_seesaw.yaml"
if [ "${1:-}" = "--config-file" ]; then CONFIG="$2"; shift 2; fi
exec "$PY" train_net.py --config-file "$CONFIG" "$@"
