"""The long-tail benchmark harness: config mapping, collecting hand-made run folders (metrics,
seconds per iteration, per-class AP against hand-computed values), aggregation over seeds,
and one short end-to-end run."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml
from detectron2.config import get_cfg
from pycocotools import mask as mask_utils

from seesaw_ecm import add_seesaw_ecm_config
from seesaw_ecm.errors import SeesawEcmError

from benchmarks import harness


def load(path, opts=()):
    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    cfg.merge_from_file(path)
    cfg.merge_from_list(list(opts))
    return cfg


def cells(line):
    """The cells of a Markdown table row, stripped."""
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def table_row(text, loss):
    """The cells of the first table row of `loss` (its second column) in `text`."""
    return next(cells(line) for line in text.splitlines()
                if line.startswith("|") and cells(line)[1:2] == [loss])


def test_config_mapping_reproduces_the_shipped_cascades():
    assert harness.config_for("ce", "mask_rcnn") == (
        "configs/Synthetic/mask_rcnn_R18_FPN_ce.yaml", [])
    assert harness.config_for("seesaw", "cascade") == (
        "configs/Synthetic/cascade_mask_rcnn_R18_FPN_seesaw.yaml", [])
    path, opts = harness.config_for("federated", "cascade")
    cfg = load(path, opts)
    assert cfg.MODEL.ROI_HEADS.NAME == "LongTailCascadeROIHeads"
    assert cfg.MODEL.LONG_TAIL.LOSS == "federated" and not cfg.MODEL.LONG_TAIL.OBJECTNESS
    # the rule "Mask R-CNN config + CASCADE_OPTS" gives exactly the shipped cascade configs
    for loss in ("seesaw", "ecm"):
        derived = load(f"configs/Synthetic/mask_rcnn_R18_FPN_{loss}.yaml", harness.CASCADE_OPTS)
        shipped = load(f"configs/Synthetic/cascade_mask_rcnn_R18_FPN_{loss}.yaml")
        derived.OUTPUT_DIR = shipped.OUTPUT_DIR
        assert derived.dump() == shipped.dump()
    # and "cascade + HTC_LITE_OPTS" the shipped HTC-Lite config
    assert harness.config_for("seesaw", "htc_lite") == (
        "configs/Synthetic/htc_lite_R18_FPN_seesaw.yaml", [])
    derived = load("configs/Synthetic/cascade_mask_rcnn_R18_FPN_seesaw.yaml",
                   harness.HTC_LITE_OPTS)
    shipped = load("configs/Synthetic/htc_lite_R18_FPN_seesaw.yaml")
    derived.OUTPUT_DIR = shipped.OUTPUT_DIR
    assert derived.dump() == shipped.dump()
    path, opts = harness.config_for("ecm", "htc_lite")
    cfg = load(path, opts)
    assert cfg.MODEL.ROI_HEADS.NAME == "HTCLiteROIHeads" and cfg.MODEL.LONG_TAIL.LOSS == "ecm"
    with pytest.raises(SeesawEcmError):
        harness.config_for("focal", "mask_rcnn")
    cmd = harness.train_command("ecm", "mask_rcnn", 3, "out/x", datasets=["a=j:r"],
                                train=["a"], test=["b"], opts=["SOLVER.MAX_ITER", "6"])
    assert cmd[-10:] == ["DATASETS.TRAIN", "('a',)", "DATASETS.TEST", "('b',)",
                         "SOLVER.MAX_ITER", "6", "SEED", "3", "OUTPUT_DIR", "out/x"]
    assert cmd[cmd.index("--dataset") + 1] == "a=j:r"


SQUARE = lambda x, y, s: [[x, y, x + s, y, x + s, y + s, x, y + s]]  # noqa: E731


@pytest.fixture(scope="module")
def tiny_lvis(tmp_path_factory):
    """Val: one 64x64 image with GT of categories 1, 2, 3 (category 4 has no val GT).
    Train: instances per category 1..4 = 10, 5, 2, 1."""
    root = tmp_path_factory.mktemp("tiny_lvis")
    cats = [{"id": i, "name": f"c{i}", "frequency": f, "image_count": 1}
            for i, f in zip((1, 2, 3, 4), "fcrr")]
    gt_boxes = {1: (4, 4, 16), 2: (30, 30, 20), 3: (4, 40, 12)}
    val = {
        "images": [{"id": 1, "height": 64, "width": 64, "file_name": "a.jpg",
                    "neg_category_ids": [], "not_exhaustive_category_ids": []}],
        "annotations": [{"id": c, "image_id": 1, "category_id": c, "bbox": [x, y, s, s],
                         "area": s * s, "segmentation": SQUARE(x, y, s), "iscrowd": 0}
                        for c, (x, y, s) in gt_boxes.items()],
        "categories": cats,
    }
    train_anns = [c for c, n in zip((1, 2, 3, 4), (10, 5, 2, 1)) for _ in range(n)]
    train = {
        "images": [{"id": 1, "height": 64, "width": 64, "file_name": "a.jpg"}],
        "annotations": [{"id": i + 1, "image_id": 1, "category_id": c, "bbox": [1, 1, 8, 8],
                         "area": 64, "segmentation": SQUARE(1, 1, 8)}
                        for i, c in enumerate(train_anns)],
        "categories": cats,
    }
    (root / "val.json").write_text(json.dumps(val))
    (root / "train.json").write_text(json.dumps(train))

    def det(c, x, y, s, score):
        rle = mask_utils.merge(mask_utils.frPyObjects(SQUARE(x, y, s), 64, 64))
        rle["counts"] = rle["counts"].decode()
        return {"image_id": 1, "category_id": c, "bbox": [x, y, s, s], "score": score,
                "segmentation": rle}

    # category 1: one exact hit -> AP 100; category 2: a false positive scored above the exact
    # hit -> precision 1/2 at every recall point -> AP 50; category 3: no detection -> AP 0;
    # category 4: no val GT -> no AP. Mean over the three categories with GT: 50.
    results = [det(1, 4, 4, 16, 0.9), det(2, 2, 48, 10, 0.8), det(2, 30, 30, 20, 0.7)]
    return {"root": root, "results": results}


def fake_run(tiny, folder, loss, seed, bbox_ap, times, heads="LongTailROIHeads", stats=None):
    folder.mkdir(parents=True)
    root = tiny["root"]
    cfg = {
        "MODEL": {"ROI_HEADS": {"NAME": heads}, "LONG_TAIL": {"LOSS": loss,
                                                              "OBJECTNESS": loss == "seesaw"}},
        "DATASETS": {"TRAIN": ["tiny_tr"], "TEST": ["tiny_val"], "LVIS_FORMAT": [
            f"tiny_tr={root}/train.json:{root}", f"tiny_val={root}/val.json:{root}"]},
        "TEST": {"DETECTIONS_PER_IMAGE": 100}, "SOLVER": {"MAX_ITER": 40}, "SEED": seed,
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = [{"iteration": 19 + 20 * i, "time": t, "total_loss": 1.0} for i, t in enumerate(times)]
    metrics = {f"{t}/{m}": bbox_ap + (1 if t == "segm" else 0) + j
               for t in ("bbox", "segm") for j, m in enumerate(harness.METRICS)}
    metrics["bbox/APr"] = -100.0  # LVISEval's "no category in this group"
    with open(folder / "metrics.json", "w") as f:
        for row in rows + [dict(metrics, iteration=20 * len(times))]:
            f.write(json.dumps(row) + "\n")
    inference = folder / "inference" / "tiny_val"
    inference.mkdir(parents=True)
    (inference / "lvis_instances_results.json").write_text(json.dumps(tiny["results"]))
    if stats is not None:
        (folder / "class_statistics.json").write_text(json.dumps(
            {"datasets": ["tiny_tr"], "statistic": "instance_count", "counts": stats}))
    return str(folder)


def test_read_run_metrics_time_and_per_class_ap(tiny_lvis, tmp_path):
    folder = fake_run(tiny_lvis, tmp_path / "a", "seesaw", 1, 10.0, [9.0, 1.0, 2.0, 3.0])
    # a restarted training: metrics.json holds an earlier, aborted run first
    lines = open(os.path.join(folder, "metrics.json")).read()
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        f.write(json.dumps({"iteration": 19, "time": 100.0}) + "\n"
                + json.dumps({"iteration": 39, "time": 100.0}) + "\n" + lines)
    run = harness.read_run(folder)
    assert (run["loss"], run["arch"], run["seed"]) == ("seesaw", "mask_rcnn", 1)
    assert run["sec_per_iter"] == 2.5  # median of 9, 1, 2, 3 (the aborted run's rows skipped)
    assert run["metrics"]["bbox/AP"] == 10.0 and run["metrics"]["segm/APf"] == 15.0
    assert run["metrics"]["bbox/APr"] is None
    for task in ("bbox", "segm"):
        ap = run["per_class_ap"][task]
        assert ap["1"] == pytest.approx(100) and ap["2"] == pytest.approx(50)
        assert ap["3"] == 0 and ap["4"] is None
        assert run["ap_check"][task] == pytest.approx(50)  # the evaluator's own overall AP
    assert run["train_counts"] == {"1": 10, "2": 5, "3": 2, "4": 1}  # counted in train.json
    stats = fake_run(tiny_lvis, tmp_path / "b", "ecm", 1, 10.0, [1.0], stats=[7, 6, 5, 4])
    assert harness.read_run(stats)["train_counts"] == {"1": 7, "2": 6, "3": 5, "4": 4}
    cascade = fake_run(tiny_lvis, tmp_path / "c", "ecm", 1, 1.0, [1.0],
                       heads="LongTailCascadeROIHeads")
    stock = fake_run(tiny_lvis, tmp_path / "d", "seesaw", 1, 1.0, [1.0], heads="StandardROIHeads")
    assert harness.read_run(cascade, per_class=False)["arch"] == "cascade"
    assert harness.read_run(stock, per_class=False)["loss"] == "ce"
    loce = fake_run(tiny_lvis, tmp_path / "e", "loce", 1, 1.0, [1.0], heads="LOCEROIHeads")
    assert harness.read_run(loce, per_class=False)["loss"] == "loce"  # not taken for stock CE


def test_collect_aggregates_mean_and_std_over_seeds(tiny_lvis, tmp_path):
    folders = [
        fake_run(tiny_lvis, tmp_path / "s1", "seesaw", 1, 10.0, [1.0, 1.0]),
        fake_run(tiny_lvis, tmp_path / "s2", "seesaw", 2, 14.0, [2.0, 2.0]),
        fake_run(tiny_lvis, tmp_path / "ce", "ce", 1, 8.0, [0.5], heads="StandardROIHeads"),
    ]
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.long_tail", "--collect", *folders,
                           "--output-dir", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ce, seesaw = table_row(proc.stdout, "ce"), table_row(proc.stdout, "seesaw")
    assert ce[1:5] == ["ce", "1", "8.00", "9.00"] and ce[5] == "n/a"
    # bbox/AP 10 and 14: mean 12, sample std sqrt(8) = 2.83; s/iter 1 and 2: 1.5 +- 0.707
    assert seesaw[3] == "12.00 ± 2.83" and seesaw[-1].startswith("1.500 ± 0.707")
    report = json.loads((out / "long_tail_benchmark.json").read_text())
    group = next(g for g in report["groups"] if g["loss"] == "seesaw")
    assert group["seeds"] == [1, 2] and group["mean"]["segm/AP"] == pytest.approx(13)
    assert group["std"]["segm/AP"] == pytest.approx(np.std([11, 15], ddof=1))
    assert group["per_class_ap"]["bbox"]["2"] == pytest.approx(50)
    assert len(report["runs"]) == 3
    png = (out / "long_tail_per_class_ap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    dup = fake_run(tiny_lvis, tmp_path / "s1b", "seesaw", 1, 10.0, [1.0])
    with pytest.raises(SeesawEcmError, match="same seed"):
        harness.aggregate([harness.read_run(f, per_class=False) for f in (folders[0], dup)])


def test_is_finished_checks_evaluation_and_command(tiny_lvis, tmp_path):
    folder = fake_run(tiny_lvis, tmp_path / "r", "ecm", 1, 1.0, [1.0])
    assert harness.is_finished(folder)
    assert not harness.is_finished(folder, ["python", "train_net.py", "X"])
    (tmp_path / "r" / "harness_command.json").write_text(json.dumps(["train_net.py", "X"]))
    assert harness.is_finished(folder, ["python", "train_net.py", "X"])
    assert not harness.is_finished(str(tmp_path / "none"))


def small_harness_cmd(data, out, name, losses, iterations, *args):
    """benchmarks.long_tail on the small synthetic set `data` (registered as <name>_train and
    <name>_val), seed 1, a short CPU schedule of `iterations`; `args` before --opts."""
    return [
        sys.executable, "-m", "benchmarks.long_tail", "--losses", *losses, "--seeds", "1",
        "--dataset", f"{name}_train={data['train_json']}:{data['image_root']}",
        "--dataset", f"{name}_val={data['val_json']}:{data['image_root']}",
        "--train", f"{name}_train", "--test", f"{name}_val", "--output-dir", str(out), *args,
        "--opts", "MODEL.ROI_HEADS.NUM_CLASSES", "12", "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", str(iterations), "SOLVER.WARMUP_ITERS", "2",
        "DATALOADER.NUM_WORKERS", "0", "TEST.DETECTIONS_PER_IMAGE", "50",
        "MODEL.RPN.POST_NMS_TOPK_TEST", "100", "MODEL.DEVICE", "cpu",
    ]


@pytest.mark.slow
def test_harness_trains_two_losses_and_skips_finished_runs(small_synthetic, tmp_path):
    cmd = small_harness_cmd(small_synthetic, tmp_path, "hs", ["ce", "seesaw"], 6)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("[train]") == 2 and table_row(proc.stdout, "seesaw")[:3] == [
        "mask_rcnn", "seesaw", "1"]
    report = json.loads((tmp_path / "long_tail_benchmark.json").read_text())
    assert [g["loss"] for g in report["groups"]] == ["ce", "seesaw"]
    run = report["runs"][1]
    assert run["seed"] == 1 and run["iterations"] == 6 and run["sec_per_iter"] > 0
    assert len(run["train_counts"]) == 12 and sum(run["train_counts"].values()) > 0
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("[skip]") == 2


@pytest.mark.slow
def test_harness_trains_a_decoupled_method_and_its_control(small_synthetic, tmp_path):
    """ce, then BaGS and its control from the CE model: the control changes the same parameters
    as BaGS's second stage (the box classifier), and the table compares BaGS with both."""
    cmd = small_harness_cmd(small_synthetic, tmp_path, "hc", ["ce", "bags"], 4, "--no-per-class")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("[train]") == 3 and "given the same second stage" in proc.stdout
    report = json.loads((tmp_path / "long_tail_benchmark.json").read_text())
    assert [g["loss"] for g in report["groups"]] == ["ce", "bags", "ce_ft_bags"]
    assert report["control_gaps"][0]["vs_control"]["seeds"] == [1]
    import torch

    def state(label):
        path = tmp_path / f"mask_rcnn_{label}" / "seed1" / "model_final.pth"
        return torch.load(path, map_location="cpu", weights_only=False)["model"]

    ce, control = state("ce"), state("ce_ft_bags")
    # (freezing turns BatchNorm into FrozenBatchNorm2d: no num_batches_tracked in the control)
    changed = {k for k in ce.keys() & control.keys() if not torch.equal(ce[k], control[k])}
    assert changed == {"roi_heads.box_predictor.cls_score.weight",
                       "roi_heads.box_predictor.cls_score.bias"}


def test_decoupled_bags_starts_from_the_ce_run(tmp_path):
    out = os.path.join("bench", "mask_rcnn_bags", "seed2")
    cmd = harness.train_command("bags", "mask_rcnn", 2, out)
    assert cmd[cmd.index("MODEL.WEIGHTS") + 1] == os.path.join(
        "bench", "mask_rcnn_ce", "seed2", "model_final.pth")
    assert load(cmd[cmd.index("--config-file") + 1]).MODEL.LONG_TAIL.TRAINABLE
    # refused before any training when its base run is neither listed first nor finished
    with pytest.raises(SeesawEcmError, match="list 'ce' before it"):
        harness.train_all(["bags", "ce"], ["mask_rcnn"], [1], str(tmp_path))


def command_cfg(cmd):
    """The config a train_net.py command of the harness trains: its file and its opts."""
    return load(cmd[cmd.index("--config-file") + 1], cmd[cmd.index("--num-gpus") + 2:])


@pytest.mark.parametrize("config_dir", ["configs/Demo", "configs/Synthetic"])
def test_each_decoupled_method_gets_a_ce_control_with_its_second_stage(config_dir, tmp_path):
    plan = harness.plan_runs(["ce", "bags", "loce"], ["mask_rcnn"], [1, 2], str(tmp_path),
                             config_dir=config_dir, opts=["SOLVER.BASE_LR", "0.01"])
    assert [(r["label"], r["seed"], r["wave"]) for r in plan] == [
        (label, seed, wave) for seed in (1, 2) for label, wave in (
            ("ce", 0), ("bags", 1), ("ce_ft_bags", 1), ("loce", 1), ("ce_ft_loce", 1))]
    runs = {(r["label"], r["seed"]): r for r in plan}
    ce = command_cfg(runs[("ce", 2)]["cmd"])
    for method in ("bags", "loce"):
        stage = command_cfg(runs[(method, 2)]["cmd"])
        control = command_cfg(runs[(f"ce_ft_{method}", 2)]["cmd"])
        # the method's second stage: trainable parts, the whole solver, start weights, seed
        assert control.MODEL.LONG_TAIL.TRAINABLE == stage.MODEL.LONG_TAIL.TRAINABLE != []
        assert control.SOLVER == stage.SOLVER and control.SOLVER.BASE_LR == 0.01
        assert control.MODEL.WEIGHTS == stage.MODEL.WEIGHTS == str(
            tmp_path / "mask_rcnn_ce" / "seed2" / "model_final.pth")
        assert control.SEED == stage.SEED == 2
        # otherwise the plain CE run: its loss and heads
        assert control.MODEL.ROI_HEADS.NAME == "StandardROIHeads" != stage.MODEL.ROI_HEADS.NAME
        control.MODEL.LONG_TAIL.TRAINABLE, control.SOLVER = [], ce.SOLVER
        control.MODEL.WEIGHTS, control.OUTPUT_DIR = ce.MODEL.WEIGHTS, ce.OUTPUT_DIR
        assert control == ce, method
    loce = command_cfg(runs[("ce_ft_loce", 1)]["cmd"])
    assert loce.SOLVER.MAX_ITER * 4 == pytest.approx(ce.SOLVER.MAX_ITER, abs=3)  # a quarter
    assert [r["label"] for r in harness.plan_runs(
        ["ce", "bags"], ["mask_rcnn"], [1], str(tmp_path), controls=False)] == ["ce", "bags"]


def test_decoupled_change_against_its_control_beside_against_ce(tiny_lvis, tmp_path):
    """The report pairs each decoupled method with CE and with CE given the same second stage
    (read from the control's label file), seed by seed."""
    aps = {"ce": [8.0, 9.0, 7.0], "bags": [12.0, 15.0, 10.0], "ce_ft_bags": [9.0, 11.0, 9.0]}
    folders = []
    for label, values in aps.items():
        for seed, ap in zip((1, 2, 3), values):
            loss, heads = ("bags", "LongTailROIHeads") if label == "bags" else (
                "ce", "StandardROIHeads")
            folder = fake_run(tiny_lvis, tmp_path / f"{label}{seed}", loss, seed, ap, [1.0],
                              heads=heads)
            if label == "ce_ft_bags":
                (tmp_path / f"{label}{seed}" / harness.LABEL_FILE).write_text(
                    json.dumps({"loss": label}))
            folders.append(folder)
    runs = [harness.read_run(f, per_class=False) for f in folders]
    assert [r["loss"] for r in runs[-3:]] == ["ce_ft_bags"] * 3
    assert [g["loss"] for g in harness.aggregate(runs)] == ["ce", "bags", "ce_ft_bags"]
    (row,) = harness.control_gaps(runs)
    vs_ce, vs_control = (np.subtract(aps["bags"], aps[b]) for b in ("ce", "ce_ft_bags"))
    assert (row["loss"], row["control"]) == ("bags", "ce_ft_bags")
    assert row["vs_first_stage"]["mean"]["segm/APr"] == pytest.approx(vs_ce.mean())
    assert row["vs_control"]["mean"]["segm/APr"] == pytest.approx(vs_control.mean())
    assert row["vs_control"]["std"]["bbox/AP"] == pytest.approx(np.std(vs_control, ddof=1))
    assert row["vs_control"]["seeds"] == [1, 2, 3]
    head, _, line = harness.format_control_table([row]).splitlines()
    assert cells(head)[4] == "Δ box AP vs ce / control"
    assert cells(line)[:5] == ["mask_rcnn", "bags", "ce_ft_bags", "3 / 3",
                               f"{vs_ce.mean():+.2f} / {vs_control.mean():+.2f}"]
    _, table = harness.write_report(runs, str(tmp_path / "report"))
    assert "given the same second stage" in table
    report = json.loads((tmp_path / "report" / "long_tail_benchmark.json").read_text())
    assert report["control_gaps"][0]["vs_control"]["mean"]["bbox/AP"] == pytest.approx(
        vs_control.mean())
    # without control runs the report has no such table
    _, table = harness.write_report(runs[:6], str(tmp_path / "report2"))
    assert "second stage" not in table and harness.control_gaps(runs[:6]) == []


def test_changes_against_ce_paired_by_seed(tiny_lvis, tmp_path):
    ce_ap, seesaw_ap = [8.0, 9.0, 7.0], [12.0, 15.0, 10.0]
    folders = [fake_run(tiny_lvis, tmp_path / f"ce{s}", "ce", s, ap, [1.0],
                        heads="StandardROIHeads") for s, ap in zip((1, 2, 3), ce_ap)]
    folders += [fake_run(tiny_lvis, tmp_path / f"ss{s}", "seesaw", s, ap, [1.0])
                for s, ap in zip((1, 2, 3), seesaw_ap)]
    # an unpaired seed (no CE run with seed 4) is left out of the paired changes
    folders.append(fake_run(tiny_lvis, tmp_path / "ss4", "seesaw", 4, 40.0, [1.0]))
    runs = [harness.read_run(f, per_class=False) for f in folders]
    (row,) = harness.gaps(runs, "ce")
    diffs = np.subtract(seesaw_ap, ce_ap)  # fake_run: every metric = bbox_ap + offset
    assert row["loss"] == "seesaw" and row["seeds"] == [1, 2, 3]
    assert row["mean"]["segm/APr"] == pytest.approx(diffs.mean())
    assert row["std"]["segm/APr"] == pytest.approx(np.std(diffs, ddof=1))
    assert row["sigmas"]["segm/APr"] == pytest.approx(diffs.mean() / np.std(diffs, ddof=1))
    assert row["mean"]["bbox/APr"] is None  # -100 ("no rare category") in both runs
    gap_line = cells(harness.format_gap_table([row]).splitlines()[2])
    assert gap_line[1:4] == ["seesaw", "ce", "3"]
    assert gap_line[-1] == "2.8"  # 4.33 / 1.53
    table = harness.format_table(harness.aggregate(runs), baseline="ce")
    # box AP over the four seesaw seeds: mean 19.25 against CE's 8.0
    assert f"({np.mean(seesaw_ap + [40.0]) - np.mean(ce_ap):+.2f})" in table_row(table, "seesaw")[3]
    assert "(" not in "".join(table_row(table, "ce"))


def test_bootstrap_eval_noise_of_the_changes(tiny_lvis, tmp_path):
    folders = [fake_run(tiny_lvis, tmp_path / f"{loss}{s}", loss, s, 10.0 + s, [1.0])
               for loss in ("ce", "seesaw") for s in (1, 2)]
    runs = [harness.read_run(f, bootstrap=4) for f in folders]
    # one test image: every draw is the whole set (AP 50; APr 0: the rare category 3 is missed)
    assert runs[0]["bootstrap"]["bbox/AP"] == pytest.approx([50.0] * 4)
    assert runs[0]["bootstrap"]["segm/APr"] == [0.0] * 4 and "bootstrap" not in (
        harness.read_run(folders[0]))
    # the change's eval std: root mean square over seeds of its std over the paired draws
    rng = np.random.default_rng(0)
    for run in runs:
        run["bootstrap"]["segm/APr"] = rng.normal(size=6).tolist()
    runs[0]["bootstrap"]["segm/APr"][2] = None  # undefined in one draw: left out of that pair
    (row,) = harness.gaps(runs, "ce")
    ce, ss = ([np.array(r["bootstrap"]["segm/APr"], float) for r in runs if r["loss"] == loss]
              for loss in ("ce", "seesaw"))
    stds = [np.std(np.delete(ss[0] - ce[0], 2), ddof=1), np.std(ss[1] - ce[1], ddof=1)]
    assert row["eval_std"]["segm/APr"] == pytest.approx(np.sqrt(np.mean(np.square(stds))))
    assert row["eval_std"]["bbox/AP"] == 0  # the same single image in every draw
    head, _, line = harness.format_gap_table([row]).splitlines()
    assert cells(head)[-2:] == ["box APr Δ eval std", "mask APr Δ eval std"]
    assert cells(line)[-1] == f"{row['eval_std']['segm/APr']:.2f}"
    runs[0]["bootstrap"]["segm/APr"] = [0.0] * 3
    with pytest.raises(SeesawEcmError, match="same --bootstrap"):
        harness.gaps(runs, "ce")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.long_tail", "--collect", *folders,
                           "--bootstrap", "3", "--no-per-class"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--bootstrap needs the per-class" in proc.stderr


def test_pool_counts_each_reports_seeds_as_seeds_of_their_own(tiny_lvis, tmp_path):
    # the same two seeds on two "machines": four CE / Seesaw pairs, each paired in its report
    aps = {"a": ([8.0, 9.0], [12.0, 15.0]), "b": ([7.0, 10.0], [10.0, 18.0])}
    reports = []
    for vm, (ce_ap, ss_ap) in aps.items():
        folders = [fake_run(tiny_lvis, tmp_path / vm / f"ce{s}", "ce", s, ap, [1.0],
                            heads="StandardROIHeads") for s, ap in zip((1, 2), ce_ap)]
        folders += [fake_run(tiny_lvis, tmp_path / vm / f"ss{s}", "seesaw", s, ap, [1.0])
                    for s, ap in zip((1, 2), ss_ap)]
        harness.write_report([harness.read_run(f, per_class=False) for f in folders],
                             str(tmp_path / vm / "report"))
        reports.append(str(tmp_path / vm / "report" / "long_tail_benchmark.json"))
    with pytest.raises(SeesawEcmError, match="same seed"):  # without pooling they collide
        harness.aggregate([r for p in reports for r in json.load(open(p))["runs"]])
    out = tmp_path / "pooled"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.long_tail", "--pool", *reports,
                           "--baseline", "ce", "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads((out / "long_tail_benchmark.json").read_text())["gaps"]
    diffs = [4.0, 6.0, 3.0, 8.0]  # Seesaw - CE of the same report and seed
    assert row["seeds"] == ["1:1", "1:2", "2:1", "2:2"]
    assert row["mean"]["segm/APr"] == pytest.approx(np.mean(diffs))
    assert row["std"]["segm/APr"] == pytest.approx(np.std(diffs, ddof=1))
    assert "Wrote" in proc.stdout and "png" not in proc.stdout  # no per-class AP was read
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(SeesawEcmError, match="not a long_tail_benchmark.json"):
        harness.pool_reports([str(bad)])


def test_parallel_jobs_run_side_by_side_with_a_thread_share(tmp_path, monkeypatch):
    # Each fake run marks that it started, then waits for the other one's mark: they can both
    # finish only if they run at the same time.
    script = (
        "import os, sys, time, json\n"
        "out = sys.argv[1]; open(os.path.join(out, 'started'), 'w').close()\n"
        "other = os.path.join(os.path.dirname(os.path.dirname(out)), sys.argv[2], 'seed1')\n"
        "for _ in range(600):\n"
        "    if os.path.exists(os.path.join(other, 'started')): break\n"
        "    time.sleep(0.1)\n"
        "else: sys.exit(3)\n"
        "row = {'bbox/AP': 1.0, 'threads': os.environ.get('OMP_NUM_THREADS')}\n"
        "open(os.path.join(out, 'metrics.json'), 'w').write(json.dumps(row))\n"
    )
    other = {"ce": "mask_rcnn_seesaw", "seesaw": "mask_rcnn_ce"}
    monkeypatch.setattr(harness, "train_command", lambda loss, arch, seed, out, **kw: [
        sys.executable, "-c", script, out, other[loss]])
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    folders = harness.train_all(["ce", "seesaw"], ["mask_rcnn"], [1], str(tmp_path), jobs=2)
    for folder in folders:
        row = json.loads(open(os.path.join(folder, "metrics.json")).read())
        assert row["threads"] == str(max(1, (os.cpu_count() or 1) // 2))
        assert os.path.isfile(os.path.join(folder, "harness_command.json"))


def test_demo_configs_differ_from_each_other_only_in_the_loss():
    """The main job's three runs share data, model, schedule and seed; CE is stock detectron2;
    each long-tail config equals its configs/Synthetic counterpart's loss keys."""
    cfgs = {loss: load(harness.config_for(loss, "mask_rcnn", "configs/Demo")[0])
            for loss in ("ce", "seesaw", "ecm")}
    assert cfgs["ce"].MODEL.ROI_HEADS.NAME == "StandardROIHeads"
    assert cfgs["ce"].DATASETS.TRAIN == ("synthetic_lt_demo_train",)
    for loss in ("seesaw", "ecm"):
        synthetic = load(f"configs/Synthetic/mask_rcnn_R18_FPN_{loss}.yaml")
        assert cfgs[loss].MODEL.LONG_TAIL == synthetic.MODEL.LONG_TAIL
        assert cfgs[loss].MODEL.ROI_MASK_HEAD.NAME == synthetic.MODEL.ROI_MASK_HEAD.NAME
        cfg = cfgs[loss].clone()
        # what a long-tail config may change: the heads, the loss, and (ECM) warm-up + clip
        for key in ("MODEL.ROI_HEADS.NAME", "MODEL.ROI_MASK_HEAD.NAME", "MODEL.LONG_TAIL",
                    "SOLVER.WARMUP_ITERS", "SOLVER.CLIP_GRADIENTS", "OUTPUT_DIR"):
            node, leaf = key.rsplit(".", 1) if "." in key else ("", key)
            src = cfgs["ce"]
            for part in filter(None, node.split(".")):
                src = src[part]
            dst = cfg
            for part in filter(None, node.split(".")):
                dst = dst[part]
            dst[leaf] = src[leaf]
        assert cfg == cfgs["ce"], loss
    assert cfgs["ecm"].SOLVER.WARMUP_ITERS == cfgs["ecm"].SOLVER.MAX_ITER // 2
    # the main job's cascades are these configs plus exactly the harness's cascade keys; ECM's
    # also takes CE's warm-up and a clip of 35 (configs/Demo/cascade_mask_rcnn_R18_FPN_ecm.yaml)
    for loss, cfg in cfgs.items():
        derived = load(f"configs/Demo/mask_rcnn_R18_FPN_{loss}.yaml", harness.CASCADE_OPTS)
        shipped = load(f"configs/Demo/cascade_mask_rcnn_R18_FPN_{loss}.yaml")
        derived.OUTPUT_DIR = shipped.OUTPUT_DIR
        if loss == "ecm":
            derived.SOLVER.WARMUP_ITERS = cfgs["ce"].SOLVER.WARMUP_ITERS
            derived.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 35.0
        assert derived == shipped, loss
    assert "--archs cascade" in open("tools/run_main.sh").read()


def test_demo_has_every_method_with_the_synthetic_configs_thresholds():
    """Every loss of the harness runs on the demo set (issue 18's benchmark); each equals its
    configs/Synthetic counterpart except the thresholds stated per training image, which keep
    their image count on the 800-image demo set (2,000 synthetic images), and LOCE's schedule,
    a quarter of the demo's as of the synthetic's."""
    base = load("configs/Demo/Base-Demo.yaml")
    for loss in harness.LOSSES:
        demo = load(*harness.config_for(loss, "cascade", "configs/Demo"))
        synthetic = load(f"configs/Synthetic/mask_rcnn_R18_FPN_{loss}.yaml")
        assert demo.DATASETS.TRAIN == ("synthetic_lt_demo_train",), loss
        assert demo.MODEL.LONG_TAIL.LOSS == synthetic.MODEL.LONG_TAIL.LOSS, loss
        assert demo.MODEL.LONG_TAIL.TRAINABLE == synthetic.MODEL.LONG_TAIL.TRAINABLE or (
            loss == "bags"), loss  # BaGS: the cascade's three classifiers too
        for key, images in (("EQL", 110), ("DROPLOSS", 177), ("GOL", 110)):
            if loss == key.lower():
                assert demo.MODEL.LONG_TAIL[key].LAMBDA_ * 800 == pytest.approx(images)
                assert synthetic.MODEL.LONG_TAIL[key].LAMBDA_ * 2000 == pytest.approx(images)
        if loss == "federated":
            assert demo.MODEL.LONG_TAIL.FEDERATED.NUM_CLASSES / 30 == pytest.approx(
                synthetic.MODEL.LONG_TAIL.FEDERATED.NUM_CLASSES / 60)
        if loss == "loce":
            assert demo.SOLVER.MAX_ITER * 4 == pytest.approx(base.SOLVER.MAX_ITER, abs=3)
            assert synthetic.SOLVER.MAX_ITER * 4 == load(
                "configs/Synthetic/Base-Synthetic-R18-FPN.yaml").SOLVER.MAX_ITER
        else:
            assert demo.SOLVER.MAX_ITER == base.SOLVER.MAX_ITER, loss
    bags = load(*harness.config_for("bags", "cascade", "configs/Demo"))
    assert re.match(bags.MODEL.LONG_TAIL.TRAINABLE[0], "roi_heads.box_predictor.2.cls_score.weight")
    assert re.match(bags.MODEL.LONG_TAIL.TRAINABLE[0], "roi_heads.box_predictor.cls_score.weight")


def test_report_paths_are_relative_inside_the_working_directory(tmp_path, monkeypatch):
    """A run folder under the working directory is recorded relative to it (a committed report
    names no machine's folders); one outside keeps its absolute path."""
    from benchmarks.harness import report_path

    (tmp_path / "work" / "out" / "ce").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    assert report_path("out/ce") == os.path.join("out", "ce")
    assert report_path(str(tmp_path / "work" / "out" / "ce")) == os.path.join("out", "ce")
    assert report_path(str(tmp_path)) == str(tmp_path)


def test_a_failed_run_skips_only_the_runs_that_start_from_its_weights(tmp_path, monkeypatch):
    """CE seed 1 fails: its second stages (BaGS and BaGS' control) are skipped, every other run
    trains, and one error names the failed and the skipped runs."""
    out = str(tmp_path)

    def command(label, arch, seed, folder, **kwargs):
        base = [] if label in ("ce", "seesaw") else [
            os.path.join(harness.run_dir(out, "ce", arch, seed), "model_final.pth")]
        code = "import sys; sys.exit(1)" if (label, seed) == ("ce", 1) else "pass"
        return [sys.executable, "-c", code] + base

    monkeypatch.setattr(harness, "train_command", command)
    with pytest.raises(SeesawEcmError) as error:
        harness.train_all(["ce", "seesaw", "bags"], ["mask_rcnn"], [1, 2], out, jobs=2)
    labels = ["ce", "seesaw", "bags", harness.control_label("bags")]
    trained = {(label, seed) for label in labels for seed in (1, 2) if os.path.isfile(
        os.path.join(harness.run_dir(out, label, "mask_rcnn", seed), "harness_command.json"))}
    assert trained == {("seesaw", 1)} | {(label, 2) for label in labels}
    message = str(error.value)
    assert message.startswith("3 of 8 runs did not train")
    assert "Training mask_rcnn ce seed 1 failed (exit 1)" in message
    for label in labels[2:]:
        assert f"mask_rcnn {label} seed 1: not trained, it starts from the weights of" in message
