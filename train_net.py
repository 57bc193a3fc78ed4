#!/usr/bin/env python
"""Train / evaluate seesaw_ecm models with detectron2 (single process, multi-GPU, multi-machine).

    python train_net.py --config-file configs/Synthetic/mask_rcnn_R18_FPN_ce.yaml
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
    python train_net.py --config-file ... --num-gpus 2          # 2 processes (GLOO on CPU)
    torchrun --nproc-per-node 8 --nnodes 2 ... train_net.py --config-file ...  # or torchrun
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS ... \\
        TEST.AP_FIXED.ENABLED True TEST.AP_POOL True TEST.BOUNDARY_AP True  # more LVIS metrics
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS ... \\
        TEST.AUG.ENABLED True TEST.AUG.MIN_SIZES "(400, 500, 600)" TEST.AUG.FLIP True  # + TTA
    python train_net.py --config-file ... --dataset mine=/data/mine.json:/data/images \\
        DATASETS.TRAIN "('mine',)" DATASETS.TEST "('mine',)"
"""
import logging
import os
import sys

import torch
from torch.multiprocessing import ProcessExitedException

import detectron2.utils.comm as comm
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils.logger import setup_logger

from seesaw_ecm import add_seesaw_ecm_config
from seesaw_ecm.checkpoint import AtomicCheckpointer, check_weights_file
from seesaw_ecm.config import merge_config
from seesaw_ecm.data.datasets import register_from_cfg
from seesaw_ecm.distributed import launch, report_error, sync_bn_on_cpu
from seesaw_ecm.engine import Trainer, format_summary, per_dataset
from seesaw_ecm.errors import SeesawEcmError
from seesaw_ecm.validation import validate_run


def load_config(args):
    """detectron2's config with seesaw_ecm's keys, merged from the arguments; a bad file, key,
    value or argument order raises SeesawEcmError."""
    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    merge_config(cfg, args.config_file, args.opts)
    return cfg


def setup(args):
    cfg = load_config(args)
    cfg.DATASETS.LVIS_FORMAT = list(cfg.DATASETS.LVIS_FORMAT) + list(args.dataset)
    cfg.DATASETS.OPENIMAGES = list(cfg.DATASETS.OPENIMAGES) + list(args.openimages_dataset)
    if args.eval_only:  # class statistics (ECM margins) come with the weights
        cfg.MODEL.LONG_TAIL.STATISTICS_FROM = "checkpoint"
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        print("No GPU available: running on the CPU.")
        cfg.MODEL.DEVICE = "cpu"
    sync_bn_on_cpu(cfg)
    cfg.freeze()
    register_from_cfg(cfg)
    # every dataset and the config checked before anything is built or written to OUTPUT_DIR
    seconds = validate_run(cfg, eval_only=args.eval_only)
    check_weights_file(cfg, args.eval_only, args.resume)  # none to evaluate, missing, corrupted
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="seesaw_ecm")
    logging.getLogger("seesaw_ecm").info(f"Config and datasets validated in {seconds:.1f} s")
    if cfg.MODEL.DEVICE == "cpu" and comm.get_local_size() > 1:
        # several CPU processes on one machine: share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // comm.get_local_size()))
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR, strict=True).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:  # as detectron2's tools/train_net.py (in training: a hook)
            results = {**per_dataset(cfg, results), **Trainer.test_with_TTA(cfg, model)}
    else:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        results = trainer.train()
    if comm.is_main_process() and results:
        logging.getLogger("seesaw_ecm").info(
            "Summary:\n" + format_summary(per_dataset(cfg, results)))
    return results


def main_reporting_errors(args):
    """main(), with bad input (SeesawEcmError) reported as one clear message, no traceback."""
    try:
        return main(args)
    except SeesawEcmError as e:
        report_error(e)
        sys.exit(2)


def build_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--dataset", action="append", default=[], metavar="NAME=JSON:IMAGE_ROOT",
        help="register an LVIS-format dataset under NAME (repeatable); then use NAME in "
        "DATASETS.TRAIN / DATASETS.TEST",
    )
    parser.add_argument(
        "--openimages-dataset", action="append", default=[],
        metavar="NAME=BOXES_CSV:LABELS_CSV:CLASSES_CSV:HIERARCHY_JSON:IMAGE_ROOT[:SIZES_CSV]",
        help="register an Open Images dataset from the official challenge files (repeatable)",
    )
    return parser


if __name__ == "__main__":
    args = build_parser().parse_args()
    print("Command Line Args:", args)
    try:  # config errors: one message here, before any process starts
        load_config(args)
    except SeesawEcmError as e:
        report_error(e)
        sys.exit(2)
    try:  # --num-gpus processes meeting at --dist-url, or one rank of torchrun / SLURM's
        launch(main_reporting_errors, args)
    except ProcessExitedException as e:  # a worker already reported its error
        sys.exit(e.exit_code)
    except SeesawEcmError as e:  # launcher flags that contradict torchrun's
        report_error(e)
        sys.exit(2)
