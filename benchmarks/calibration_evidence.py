"""Calibration evidence: NorCal with its gamma chosen on a held-out split, against the losses.

    python -m benchmarks.calibration_evidence --runs output/evidence_demo \\
        --losses ce seesaw ecm gol --calibrate ce seesaw \\
        --holdout synthetic_lt_demo_holdout --test synthetic_lt_demo_val \\
        --gammas 0 0.25 0.5 0.75 1 1.5 2 --output benchmarks/calibration_evidence_demo.json

--runs are long-tail harness output folders (benchmarks.long_tail: <arch>_<loss>/seed<k>,
each with model_final.pth and harness_command.json). For every run of a --calibrate loss:
tools.calibration_sweep over --gammas on the --holdout split (box AP, one inference pass), the
gamma of the best holdout box AP chosen (ties: the smaller gamma; AP, not APr: the rule must
not trade the frequent classes away unseen), and that model evaluated on the --test split with
NorCal at that gamma (train_net.py --eval-only: box and mask). Every run is also evaluated on
the test split without calibration. All evaluations add AP-fixed and AP-pool (TEST.AP_FIXED,
TEST.AP_POOL); a model with detectron2's StandardROIHeads (softmax CE) is evaluated as
LongTailROIHeads with MODEL.LONG_TAIL.LOSS "ce" (the same weights and scores; those heads give
the top-K-per-class inference AP-fixed needs). AP-fixed's K (TEST.AP_FIXED.TOPK_PER_CLASS) is
LVIS' 10,000 per category over its 19,809 validation images scaled to the test split's size
(151 for 300 images), as docs/BENCHMARKS.md scales it for the synthetic set; LVIS' own 10,000
would give every detection a mask (seconds per image on a CPU). NorCal's counts:
MODEL.ROI_HEADS.CALIBRATION.COUNTS (--counts; image_count: the official NorCal's). Finished
steps are reused (their output files).

Writes --output: per run the holdout sweep, the chosen gamma and the test metrics; per row
(loss, loss + NorCal) mean ± std over seeds; prints the Markdown table. Paths in the JSON are
relative to the working directory (run from the repository root).
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import yaml

from seesaw_ecm.errors import SeesawEcmError
from seesaw_ecm.evaluation.evaluator import REPORT_FILE
from seesaw_ecm.fileio import write_atomic

from . import harness

METRICS = ("AP", "APr", "APc", "APf", "AP-pool")
NAMES = {"ce": "CE", "seesaw": "Seesaw", "ecm": "ECM", "gol": "GOL"}  # the table's row names
TASKS = ("bbox", "segm")
# evaluation overrides of every run: AP-fixed detections and AP-pool on them
POOL_OPTS = ["TEST.AP_FIXED.ENABLED", "True", "TEST.AP_POOL", "True"]
# AP-fixed's K on LVIS v1 and the number of LVIS v1 validation images it is meant for
LVIS_TOPK, LVIS_VAL_IMAGES = 10000, 19809
# a StandardROIHeads (softmax CE) model evaluated with top-K-per-class inference
CE_HEADS_OPTS = ["MODEL.ROI_HEADS.NAME", "LongTailROIHeads", "MODEL.LONG_TAIL.LOSS", "ce"]


def _config_of(run):
    """The config file and overrides the harness trained `run` with (its stored command),
    without SEED / OUTPUT_DIR."""
    with open(os.path.join(run, "harness_command.json")) as f:
        cmd = json.load(f)
    config = cmd[cmd.index("--config-file") + 1]
    opts = cmd[cmd.index("--num-gpus") + 2:] if "--num-gpus" in cmd else []
    keep = []
    for key, value in zip(opts[::2], opts[1::2]):
        if key not in ("SEED", "OUTPUT_DIR"):
            keep += [key, value]
    return config, keep


def scaled_topk(num_images):
    """AP-fixed's K for a test set of `num_images`: LVIS' K per image, times the images."""
    return max(1, round(LVIS_TOPK * num_images / LVIS_VAL_IMAGES))


def _model_opts(run, topk):
    """Overrides that every evaluation of `run` needs: its weights, AP-pool (K = `topk`), CE
    heads."""
    with open(os.path.join(run, "config.yaml")) as f:
        heads = yaml.safe_load(f)["MODEL"]["ROI_HEADS"]["NAME"]
    extra = CE_HEADS_OPTS if heads == "StandardROIHeads" else []
    return (["MODEL.WEIGHTS", os.path.join(run, "model_final.pth")] + POOL_OPTS
            + ["TEST.AP_FIXED.TOPK_PER_CLASS", str(topk)] + extra)


def sweep_command(run, holdout, gammas, counts, topk):
    config, opts = _config_of(run)
    return ([sys.executable, "-m", "tools.calibration_sweep", "--config-file", config] + opts
            + _model_opts(run, topk) + [
                "DATASETS.TEST", repr((holdout,)), "MODEL.ROI_HEADS.CALIBRATION.COUNTS", counts,
                "--output-dir", os.path.join(run, "sweep_holdout"), "--gammas"]
            + [f"{g:g}" for g in gammas])


def eval_command(run, test, out, topk, gamma=None, counts="image_count"):
    config, opts = _config_of(run)
    calib = [] if gamma is None else [
        "MODEL.ROI_HEADS.CALIBRATION.METHOD", "norcal", "MODEL.ROI_HEADS.CALIBRATION.GAMMA",
        repr(float(gamma)), "MODEL.ROI_HEADS.CALIBRATION.COUNTS", counts]  # 1 -> "1.0": a float
    return ([sys.executable, "train_net.py", "--config-file", config, "--eval-only"] + opts
            + _model_opts(run, topk) + calib + ["DATASETS.TEST", repr((test,)), "OUTPUT_DIR", out])


class NotEvaluated(Exception):
    """--collect-only: a step of this run has not been run."""


def _run(cmd, done, log, collect_only=False):
    """Run `cmd` unless the file `done` exists; its output into `log`. With `collect_only`,
    raise NotEvaluated instead of running it."""
    if os.path.isfile(done):
        return
    if collect_only:
        raise NotEvaluated(done)
    os.makedirs(os.path.dirname(log), exist_ok=True)
    print("[run]", " ".join(cmd[1:]), flush=True)
    with open(log, "w") as f:
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
            raise SeesawEcmError(f"Failed ({log}):\n{open(log).read()[-3000:]}")


def choose_gamma(gammas, results):
    """The gamma of the best box AP on the holdout split (ties: the smaller gamma).
    results: calibration_sweep's per-value evaluator results, in the order of `gammas`."""
    aps = [r["bbox"]["AP"] for r in results]
    best = max(range(len(gammas)), key=lambda i: (aps[i], -gammas[i]))
    return gammas[best]


def eval_file(out, test):
    """The report an evaluation into `out` writes last (its done-marker)."""
    return os.path.join(out, "inference", test, REPORT_FILE)


def read_eval(out, test):
    """{"bbox/AP": ..., "segm/AP-pool": ...} from an evaluation's report (REPORT_FILE)."""
    with open(eval_file(out, test)) as f:
        report = json.load(f)
    metrics = {}
    for task in TASKS:
        entry = report[task]
        for m in METRICS:
            value = (entry["pooled"]["AP-pooled-all"] if m == "AP-pool"
                     else entry["metrics"][m])
            metrics[f"{task}/{m}"] = value if value >= 0 else None
    return metrics


def evaluate_run(run, args):
    """Sweep (for a --calibrate loss), then the test evaluations of one run."""
    trained = harness.read_run(run, per_class=False)
    out = {"run": os.path.relpath(run), "loss": trained["loss"]}
    if trained["loss"] in args.calibrate:
        sweep_dir = os.path.join(run, "sweep_holdout")
        cmd = sweep_command(run, args.holdout, args.gammas, args.counts, args.topk)
        _run(cmd, os.path.join(sweep_dir, "results.json"), os.path.join(sweep_dir, "log.txt"),
             args.collect_only)
        with open(os.path.join(sweep_dir, "results.json")) as f:
            sweep = json.load(f)
        values, per_value = sweep["values"], sweep["results"][args.holdout]
        out["holdout_box"] = {f"{g:g}": {m: per_value[i]["bbox"].get(m) for m in (
            "AP", "APr", "APc", "APf")} for i, g in enumerate(values)}
        out["gamma"] = choose_gamma(values, per_value)
    plain = os.path.join(run, "eval_test")
    cmd = eval_command(run, args.test, plain, args.topk)
    try:
        _run(cmd, eval_file(plain, args.test), os.path.join(plain, "stdout.txt"),
             args.collect_only)
        out["test"] = read_eval(plain, args.test)
    except NotEvaluated:  # --collect-only: the training's own evaluation, without AP-pool
        out["test"] = {f"{t}/{m}": (None if m == "AP-pool" else trained["metrics"][f"{t}/{m}"])
                       for t in TASKS for m in METRICS}
        out["test_source"] = "training evaluation (no AP-pool)"
    if "gamma" in out:
        calibrated = os.path.join(run, "eval_test_norcal")
        cmd = eval_command(run, args.test, calibrated, args.topk, out["gamma"], args.counts)
        try:
            _run(cmd, eval_file(calibrated, args.test), os.path.join(calibrated, "stdout.txt"),
                 args.collect_only)
            out["test_norcal"] = read_eval(calibrated, args.test)
        except NotEvaluated as e:  # --collect-only: the run without its calibrated row
            print(f"[skip] {run}: not evaluated with NorCal ({e})", flush=True)
    return out


def _evaluate_or_skip(run, args):
    try:
        return evaluate_run(run, args)
    except NotEvaluated as e:
        print(f"[skip] {run}: not evaluated ({e})", flush=True)
        return None


def rows(runs, losses, calibrate):
    """Table rows: each loss, and each calibrated loss + NorCal, as mean ± std over seeds."""
    out = []
    for loss in losses:
        name = NAMES.get(loss, loss)
        for key, label in (("test", name), ("test_norcal", f"{name} + NorCal")):
            members = [r for r in runs if r["loss"] == loss and key in r]
            if not members or (key == "test_norcal" and loss not in calibrate):
                continue
            row = {"row": label, "seeds": len(members), "mean": {}, "std": {}}
            if key == "test_norcal":
                row["gammas"] = [r["gamma"] for r in members]
            for metric in (f"{t}/{m}" for t in TASKS for m in METRICS):
                values = [r[key][metric] for r in members]  # None: n/a for the row
                row["mean"][metric], row["std"][metric] = (
                    (None, None) if None in values else harness._mean_std(values))
            out.append(row)
    return out


def format_table(table_rows):
    head = (["row", "seeds", "gamma per seed"] + [f"box {m}" for m in METRICS]
            + [f"mask {m}" for m in METRICS])
    cells = [[r["row"], str(r["seeds"]), " / ".join(f"{g:g}" for g in r.get("gammas", [])) or "-"]
             + [harness._cell(r["mean"][k], r["std"][k], 2)
                for k in (f"{t}/{m}" for t in TASKS for m in METRICS)] for r in table_rows]
    return harness.markdown(cells, head)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True,
                        help="the long-tail harness's output folders (each loss: in any of them)")
    parser.add_argument("--arch", default="mask_rcnn", choices=harness.ARCHS)
    parser.add_argument("--losses", nargs="+", default=["ce", "seesaw", "ecm", "gol"])
    parser.add_argument("--calibrate", nargs="*", default=["ce", "seesaw"])
    parser.add_argument("--seeds", nargs="+", type=int, help="default: every seed folder")
    parser.add_argument("--holdout", required=True, help="dataset the gamma is chosen on")
    parser.add_argument("--test", required=True, help="dataset the table reports")
    parser.add_argument("--gammas", nargs="+", type=float, default=[0, 0.25, 0.5, 0.75, 1, 1.5, 2])
    parser.add_argument("--counts", default="image_count",
                        choices=["model", "instance_count", "image_count"])
    parser.add_argument("--jobs", type=int, default=1, help="evaluations side by side")
    parser.add_argument("--output", required=True, help="JSON to write")
    parser.add_argument("--note", default="", help="free text stored in the JSON")
    parser.add_argument("--collect-only", action="store_true",
                        help="run nothing: leave out the runs with a step not yet run")
    parser.add_argument("--topk-per-class", dest="topk", type=int,
                        help="AP-fixed's K (default: scaled_topk of the test split's images)")
    args = parser.parse_args(argv)
    if args.topk is None:
        from detectron2.data import DatasetCatalog

        import seesaw_ecm.data.datasets  # noqa: F401 (registers the built-in sets)

        args.topk = scaled_topk(len(DatasetCatalog.get(args.test)))
    folders = []
    for loss in args.losses:
        for runs in args.runs:
            base = os.path.join(runs, f"{args.arch}_{loss}")
            if not os.path.isdir(base):
                continue
            seeds = args.seeds or sorted(int(d[4:]) for d in os.listdir(base)
                                         if d.startswith("seed"))
            folders += [harness.run_dir(runs, loss, args.arch, s) for s in seeds
                        if harness.is_finished(harness.run_dir(runs, loss, args.arch, s))]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        runs = [r for r in pool.map(lambda run: _evaluate_or_skip(run, args), folders) if r]
    table_rows = rows(runs, args.losses, args.calibrate)
    report = {"command": "python -m benchmarks.calibration_evidence " + shlex.join(
        argv if argv is not None else sys.argv[1:]), "holdout": args.holdout, "test": args.test,
        "gammas": args.gammas, "counts": args.counts, "topk_per_class": args.topk,
        "rule": "best holdout box AP, ties: smaller", "note": args.note, "rows": table_rows,
        "runs": runs}
    write_atomic(args.output, json.dumps(report, indent=1) + "\n")
    print(format_table(table_rows))
    print(f"Wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
