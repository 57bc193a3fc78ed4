"""Count the operations of one training step that force a device-to-host sync on CUDA (see
tools/sync_counter.py for what counts), for a config and for stock detectron2 with the same
architecture, on the CPU (no GPU needed):

    python -m tools.count_syncs --config-file configs/Synthetic/mask_rcnn_R18_FPN_seesaw.yaml
    python -m tools.count_syncs --config-file CONFIG --where [KEY VALUE ...]

One step = forward, sum of the losses, backward and optimizer step of a model built from the
config (randomly initialized: MODEL.WEIGHTS is not loaded, learning rate 0, so that the stock
model, built with the same seed, sees the same proposals), on a batch of synthetic images with
LVIS-like instance counts (tools/gpu_check/throughput.py) after `--warmup` uncounted steps; the
class statistics of the losses come with that batch. The trainer's own logging of the losses
(one read per loss term, as detectron2's SimpleTrainer) is not part of the step. Stock = the
config with detectron2's GeneralizedRCNN and StandardROIHeads, or CascadeROIHeads for cascade
heads (HTC-Lite's included).
"""
import argparse

import torch
from detectron2.config import get_cfg
from detectron2.modeling import ROI_HEADS_REGISTRY, build_model
from detectron2.modeling.roi_heads import CascadeROIHeads
from detectron2.utils.events import EventStorage


from seesaw_ecm import deferred_scalars
from seesaw_ecm.config import add_seesaw_ecm_config, merge_config
from seesaw_ecm.engine import Trainer

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
    with EventStorage(), deferred_scalars.defer_cpu_tensors():  # as the GPU would
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


def count_config(cfg, images=2, warmup=1):
    """(SyncCounter of `cfg`, SyncCounter of its stock_config) for one step on the same batch."""
    cfg = step_config(cfg, images)
    batch = synthetic_inputs(cfg, images)
    return count_training_step(cfg, batch, warmup), count_training_step(
        stock_config(cfg), batch, warmup)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="the config to count")
    parser.add_argument("--images", type=int, default=2, help="images per batch (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted steps first")
    parser.add_argument("--where", action="store_true",
                        help="list every sync with its source location")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
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
