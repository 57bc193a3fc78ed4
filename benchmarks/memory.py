"""The memory a benchmark measures: this process' peak resident set, and the library's numpy-only
modules imported without the package's __init__ (which loads torch and detectron2)."""
import importlib.util
import sys
import types


def peak_rss_gib():
    """This process' peak resident memory (VmHWM) in GiB; nan where /proc does not say."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2 ** 20
    return float("nan")


def bare_library():
    """Make `seesaw_ecm` an empty package over the installed one's folder, so that importing its
    numpy-only modules (evaluation.lvis_fast, evaluation.openimages_fast,
    data.openimages_hierarchy) skips seesaw_ecm/__init__.py, which loads torch and detectron2
    (~0.6 GiB that would count in the measured memory). Nothing once seesaw_ecm is imported."""
    if "seesaw_ecm" in sys.modules:
        return
    package = types.ModuleType("seesaw_ecm")
    package.__path__ = list(importlib.util.find_spec("seesaw_ecm").submodule_search_locations)
    sys.modules["seesaw_ecm"] = package
