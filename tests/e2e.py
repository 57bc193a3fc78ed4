"""train_net.py as a user runs it, for the end-to-end tests: one command, its output parsed."""
import io
import re
import subprocess
import sys
from typing import NamedTuple

NUM_CLASSES = 12  # of conftest's small_synthetic set
SEESAW = "configs/Synthetic/mask_rcnn_R18_FPN_seesaw.yaml"
# The shared Seesaw run (conftest's seesaw_run) and every evaluation of its model: 20 iterations
# at a low learning rate (at 0.02 the box regression may blow up, leaving no boxes), every
# detection kept (threshold 0) so that comparisons bite, and fewer detections than the recipe
SEESAW_RUN_OPTS = ("SOLVER.BASE_LR", "0.005", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
                   "TEST.DETECTIONS_PER_IMAGE", "20")


def train_net_args(data, out_dir, config, *extra):
    """train_net.py's arguments for a short run on `data` (conftest's small_synthetic); `extra`:
    flags (--eval-only, --resume) and config overrides, which win."""
    flags = [e for e in extra if e.startswith("--")]
    opts = [e for e in extra if not e.startswith("--")]
    return [
        "--config-file", config, *flags,
        "--dataset", f"small_train={data['train_json']}:{data['image_root']}",
        "--dataset", f"small_val={data['val_json']}:{data['image_root']}",
        "DATASETS.TRAIN", "('small_train',)", "DATASETS.TEST", "('small_val',)",
        "MODEL.ROI_HEADS.NUM_CLASSES", str(NUM_CLASSES), "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", "20", "SOLVER.WARMUP_ITERS", "5", "SOLVER.CHECKPOINT_PERIOD", "10",
        "DATALOADER.NUM_WORKERS", "0", "TEST.DETECTIONS_PER_IMAGE", "50", "MODEL.DEVICE", "cpu",
        # 100 proposals per test image (not 1,000): the final evaluations stay quick
        "MODEL.RPN.POST_NMS_TOPK_TEST", "100", "OUTPUT_DIR", str(out_dir), *opts,
    ]


def run_train_net(data, out_dir, config, *extra, num_gpus=1, check=True):
    """train_net.py on `data` in a new process (train_net_args)."""
    cmd = [sys.executable, "train_net.py", "--num-gpus", str(num_gpus),
           *train_net_args(data, out_dir, config, *extra)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def eval_seesaw_run(run_dir, data, out_dir, *opts):
    """train_net.py --eval-only of the shared Seesaw run's final model, with `opts`."""
    return run_train_net(data, out_dir, SEESAW, *SEESAW_RUN_OPTS, "MODEL.WEIGHTS",
                         str(run_dir / "model_final.pth"), "--eval-only", *opts)


def summary(stdout):
    """The AP table train_net prints at the end: {task: [AP, AP50, APr, APc, APf]}."""
    rows = re.findall(r"^\s+(bbox|segm)((?:\s+(?:[\d.]+|n/a)){5})\s*$", stdout, re.M)
    return {task: vals.split() for task, vals in rows}


class InProcessRun(NamedTuple):
    results: dict  # {dataset: {task: {metric: value}}} of the final evaluation
    log: str  # the INFO lines of detectron2's and seesaw_ecm's loggers


def train_net_in_process(data, out_dir, config, *extra):
    """train_net.py's main() with train_net_args, in this process (no
    interpreter start and torch import per run), for tests of training and evaluation rather
    than of the command line: an InProcessRun. The log handlers the run adds are removed again,
    so runs do not log into each other's files."""
    import logging

    import detectron2.utils.logger as d2_logger
    import train_net

    args = train_net.build_parser().parse_args(train_net_args(data, out_dir, config, *extra))
    loggers = [logging.getLogger(n) for n in ("", "detectron2", "fvcore", "seesaw_ecm", "d2")]
    before = {id(lg): list(lg.handlers) for lg in loggers}
    log = io.StringIO()
    for name in ("detectron2", "seesaw_ecm"):  # what the run's log.txt would hold
        handler = logging.StreamHandler(log)
        handler.setLevel(logging.INFO)
        logging.getLogger(name).addHandler(handler)
    try:
        results = train_net.main(args)
    finally:
        for lg in loggers:
            for handler in [h for h in lg.handlers if h not in before[id(lg)]]:
                lg.removeHandler(handler)
                handler.close()
        d2_logger.setup_logger.cache_clear()
    if results and "small_val" not in results:  # one test set: detectron2 unwraps it
        results = {"small_val": results}
    return InProcessRun(results, log.getvalue())
