"""Evaluate one trained model over a grid of NorCal gammas or logit-adjustment taus
(MODEL.ROI_HEADS.CALIBRATION) from one inference pass over each test set.

    python -m tools.calibration_sweep --config-file configs/Demo/mask_rcnn_R18_FPN_ce.yaml \\
        MODEL.WEIGHTS output/model_final.pth --gammas 0 0.25 0.5 1 1.5
    python -m tools.calibration_sweep --config-file ... MODEL.WEIGHTS ... --taus 0 0.5 1
    python -m tools.calibration_sweep --config-file ... --dataset train=/data/train.json:/img \\
        --dataset val=/data/val.json:/img DATASETS.TRAIN "('train',)" \\
        DATASETS.TEST "('val',)" MODEL.WEIGHTS ... --gammas 0 1

(the values last: --gammas / --taus take every number after them).

Every test image goes through the model once: the box predictors' raw class outputs, boxes and
proposals of that image are kept, and for each value the scores are computed again with the
calibration at that value, followed by the model's own post-processing (score threshold, NMS,
detections per image, TEST.AP_FIXED's top-K filter) and one evaluator per value. Box AP only:
the model runs without its mask head (MODEL.MASK_ON False), since the masks of each value's
detections would need the mask head again. One process. AP-pool (TEST.AP_FIXED + TEST.AP_POOL)
is turned on for LVIS-format test sets unless --no-pool. Writes, under --output-dir (default
OUTPUT_DIR/calibration_sweep): results.json and, per test set, calibration_sweep.png (APr and
APf against the value) and the evaluators' files in one folder per value.
"""
import argparse
import copy
import json
import logging
import os
import sys

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.evaluation import inference_context
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference
from detectron2.utils.logger import setup_logger
from tabulate import tabulate

from seesaw_ecm import add_seesaw_ecm_config
from seesaw_ecm.config import merge_config
from seesaw_ecm.data.datasets import register_from_cfg
from seesaw_ecm.engine import Trainer
from seesaw_ecm.errors import SeesawEcmError
from seesaw_ecm.fileio import write_atomic, write_figure
from seesaw_ecm.modeling.calibration import ScoreCalibration
from seesaw_ecm.validation import validate_run

logger = logging.getLogger("seesaw_ecm.calibration_sweep")

METRICS = ("AP", "APr", "APc", "APf", "AP-pool")
# the calibration key each grid sets, by the argument that gives it
GRIDS = {"gammas": ("norcal", "GAMMA"), "taus": ("logit_adjustment", "TAU")}


class ScoreCapture:
    """While entered, records what the ROI heads turn into detections in one inference forward:
    a cascade's (predictor, predictions, proposals) of every stage, or the single predictor's
    (predictions, proposals). :meth:`detections` then redoes that step from the record, with the
    predictors' calibration as it is at that time."""

    def __init__(self, roi_heads):
        self.heads = roi_heads
        self.cascade = hasattr(roi_heads, "_cascade_scores")  # LongTailCascade / HTC-Lite heads
        self.target = roi_heads if self.cascade else roi_heads.box_predictor
        self.name = "_cascade_scores" if self.cascade else "inference"
        self.recorded = None

    def __enter__(self):
        original = getattr(self.target, self.name)

        def record(*args):
            self.recorded = args
            return original(*args)

        setattr(self.target, self.name, record)  # an instance attribute over the method
        return self

    def __exit__(self, *exc):
        delattr(self.target, self.name)

    def detections(self):
        """Per image Instances (network input size), as the ROI heads' box step returns them."""
        if not self.cascade:
            return self.heads.box_predictor.inference(*self.recorded)[0]
        (head_outputs,) = self.recorded
        predictor, predictions, proposals = head_outputs[-1]  # as the cascade's _forward_box
        instances, _ = fast_rcnn_inference(
            predictor.predict_boxes(predictions, proposals), self.heads._cascade_scores(
                head_outputs), [x.image_size for x in proposals],
            predictor.test_score_thresh, predictor.test_nms_thresh, predictor.test_topk_per_image)
        return instances


def set_calibration(model, method, value):
    """Set the GAMMA (norcal) or TAU (logit_adjustment) of every predictor's calibration."""
    calibrations = [m for m in model.modules() if isinstance(m, ScoreCalibration)]
    if not calibrations:
        raise SeesawEcmError("The model has no ScoreCalibration: build it with "
                             "MODEL.ROI_HEADS.CALIBRATION.METHOD set.")
    for calibration in calibrations:
        setattr(calibration, "gamma" if method == "norcal" else "tau", value)


def sweep(cfg, model, values, output_dir):
    """Evaluate `model` (built from `cfg`, weights loaded) on every cfg.DATASETS.TEST for each
    calibration value, with one forward per image.

    Returns:
        {dataset: [evaluator results ({task: {metric: value}}) per value]}.
    """
    method = cfg.MODEL.ROI_HEADS.CALIBRATION.METHOD
    heads = model.roi_heads
    results = {}
    for dataset in cfg.DATASETS.TEST:
        evaluators = [Trainer.build_evaluator(cfg, dataset,
                                              os.path.join(output_dir, dataset, f"{v:g}"))
                      for v in values]
        filters = [copy.deepcopy(getattr(heads, "topk_filter", None)) for _ in values]
        for evaluator, topk in zip(evaluators, filters):
            evaluator.reset()
            if topk is not None:
                topk.eval()  # restarts its running K-th scores
        with inference_context(model), torch.no_grad():
            for inputs in Trainer.build_test_loader(cfg, dataset):
                with ScoreCapture(heads) as capture:
                    model(inputs)
                for value, evaluator, topk in zip(values, evaluators, filters):
                    set_calibration(model, method, value)
                    instances = capture.detections()
                    if topk is not None:
                        instances = topk(instances)
                    sizes = [x.image_size for x in instances]
                    evaluator.process(inputs, model._postprocess(instances, inputs, sizes))
        results[dataset] = [evaluator.evaluate() for evaluator in evaluators]
    return results


def _metric(result, name):
    """A bbox metric, NaN where absent or undefined (the evaluators report a frequency group
    without categories as -1 or -100)."""
    value = result["bbox"].get(name, float("nan"))
    return value if value >= 0 else float("nan")


def table(values, per_value, key):
    """The bbox METRICS per value, as a text table ("n/a": not defined)."""
    rows = [[f"{v:g}"] + [_metric(r, m) for m in METRICS] for v, r in zip(values, per_value)]
    return tabulate(rows, headers=[key, *METRICS], floatfmt=".2f", missingval="n/a").replace(
        "nan", "n/a")


def plot(values, per_value, key, path, title):
    """APr and APf (bbox) against the value, written to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for metric in ("APr", "APf"):
        ax.plot(values, [_metric(r, metric) for r in per_value], marker="o", label=metric)
    ax.set_xlabel(key)
    ax.set_ylabel("box AP")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    write_figure(fig, path)


def setup(args):
    """The config of the sweep (its datasets registered): args' file and opts, the grid's
    calibration method at its first value, no mask head, statistics from the weights, AP-pool
    unless --no-pool or a test set is not LVIS-format."""
    grid = "gammas" if args.gammas is not None else "taus"
    method, key = GRIDS[grid]
    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    merge_config(cfg, args.config_file, args.opts)
    cfg.DATASETS.LVIS_FORMAT = list(cfg.DATASETS.LVIS_FORMAT) + list(args.dataset)
    cfg.MODEL.ROI_HEADS.CALIBRATION.METHOD = method
    cfg.MODEL.ROI_HEADS.CALIBRATION[key] = getattr(args, grid)[0]
    cfg.MODEL.LONG_TAIL.STATISTICS_FROM = "checkpoint"
    cfg.MODEL.MASK_ON = False
    cfg.MODEL.MASK_SCORING.ON = False
    cfg.TEST.BOUNDARY_AP = False
    register_from_cfg(cfg)
    if args.pool and all(MetadataCatalog.get(name).get("evaluator_type") == "lvis"
                         for name in cfg.DATASETS.TEST):
        cfg.TEST.AP_FIXED.ENABLED = True
        cfg.TEST.AP_POOL = True
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg, grid, key


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    values = parser.add_mutually_exclusive_group(required=True)
    values.add_argument("--gammas", type=float, nargs="+", help="NorCal gammas to evaluate")
    values.add_argument("--taus", type=float, nargs="+", help="logit adjustment taus")
    parser.add_argument("--dataset", action="append", default=[], metavar="NAME=JSON:IMAGES",
                        help="register an LVIS-format dataset (as train_net.py --dataset)")
    parser.add_argument("--output-dir", help="default: OUTPUT_DIR/calibration_sweep")
    parser.add_argument("--no-pool", dest="pool", action="store_false",
                        help="leave TEST.AP_FIXED / TEST.AP_POOL as the config has them")
    parser.add_argument("opts", nargs="*", help="config overrides: KEY VALUE ...")
    return parser


def main(argv=None):
    args = build_parser().parse_intermixed_args(argv)
    setup_logger(name="seesaw_ecm")
    try:
        cfg, grid, key = setup(args)
        validate_run(cfg, eval_only=True)
        out = args.output_dir or os.path.join(cfg.OUTPUT_DIR, "calibration_sweep")
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        values = getattr(args, grid)
        results = sweep(cfg, model, values, out)
    except SeesawEcmError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    method = cfg.MODEL.ROI_HEADS.CALIBRATION.METHOD
    write_atomic(os.path.join(out, "results.json"), json.dumps(
        {"method": method, "values": values, "results": results}, indent=1))
    name = key.lower()
    for dataset, per_value in results.items():
        print(f"{dataset}: {method}, box AP per {name}\n{table(values, per_value, name)}")
        plot(values, per_value, name, os.path.join(out, dataset, "calibration_sweep.png"),
             f"{dataset}: {method}")
    print(f"Wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
