"""Time and peak memory of LVIS evaluation: official `lvis` against seesaw_ecm's `lvis_fast`.

Synthetic LVIS-scale data (benchmarks.lvis_scale_synthetic: 1,203 classes in r/c/f
groups, negative and not-exhaustive lists, polygon ground truth, 300 detections per image with
RLE masks) is generated once per size and cached under --data-dir. Each (size, task, backend)
runs in its own child process, which loads the ground truth and results json (as detectron2
holds them: a list of dicts), evaluates, and reports the evaluation's wall time and the process'
peak resident memory (VmHWM, loading included; torch / detectron2 are not imported by either).
For segm the results' "bbox" is removed first, as detectron2's LVISEvaluator does. lvis' time
counts LVISResults + LVISEval.run (its LVIS(gt)
index is built before the clock starts); lvis_fast's counts building its ground-truth arrays
and the whole evaluation. The parent prints a table with the ratios, checks that both backends
give the same metrics and per-category AP, and writes a JSON report.

    python -m benchmarks.lvis_eval [--sizes 1000 5000] [--tasks bbox segm]
        [--data-dir /tmp/lvis_eval_bench] [--out benchmarks/lvis_eval.json]

With --lvis-metrics, lvis_fast only: standard AP (300 per image) against AP-fixed + AP-pool
(top --topk per category, no per-image cap) of bbox and segm, and boundary AP, on the same
data, each in its own process; ratios are to the standard AP of the same task (boundary: to
segm). The report goes to --out (default benchmarks/lvis_metrics.json).
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
from tabulate import tabulate

from benchmarks.memory import bare_library, peak_rss_gib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LVIS_V1_VAL_IMAGES = 19809


def child(backend, task, gt_path, res_path, topk="0"):
    """Runs in a fresh process; prints one JSON line with time, memory and the metrics
    (topk > 0: lvis_fast's AP-fixed with that K, and AP-pool)."""
    import logging

    for name in ("lvis", "lvis.results", "lvis.eval", "lvis.lvis"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with open(res_path) as f:
        results = json.load(f)
    if task in ("segm", "boundary"):
        for r in results:
            r.pop("bbox", None)
    if backend == "lvis":
        from lvis import LVIS, LVISEval, LVISResults

        gt = LVIS(gt_path)
        loaded = peak_rss_gib()
        start = time.perf_counter()
        ev = LVISEval(gt, LVISResults(gt, results, max_dets=300), task)
        ev.run()
        seconds = time.perf_counter() - start
        metrics, precision = dict(ev.results), ev.eval["precision"]
    else:
        bare_library()  # lvis_fast needs numpy + pycocotools only, as the lvis child
        from seesaw_ecm.evaluation import lvis_fast

        with open(gt_path) as f:
            dataset = json.load(f)
        loaded = peak_rss_gib()
        start = time.perf_counter()
        res = lvis_fast.evaluate(lvis_fast.LvisGroundTruth(dataset), results, task, 300,
                                 topk_per_class=int(topk))
        seconds = time.perf_counter() - start
        metrics, precision = dict(res.metrics, **(res.pooled or {})), res.precision
    p = precision[:, :, :, 0]
    valid = p > -1
    per_cat = np.where(valid.any(axis=(0, 1)), np.where(valid, p, 0).sum(axis=(0, 1))
                       / np.maximum(valid.sum(axis=(0, 1)), 1), -1)
    print(json.dumps({"seconds": seconds, "peak_gib": peak_rss_gib(), "loaded_gib": loaded,
                      "metrics": {k: float(v) for k, v in metrics.items()},
                      "per_category_ap": per_cat.tolist()}))


def run_child(backend, task, gt_path, res_path, topk=0):
    cmd = [sys.executable, "-m", "benchmarks.lvis_eval", "--child", backend, task, gt_path,
           res_path, str(topk)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env,
                         cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--tasks", nargs="+", default=["bbox", "segm"])
    parser.add_argument("--data-dir", default="/tmp/lvis_eval_bench")
    parser.add_argument("--out", default=None,
                        help="JSON report (default benchmarks/lvis_eval.json, or "
                        "benchmarks/lvis_metrics.json with --lvis-metrics)")
    parser.add_argument("--lvis-metrics", action="store_true",
                        help="time AP-fixed / AP-pool / boundary AP against standard AP")
    parser.add_argument("--topk", type=int, default=10000, help="K of AP-fixed")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    if args.lvis_metrics:
        return lvis_metrics(args)
    args.out = args.out or os.path.join(ROOT, "benchmarks", "lvis_eval.json")

    from seesaw_ecm.fileio import write_atomic

    from benchmarks import lvis_scale_synthetic as synthetic

    rows, table = [], []
    for n in args.sizes:
        gt_path, res_path = synthetic.write(os.path.join(args.data_dir, str(n)), n)
        for task in args.tasks:
            lv = run_child("lvis", task, gt_path, res_path)
            fa = run_child("fast", task, gt_path, res_path)
            diff = max(max(abs(lv["metrics"][k] - fa["metrics"][k]) for k in lv["metrics"]),
                       float(np.max(np.abs(np.subtract(lv["per_category_ap"],
                                                       fa["per_category_ap"])))))
            row = {"images": n, "task": task, "lvis": lv, "fast": fa, "max_abs_diff": diff,
                   "speedup": lv["seconds"] / fa["seconds"],
                   "memory_ratio": lv["peak_gib"] / fa["peak_gib"]}
            for result in (lv, fa):  # compared above; too long for the report
                del result["per_category_ap"]
            rows.append(row)
            table.append([n, task, lv["seconds"], fa["seconds"], f"{row['speedup']:.1f}x",
                          lv["peak_gib"], fa["peak_gib"], f"{row['memory_ratio']:.1f}x", diff])
            print(f"done: {n} images, {task}", flush=True)
    print(tabulate(table, headers=["images", "task", "lvis s", "fast s", "speed-up", "lvis GiB",
                                   "fast GiB", "mem ratio", "max |diff|"],
                   floatfmt=("", "", ".1f", ".1f", "", ".2f", ".2f", "", ".1e")))
    # linear extrapolation from the two largest sizes (time and memory grow ~linearly)
    print(f"\nExtrapolated to LVIS v1 val ({LVIS_V1_VAL_IMAGES} images), linear in images "
          "from the two largest sizes:")
    table = []
    for task in args.tasks:
        for backend in ("lvis", "fast"):
            ext = _extrapolate([(r["images"], r[backend]) for r in rows
                                if r["task"] == task and backend in r])
            if ext is None:
                continue
            table.append([task, backend, ext["seconds"], ext["peak_gib"]])
            rows.append({"images": LVIS_V1_VAL_IMAGES, "task": task, "backend": backend,
                         "extrapolated": ext})
    print(tabulate(table, headers=["task", "backend", "~s", "~GiB"],
                   floatfmt=("", "", ".0f", ".1f")))
    write_atomic(args.out, json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
    print(f"\nwritten {args.out}")


def _extrapolate(points):
    """points: [(images, {"seconds", "peak_gib"})] -> the two at LVIS v1 val size, linear in
    images from the two largest sizes (time and memory grow ~linearly); None below 2 sizes."""
    pts = sorted(points, key=lambda p: p[0])[-2:]
    if len(pts) < 2:
        return None
    (x0, a), (x1, b) = pts
    return {f: b[f] + (b[f] - a[f]) / (x1 - x0) * (LVIS_V1_VAL_IMAGES - x1)
            for f in ("seconds", "peak_gib")}


def lvis_metrics(args):
    """lvis_fast: standard AP against AP-fixed + AP-pool and boundary AP, same data."""
    from seesaw_ecm.fileio import write_atomic

    from benchmarks import lvis_scale_synthetic as synthetic

    variants = [("bbox", 0), ("bbox", args.topk), ("segm", 0), ("segm", args.topk),
                ("boundary", 0)]
    rows, table = [], []
    for n in args.sizes:
        gt_path, res_path = synthetic.write(os.path.join(args.data_dir, str(n)), n)
        base = {}
        for task, topk in variants:
            out = run_child("fast", task, gt_path, res_path, topk)
            del out["per_category_ap"]
            metric = f"AP-fixed K={topk}" if topk else "standard"
            if not topk:
                base[task] = out["seconds"]
            ratio = out["seconds"] / base["segm" if task == "boundary" else task]
            rows.append({"images": n, "task": task, "topk": topk, "ratio": ratio, **out})
            m = out["metrics"]
            table.append([n, task, metric, out["seconds"], out["peak_gib"], f"{ratio:.2f}x",
                          m["AP"] * 100, m["APr"] * 100, m.get("AP-pooled-all", -0.01) * 100])
            print(f"done: {n} images, {task} {metric}", flush=True)
    print(tabulate(table, headers=["images", "task", "metric", "s", "GiB", "x time", "AP", "APr",
                                   "pooled"],
                   floatfmt=("", "", "", ".1f", ".2f", "", ".2f", ".2f", ".2f")))
    print(f"\nExtrapolated to LVIS v1 val ({LVIS_V1_VAL_IMAGES} images), linear in images "
          "from the two largest sizes (300 detections per image):")
    table = []
    for task, topk in variants:
        ext = _extrapolate([(r["images"], r) for r in rows
                            if r["task"] == task and r["topk"] == topk])
        if ext:
            table.append([task, "AP-fixed" if topk else "standard", ext["seconds"],
                          ext["peak_gib"]])
            rows.append({"images": LVIS_V1_VAL_IMAGES, "task": task, "topk": topk,
                         "extrapolated": ext})
    print(tabulate(table, headers=["task", "metric", "~s", "~GiB"],
                   floatfmt=("", "", ".0f", ".1f")))
    out = args.out or os.path.join(ROOT, "benchmarks", "lvis_metrics.json")
    write_atomic(out, json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
