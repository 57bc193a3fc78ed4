#!/usr/bin/env python
"""Apply the compatibility fixes that detectron2 0.6 (``pb1-detectron2`` sdist) and lvis 0.5.3
need to run against today's torch / numpy / Pillow / setuptools.

Usage::

    python patch_third_party.py detectron2 <unpacked pb1-detectron2-0.6 folder>
    python patch_third_party.py lvis <unpacked lvis-0.5.3 folder>

Each fix is a literal text substitution that must match exactly once per listed file; a source
that differs from the pinned release fails loudly instead of being half-patched. Re-running on an
already patched tree is a no-op. Why each fix exists is stated beside it; the
fixes mirror what detectron2's main branch did after v0.6 (except where noted).

Why this is hand-written: the sdists are fetched by pinned hash and nothing on PyPI carries a
working detectron2 for today's stack; committing a patched copy of third-party source is not
allowed, so the fixes are applied at install time.
"""
import glob
import os
import sys

MARKER = "seesaw_ecm-compat-2"  # bump when a fix changes; install.sh checks it

# The stub that replaces the compiled extension (its C++/CUDA sources are absent from the sdist).
C_STUB = f'''"""Stub for detectron2's compiled ops, written by seesaw_ecm's installer ({MARKER}).

The pb1-detectron2 sdist lacks detectron2/layers/csrc, so detectron2._C cannot be built.
Mask R-CNN / Cascade R-CNN with FPN use torchvision's ops and do not need it; rotated boxes,
deformable convolution and the C++ COCO evaluator do.
"""
SEESAW_ECM_STUB = True


# what detectron2.utils.collect_env asks of a built extension
def get_compiler_version():
    return "none (stub detectron2._C: no compiled ops)"


def get_cuda_version():
    return "none"


def has_cuda():
    return False


def __getattr__(name):
    raise RuntimeError(
        f"detectron2._C.{{name}} is a compiled op that this detectron2 install does not have "
        "(it was installed from the pb1-detectron2 sdist, which lacks the C++/CUDA sources). "
        "Rotated boxes, deformable conv and COCOeval_opt need it; to use them, build official "
        "detectron2 from source, which tools/install/install.sh detects and keeps."
    )
'''

# (glob relative to the source root, old text, new text); every file matched must contain `old`.
DETECTRON2_FIXES = [
    # 1. The sdist has no csrc/: build no extension at all.
    ("setup.py", "ext_modules=get_extensions(),", "ext_modules=[],"),
    # 2. Ship the model-zoo configs that the sdist keeps inside the package.
    (
        "setup.py",
        'package_data={"detectron2.model_zoo": get_model_zoo_configs()},',
        'package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]},',
    ),
    # 4. Pillow >= 10 removed Image.LINEAR (an alias of BILINEAR).
    ("detectron2/data/transforms/transform.py", "interp=Image.LINEAR", "interp=Image.BILINEAR"),
    # 5. numpy >= 1.24 removed the np.int / np.float / np.bool / np.str aliases.
    ("detectron2/data/build.py", "dtype=np.int)", "dtype=np.int64)"),
    ("detectron2/data/build.py", "dtype=np.int\n", "dtype=np.int64\n"),
    ("detectron2/structures/masks.py", "np.bool)", "bool)"),
    ("detectron2/evaluation/sem_seg_evaluation.py", "np.int)", "np.int64)"),
    ("detectron2/evaluation/sem_seg_evaluation.py", "np.float)", "np.float64)"),
    ("detectron2/evaluation/pascal_voc_evaluation.py", "astype(np.bool)", "astype(bool)"),
    ("detectron2/data/datasets/pascal_voc.py", "dtype=np.str)", "dtype=str)"),
    ("detectron2/utils/visualizer.py", "astype(np.bool)", "astype(bool)"),
    ("detectron2/utils/video_visualizer.py", "dtype=np.bool)", "dtype=bool)"),
    # 7. detectron2.export imports caffe2 (gone from torch): guard it so TracingAdapter imports.
    (
        "detectron2/export/__init__.py",
        "from .api import *\n",
        "try:\n    from .api import *\nexcept ImportError:  # caffe2 is gone from torch\n    pass\n",  # noqa: E501
    ),
    # 8. launch(): GLOO and no CUDA device calls when there is no GPU (multi-process on CPU).
    (
        "detectron2/engine/launch.py",
        '    assert torch.cuda.is_available(), "cuda is not available. Please check your installation."\n',  # noqa: E501
        "    has_gpu = torch.cuda.is_available()\n",
    ),
    ("detectron2/engine/launch.py", 'backend="NCCL",', 'backend="NCCL" if has_gpu else "GLOO",'),
    (
        "detectron2/engine/launch.py",
        "    assert num_gpus_per_machine <= torch.cuda.device_count()\n"
        "    torch.cuda.set_device(local_rank)\n",
        "    if has_gpu:\n"
        "        assert num_gpus_per_machine <= torch.cuda.device_count()\n"
        "        torch.cuda.set_device(local_rank)\n",
    ),
    # 8b. DistributedDataParallel of a CPU model takes no device_ids (not fixed upstream).
    (
        "detectron2/engine/defaults.py",
        'kwargs["device_ids"] = [comm.get_local_rank()]',
        'kwargs["device_ids"] = [comm.get_local_rank()] if torch.cuda.is_available() else None',
    ),
]
# 6. (pkg_resources) and 9. (iopath<0.1.10) are pins in requirements.in.

LVIS_FIXES = [
    ("lvis/eval.py", "astype(dtype=np.float)", "astype(dtype=np.float64)"),
]


def apply(root, fixes):
    done = os.path.join(root, ".seesaw_ecm_patched")
    if os.path.exists(done) and open(done).read().strip() == MARKER:
        return
    for pattern, old, new in fixes:
        files = sorted(glob.glob(os.path.join(root, pattern)))
        if not files:
            sys.exit(f"patch_third_party: {pattern} not found under {root}: "
                     "not the pinned release?")
        for path in files:
            with open(path) as f:
                text = f.read()
            if old not in text:
                sys.exit(
                    f"patch_third_party: expected text not found in {path}:\n  {old!r}\n"
                    "The source differs from the pinned release; refusing to patch it."
                )
            with open(path, "w") as f:
                f.write(text.replace(old, new))
    with open(done, "w") as f:
        f.write(MARKER + "\n")


def main(argv):
    if len(argv) != 3 or argv[1] not in ("detectron2", "lvis"):
        sys.exit(__doc__)
    which, root = argv[1], argv[2]
    if which == "detectron2":
        # 3. detectron2._C: a stub that raises a clear error for any compiled op.
        with open(os.path.join(root, "detectron2", "_C.py"), "w") as f:
            f.write(C_STUB)
        apply(root, DETECTRON2_FIXES)
    else:
        # the sdist's setup.py reads a requirements.txt it does not ship; its dependencies are
        # installed from requirements.lock instead
        open(os.path.join(root, "requirements.txt"), "a").close()
        apply(root, LVIS_FIXES)


if __name__ == "__main__":
    main(sys.argv)
