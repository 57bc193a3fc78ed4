"""GPU check, training section: the whole path on the device. A small synthetic LVIS-format set
(seesaw_ecm.data.synthetic_lt), train_net.py with the built-in Seesaw config
(configs/Synthetic/mask_rcnn_R18_FPN_seesaw.yaml: dataset registration, Trainer, checkpoints,
evaluation with the fast LVIS evaluator), then tools.export_model (weights, config,
TorchScript, each checked against the checkpoint's predictions on the device)."""
import json
import os
import statistics
import subprocess
import sys
import time

from seesaw_ecm.data.synthetic_lt import generate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = "configs/Synthetic/mask_rcnn_R18_FPN_seesaw.yaml"
NUM_CLASSES = 12
SIZES = {  # synthetic images, iterations, images per batch, data-loader workers
    "full": dict(train_images=320, val_images=48, iters=300, batch=4, workers=4),
    "tiny": dict(train_images=160, val_images=8, iters=6, batch=2, workers=0),
}


def _run(cmd, log_file, deadline):
    """Run `cmd` from the checkout with its output in `log_file`; raise with the output's end
    if it fails or passes `deadline`."""
    with open(log_file, "w") as log:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc = None
    if proc is None or proc.returncode != 0:
        tail = open(log_file).read()[-3000:]
        what = "timed out" if proc is None else f"exit {proc.returncode}"
        raise RuntimeError(f"{' '.join(cmd[:3])} ... {what}:\n{tail}")


def run(device, tiny, work, deadline):
    """The section: {"iterations", "s_per_iter", "evaluation", "checkpoints", "export"}."""
    size = SIZES["tiny" if tiny else "full"]
    data = generate(os.path.join(work, "synthetic"), num_classes=NUM_CLASSES,
                    train_images=size["train_images"], val_images=size["val_images"],
                    image_size=128, seed=0)
    out = os.path.join(work, "train")
    _run([sys.executable, "train_net.py", "--config-file", CONFIG,
          "--dataset", f"gpu_check_train={data['train_json']}:{data['image_root']}",
          "--dataset", f"gpu_check_val={data['val_json']}:{data['image_root']}",
          "DATASETS.TRAIN", "('gpu_check_train',)", "DATASETS.TEST", "('gpu_check_val',)",
          "MODEL.ROI_HEADS.NUM_CLASSES", str(NUM_CLASSES), "MODEL.DEVICE", device.type,
          "SOLVER.IMS_PER_BATCH", str(size["batch"]), "SOLVER.MAX_ITER", str(size["iters"]),
          "SOLVER.BASE_LR", "0.005", "SOLVER.WARMUP_ITERS", str(size["iters"] // 3),
          "SOLVER.CHECKPOINT_PERIOD", str(size["iters"] // 2),
          "DATALOADER.NUM_WORKERS", str(size["workers"]), "TEST.DETECTIONS_PER_IMAGE", "50",
          # every detection kept, so that evaluation and the export's parity check have boxes
          # and masks to work on even after a few iterations
          "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "OUTPUT_DIR", out],
         os.path.join(work, "train_log.txt"), deadline)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.json"))]
    train = [r for r in rows if "total_loss" in r]
    times = [r["time"] for r in train if "time" in r]
    evaluation = next(r for r in reversed(rows) if "bbox/AP" in r)
    zoo = os.path.join(work, "zoo")
    _run([sys.executable, "-m", "tools.export_model", "--name", "gpu_check_seesaw",
          "--output-dir", out, "--zoo-dir", zoo, "--table", os.path.join(zoo, "MODEL_ZOO.md"),
          "--num-images", "2", "--device", device.type, "--torchscript"],
         os.path.join(work, "export_log.txt"), deadline)
    info = json.load(open(os.path.join(zoo, "gpu_check_seesaw_metrics.json")))
    return {
        "config": CONFIG,
        "iterations": train[-1]["iteration"] + 1,
        "images_per_batch": size["batch"],
        "s_per_iter": statistics.median(times) if times else None,
        "final_total_loss": train[-1]["total_loss"],
        "evaluation": {k: v for k, v in evaluation.items() if k.startswith(("bbox/", "segm/"))},
        "checkpoints": sorted(f for f in os.listdir(out) if f.endswith(".pth")),
        "export": {fmt: f["name"] for fmt, f in info["files"].items()},
    }
