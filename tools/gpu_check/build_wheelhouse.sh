#!/usr/bin/env bash
# Build the wheelhouse that the GPU check carries to a GPU machine that has no registry access:
# wheels for CPython 3.12 manylinux x86_64 of everything its image lacks.
#
#   bash tools/gpu_check/build_wheelhouse.sh [OUT]      # OUT: default .wheelhouse (git-ignored)
#
# - the packages pinned in tools/install/requirements.lock that the image lacks (WANT below):
#   downloaded as cp312 / pure wheels with `pip download --require-hashes` against the lock's
#   hashes; the two that PyPI has only as sdists (SDIST_ONLY) are built here into pure wheels
#   from their hash-checked sdists;
# - detectron2 0.6 and lvis 0.5.3: built into wheels from the same pinned, sha256-checked sdists
#   and with the same fixes as tools/install/install.sh (both use tools/install/sdists.sh);
# - seesaw_ecm itself is not a wheel: its source travels with the working tree.
# Then it checks that every wheel's requirements are in the wheelhouse or on the image, writes
# SHA256SUMS (tools/gpu_check/run.py verifies them before installing) and prints the size of the
# wheelhouse and of all that travels (limit 64 MiB). The result replaces OUT only when complete.
# Needs a python with pip, setuptools and torch (detectron2's setup.py imports torch): the
# project's .venv by default, or PYTHON=...
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/tools/install"
OUT="$(realpath -m "${1:-$ROOT/.wheelhouse}")"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
CACHE="${SEESAW_ECM_CACHE:-$ROOT/.cache/install}"
LIMIT_MIB=64

say() { echo "[wheelhouse] $*" >&2; }
die() { echo "[wheelhouse] ERROR: $*" >&2; exit 1; }
source "$HERE/sdists.sh"

# What the GPU image lacks (its torch, torchvision, numpy, Pillow, matplotlib, OpenCV,
# safetensors, tabulate, tensorboard, PyYAML, tqdm, cloudpickle stay: see IMAGE_HAS below).
WANT=(fvcore iopath yacs termcolor portalocker omegaconf hydra-core pycocotools
      antlr4-python3-runtime)
SDIST_ONLY=(fvcore antlr4-python3-runtime)  # no wheel on PyPI
PLATFORMS=()
for n in $(seq 17 39); do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)

"$PY" -c "import setuptools, pip, torch" 2>/dev/null \
    || die "$PY lacks pip, setuptools or torch: run tools/install/install.sh or set PYTHON=..."
export PIP_FIND_LINKS="" PIP_DISABLE_PIP_VERSION_CHECK=1
BUILD="$OUT.partial"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
rm -rf "$BUILD"
mkdir -p "$BUILD"

BINARY=()
for name in "${WANT[@]}"; do
    [[ " ${SDIST_ONLY[*]} " == *" $name "* ]] || BINARY+=("$name")
done
"$PY" "$HERE/filter_lock.py" "$HERE/requirements.lock" --keep "${BINARY[@]}" > "$TMP/binary.txt"
"$PY" "$HERE/filter_lock.py" "$HERE/requirements.lock" --keep "${SDIST_ONLY[@]}" > "$TMP/sdist.txt"

say "downloading ${BINARY[*]} (hash-checked, cp312 manylinux x86_64)"
"$PY" -m pip download --quiet --no-deps --require-hashes --only-binary=:all: \
    --python-version 3.12 --implementation cp "${PLATFORMS[@]}" -d "$BUILD" -r "$TMP/binary.txt" \
    || die "pip download failed (registry unreachable, no cp312 wheel, or a hash mismatch)"
say "building ${SDIST_ONLY[*]} from their hash-checked sdists"
"$PY" -m pip wheel --quiet --no-deps --require-hashes --no-binary=:all: --no-build-isolation \
    -w "$BUILD" -r "$TMP/sdist.txt" || die "building the sdist-only packages failed"

for spec in "detectron2 $D2_URL $D2_SHA256" "lvis $LVIS_URL $LVIS_SHA256"; do
    set -- $spec
    mkdir -p "$TMP/$1"
    src="$(patched_source "$1" "$2" "$3" "$TMP/$1")"
    say "building the patched $1 wheel"
    "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$BUILD" "$src" \
        || die "building the patched $1 wheel failed"
done

say "checking the wheels' requirements and writing SHA256SUMS"
"$PY" - "$BUILD" "$ROOT" "$LIMIT_MIB" <<'EOF' || die "the wheelhouse is incomplete or too large (see above)"
import glob, hashlib, os, re, subprocess, sys, zipfile
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

house, root, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
# on the GPU image (tools/gpu_check/README.md) or not needed there
IMAGE_HAS = {"torch", "torchvision", "numpy", "pillow", "matplotlib", "opencv-python-headless",
             "safetensors", "tabulate", "tensorboard", "pyyaml", "tqdm", "cloudpickle",
             "packaging", "typing-extensions", "scipy", "six"}
UNUSED = {"black", "pydot", "future"}  # detectron2's caffe2 / LazyConfig-formatting paths only
env = dict(default_environment(), python_version="3.12", python_full_version="3.12.3",
           sys_platform="linux", platform_system="Linux", platform_machine="x86_64", extra="")


def fits(tag):  # installs on CPython 3.12, manylinux x86_64
    if tag.platform == "any":
        return tag.interpreter.startswith("py3")
    if not (tag.platform.startswith("manylinux") and tag.platform.endswith("_x86_64")):
        return False
    return tag.interpreter == "cp312" or tag.abi == "abi3" and int(tag.interpreter[3:]) <= 12


wheels = sorted(glob.glob(os.path.join(house, "*.whl")))
names = {}
for w in wheels:
    name, version, _, tags = parse_wheel_filename(os.path.basename(w))
    if not any(fits(t) for t in tags):
        sys.exit(f"{os.path.basename(w)} is not for CPython 3.12 manylinux x86_64")
    if name in names:
        sys.exit(f"two versions of {name}: pip would refuse the install")
    names[name] = version
missing = []
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    for line in re.findall(r"^Requires-Dist: (.+)$", text, re.M):
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if req.marker and not req.marker.evaluate(env):
            continue
        if name in names and not req.specifier.contains(str(names[name]), prereleases=True):
            missing.append(f"{os.path.basename(w)} needs {req}, the wheelhouse has {names[name]}")
        elif name not in names and name not in IMAGE_HAS | UNUSED:
            missing.append(f"{os.path.basename(w)} needs {req}: not in the wheelhouse or image")
if missing:
    sys.exit("\n".join(missing))
with open(os.path.join(house, "SHA256SUMS"), "w") as f:
    for w in wheels:
        f.write(f"{hashlib.sha256(open(w, 'rb').read()).hexdigest()}  {os.path.basename(w)}\n")
size = sum(os.path.getsize(w) for w in wheels) / 2**20
files = subprocess.run(["git", "-C", root, "ls-files", "-z", "-co", "--exclude-standard"],
                       capture_output=True, text=True, check=True).stdout.split("\0")
tree = sum(os.path.getsize(os.path.join(root, f)) for f in files
           if f and os.path.isfile(os.path.join(root, f))) / 2**20
for w in wheels:
    print(f"  {os.path.getsize(w) / 2**20:6.2f} MiB  {os.path.basename(w)}")
print(f"wheelhouse: {len(wheels)} wheels, {size:.2f} MiB; with the working tree "
      f"({tree:.2f} MiB) {size + tree:.2f} MiB of the {limit:.0f} MiB a device run carries")
if size + tree > limit:
    sys.exit(f"over the {limit:.0f} MiB limit")
EOF
rm -rf "$OUT"
mv "$BUILD" "$OUT"
say "done: $OUT"
