"""benchmarks.calibration_evidence: the gamma rule, the commands it runs, the table rows."""
import json
import os

from detectron2.config import get_cfg

from benchmarks import calibration_evidence as evidence
from seesaw_ecm.config import add_seesaw_ecm_config, merge_config


def test_gamma_is_the_best_holdout_box_ap_ties_to_the_smaller():
    results = [{"bbox": {"AP": ap, "APr": apr}} for ap, apr in
               ((10.0, 1.0), (12.0, 5.0), (12.0, 9.0), (11.0, 20.0))]
    assert evidence.choose_gamma([0, 0.5, 1, 2], results) == 0.5  # not APr's best (2)
    assert evidence.choose_gamma([0, 2, 1, 0.5], results) == 1  # the smaller of the tie


def _run_folder(tmp_path, heads):
    run = tmp_path / "mask_rcnn_ce" / "seed2"
    run.mkdir(parents=True)
    cmd = ["train_net.py", "--config-file", "configs/Demo/mask_rcnn_R18_FPN_ce.yaml",
           "--num-gpus", "1", "SOLVER.MAX_ITER", "10", "SEED", "2", "OUTPUT_DIR", str(run)]
    (run / "harness_command.json").write_text(json.dumps(cmd))
    (run / "config.yaml").write_text(f"MODEL:\n  ROI_HEADS:\n    NAME: {heads}\n")
    return str(run)


def test_commands_keep_the_training_overrides_and_add_pool_and_calibration(tmp_path):
    run = _run_folder(tmp_path, "StandardROIHeads")
    cmd = evidence.eval_command(run, "val", "out", 151, gamma=0.75, counts="image_count")
    assert cmd[1:5] == ["train_net.py", "--config-file",
                        "configs/Demo/mask_rcnn_R18_FPN_ce.yaml", "--eval-only"]
    opts = dict(zip(cmd[5::2], cmd[6::2]))
    assert opts["SOLVER.MAX_ITER"] == "10" and "SEED" not in opts
    assert opts["MODEL.WEIGHTS"] == os.path.join(run, "model_final.pth")
    assert opts["TEST.AP_POOL"] == "True" and opts["MODEL.ROI_HEADS.NAME"] == "LongTailROIHeads"
    assert opts["TEST.AP_FIXED.TOPK_PER_CLASS"] == "151"
    assert (opts["MODEL.ROI_HEADS.CALIBRATION.METHOD"], opts["MODEL.ROI_HEADS.CALIBRATION.GAMMA"],
            opts["OUTPUT_DIR"], opts["DATASETS.TEST"]) == ("norcal", "0.75", "out", "('val',)")
    # a whole-number gamma (the holdout's choice may be 1) stays a float for the config
    calibrated = evidence.eval_command(run, "val", "out", 151, gamma=1, counts="image_count")
    opts = calibrated[calibrated.index("MODEL.ROI_HEADS.CALIBRATION.METHOD"):][:6]
    assert opts[3] == "1.0"
    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    merge_config(cfg, opts=opts)
    assert cfg.MODEL.ROI_HEADS.CALIBRATION.GAMMA == 1.0
    plain = evidence.eval_command(run, "val", "out", 151)
    assert "MODEL.ROI_HEADS.CALIBRATION.METHOD" not in plain
    sweep = evidence.sweep_command(_run_folder(tmp_path / "b", "LongTailROIHeads"), "hold",
                                   [0, 0.5], "image_count", 151)
    assert sweep[sweep.index("--gammas") + 1:] == ["0", "0.5"]
    assert "MODEL.ROI_HEADS.NAME" not in sweep and "('hold',)" in sweep


def test_topk_is_lvis_per_image_k_times_the_images():
    assert evidence.scaled_topk(300) == 151 and evidence.scaled_topk(250) == 126  # BENCHMARKS.md
    assert evidence.scaled_topk(19809) == 10000


def test_rows_mean_and_std_over_seeds_with_the_chosen_gammas():
    def run(loss, ap, gamma=None):
        metrics = {f"{t}/{m}": ap for t in evidence.TASKS for m in evidence.METRICS}
        out = {"loss": loss, "test": metrics}
        if gamma is not None:
            out.update(gamma=gamma, test_norcal={k: v + 1 for k, v in metrics.items()})
        return out

    runs = [run("ce", 10.0, 0.5), run("ce", 12.0, 1.0), run("ecm", 20.0)]
    rows = evidence.rows(runs, ["ce", "ecm"], ["ce"])
    assert [r["row"] for r in rows] == ["CE", "CE + NorCal", "ECM"]
    assert rows[1]["gammas"] == [0.5, 1.0] and rows[1]["mean"]["segm/AP-pool"] == 12.0
    assert abs(rows[0]["std"]["bbox/AP"] - 2 ** 0.5) < 1e-9 and rows[2]["std"]["bbox/AP"] is None
    line = evidence.format_table(rows).splitlines()[3]
    assert [c.strip() for c in line.strip("|").split("|")][:4] == [
        "CE + NorCal", "2", "0.5 / 1", "12.00 ± 1.41"]


def test_collect_only_runs_nothing_and_falls_back_to_the_training_evaluation(tmp_path):
    run = _run_folder(tmp_path, "StandardROIHeads")
    (tmp_path / "mask_rcnn_ce" / "seed2" / "config.yaml").write_text(
        "MODEL:\n  ROI_HEADS:\n    NAME: StandardROIHeads\nSOLVER:\n  MAX_ITER: 10\nSEED: 2\n")
    trained = {f"{t}/{m}": 1.5 for t in evidence.TASKS for m in ("AP", "AP50", "APr", "APc", "APf")}
    (tmp_path / "mask_rcnn_ce" / "seed2" / "metrics.json").write_text(json.dumps(trained) + "\n")

    class Args:
        calibrate, collect_only, test, topk, counts = [], True, "val", 151, "image_count"
        holdout, gammas = "hold", [0.0, 0.5]

    out = evidence._evaluate_or_skip(run, Args)
    assert out["test"]["segm/APr"] == 1.5 and out["test"]["bbox/AP-pool"] is None
    assert "training evaluation" in out["test_source"]
    Args.calibrate = ["ce"]  # its holdout sweep has not run: the run is left out
    assert evidence._evaluate_or_skip(run, Args) is None
    row = evidence.rows([out], ["ce"], [])[0]
    assert row["mean"]["bbox/AP-pool"] is None and row["mean"]["bbox/AP"] == 1.5
