#!/usr/bin/env python
"""seesaw_ecm: Seesaw Loss and ECM loss for long-tailed instance segmentation in Detectron2.

Install with `bash tools/install/install.sh`, which installs detectron2 0.6 (patched for today's
torch / numpy / Pillow) and this package. detectron2 is not listed in install_requires: it is not
on PyPI under that name, and a user's own (e.g. compiled-from-source) build must be kept.
"""
from setuptools import find_packages, setup

setup(
    name="seesaw_ecm",
    version="0.1.0",
    description="Seesaw Loss and ECM loss for long-tailed instance segmentation (Detectron2)",
    # the library only: benchmarks/ and tools/ stay in the checkout and run from its root
    # (python -m benchmarks.long_tail, python -m tools.export_model, ...), importing seesaw_ecm
    # like any user; detectron2's wheel already installs a top-level `tools` package
    packages=find_packages(include=["seesaw_ecm", "seesaw_ecm.*"]),
    license="Apache-2.0",
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.0",
        "torchvision",
        "numpy>=2",
        "fvcore",
        "iopath",
        "pycocotools",
        "lvis",
        "Pillow",
        "safetensors",
    ],
    extras_require={"test": ["pytest"]},
)
