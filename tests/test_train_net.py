"""End-to-end runs of train_net.py on a small synthetic set (marked slow; CI runs them)."""
import json
import os
import shutil

import pytest
import torch
from e2e import (NUM_CLASSES, SEESAW, SEESAW_RUN_OPTS, eval_seesaw_run, run_train_net,
                 summary, train_net_in_process)

pytestmark = pytest.mark.slow


def test_train_writes_metrics_events_checkpoints_and_summary(seesaw_run):
    out, proc = seesaw_run
    table = summary(proc.stdout)
    assert set(table) == {"bbox", "segm"}, proc.stdout[-2000:]
    metrics = [json.loads(line) for line in open(out / "metrics.json")]
    train_rows = [m for m in metrics if "total_loss" in m]
    assert train_rows[-1]["iteration"] == 19
    assert {"loss_cls", "loss_objectness", "fast_rcnn/objectness_accuracy"} <= set(train_rows[-1])
    eval_rows = [m for m in metrics if "bbox/APr" in m]
    assert eval_rows and "segm/APf" in eval_rows[-1]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out))
    assert {"model_0000009.pth", "model_final.pth", "config.yaml"} <= set(os.listdir(out))
    assert "eta:" in open(out / "log.txt").read()


def test_eval_only_reproduces_the_run_and_adds_ap_fixed_pool_and_boundary(
        seesaw_run, small_synthetic, tmp_path):
    """--eval-only of the final model gives the run's final standard AP again, also with the LVIS
    metric keys from the command line: the summary gets the AP-fixed and AP-pool columns and a
    boundary row, the standard AP is unchanged (each image's best are still kept, with their
    masks), and lvis_fast_eval.json has per-category AP-fixed."""
    out, proc = seesaw_run
    again = eval_seesaw_run(out, small_synthetic, tmp_path, "TEST.AP_FIXED.ENABLED", "True",
                            "TEST.AP_FIXED.TOPK_PER_CLASS", "20", "TEST.AP_POOL", "True",
                            "TEST.BOUNDARY_AP", "True")
    lines = again.stdout[again.stdout.index("Summary:"):].splitlines()
    header = lines[1].split()
    assert header[1:] == ["task", "AP", "AP50", "APr", "APc", "APf", "AP-fixed", "APr-fixed",
                          "APc-fixed", "APf-fixed", "AP-pool", "APr-pool", "APc-pool",
                          "APf-pool"], lines[:5]
    rows = {row.split()[0]: row.split()[1:] for row in lines[2:5]}
    assert set(rows) == {"bbox", "segm", "boundary"}
    standard = summary(proc.stdout)
    assert set(standard) == {"bbox", "segm"}
    for task, values in standard.items():
        assert rows[task][:5] == values  # standard AP as in the run, without AP-fixed
    report = json.loads((tmp_path / "inference" / "small_val" / "lvis_fast_eval.json").read_text())
    assert set(report) == {"bbox", "segm", "boundary"}
    assert "AP_fixed" in report["segm"]["per_category_ap"][0] and "pooled" in report["segm"]


def test_eval_only_with_test_time_augmentation(seesaw_run, small_synthetic, tmp_path):
    """TEST.AUG from the command line: the plain evaluation as before, then a "small_val_TTA"
    block (files under inference_TTA)."""
    out, proc = seesaw_run
    again = eval_seesaw_run(out, small_synthetic, tmp_path, "TEST.AUG.ENABLED", "True",
                            "TEST.AUG.MIN_SIZES", "(96, 128)", "TEST.AUG.MAX_SIZE", "256",
                            "TEST.AUG.FLIP", "True")
    text = again.stdout[again.stdout.index("Summary:"):]
    plain, tta = text.split("small_val_TTA")
    assert summary(plain) == summary(proc.stdout), text
    # the TTA evaluation ran and wrote its own files; its values are not compared: on this
    # 20-iteration model most boxes are empty, and the merged top detections of the augmented
    # images can all be (tests/test_tta.py checks TTA's results in-process)
    assert "task" in tta and "bbox" in tta, text
    results = tmp_path / "inference_TTA" / "small_val" / "lvis_instances_results.json"
    assert isinstance(json.loads(results.read_text()), list)


def test_resume_restores_seesaw_counts(seesaw_run, small_synthetic, tmp_path):
    run_dir, _ = seesaw_run
    out = tmp_path / "resumed"  # a copy: the shared run's own files stay as they are
    out.mkdir()
    shutil.copy(run_dir / "model_0000009.pth", out)
    ckpt = torch.load(out / "model_0000009.pth", map_location="cpu")
    key = "roi_heads.box_predictor.cls_loss.cum_samples"
    assert ckpt["model"][key].sum() > 0
    (out / "last_checkpoint").write_text("model_0000009.pth")
    proc = run_train_net(small_synthetic, out, SEESAW, *SEESAW_RUN_OPTS, "--resume",
                         "TEST.EVAL_PERIOD", "0", "SOLVER.MAX_ITER", "12")
    assert "Starting training from iteration 10" in proc.stdout + proc.stderr
    final = torch.load(out / "model_final.pth", map_location="cpu")["model"][key]
    # counts continued from the checkpoint's: two more iterations of foreground RoIs
    assert (final >= ckpt["model"][key]).all() and final.sum() > ckpt["model"][key].sum()


def test_ecm_short_training_run_learns(small_synthetic, tmp_path):
    results, _ = train_net_in_process(small_synthetic, tmp_path,
                                      "configs/Synthetic/mask_rcnn_R18_FPN_ecm.yaml",
                                      "SOLVER.MAX_ITER", "30", "SOLVER.WARMUP_ITERS", "10")
    stats = json.loads((tmp_path / "class_statistics.json").read_text())
    assert len(stats["counts"]) == NUM_CLASSES and min(stats["counts"]) >= 1
    rows = [json.loads(line) for line in open(tmp_path / "metrics.json")]
    losses = [r["loss_cls"] for r in rows if "loss_cls" in r]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert set(results["small_val"]) == {"bbox", "segm"}
    # eval-only takes the margins from the checkpoint: no training data needed, same numbers
    again, _ = train_net_in_process(
        small_synthetic, tmp_path / "eval", "configs/Synthetic/mask_rcnn_R18_FPN_ecm.yaml",
        "--eval-only", "MODEL.WEIGHTS", str(tmp_path / "model_final.pth"),
        "DATASETS.TRAIN", "('no_such_dataset',)")
    assert json.dumps(again, sort_keys=True) == json.dumps(results, sort_keys=True)


def test_two_process_cpu_run(small_synthetic, tmp_path):
    proc = run_train_net(small_synthetic, tmp_path, "configs/Synthetic/mask_rcnn_R18_FPN_ce.yaml",
                         "SOLVER.MAX_ITER", "6", num_gpus=2)
    log = proc.stdout + proc.stderr
    assert "World size: 2" in log
    assert "bbox" in summary(proc.stdout)  # evaluated (6 iterations may detect nothing yet)
    assert (tmp_path / "model_final.pth").exists()


def test_malformed_dataset_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [], "annotations": []}')
    data = {"train_json": str(bad), "val_json": str(bad), "image_root": str(tmp_path)}
    proc = run_train_net(data, tmp_path / "out", "configs/Synthetic/mask_rcnn_R18_FPN_ce.yaml",
                         check=False)
    assert proc.returncode != 0
    assert "missing list 'categories'" in proc.stderr and "Fix the file" in proc.stderr


@pytest.mark.parametrize("config, per_stage", [
    ("cascade_mask_rcnn_R18_FPN_seesaw", {"loss_cls", "loss_objectness", "loss_box_reg"}),
    ("cascade_mask_rcnn_R18_FPN_ecm", {"loss_cls", "loss_box_reg"}),
    ("cascade_mask_rcnn_R18_FPN_ecm MODEL.LONG_TAIL.LOSS cosine_ce", {"loss_cls", "loss_box_reg"}),
    ("cascade_mask_rcnn_R18_FPN_ecm MODEL.LONG_TAIL.LOSS federated", {"loss_cls", "loss_box_reg"}),
    ("htc_lite_R18_FPN_seesaw", {"loss_cls", "loss_objectness", "loss_box_reg"}),
    ("cascade_mask_rcnn_R18_FPN_seesaw_mmdet",
     {"loss_cls", "loss_objectness", "loss_box_reg", "loss_mask"}),
    ("cascade_mask_rcnn_R18_FPN_ecm_mmdet", {"loss_cls", "loss_box_reg", "loss_mask"}),
])
def test_cascade_and_htc_lite_short_training_run(small_synthetic, tmp_path, config, per_stage):
    """Train a few iterations, evaluate, and evaluate the checkpoint again with --eval-only
    (statistics and counts of every stage come from the checkpoint)."""
    name, *opts = config.split()
    path = f"configs/Synthetic/{name}.yaml"
    results, _ = train_net_in_process(small_synthetic, tmp_path, path, *opts,
                                      "SOLVER.MAX_ITER", "8")
    rows = [json.loads(line) for line in open(tmp_path / "metrics.json")]
    last = [r for r in rows if "total_loss" in r][-1]
    assert {f"{k}_stage{s}" for k in per_stage for s in range(3)} <= set(last)
    assert all(torch.isfinite(torch.tensor(last[f"loss_cls_stage{s}"])) for s in range(3))
    assert ("loss_context" in last) == name.startswith("htc_lite")
    assert "bbox" in results["small_val"]  # evaluated (8 iterations may segment nothing yet)
    again, _ = train_net_in_process(small_synthetic, tmp_path / "eval", path, *opts, "--eval-only",
                                    "MODEL.WEIGHTS", str(tmp_path / "model_final.pth"),
                                    "DATASETS.TRAIN", "('no_such_dataset',)")
    assert json.dumps(again, sort_keys=True) == json.dumps(results, sort_keys=True)  # NaN too
