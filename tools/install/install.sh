#!/usr/bin/env bash
# Install (or check) the seesaw_ecm stack into a virtual environment in the checkout.
#
#   bash tools/install/install.sh          # idempotent; a second run takes seconds
#
# What it does (docs/GETTING_STARTED.md "Install" says why):
#   1. checks platform (Linux x86_64) and Python (CPython 3.10-3.13);
#   2. creates .venv (or $SEESAW_ECM_VENV); with SEESAW_ECM_SYSTEM_SITE_PACKAGES=1 the venv sees
#      the system's packages, and a working torch/torchvision/detectron2 found there is kept;
#   3. installs requirements.lock (every file pinned by sha256) from PyPI;
#   4. downloads the pb1-detectron2 0.6 and lvis 0.5.3 sdists by pinned URL + sha256, applies
#      patch_third_party.py and installs them without dependencies (an already working
#      detectron2, e.g. an official build with compiled ops, is detected and kept);
#   5. `pip install -e .` of this project, then an import smoke test.
# Only when every step passed does it write the stamp .venv/.seesaw_ecm_ok: the stamp is what
# the other scripts trust, so an interrupted install never looks finished.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/tools/install"
VENV="${SEESAW_ECM_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.seesaw_ecm_ok"
CACHE="${SEESAW_ECM_CACHE:-$ROOT/.cache/install}"

say() { echo "[install] $*" >&2; }
die() { echo "[install] ERROR: $*" >&2; exit 1; }
# D2_URL, D2_SHA256, LVIS_URL, LVIS_SHA256, fetch, patched_source (uses PY, set below)
source "$HERE/sdists.sh"

# The stamp's content: everything that decides what gets installed.
fingerprint() {
    cat "$HERE/requirements.lock" "$HERE/install.sh" "$HERE/sdists.sh" "$HERE/filter_lock.py" \
        "$HERE/patch_third_party.py" "$ROOT/setup.py" | sha256sum | cut -d' ' -f1
}

# --- 1. platform and python -------------------------------------------------------------
[ "$(uname -s)" = Linux ] && [ "$(uname -m)" = x86_64 ] \
    || die "unsupported platform $(uname -s)/$(uname -m): the lock file pins Linux x86_64 wheels."
command -v "$PYTHON" >/dev/null || die "no '$PYTHON' on PATH; set PYTHON=/path/to/python3.11"
"$PYTHON" - <<'EOF' || die "unsupported Python: CPython 3.10-3.13 is required (set PYTHON=...)."
import sys, platform
ok = platform.python_implementation() == "CPython" and (3, 10) <= sys.version_info[:2] <= (3, 13)
sys.exit(0 if ok else 1)
EOF

# --- fast path: everything in place -----------------------------------------------------
WANT="$(fingerprint)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] \
    && "$VENV/bin/python" -c "import detectron2, lvis, seesaw_ecm" 2>/dev/null; then
    say "environment $VENV is up to date"
    exit 0
fi

rm -f "$STAMP"
trap 'echo "[install] FAILED (see above). The environment is marked incomplete; re-run this script to finish it." >&2' ERR

# --- 2. virtual environment ---------------------------------------------------------------
if ! "$VENV/bin/python" -c "import sys" 2>/dev/null; then
    say "creating virtual environment $VENV"
    rm -rf "$VENV"
    VENV_ARGS=()
    [ "${SEESAW_ECM_SYSTEM_SITE_PACKAGES:-0}" = 1 ] && VENV_ARGS+=(--system-site-packages)
    "$PYTHON" -m venv "${VENV_ARGS[@]}" "$VENV"
fi
PY="$VENV/bin/python"
# Only PyPI (by hash) decides what is installed: ignore the machine's extra find-links.
export PIP_FIND_LINKS="" PIP_DISABLE_PIP_VERSION_CHECK=1
pip_install() { "$PY" -m pip install --no-input --progress-bar off "$@"; }

# --- 3. pinned, hashed dependencies ----------------------------------------------------------
REQ="$HERE/requirements.lock"
if "$PY" - <<'EOF' 2>/dev/null; then
import torch, torchvision
b = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
torchvision.ops.nms(b, torch.ones(1), 0.5)
import sys
# a torch that is not the pinned one counts as "already there" only in a system-site venv
sys.exit(1 if torch.__file__.startswith(sys.prefix) else 0)
EOF
    say "keeping the working torch/torchvision found outside the venv"
    REQ="$(mktemp)"
    # drop torch, torchvision and their CUDA runtime packages from the lock
    "$PY" "$HERE/filter_lock.py" "$HERE/requirements.lock" \
        --drop 'torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+' > "$REQ"
fi
say "installing pinned dependencies (first run: a few minutes, ~6 GB)"
pip_install --require-hashes --no-deps -r "$REQ" \
    || die "pip could not install the pinned dependencies (registry unreachable, or a hash mismatch: see pip's message above)."

# --- 4. detectron2 and lvis from patched sdists ----------------------------------------------
MARKER="$("$PY" -c "import runpy; print(runpy.run_path('$HERE/patch_third_party.py')['MARKER'])")"

install_sdist() {  # install_sdist NAME URL SHA256
    local tmp src
    tmp="$(mktemp -d)"
    src="$(patched_source "$1" "$2" "$3" "$tmp")"
    say "installing patched $1"
    (cd "$src" && pip_install --no-deps --no-build-isolation .)
    rm -rf "$tmp"
}

D2_STATE="$("$PY" - "$MARKER" <<'EOF' 2>/dev/null || echo missing
import sys
try:
    import detectron2
    from detectron2 import _C
except Exception:
    print("missing"); sys.exit()
if not getattr(_C, "SEESAW_ECM_STUB", False):
    print("compiled")           # e.g. an official build from source: keep it
elif sys.argv[1] in open(_C.__file__).read():
    print("patched")            # ours, current fixes
else:
    print("stale")
EOF
)"
case "$D2_STATE" in
    compiled) say "keeping the working detectron2 with compiled ops found in the environment" ;;
    patched)  say "detectron2 (patched pb1-detectron2 0.6) already installed" ;;
    *)        install_sdist detectron2 "$D2_URL" "$D2_SHA256" ;;
esac

if ! "$PY" -c "import lvis.eval, inspect, sys; sys.exit('np.float)' in inspect.getsource(lvis.eval))" 2>/dev/null; then
    install_sdist lvis "$LVIS_URL" "$LVIS_SHA256"
fi

# --- 5. this project ------------------------------------------------------------------------
say "installing seesaw_ecm (editable)"
pip_install --no-deps --no-build-isolation -e "$ROOT" >/dev/null

say "smoke test"
"$PY" - <<'EOF' || die "the installed stack does not import/run; see the error above."
import numpy, torch, torchvision, detectron2, lvis.eval, pycocotools.mask  # noqa: F401
from detectron2 import model_zoo
from detectron2.engine import DefaultTrainer  # noqa: F401
from detectron2.export import TracingAdapter  # noqa: F401
import seesaw_ecm  # noqa: F401
import shapely  # noqa: F401  (detectron2's crop of polygons)
from importlib.metadata import distributions
from seesaw_ecm.data.instaboost import import_instaboostfast
import_instaboostfast()  # InstaBoost and what it imports at runtime
opencv = sorted(d.metadata["Name"] for d in distributions() if d.metadata["Name"].startswith("opencv"))
assert opencv == ["opencv-python-headless"], f"one OpenCV expected, found {opencv}"
assert numpy.__version__.startswith("2."), numpy.__version__
model_zoo.get_config_file("Base-RCNN-FPN.yaml")
torchvision.ops.roi_align(torch.rand(1, 1, 8, 8), [torch.tensor([[0.0, 0, 4, 4]])], 2)
print(f"[install] ok: torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"detectron2 {detectron2.__version__}, numpy {numpy.__version__}")
EOF

echo "$WANT" > "$STAMP.tmp" && mv "$STAMP.tmp" "$STAMP"
say "done: $VENV"
