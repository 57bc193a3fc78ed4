"""Long-tail benchmark harness: train every selected (loss, architecture, seed) with the same
schedule through train_net.py, or collect finished run folders, then aggregate box / mask AP,
AP50, APr, APc, APf, seconds per iteration and per-class AP against training instance count.

Decoupled methods (DECOUPLED_FROM: BaGS, LOCE) fine-tune a finished first-stage run; each gets
a control, the first-stage loss given the same second stage (same trainable parts, solver and
seed, from the same weights), and the report shows each method's change against that control
beside its change against the first stage: extra training of the same parts is not credited to
the method.

What a finished run folder holds (train_net.py writes it): config.yaml, metrics.json (training
rows with "time"; an evaluation row with "bbox/AP", "segm/AP", ...), and
inference/<test dataset>/lvis_instances_results.json (the detections LVISEvaluator scored).
Per-class AP is recomputed from those detections and the test set's annotation file with
the project's exact LVIS backend (seesaw_ecm.evaluation.lvis_fast, equal to lvis.LVISEval):
per category the mean of the precision entries > -1 over IoU thresholds and recall points,
area all, the average LVISEval.summarize takes over all categories. `python -m
benchmarks.long_tail` is the command line.
"""
import functools
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import yaml
from tabulate import tabulate

from seesaw_ecm.errors import SeesawEcmError
from seesaw_ecm.evaluation import lvis_bootstrap, lvis_fast
from seesaw_ecm.fileio import write_atomic, write_figure

logger = logging.getLogger(__name__)

LOSSES = ("ce", "cosine_ce", "federated", "seesaw", "ecm", "eql", "eqlv2", "droploss", "gol",
          "bags", "loce")
# Decoupled methods: trained from the finished run of another loss (same arch and seed), whose
# model_final.pth becomes MODEL.WEIGHTS (BaGS: the classifier of the softmax CE model; LOCE: its
# fine-tune of the CE model).
DECOUPLED_FROM = {"bags": "ce", "loce": "ce"}
# The keys that make up a second stage, copied from the method's config into its control (the
# first-stage loss's config fine-tuned the same way): the trainable parts and the whole solver.
SECOND_STAGE_KEYS = ("MODEL.LONG_TAIL.TRAINABLE", "SOLVER")
ARCHS = ("mask_rcnn", "cascade", "htc_lite")
TASKS = ("bbox", "segm")
METRICS = ("AP", "AP50", "APr", "APc", "APf")
CONFIG_DIR = "configs/Synthetic"
# written by the harness into a control's run folder: {"loss": its control_label}
LABEL_FILE = "harness_label.json"
# Cascade Mask R-CNN = the loss's Mask R-CNN config with these keys, exactly how
# cascade_mask_rcnn_R18_FPN_{seesaw,ecm}.yaml are derived from mask_rcnn_R18_FPN_{seesaw,ecm}.yaml.
CASCADE_OPTS = (
    "MODEL.ROI_HEADS.NAME", "LongTailCascadeROIHeads",
    "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "True",
    "MODEL.ROI_BOX_CASCADE_HEAD.IOUS", "(0.5, 0.6, 0.7)",
    "MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS",
    "((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))",
)
# HTC-Lite = the loss's cascade with these keys, as htc_lite_R18_FPN_seesaw.yaml derives from
# cascade_mask_rcnn_R18_FPN_seesaw.yaml.
HTC_LITE_OPTS = ("MODEL.META_ARCHITECTURE", "HTCLiteRCNN",
                 "MODEL.ROI_HEADS.NAME", "HTCLiteROIHeads")


def config_for(loss, arch, config_dir=CONFIG_DIR):
    """(config file, extra opts) of `loss` with `arch`: the shipped file when there is one,
    else the loss's Mask R-CNN file plus CASCADE_OPTS (the stock-CE Mask R-CNN file uses
    StandardROIHeads; its cascade uses LongTailCascadeROIHeads with LOSS ce, a linear
    classifier, as the stock predictor), plus HTC_LITE_OPTS for "htc_lite"."""
    if loss not in LOSSES or arch not in ARCHS:
        raise SeesawEcmError(f"Unknown loss {loss!r} or architecture {arch!r}: choose from "
                             f"{LOSSES} and {ARCHS}")
    prefix = {"mask_rcnn": "mask_rcnn", "cascade": "cascade_mask_rcnn", "htc_lite": "htc_lite"}
    shipped = os.path.join(config_dir, f"{prefix[arch]}_R18_FPN_{loss}.yaml")
    if os.path.isfile(shipped):
        return shipped, []
    if arch == "htc_lite":
        config, opts = config_for(loss, "cascade", config_dir)
        return config, opts + list(HTC_LITE_OPTS)
    return os.path.join(config_dir, f"mask_rcnn_R18_FPN_{loss}.yaml"), list(CASCADE_OPTS)


def run_dir(output_dir, loss, arch, seed):
    return os.path.join(output_dir, f"{arch}_{loss}", f"seed{seed}")


def control_label(method):
    """The run label of `method`'s control: its first-stage loss (DECOUPLED_FROM) given the same
    second stage, e.g. "ce_ft_bags"."""
    return f"{DECOUPLED_FROM[method]}_ft_{method}"


def controlled_method(label):
    """The decoupled method whose control `label` is, else None."""
    return next((m for m in DECOUPLED_FROM if label == control_label(m)), None)


def _load_config(config, opts):
    from detectron2.config import get_cfg

    from seesaw_ecm import add_seesaw_ecm_config
    from seesaw_ecm.config import merge_config

    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    merge_config(cfg, config, opts)
    return cfg


def _flat(node, prefix):
    """(key, value) of every leaf under a config node, keys dotted from `prefix`."""
    if not isinstance(node, dict):
        return [(prefix, node)]
    return [leaf for k in sorted(node) for leaf in _flat(node[k], f"{prefix}.{k}")]


def second_stage_opts(method, arch, config_dir=CONFIG_DIR):
    """Config overrides (KEY VALUE ...) that give the first-stage config of decoupled `method`
    (its DECOUPLED_FROM loss on `arch`) the second stage of `method`: every SECOND_STAGE_KEYS
    leaf whose value differs between the two configs (trainable parts, iterations, lr steps,
    warm-up, ...). Values as Python literals, which train_net.py's opts parse back."""
    stage = _load_config(*config_for(method, arch, config_dir))
    first = _load_config(*config_for(DECOUPLED_FROM[method], arch, config_dir))
    opts = []
    for key in SECOND_STAGE_KEYS:
        node = functools.reduce(lambda n, part: n[part], key.split("."), stage)
        for leaf, value in _flat(node, key):
            if value != functools.reduce(lambda n, part: n[part], leaf.split("."), first):
                opts += [leaf, repr(value)]
    return opts


def train_command(loss, arch, seed, out, datasets=(), train=(), test=(), opts=(), num_gpus=1,
                  config_dir=CONFIG_DIR):
    """The train_net.py command line of one run (list of str). A decoupled loss starts from
    the DECOUPLED_FROM run of the same arch and seed, beside `out`; so does the control of one
    (`loss` = control_label(method)): the DECOUPLED_FROM loss's config with the method's
    second stage (second_stage_opts). Configs come from `config_dir` (configs/Demo: the main
    job's)."""
    method = controlled_method(loss)
    first = DECOUPLED_FROM.get(method or loss)
    config, extra = config_for(first if method else loss, arch, config_dir)
    if method:
        extra = extra + second_stage_opts(method, arch, config_dir)
    if first:
        base = os.path.join(os.path.dirname(os.path.dirname(out)),
                            f"{arch}_{first}", f"seed{seed}", "model_final.pth")
        extra = extra + ["MODEL.WEIGHTS", base]
    cmd = [sys.executable, "train_net.py", "--config-file", config, "--num-gpus", str(num_gpus)]
    for spec in datasets:
        cmd += ["--dataset", spec]
    cmd += extra
    if train:
        cmd += ["DATASETS.TRAIN", repr(tuple(train))]
    if test:
        cmd += ["DATASETS.TEST", repr(tuple(test))]
    return cmd + list(opts) + ["SEED", str(seed), "OUTPUT_DIR", out]


def _read_metrics(folder):
    path = os.path.join(folder, "metrics.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def is_finished(folder, cmd=None):
    """Whether `folder` holds an evaluated run (of `cmd`, when given: the harness stores it)."""
    if not any("bbox/AP" in row for row in _read_metrics(folder)):
        return False
    if cmd is None:
        return True
    stored = os.path.join(folder, "harness_command.json")
    return os.path.isfile(stored) and json.load(open(stored)) == cmd[1:]


def plan_runs(losses, archs, seeds, output_dir, controls=True, **kwargs):
    """The runs of :func:`train_all`, in order: dicts with "label" (the loss, or a control's
    control_label), "arch", "seed", "out" (run folder), "cmd" (train_command) and "wave" (0;
    1 for those that start from another run: decoupled methods and, with `controls`, each
    decoupled method's control, planned right after it). kwargs: as :func:`train_command`."""
    for loss in losses:  # before any training: a decoupled loss needs its base run first
        base = DECOUPLED_FROM.get(loss)
        if base and base not in losses[: list(losses).index(loss)] and not all(
                is_finished(run_dir(output_dir, base, a, s)) for a in archs for s in seeds):
            raise SeesawEcmError(f"{loss!r} is trained from the {base!r} run of the same "
                                 f"architecture and seed: list {base!r} before it in --losses.")
    labels = [label for loss in losses for label in [loss] + (
        [control_label(loss)] if controls and loss in DECOUPLED_FROM else [])]
    plan = []
    for arch in archs:  # seed by seed: with jobs = len(losses) each wave is one seed's set
        for seed in seeds:
            for label in labels:
                out = run_dir(output_dir, label, arch, seed)
                wave = int(label in DECOUPLED_FROM or controlled_method(label) is not None)
                plan.append({"label": label, "arch": arch, "seed": seed, "out": out, "wave": wave,
                             "cmd": train_command(label, arch, seed, out, **kwargs)})
    return plan


def train_all(losses, archs, seeds, output_dir, force=False, jobs=1, controls=True, **kwargs):
    """Run train_net.py for every run of :func:`plan_runs` (each (arch, loss, seed), and the
    controls of decoupled methods unless `controls` is False); skip finished runs unless
    `force`. `jobs` runs train side by side, each with OMP_NUM_THREADS = cores // jobs (at
    least 1; kept when already set); wave-1 runs start after every wave-0 run. On a 2-core
    machine 2-3 single-thread runs side by side do ~30% more iterations per second in all
    than one 2-thread run (docs/BENCHMARKS.md "The main job"). A failed run does not stop the
    others (only the runs that start from its weights are skipped); one error lists the failed
    and skipped runs after all the others finished. kwargs: as :func:`train_command`. Returns
    the run folders."""
    plan = plan_runs(losses, archs, seeds, output_dir, controls=controls, **kwargs)
    waves = ([], [])
    for run in plan:
        if not force and is_finished(run["out"], run["cmd"]):
            print(f"[skip] {run['out']}: finished", flush=True)
            continue
        waves[run["wave"]].append(run)
    env = dict(os.environ)
    if jobs > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    failed, errors = [], []
    for wave in waves:
        with ThreadPoolExecutor(max(1, jobs)) as pool:
            wave_errors = list(pool.map(lambda run: _train_one(run, env, failed), wave))
        failed += [run["out"] for run, e in zip(wave, wave_errors) if e]
        errors += [e for e in wave_errors if e]
    if errors:
        raise SeesawEcmError(
            f"{len(errors)} of {sum(map(len, waves))} runs did not train; the others finished "
            "(run the same command again to retry these: finished runs are skipped).\n\n"
            + "\n\n".join(errors))
    return [run["out"] for run in plan]


def _train_one(run, env, failed):
    """Train `run`; None, or the error message (the log's tail) when it failed or starts from
    the weights of a run in `failed`."""
    out, cmd = run["out"], run["cmd"]
    label = f"{run['arch']} {run['label']} seed {run['seed']}"
    base = next((f for f in failed if os.path.join(f, "model_final.pth") in cmd), None)
    if base:
        return f"{label}: not trained, it starts from the weights of {base}, which failed."
    os.makedirs(out, exist_ok=True)
    if controlled_method(run["label"]):  # read_run takes the label from here, not the config
        write_atomic(os.path.join(out, LABEL_FILE), json.dumps({"loss": run["label"]}))
    print(f"[train] {label} -> {out}", flush=True)
    log_path = os.path.join(out, "harness_stdout.txt")
    with open(log_path, "w") as log:
        returncode = _run_logged(cmd, log, f"  {label}:", env)
    if returncode != 0:
        with open(log_path) as log:
            tail = log.read()[-3000:]
        print(f"[failed] {label} (exit {returncode}): {log_path}", flush=True)
        return f"Training {label} failed (exit {returncode}):\n{tail}"
    write_atomic(os.path.join(out, "harness_command.json"), json.dumps(cmd[1:]))
    return None


# lines of a run's log echoed to the console as it trains: detectron2's progress with ETA
# ("eta:" every 20 iterations, "Inference done" every 5 s of evaluation), at most one line per
# run and kind every PROGRESS_EVERY seconds, and errors
PROGRESS_MARKS = (" eta: ", "Inference done", "ERROR")
PROGRESS_EVERY = 30.0


def _run_logged(cmd, log, prefix, env=None):
    """Run `cmd`, its output into `log`; echo the PROGRESS_MARKS lines, shortened, after
    `prefix`. Returns the exit status."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    last = {}
    for line in proc.stdout:
        log.write(line)
        mark = next((m for m in PROGRESS_MARKS if m in line), None)
        now = time.monotonic()
        if mark is None or (mark != "ERROR" and now - last.get(mark, -1e9) < PROGRESS_EVERY):
            continue
        last[mark] = now
        text = line.split("]: ", 1)[-1].strip()
        if mark == " eta: ":  # eta and iteration only
            text = " ".join(text.split()[:4])
        elif mark == "Inference done":
            text = text.split(". Dataloading")[0] + " (evaluation)"
        print(prefix, text, flush=True)
    return proc.wait()


def _dataset_json(name, specs):
    """Annotation file of a dataset name: from the run's DATASETS.LVIS_FORMAT specs, else from
    detectron2's registry (built-in synthetic set, builtin LVIS)."""
    from detectron2.data import MetadataCatalog

    # importing it registers the built-in sets
    from seesaw_ecm.data.datasets import parse_dataset_spec

    for spec in specs:
        spec_name, json_file, _ = parse_dataset_spec(spec)
        if spec_name == name:
            return json_file
    json_file = MetadataCatalog.get(name).get("json_file")
    if not json_file or not os.path.isfile(json_file):
        raise SeesawEcmError(
            f"Cannot find the annotation file of dataset {name!r} ({json_file}). Run from the "
            "checkout that trained it or set $DETECTRON2_DATASETS to its datasets folder.")
    return json_file


def per_class_ap(gt, results, iou_type, max_dets=300, bootstrap=0):
    """Per-category AP (in %, nan for a category without ground truth), the overall AP and,
    with `bootstrap` > 0, the metrics on that many resampled test sets.

    Args:
        gt: the test set as `lvis_fast.LvisGroundTruth`.
        results: detections as LVISEvaluator writes them (dicts with image_id, category_id,
            score, bbox and segmentation); for "segm" the boxes are dropped first, as
            detectron2 does, so areas are mask areas.
        iou_type: "bbox" or "segm".
        bootstrap: number of test sets drawn from gt's images with replacement
            (`lvis_bootstrap.draws(num_images, bootstrap)`, the same for every run).
    Returns:
        ({category id: AP}, overall AP, {metric of METRICS: [bootstrap values in %]} or None),
        computed by the project's exact LVIS backend (`seesaw_ecm.evaluation.lvis_fast`, equal
        to `lvis.LVISEval`).
    """
    if not results:
        return {c: float("nan") for c in gt.cat_ids.tolist()}, float("nan"), None
    if iou_type == "segm":
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    result = lvis_fast.evaluate(gt, results, iou_type, max_dets)
    ap = {c: float(a * 100) for c, a in zip(result.cat_ids.tolist(), result.per_category_ap)}
    draws = None
    if bootstrap > 0:
        values = lvis_bootstrap.bootstrap(gt, result.records, bootstrap, max_dets=max_dets)
        draws = {m: [float(v * 100) if v >= 0 else None for v in values[m]] for m in METRICS}
    return ap, float(result.metrics["AP"] * 100), draws


_GT_CACHE = {}


def _load_gt(path):
    """({category id: name}, lvis_fast.LvisGroundTruth) of an annotation file, cached."""
    if path not in _GT_CACHE:
        with open(path) as f:
            data = json.load(f)
        names = {c["id"]: c["name"] for c in data["categories"]}
        _GT_CACHE[path] = names, lvis_fast.LvisGroundTruth(data)
    return _GT_CACHE[path]


def report_path(folder):
    """`folder` as a report records it: relative to the working directory when inside it (so a
    committed report names no machine's folders), else absolute."""
    rel = os.path.relpath(os.path.abspath(folder))
    return os.path.abspath(folder) if rel.startswith(os.pardir) else rel


def read_run(folder, per_class=True, bootstrap=0):
    """Everything the benchmark needs from one finished run folder, as a JSON-able dict:
    loss (from the config; a control's label from its LABEL_FILE), arch, seed, final metrics
    {"bbox/AP": ...} (None for "n/a"), sec_per_iter (median of the last training's
    metrics.json "time" rows), and with `per_class`,
    per-class AP {"bbox"|"segm": {category id: AP}} and training counts {category id: n};
    with `bootstrap` > 0 (needs `per_class`) also "bootstrap": {"bbox/APr": [the metric on
    each of `bootstrap` resampled test sets], ...} (`per_class_ap`)."""
    config = os.path.join(folder, "config.yaml")
    if not os.path.isfile(config):
        raise SeesawEcmError(f"{folder}: no config.yaml; not a train_net.py output folder.")
    with open(config) as f:
        cfg = yaml.safe_load(f)
    heads = cfg["MODEL"]["ROI_HEADS"]["NAME"]
    long_tail = cfg["MODEL"].get("LONG_TAIL", {})
    # the stock heads (StandardROIHeads, CascadeROIHeads) ignore MODEL.LONG_TAIL; the project's
    # (LongTail*, HTCLiteROIHeads, LOCEROIHeads) read it
    long_tail_heads = heads not in ("StandardROIHeads", "CascadeROIHeads")
    loss = long_tail.get("LOSS", "ce") if long_tail_heads else "ce"
    if long_tail.get("OBJECTNESS") and loss != "seesaw" and long_tail_heads:
        loss += "+objectness"
    label_file = os.path.join(folder, LABEL_FILE)
    if os.path.isfile(label_file):  # a control run: its config alone says "ce"
        with open(label_file) as f:
            loss = json.load(f)["loss"]
    rows = _read_metrics(folder)
    evals = [r for r in rows if "bbox/AP" in r]
    if not evals:
        raise SeesawEcmError(f"{folder}: metrics.json has no evaluation ('bbox/AP'); the run is "
                             "not finished (or trained with DATASETS.TEST empty).")
    last_eval = evals[-1]
    timed = [r for r in rows if "time" in r and "iteration" in r]
    # a restarted (not resumed) training appends to metrics.json: keep the last one's rows
    start = max([0] + [i for i in range(1, len(timed))
                       if timed[i]["iteration"] <= timed[i - 1]["iteration"]])
    times = [r["time"] for r in timed[start:]]
    run = {
        "path": report_path(folder),
        "loss": loss,
        "arch": ("htc_lite" if "HTCLite" in heads else "cascade" if "Cascade" in heads
                 else "mask_rcnn"),
        "seed": cfg.get("SEED"),
        "iterations": cfg["SOLVER"]["MAX_ITER"],
        "metrics": {f"{t}/{m}": (last_eval.get(f"{t}/{m}") if last_eval.get(f"{t}/{m}", -1) >= 0
                                 else None) for t in TASKS for m in METRICS},
        "sec_per_iter": statistics.median(times) if times else None,
    }
    if not per_class:
        return run
    specs = cfg["DATASETS"].get("LVIS_FORMAT", [])
    test = cfg["DATASETS"]["TEST"][0]
    results_file = os.path.join(folder, "inference", test, "lvis_instances_results.json")
    if not os.path.isfile(results_file):
        logger.warning(f"{folder}: no {results_file}; no per-class AP for this run.")
        return run
    with open(results_file) as f:
        results = json.load(f)
    class_names, gt = _load_gt(_dataset_json(test, specs))
    max_dets = cfg["TEST"]["DETECTIONS_PER_IMAGE"]
    run["per_class_ap"], run["ap_check"] = {}, {}
    for task in TASKS:
        if task == "segm" and results and "segmentation" not in results[0]:
            continue
        ap, overall, draws = per_class_ap(gt, results, task, max_dets, bootstrap)
        run["per_class_ap"][task] = {str(k): (None if np.isnan(v) else v) for k, v in ap.items()}
        run["ap_check"][task] = overall
        if draws:
            run.setdefault("bootstrap", {}).update({f"{task}/{m}": v for m, v in draws.items()})
    run["class_names"] = {str(k): v for k, v in class_names.items()}
    run["train_counts"] = {str(k): v for k, v in _train_counts(folder, cfg, gt).items()}
    return run


def _train_counts(folder, cfg, gt):
    train = list(cfg["DATASETS"]["TRAIN"])
    stats_file = os.path.join(folder, "class_statistics.json")
    if os.path.isfile(stats_file):
        stats = json.load(open(stats_file))
        if stats.get("statistic") == "instance_count" and stats.get("datasets") == train:
            cat_ids = gt.cat_ids.tolist()  # sorted: contiguous class i = i-th category id
            if len(cat_ids) == len(stats["counts"]):
                return dict(zip(cat_ids, stats["counts"]))
    specs = cfg["DATASETS"].get("LVIS_FORMAT", [])
    from seesaw_ecm.data.statistics import json_class_counts

    counts = {}
    for name in train:
        for cat, n in json_class_counts(_dataset_json(name, specs)).items():
            counts[cat] = counts.get(cat, 0) + n
    return counts


def _mean_std(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))]
    if not values:
        return None, None
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def aggregate(runs):
    """Group runs by (arch, loss): mean and sample standard deviation (ddof 1) over seeds of
    every metric and of seconds per iteration; mean per-class AP. Two runs of one group with
    the same seed are an error (they would count as two seeds)."""
    labels = [x for loss in LOSSES
              for x in [loss] + ([control_label(loss)] if loss in DECOUPLED_FROM else [])]
    order = {k: i for i, k in enumerate((a, label) for a in ARCHS for label in labels)}
    groups = {}
    for run in runs:
        groups.setdefault((run["arch"], run["loss"]), []).append(run)
    out = []
    for (arch, loss), members in sorted(groups.items(), key=lambda kv: order.get(kv[0], 99)):
        seeds = [r["seed"] for r in members]
        if len(set(seeds)) != len(seeds):
            raise SeesawEcmError(
                f"{arch} {loss}: several runs with the same seed ({seeds}): "
                + ", ".join(r["path"] for r in members))
        group = {"arch": arch, "loss": loss, "seeds": seeds, "runs": [r["path"] for r in members],
                 "mean": {}, "std": {}}
        for key in [f"{t}/{m}" for t in TASKS for m in METRICS] + ["sec_per_iter"]:
            vals = [r["metrics"][key] if key != "sec_per_iter" else r[key] for r in members]
            group["mean"][key], group["std"][key] = _mean_std(vals)
        per_class = [r for r in members if r.get("per_class_ap")]
        if per_class:
            group["train_counts"] = per_class[0]["train_counts"]
            group["per_class_ap"] = {}
            for task in per_class[0]["per_class_ap"]:
                cats = per_class[0]["per_class_ap"][task]
                group["per_class_ap"][task] = {
                    c: _mean_std([r["per_class_ap"][task].get(c) for r in per_class])[0]
                    for c in cats}
        out.append(group)
    return out


def _cell(mean, std, digits=2):
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def format_table(groups, baseline=None):
    """Markdown table: one row per (arch, loss); box and mask AP, AP50, APr, APc, APf and
    seconds per iteration, as mean ± std over seeds (std only with several seeds). With
    `baseline` (a loss, e.g. "ce"), each metric of another loss also shows its change against
    that loss's mean on the same arch, e.g. "2.64 (+2.63)"."""
    head = (["arch", "loss", "seeds"] + [f"box {m}" for m in METRICS]
            + [f"mask {m}" for m in METRICS] + ["s/iter"])
    rows = []
    base = {g["arch"]: g["mean"] for g in groups if g["loss"] == baseline}
    for g in groups:
        cells = [g["arch"], g["loss"], str(len(g["seeds"]))]
        for key in [f"{t}/{m}" for t in TASKS for m in METRICS]:
            cell = _cell(g["mean"][key], g["std"][key])
            ref = base.get(g["arch"], {}).get(key) if g["loss"] != baseline else None
            if ref is not None and g["mean"][key] is not None:
                cell += f" ({g['mean'][key] - ref:+.2f})"
            cells.append(cell)
        cells.append(_cell(g["mean"]["sec_per_iter"], g["std"]["sec_per_iter"], 3))
        rows.append(cells)
    return markdown(rows, head)


def markdown(rows, head):
    """A Markdown (GitHub) table of string cells, printed as given."""
    return tabulate(rows, headers=head, tablefmt="github", disable_numparse=True)


def _draw_std(run, base, key):
    """Sample std over the bootstrap draws of run - base (the same draws), None if either run
    has no draws of `key` or fewer than two draws define it."""
    a, b = run.get("bootstrap", {}).get(key), base.get("bootstrap", {}).get(key)
    if a is None or b is None:
        return None
    if len(a) != len(b):
        raise SeesawEcmError(
            f"{run['path']} and {base['path']} were evaluated on {len(a)} and {len(b)} resampled "
            "test sets; read both with the same --bootstrap.")
    diff = np.array(a, np.float64) - np.array(b, np.float64)  # None -> nan
    diff = diff[~np.isnan(diff)]
    return float(np.std(diff, ddof=1)) if len(diff) > 1 else None


def gaps(runs, baseline="ce"):
    """Paired changes against `baseline`: for every (arch, loss) other than it, the per-seed
    difference (loss run - baseline run of the same arch and seed) of every metric, and over
    the seeds they share its mean, sample std (ddof 1) and mean / std ("sigmas": how many
    seed standard deviations the change is). Where the runs were read with a bootstrap
    (`read_run`), also "eval_std": the part of that spread the test set's size alone gives,
    the root mean square over the seeds of the change's std over the resampled test sets.
    Returns a list of dicts, in aggregate's order."""
    base = {(r["arch"], r["seed"]): r for r in runs if r["loss"] == baseline}
    out = []
    for g in aggregate([r for r in runs if r["loss"] != baseline]):
        members = [r for r in runs if (r["arch"], r["loss"]) == (g["arch"], g["loss"])]
        paired = [(r, base[(r["arch"], r["seed"])]) for r in members
                  if (r["arch"], r["seed"]) in base]
        if not paired:
            continue
        row = {"arch": g["arch"], "loss": g["loss"], "baseline": baseline,
               "seeds": [r["seed"] for r, _ in paired], "mean": {}, "std": {}, "sigmas": {}}
        for key in [f"{t}/{m}" for t in TASKS for m in METRICS]:
            diffs = [r["metrics"][key] - b["metrics"][key] for r, b in paired
                     if r["metrics"][key] is not None and b["metrics"][key] is not None]
            mean, std = _mean_std(diffs)
            row["mean"][key], row["std"][key] = mean, std
            row["sigmas"][key] = (abs(mean) / std if mean is not None and std else None)
            draw_stds = [v for v in (_draw_std(r, b, key) for r, b in paired) if v is not None]
            if draw_stds:
                row.setdefault("eval_std", {})[key] = float(np.sqrt(np.mean(np.square(draw_stds))))
        out.append(row)
    return out


def format_gap_table(rows):
    """Markdown table of `gaps`: per (arch, loss), the change against the baseline of box and
    mask AP, APr, APc, APf (mean ± std over paired seeds), and for APr how many standard
    deviations the change is and, if the runs were bootstrapped, its evaluation noise
    (`gaps` "eval_std")."""
    metrics = ("AP", "APr", "APc", "APf")
    head = ["arch", "loss", "vs", "seeds"] + [f"Δ {'box' if t == 'bbox' else 'mask'} {m}"
                                              for t in TASKS for m in metrics]
    head += ["box APr Δ / std", "mask APr Δ / std"]
    noise = any("eval_std" in row for row in rows)
    if noise:
        head += ["box APr Δ eval std", "mask APr Δ eval std"]
    table = []
    for row in rows:
        cells = [row["arch"], row["loss"], row["baseline"], str(len(row["seeds"]))]
        for key in [f"{t}/{m}" for t in TASKS for m in metrics]:
            mean, std = row["mean"][key], row["std"][key]
            cells.append("n/a" if mean is None else f"{mean:+.2f}"
                         + (f" ± {std:.2f}" if std is not None else ""))
        for task in TASKS:
            sig = row["sigmas"][f"{task}/APr"]
            cells.append("n/a" if sig is None else f"{sig:.1f}")
        if noise:
            for task in TASKS:
                std = row.get("eval_std", {}).get(f"{task}/APr")
                cells.append("n/a" if std is None else f"{std:.2f}")
        table.append(cells)
    return markdown(table, head)


def control_gaps(runs):
    """For every decoupled method with control runs (control_label): its paired changes
    (`gaps`) against its first-stage loss (DECOUPLED_FROM, e.g. plain CE) and against its
    control (that loss given the same second stage), per arch. The second tells what the
    method adds beyond extra training of the same parts. Returns a list of dicts with "arch",
    "loss", "control", "vs_first_stage" and "vs_control" (each a `gaps` row)."""
    out = []
    for method, first in DECOUPLED_FROM.items():
        control = control_label(method)
        vs_control = gaps([r for r in runs if r["loss"] in (method, control)], control)
        vs_first = {row["arch"]: row for row in gaps(
            [r for r in runs if r["loss"] in (method, first)], first)}
        for row in vs_control:
            out.append({"arch": row["arch"], "loss": method, "control": control,
                        "vs_first_stage": vs_first.get(row["arch"]), "vs_control": row})
    return out


def format_control_table(rows):
    """Markdown table of `control_gaps`: per (arch, method), the mean change of box and mask AP,
    APr, APc, APf against the first-stage loss and against the control, side by side
    ("+27.10 / +24.80"), with the seeds paired in each."""
    metrics = ("AP", "APr", "APc", "APf")
    keys = [f"{t}/{m}" for t in TASKS for m in metrics]
    first = rows[0]["vs_first_stage"]["baseline"] if rows and rows[0]["vs_first_stage"] else "?"
    head = ["arch", "loss", "control", f"seeds vs {first} / control"] + [
        f"Δ {'box' if k.startswith('bbox') else 'mask'} {k.split('/')[1]} vs {first} / control"
        for k in keys]
    table = []
    for row in rows:
        plain, ctrl = row["vs_first_stage"] or {"mean": {}, "seeds": []}, row["vs_control"]
        cells = [row["arch"], row["loss"], row["control"],
                 f"{len(plain['seeds'])} / {len(ctrl['seeds'])}"]
        for key in keys:
            cells.append(" / ".join("n/a" if v is None else f"{v:+.2f}"
                                    for v in (plain["mean"].get(key), ctrl["mean"][key])))
        table.append(cells)
    return markdown(table, head)


def plot_per_class(groups, out_png):
    """Per-class AP (mean over seeds) against training instance count (log x), one panel per
    task, one series per (arch, loss): points per class and a line through the mean AP of
    log-spaced count bins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in groups if g.get("per_class_ap")]
    if not groups:
        raise SeesawEcmError("No run has per-class AP (inference/*/lvis_instances_results.json).")
    tasks = [t for t in TASKS if any(t in g["per_class_ap"] for g in groups)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.8), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, task in zip(axes[0], tasks):
        for i, g in enumerate(groups):
            ap = g["per_class_ap"].get(task, {})
            cats = [c for c in ap if ap[c] is not None and g["train_counts"].get(c, 0) > 0]
            x = np.array([g["train_counts"][c] for c in cats], dtype=float)
            y = np.array([ap[c] for c in cats], dtype=float)
            style = "-" if g["arch"] == "mask_rcnn" else "--"
            color = colors[i % len(colors)]
            ax.scatter(x, y, s=10, alpha=0.45, color=color,
                       marker="o" if g["arch"] == "mask_rcnn" else "^")
            edges = np.logspace(0, np.log10(max(x.max(), 2)) + 1e-9, 8) if x.size else []
            which = np.digitize(x, edges)
            centers = [np.exp(np.log(x[which == b]).mean()) for b in np.unique(which)]
            means = [y[which == b].mean() for b in np.unique(which)]
            ax.plot(centers, means, style, color=color, lw=1.8,
                    label=f"{g['arch']} {g['loss']} (n={len(g['seeds'])})")
        ax.set_xscale("log")
        ax.set_xlabel("training instances of the class (log)")
        ax.set_ylabel(f"{'box' if task == 'bbox' else 'mask'} AP of the class")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    write_figure(fig, out_png)
    return out_png


def pool_reports(paths):
    """The runs of several earlier reports (each a long_tail_benchmark.json) as one set of runs.

    For the same configs and seeds trained on other machines: a run repeats exactly on one CPU
    but not on another (floating-point order), so each (report, seed) counts as a seed of its
    own, labelled "<k>:<seed>" (k: the report's position, from 1), and a run pairs with the
    baseline run of its own report and seed. Returns the runs as read_run gives them.
    """
    runs = []
    for k, path in enumerate(paths, 1):
        try:
            with open(path) as f:
                report_runs = json.load(f)["runs"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SeesawEcmError(
                f"--pool {path}: not a long_tail_benchmark.json with its runs ({e!r}); give the "
                "files that benchmarks.long_tail wrote into its --output-dir.") from None
        runs += [dict(run, seed=f"{k}:{run['seed']}") for run in report_runs]
    return runs


def write_report(runs, output_dir, command=None, baseline=None):
    """Aggregate `runs`, write OUTPUT/long_tail_benchmark.json and .png (atomically); return
    (groups, markdown table). With `baseline` (a loss) the table shows each metric's change
    against it and, below it, the paired per-seed changes (`gaps`)."""
    groups = aggregate(runs)
    table = format_table(groups, baseline)
    changes = gaps(runs, baseline) if baseline else []
    if changes:
        table += "\n\nChange against " + baseline + ", paired by seed:\n\n" + format_gap_table(
            changes)
    controlled = control_gaps(runs)
    if controlled:
        table += ("\n\nDecoupled methods: change against the first stage and against it given "
                  "the same second stage (control), paired by seed:\n\n"
                  + format_control_table(controlled) + "\n\nChange against the control:\n\n"
                  + format_gap_table([row["vs_control"] for row in controlled]))
    os.makedirs(output_dir, exist_ok=True)
    write_atomic(os.path.join(output_dir, "long_tail_benchmark.json"), json.dumps(
        {"command": command, "groups": groups, "gaps": changes, "control_gaps": controlled,
         "runs": runs, "table": table}, indent=1))
    if any(g.get("per_class_ap") for g in groups):
        plot_per_class(groups, os.path.join(output_dir, "long_tail_per_class_ap.png"))
    return groups, table
