"""Count the operations of one training step that force a device-to-host sync on CUDA (see
tools/sync_counter.py for what counts), for a config and for stock detectron2 with the same
architecture, on the CPU (no GPU needed):

    python -m tools.count_syncs --config-file configs/Synthetic/mask_rcnn_R18_FPN_seesaw.yaml
    python -m tools.count_syncs --config-file CONFIG --where [KEY VALUE ...]
    python -m tools.count_syncs --table     # every loss with every head, tiny configs

One step = forward, sum of the losses, backward and optimizer step of a model built from the
config (randomly initialized: MODEL.WEIGHTS is not loaded, learning rate 0, so that the stock
model, built with the same seed, sees the same proposals), on a batch of synthetic images with
LVIS-like instance counts (tools/gpu_check/throughput.py) after `--warmup` uncounted steps; the
class statistics of the losses come with that batch. Scalars the model keeps on the device
(seesaw_ecm/deferred_scalars.py) stay pending in the step, as on a GPU; the trainer's own
logging of the losses (one read per loss term, as detectron2's SimpleTrainer) is not part of
the step, nor MODEL.LONG_TAIL.TRAINABLE (the model is detectron2's build_model's). Stock = the
config with detectron2's GeneralizedRCNN and StandardROIHeads, or CascadeROIHeads for cascade
heads (HTC-Lite's included).
"""
import argparse
from unittest import mock

import torch
from detectron2.config import get_cfg
from detectron2.modeling import ROI_HEADS_REGISTRY, build_model
from detectron2.modeling.roi_heads import CascadeROIHeads
from detectron2.utils.events import EventStorage

from seesaw_ecm import deferred_scalars
from seesaw_ecm.config import add_seesaw_ecm_config, merge_config
from seesaw_ecm.engine import Trainer
from seesaw_ecm.losses import seesaw as seesaw_loss

from tools.sync_counter import SyncCounter


def stock_config(cfg):
    """A copy of `cfg` with detectron2's own meta-architecture and ROI heads of the same shape:
    CascadeROIHeads for cascade heads, StandardROIHeads otherwise."""
    stock = cfg.clone()
    stock.defrost()
    cascade = issubclass(ROI_HEADS_REGISTRY.get(cfg.MODEL.ROI_HEADS.NAME), CascadeROIHeads)
    stock.MODEL.ROI_HEADS.NAME = "CascadeROIHeads" if cascade else "StandardROIHeads"
    stock.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    return stock


def step_config(cfg, images):
    """`cfg` made ready for a counted step: CPU, no weights, learning rate 0, `images` per batch,
    the synthetic statistics dataset as DATASETS.TRAIN (which it registers)."""
    from tools.gpu_check.throughput import register_statistics

    cfg = cfg.clone()
    cfg.defrost()
    data = register_statistics(cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "SOLVER.BASE_LR", 0.0,
                         "SOLVER.IMS_PER_BATCH", images, "DATASETS.TRAIN", (data["dataset"],),
                         "OUTPUT_DIR", ""])
    return cfg


def synthetic_inputs(cfg, images, seed=0):
    """`images` training inputs at cfg's training size (short side INPUT.MIN_SIZE_TRAIN[0])."""
    from tools.gpu_check.throughput import synthetic_batch

    short = cfg.INPUT.MIN_SIZE_TRAIN[0]
    long = min(cfg.INPUT.MAX_SIZE_TRAIN, round(short * 4 / 3))
    return synthetic_batch(images, cfg.MODEL.ROI_HEADS.NUM_CLASSES, short, (short, long), seed)


def count_training_step(cfg, batch, warmup=1):
    """A SyncCounter of one training step of the model `cfg` builds, on `batch`, after `warmup`
    steps that are not counted. The model is built with seed 0 (as its stock counterpart)."""
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    optimizer = Trainer.build_optimizer(cfg, model)
    counter = SyncCounter()
    # as on a GPU: metrics kept on the device, and the losses' accelerator paths (Seesaw's class
    # term on every row instead of selecting the foreground rows, free only on the CPU)
    with EventStorage(), deferred_scalars.defer_cpu_tensors(), \
            mock.patch.object(seesaw_loss, "_select_rows", lambda device: False):
        for i in range(warmup + 1):
            if i == warmup:
                counter.__enter__()
            try:
                losses = sum(model(batch).values())
                optimizer.zero_grad()
                losses.backward()
                optimizer.step()
            finally:
                if i == warmup:
                    counter.__exit__(None, None, None)
    return counter


def count_config(cfg, images=2, warmup=1, stock_counts=None):
    """(SyncCounter of `cfg`, SyncCounter of its stock_config) for one step on the same batch.
    stock_counts: a dict that keeps the stock counters by ROI heads name, to count each once
    (for configs of the same base and batch)."""
    cfg = step_config(cfg, images)
    batch = synthetic_inputs(cfg, images)
    stock_cfg = stock_config(cfg)
    stock_counts = {} if stock_counts is None else stock_counts
    name = stock_cfg.MODEL.ROI_HEADS.NAME
    if name not in stock_counts:
        stock_counts[name] = count_training_step(stock_cfg, batch, warmup)
    return count_training_step(cfg, batch, warmup), stock_counts[name]


HEADS = ("mask_rcnn", "cascade", "htc_lite")  # --table's columns; LOCE's loss has its own heads


def grid_config(arch, loss, num_classes=12):
    """The tiny synthetic config of `loss` with `arch` (one of HEADS; LOCE's heads for "loce"),
    as benchmarks.train_speed builds its models (HTC-Lite with its context encoder)."""
    from benchmarks import train_speed
    from benchmarks.harness import HTC_LITE_OPTS

    cascade = arch in ("cascade", "htc_lite")
    cfg = train_speed.make_cfg("cascade" if cascade else "mask_rcnn", loss, "cpu",
                               {"num_classes": num_classes, "dataset": "unused"})
    if arch == "htc_lite":
        cfg.merge_from_list(list(HTC_LITE_OPTS) + ["MODEL.HTC_LITE.CONTEXT", True])
    return cfg


def print_table(images, warmup):
    """Syncs per step of every loss with every head (grid_config) and of stock, as a table."""
    from benchmarks.harness import LOSSES
    from tabulate import tabulate

    rows, stock_counts = [], {}
    for loss in LOSSES:
        row = [loss]
        for arch in HEADS:
            if loss != "loce" or arch == "mask_rcnn":
                model, stock = count_config(grid_config(arch, loss), images, warmup,
                                            stock_counts)
                row.append(f"{model.total} ({stock.total})")
            else:
                row.append("-")
        rows.append(row)
    print(f"syncs per training step (stock detectron2's in parentheses), tiny synthetic "
          f"configs, {images} images")
    print(tabulate(rows, headers=["loss"] + [f"{h} (LOCE heads for loce)" if h == "mask_rcnn"
                                             else h for h in HEADS], tablefmt="github"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", help="the config to count")
    parser.add_argument("--table", action="store_true",
                        help="instead, every loss with every head on tiny synthetic configs")
    parser.add_argument("--images", type=int, default=2, help="images per batch (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted steps first")
    parser.add_argument("--where", action="store_true",
                        help="list every sync with its source location")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    if args.table:
        return print_table(args.images, args.warmup)
    if not args.config_file:
        parser.error("give --config-file (or --table)")
    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    merge_config(cfg, args.config_file, args.opts)
    model, stock = count_config(cfg, args.images, args.warmup)
    ops = sorted(set(model.by_op()) | set(stock.by_op()))
    print(f"syncs per training step: {args.config_file} {model.total}, stock detectron2 "
          f"({stock_config(cfg).MODEL.ROI_HEADS.NAME}) {stock.total}")
    print(f"{'operation':<44}{'config':>8}{'stock':>8}")
    for op in ops:
        print(f"{op:<44}{model.by_op().get(op, 0):>8}{stock.by_op().get(op, 0):>8}")
    if args.where:
        print("\nconfig, by location:\n" + model.table())
        print("\nconfig - stock, where they differ:\n" + model.table(model.difference(stock)))


if __name__ == "__main__":
    main()
