"""Where the CPU time of one training iteration goes, and the per-iteration speed of a config
against a baseline config, both trained in this one process.

Each config is built as train_net.py builds it (Trainer.build_model / build_optimizer /
build_train_loader) and trains with its own data loader and real learning rate; iterations
alternate between the configs (round-robin, order rotated every round). The parts are timed
with forward hooks on the model's modules (wall time, so the table adds up):

  data        next(data loader): reading, decoding, augmentation, collation
  backbone    model.backbone (ResNet + FPN)
  rpn         model.proposal_generator: anchors, objectness, proposals, RPN losses
  box head    ROI heads' box pooler + box head + box predictor forward (all cascade stages)
  mask head   ROI heads' mask pooler + mask head forward, mask loss included
  roi other   the rest of the ROI heads: proposal sampling, box / class losses, mask targets
  model other the rest of the model forward: normalisation, padding, GT moved to the device
  backward    loss.backward() (all parts together: autograd does not say which module)
  step        optimizer.step() (+ global-norm clipping if set) + zero_grad + LR scheduler

With --eval-images N the first N test images are also run through inference (backbone, rpn,
ROI heads timed the same way) and the config's evaluator (process + evaluate); the table gives
seconds per image, and the evaluate call on those N images.

    python -m benchmarks.profile_iteration \\
        --config-file configs/Demo/mask_rcnn_R18_FPN_seesaw.yaml \\
        --baseline configs/Synthetic/mask_rcnn_R18_FPN_seesaw.yaml [--iters 20] [--warmup 3] \\
        [--eval-images 40] [--json out.json]

Ratios are the median over rounds of (config time / baseline time in that round), so drifts
of the machine cancel; nothing here asserts a speed (docs/BENCHMARKS.md records the output).
"""
import argparse
import itertools
import json
import os
import statistics
import sys
import time
from collections import defaultdict

import torch
from detectron2.config import get_cfg
from detectron2.utils.events import EventStorage
from tabulate import tabulate

from seesaw_ecm import add_seesaw_ecm_config
from seesaw_ecm.data.datasets import register_from_cfg
from seesaw_ecm.engine import Trainer

from benchmarks.train_speed import round_robin

TRAIN_PARTS = ("data", "backbone", "rpn", "box head", "mask head", "roi other", "model other",
               "backward", "step")
# part -> attribute paths of the modules whose forward time it sums (absent ones are skipped)
HOOKED = {
    "backbone": ("backbone",),
    "rpn": ("proposal_generator",),
    "box head": ("roi_heads.box_pooler", "roi_heads.box_head", "roi_heads.box_predictor"),
    "mask head": ("roi_heads.mask_pooler", "roi_heads.mask_head"),
    "roi heads": ("roi_heads",),
}


def load_cfg(config_file, opts=()):
    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    register_from_cfg(cfg)
    return cfg


def _resolve(model, path):
    mod = model
    for name in path.split("."):
        mod = getattr(mod, name, None)
        if mod is None:
            return []
    return list(mod) if isinstance(mod, torch.nn.ModuleList) else [mod]


class PartTimer:
    """Forward-hook wall clock per part of a detectron2 R-CNN (see HOOKED)."""

    def __init__(self, model):
        self.seconds = defaultdict(float)
        self._start = {}
        for part, paths in HOOKED.items():
            for mod in itertools.chain.from_iterable(_resolve(model, p) for p in paths):
                mod.register_forward_pre_hook(self._pre(part, mod))
                mod.register_forward_hook(self._post(part, mod))

    def _pre(self, part, mod):
        def hook(*_):
            self._start[(part, id(mod))] = time.perf_counter()
        return hook

    def _post(self, part, mod):
        def hook(*_):
            self.seconds[part] += time.perf_counter() - self._start.pop((part, id(mod)))
        return hook

    def take(self):
        out, self.seconds = dict(self.seconds), defaultdict(float)
        return out


class Case:
    """One config: model, optimizer, data loader; step() times one training iteration."""

    def __init__(self, name, cfg):
        torch.manual_seed(cfg.SEED if cfg.SEED >= 0 else 0)
        self.name, self.cfg = name, cfg
        self.model = Trainer.build_model(cfg)
        self.model.train()
        self.optimizer = Trainer.build_optimizer(cfg, self.model)
        self.scheduler = Trainer.build_lr_scheduler(cfg, self.optimizer)  # the warm-up too
        self.data = iter(Trainer.build_train_loader(cfg))
        self.timer = PartTimer(self.model)
        self.storage = EventStorage(0)

    def step(self):
        t0 = time.perf_counter()
        batch = next(self.data)
        t1 = time.perf_counter()
        with self.storage:
            losses = sum(self.model(batch).values())
        t2 = time.perf_counter()
        losses.backward()
        t3 = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.scheduler.step()
        t4 = time.perf_counter()
        self.storage.iter += 1
        hooked = self.timer.take()
        roi = hooked.pop("roi heads", 0.0)
        parts = {"data": t1 - t0, "backward": t3 - t2, "step": t4 - t3, **hooked}
        parts["roi other"] = roi - hooked.get("box head", 0.0) - hooked.get("mask head", 0.0)
        parts["model other"] = (t2 - t1) - roi - hooked.get("backbone", 0.0) - hooked.get(
            "rpn", 0.0)
        parts["total"] = t4 - t0
        return parts

    def evaluate(self, n_images):
        """Seconds per image of inference (total and per part) on the first n test images, and
        the seconds of the evaluator's process() per image and evaluate() on them."""
        cfg = self.cfg
        name = cfg.DATASETS.TEST[0]
        evaluator = Trainer.build_evaluator(cfg, name, output_folder="")
        evaluator.reset()
        self.model.eval()
        total, process, seen = 0.0, 0.0, 0
        with torch.no_grad():
            for inputs in itertools.islice(Trainer.build_test_loader(cfg, name), n_images):
                t0 = time.perf_counter()
                outputs = self.model(inputs)
                t1 = time.perf_counter()
                evaluator.process(inputs, outputs)
                total += t1 - t0
                process += time.perf_counter() - t1
                seen += len(inputs)
        t0 = time.perf_counter()
        evaluator.evaluate()
        evaluate = time.perf_counter() - t0
        self.model.train()
        hooked = self.timer.take()
        roi = hooked.pop("roi heads", 0.0)
        out = {k: v / seen for k, v in hooked.items()}
        out["roi heads"] = roi / seen
        out["inference"] = total / seen
        out["evaluator process"] = process / seen
        out["evaluate (all images)"] = evaluate
        out["images"] = seen
        return out


def profile(cases, warmup, iters):
    """Per case: median seconds of each part over the timed rounds (train_speed.round_robin's);
    and per case the median of per-round (total / total of cases[0])."""
    rows = round_robin(cases, warmup, iters)
    base = [parts["total"] for parts in rows[cases[0].name]]
    out = {}
    for c in cases:
        r = rows[c.name]
        out[c.name] = {k: statistics.median(parts[k] for parts in r) for k in r[0]}
        out[c.name]["ratio"] = statistics.median(p["total"] / b for p, b in zip(r, base))
    return out


def format_table(result):
    """Markdown table: per part (rows) the median ms of each case, and the part's share of the
    last case's total; a last row with each case's ratio to the first."""
    names = list(result)
    last = result[names[-1]]
    rows = [[part] + [f"{1000 * result[n].get(part, 0.0):.0f}" for n in names]
            + [f"{100 * last.get(part, 0.0) / last['total']:.0f}%"]
            for part in TRAIN_PARTS + ("total",)]
    rows.append([f"ratio to {names[0]}"] + [f"{result[n]['ratio']:.3f}" for n in names] + [""])
    head = ["part"] + [f"{n} (ms)" for n in names] + [f"share of {names[-1]}"]
    return tabulate(rows, headers=head, tablefmt="github", disable_numparse=True)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--baseline", help="config to compare with (timed in the same rounds)")
    parser.add_argument("--iters", type=int, default=20, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--eval-images", type=int, default=0)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="overrides for --config-file (not the baseline), KEY VALUE ...")
    args = parser.parse_args(argv)
    cases = []
    if args.baseline:
        cases.append(Case(f"baseline {os.path.basename(args.baseline)}", load_cfg(args.baseline)))
    cases.append(Case(os.path.basename(args.config_file), load_cfg(args.config_file, args.opts)))
    print(f"torch threads: {torch.get_num_threads()}; {args.iters} rounds after {args.warmup} "
          "warm-up, median seconds per iteration")
    result = profile(cases, args.warmup, args.iters)
    print(format_table(result))
    report = {"command": sys.argv, "threads": torch.get_num_threads(), "train": result}
    if args.eval_images:
        report["eval"] = {c.name: c.evaluate(args.eval_images) for c in cases}
        for name, ev in report["eval"].items():
            print(f"eval {name}: " + ", ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in ev.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
