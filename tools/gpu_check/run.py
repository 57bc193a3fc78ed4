"""The GPU check: one command that, on a GPU machine without registry access, installs the stack
from a wheelhouse (tools/gpu_check/build_wheelhouse.sh) next to the machine's own torch, then
measures within 9.5 minutes and writes OUT/gpu_check.json and
OUT/gpu_check.log:

1. install: verify the wheelhouse's SHA256SUMS, `pip install --no-index --no-deps --target`
   (skipped when the stack already imports), import the stack;
2. environment: versions, device, a torchvision op on the device;
3. correctness (correctness.py): each loss, box predictor and mask head on the device equals
   the CPU (float32), autocast float16 is finite and close to float32, Seesaw counts are
   all-reduced on device tensors;
4. throughput (throughput.py): s/iter and peak GPU memory of Mask R-CNN and Cascade with each
   loss against stock detectron2, with and without AMP, at LVIS scale, in one process, with
   the host syncs per iteration of each (tools/sync_counter.py);
5. training (training.py): train_net.py with the synthetic Seesaw config, evaluation,
   checkpoints, export;
6. converted (converted.py): an official-checkpoint layout per family converted, LVIS-size
   inference timed.

Each section has its own time limit and error guard: a section that fails or runs out of time
is recorded with its error and the next one runs. The JSON is rewritten after every section.
Without CUDA (or with --tiny) everything runs on the CPU with tiny sizes: the rehearsal that
tests/test_gpu_check.py runs. Exit status: 0 when every section passed, 1 otherwise.

    python -m tools.gpu_check.run --wheelhouse .wheelhouse --out "$OUT"     # GPU machine
    python -m tools.gpu_check.run --tiny --out output/gpu_check              # rehearsal

Run from the checkout's root. Only the standard library is imported before the install step.
The command starts itself again with the checkout and the install folder first in PYTHONPATH,
so that it and its subprocesses import this checkout's packages and the installed wheels.
"""
import argparse
import datetime
import glob
import hashlib
import importlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STACK = ("detectron2", "fvcore", "iopath", "yacs", "omegaconf", "hydra", "pycocotools.mask",
         "lvis", "termcolor", "portalocker")
# seconds per section (GPU, tiny). On the GPU they sum to 9.5 minutes, install included; the
# tiny (CPU) ones are wide because the rehearsal shares a loaded 2-core machine (it takes ~70 s
# of CPU time).
INSTALL_BUDGET = 60
BUDGETS = {"environment": (30, 60), "correctness": (60, 240), "throughput": (210, 240),
           "training": (120, 420), "converted": (90, 240)}
SOURCES = ("seesaw_ecm", "configs", "benchmarks", "tools", "train_net.py", "setup.py")
log = logging.getLogger("gpu_check")


class SectionTimeout(BaseException):
    """Raised (by SIGALRM) in a section that outlives its time; a BaseException so that no
    `except Exception` inside the section swallows it."""


def _alarm(signum, frame):
    raise SectionTimeout()


class Report:
    """The JSON document, rewritten (atomically) after every change."""

    def __init__(self, path, doc):
        self.path, self.doc = path, doc
        self.write()

    def write(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.doc, f, indent=1, default=str)
        os.replace(tmp, self.path)

    def section(self, name, budget, fn, *args):
        """Run fn(*args, deadline) under a `budget`-second alarm; record its dict or error."""
        entry = self.doc["sections"][name] = {"status": "running", "budget_s": budget}
        self.write()
        log.info(f"--- {name} (at most {budget} s)")
        start = time.monotonic()
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(budget)
        try:
            entry.update(fn(*args, start + budget - 5))
            entry["status"] = "ok" if entry.get("passed", True) else "failed"
        except SectionTimeout:
            entry.update(status="timeout", error=f"did not finish within {budget} s")
        except Exception as e:  # recorded; the next section still runs
            entry.update(status="error", error=f"{type(e).__name__}: {e}",
                         traceback=traceback.format_exc()[-4000:])
        finally:
            signal.alarm(0)
        entry["seconds"] = round(time.monotonic() - start, 1)
        log.info(f"{name}: {entry['status']} in {entry['seconds']} s"
                 + (f"\n{entry['error']}" if "error" in entry else ""))
        self.write()
        return entry


def source_digest():
    """sha256 of the project's source files: identifies the code where .git did not travel."""
    digest = hashlib.sha256()
    for top in SOURCES:
        paths = [top] if os.path.isfile(os.path.join(ROOT, top)) else sorted(
            glob.glob(os.path.join(ROOT, top, "**", "*.*"), recursive=True))
        for path in paths:
            path = os.path.join(ROOT, path)
            if path.endswith((".py", ".yaml", ".sh")) and "__pycache__" not in path:
                digest.update(os.path.relpath(path, ROOT).encode())
                digest.update(open(path, "rb").read())
    return digest.hexdigest()


def git_commit():
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def stack_imports():
    probe = "import " + ", ".join(STACK)
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120)


def install(wheelhouse, target, deadline):
    """Install the wheelhouse into `target` unless the stack already imports."""
    if stack_imports().returncode == 0:
        return {"installed": False, "reason": "the stack already imports"}
    if not wheelhouse:
        raise RuntimeError("the stack does not import and no --wheelhouse was given: build one "
                           "with tools/gpu_check/build_wheelhouse.sh and carry it")
    sums = os.path.join(wheelhouse, "SHA256SUMS")
    wheels = []
    for line in open(sums):
        sha, name = line.split()
        path = os.path.join(wheelhouse, name)
        if hashlib.sha256(open(path, "rb").read()).hexdigest() != sha:
            raise RuntimeError(f"{path} does not match SHA256SUMS: rebuild the wheelhouse")
        wheels.append(path)
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--quiet", "--target", target, *wheels]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          timeout=max(1, deadline - time.monotonic()))
    if proc.returncode != 0:
        raise RuntimeError(f"pip install failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    probe = stack_imports()
    if probe.returncode != 0:
        raise RuntimeError(f"installed, but the stack does not import:\n{probe.stderr[-3000:]}")
    importlib.invalidate_caches()  # `target` was listed (empty) by the imports before
    return {"installed": True, "target": os.path.basename(target),  # no machine paths
            "wheels": [os.path.basename(w) for w in wheels]}


def environment(device, deadline):
    import detectron2
    import numpy
    import torch
    import torchvision

    import seesaw_ecm  # noqa: F401

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0]], device=device)
    kept = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8], device=device), 0.5)
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "torchvision": torchvision.__version__, "detectron2": detectron2.__version__,
        "numpy": numpy.__version__, "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "nms_on_device": kept.tolist() == [0],
        "passed": kept.tolist() == [0],
    }


def run_module(name, *args):
    return importlib.import_module(f"tools.gpu_check.{name}").run(*args)


COMMAND_ENV = "SEESAW_ECM_GPU_CHECK_COMMAND"  # the command as given, kept over the restart


def restart_with_path(target, argv, given):
    """Replace this process by the same command (`argv`, its paths absolute), run from the
    checkout with the checkout and `target` (the install folder) first in PYTHONPATH, which
    Python reads at start, for this process and its subprocesses alike. The checkout comes
    first: detectron2's wheel installs a top-level `tools` package too."""
    os.makedirs(target, exist_ok=True)
    path = [ROOT, target] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    env.setdefault(COMMAND_ENV, json.dumps(given))
    os.chdir(ROOT)
    os.execve(sys.executable, [sys.executable, "-m", "tools.gpu_check.run", *argv], env)


def summary(doc):
    """Failed correctness checks and the throughput table, as text for the log."""
    sections = doc["sections"]
    lines = [f"{name}: {s['status']}" for name, s in sections.items()]
    failed = [c for c in sections.get("correctness", {}).get("checks", []) if not c["passed"]]
    lines += [f"FAILED check: {c}" for c in failed]
    rows = sections.get("throughput", {}).get("rows", [])
    if rows:
        from tabulate import tabulate  # after the install step

        lines.append(tabulate(
            [[r["name"], r["s_per_iter"], r["x_stock"], r["peak_mib"], r["x_stock_memory"],
              r.get("syncs"), r.get("stock_syncs")] for r in rows],
            headers=["model", "s/iter", "x stock", "peak MiB", "x stock memory", "syncs/iter",
                     "stock syncs/iter"],
            tablefmt="github", floatfmt=("", ".4f", ".3f", ".0f", ".3f"), missingval="-"))
    training = sections.get("training", {})
    if "evaluation" in training:
        lines.append(f"training: {training['iterations']} iterations, {training['s_per_iter']} "
                     f"s/iter, {training['evaluation']}")
    return "summary:\n" + "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheelhouse", help="folder of wheels + SHA256SUMS to install from")
    parser.add_argument("--out", default="output/gpu_check",
                        help="where gpu_check.json and gpu_check.log go (default: %(default)s)")
    parser.add_argument("--work", help="scratch folder (default: a new temporary folder)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny sizes (automatic without CUDA): the CPU rehearsal")
    parser.add_argument("--sections", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    parser.add_argument("--commit", help="the commit checked out (default: git rev-parse HEAD)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
    # the checkout and the installed wheels, for this process and its subprocesses
    target = os.path.join(work, "site")
    if target not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        absolute = ["--work", work, "--out", os.path.abspath(args.out)]
        if args.wheelhouse:
            absolute += ["--wheelhouse", os.path.abspath(args.wheelhouse)]
        restart_with_path(target, argv + absolute, argv)

    os.makedirs(args.out, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", handlers=[
        logging.FileHandler(os.path.join(args.out, "gpu_check.log"), mode="w"),
        logging.StreamHandler(sys.stdout)])
    report = Report(os.path.join(args.out, "gpu_check.json"), {
        # the command as given (the restart adds absolute paths of this machine)
        "schema": 1, "command": ["python", "-m", "tools.gpu_check.run",
                                 *json.loads(os.environ.get(COMMAND_ENV, json.dumps(argv)))],
        "commit": args.commit or git_commit(),
        "source_sha256": source_digest(), "host": platform.node(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "sections": {}})
    install_entry = report.section("install", INSTALL_BUDGET, install, args.wheelhouse, target)
    if install_entry["status"] != "ok":
        return 1

    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    tiny = args.tiny or not cuda
    report.doc.update(device=str(device), tiny=tiny)
    log.info(f"device {device}, {'tiny' if tiny else 'full'} sizes")
    sections = {  # the other sections' modules are imported inside their guard
        "environment": (environment, device),
        "correctness": (run_module, "correctness", device, tiny),
        "throughput": (run_module, "throughput", device, tiny),
        "training": (run_module, "training", device, tiny, work),
        "converted": (run_module, "converted", device, tiny, work),  # converted.py
    }
    for name in args.sections:
        fn, *fn_args = sections[name]
        report.section(name, BUDGETS[name][tiny], fn, *fn_args)
        if cuda:
            torch.cuda.empty_cache()
    log.info(summary(report.doc))
    report.doc["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds")
    report.doc["passed"] = all(s["status"] == "ok" for s in report.doc["sections"].values())
    report.write()
    log.info(f"passed: {report.doc['passed']}; {report.path}")
    return 0 if report.doc["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
