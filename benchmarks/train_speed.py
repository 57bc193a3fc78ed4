"""Seconds per training iteration (forward + backward + optimizer step) of each long-tail loss
against stock detectron2 Mask R-CNN (StandardROIHeads + FastRCNNOutputLayers, softmax CE),
measured in one process, plus the peak memory of each.

Every model is the stock config (configs/Synthetic/mask_rcnn_R18_FPN_ce.yaml, or its cascade
with detectron2's CascadeROIHeads) with only the box predictor changed: LongTailROIHeads /
LongTailCascadeROIHeads with MODEL.LONG_TAIL.LOSS set (and OBJECTNESS for Seesaw; classifier
as the loss's default). All models train on the same batch (IMS_PER_BATCH images of a small
generated synthetic set, mapped once), timed round-robin, the order rotated every round to
cancel drift; the ratio is the median over rounds of (model time / stock time in that round).
The learning rate is 0: the optimizer step still runs in full, but the weights that all models
share (backbone and RPN: same seed, built first) stay equal, so every model gets the same
proposals and the same number of foreground RoIs, and the ratio measures the predictor and its
loss, not a workload that drifts apart as each model trains.
With --gradient-balance every model also runs with the gradient-balance recorder attached.
tools/gpu_check/throughput.py reuses this machinery at LVIS scale (another base config, mixed
precision: ``Case(amp=True)``).

Peak memory: on CUDA, per model, the largest torch.cuda.max_memory_allocated of its timed
iterations less what the other models hold (the peak of a process holding that model alone);
on the CPU the peak resident set size (VmHWM) of a fresh subprocess per model over 3 training
iterations, reset after the model is built (it includes the ~0.8 GiB of Python, torch,
detectron2, the model and the data), and that peak minus the RSS before training.

    python -m benchmarks.train_speed [--device cuda] [--archs mask_rcnn cascade] \\
        [--losses ce seesaw ecm] [--repeats 20] [--gradient-balance] [--memory]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from tabulate import tabulate

from seesaw_ecm import add_seesaw_ecm_config
from seesaw_ecm.data.datasets import register_lvis_format
from seesaw_ecm.data.synthetic_lt import ensure_generated
from seesaw_ecm.engine import Trainer
from seesaw_ecm.gradient_balance import GradientBalance, attach, box_predictors

from benchmarks.harness import CASCADE_OPTS, LOSSES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STOCK = "configs/Synthetic/mask_rcnn_R18_FPN_ce.yaml"
# Losses that need ROI heads of their own: LOCE's replay memory (Mask R-CNN only; it has no
# cascade heads, so case_specs leaves out its cascade row).
HEADS_OF = {"loce": "LOCEROIHeads"}
DATASET = "train_speed_synthetic"


def make_cfg(arch, loss, device, data, base=STOCK, opts=()):
    """The stock config (`base` + `opts`), or with `loss` the same with the long-tail predictor."""
    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    cfg.merge_from_file(base)
    cfg.merge_from_list(list(opts))
    if arch == "cascade":
        cfg.merge_from_list(list(CASCADE_OPTS))
        cfg.MODEL.ROI_HEADS.NAME = "CascadeROIHeads"
    if loss is not None:
        cascade = cfg.MODEL.ROI_HEADS.NAME == "CascadeROIHeads"
        cfg.MODEL.ROI_HEADS.NAME = HEADS_OF.get(loss) or (
            "LongTailCascadeROIHeads" if cascade else "LongTailROIHeads")
        cfg.MODEL.LONG_TAIL.LOSS = loss
        cfg.MODEL.LONG_TAIL.OBJECTNESS = loss == "seesaw"
    cfg.MODEL.DEVICE = device
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = data["num_classes"]
    cfg.DATASETS.TRAIN = (data["dataset"],)
    cfg.OUTPUT_DIR = ""
    # A zero rate: the optimizer step still runs in full, but the weights stay at their
    # (seeded, shared) initial values. With any rate > 0 each model's backbone and RPN drift
    # their own way on the one batch, the number of foreground RoIs reaching the mask head
    # drifts with them (+-10% after 15 steps, measured), and that workload difference, not
    # the loss, dominated the ratios (Seesaw read 1.035-1.046x at 1e-4).
    cfg.SOLVER.BASE_LR = 0.0
    return cfg


def prepare_data(data_dir, num_classes):
    paths = ensure_generated(data_dir, num_classes=num_classes, train_images=400, val_images=8,
                             image_size=128, seed=0)
    if DATASET not in DatasetCatalog.list():
        register_lvis_format(DATASET, paths["train_json"], paths["image_root"])
    return {"num_classes": num_classes, "dataset": DATASET}


def make_batch(cfg, n):
    """The first n training images with at least 2 objects, mapped by DatasetMapper (train)."""
    torch.manual_seed(0)
    np.random.seed(0)  # detectron2's random flip draws from numpy
    mapper = DatasetMapper(cfg, is_train=True)
    dicts = [d for d in DatasetCatalog.get(DATASET) if len(d["annotations"]) >= 2][:n]
    return [mapper(d) for d in dicts]


def batch_to(batch, device):
    return [{k: (v.to(device) if hasattr(v, "to") else v) for k, v in d.items()} for d in batch]


class Case:
    """One model + optimizer; ``step()`` runs one timed training iteration. With `amp`, the
    forward runs under autocast (float16 with detectron2 AMPTrainer's gradient scaling on CUDA,
    bfloat16 on the CPU). On CUDA ``peak_mib`` is the largest peak of its iterations, less the
    memory that other objects held (see the module docstring)."""

    def __init__(self, name, cfg, batch, gradient_balance=False, amp=False):
        torch.manual_seed(0)
        self.name, self.batch = name, batch
        self.model = build_model(cfg)
        self.model.train()
        self.optimizer = Trainer.build_optimizer(cfg, self.model)
        self.device = torch.device(cfg.MODEL.DEVICE)
        cuda = self.device.type == "cuda"
        self.amp = amp
        self.amp_dtype = torch.float16 if cuda else torch.bfloat16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp and cuda)
        self.peak_mib = 0.0 if cuda else None
        self.balance = None
        if gradient_balance:
            predictors = box_predictors(self.model)
            self.balance = GradientBalance(predictors[0].num_classes, len(predictors))
            attach(predictors, self.balance)
        self.iter = 0

    def step(self):
        self._sync()
        if self.peak_mib is not None:
            torch.cuda.reset_peak_memory_stats()
            others = torch.cuda.memory_allocated() - self._held_bytes()
        start = time.perf_counter()
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            losses = sum(self.model(self.batch).values())
        self.optimizer.zero_grad()
        self.scaler.scale(losses).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.iter += 1
        if self.balance is not None and self.iter % 20 == 0:
            self.balance.sync(self.device)  # as the hook does every PERIOD iterations
        self._sync()
        seconds = time.perf_counter() - start
        if self.peak_mib is not None:
            peak = (torch.cuda.max_memory_allocated() - others) / 2**20
            self.peak_mib = max(self.peak_mib, peak)
        return seconds

    def _held_bytes(self):
        """Bytes this case keeps between iterations: weights and optimizer state."""
        tensors = list(self.model.parameters()) + list(self.model.buffers()) + [
            t for state in self.optimizer.state.values() for t in state.values()
            if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors if t.is_cuda)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def case_specs(archs, losses, gradient_balance):
    """[(name, arch, loss or None for stock, gradient balance on)]"""
    specs = []
    for arch in archs:
        for loss in [None] + list(losses):
            if loss in HEADS_OF and arch != "mask_rcnn":
                continue
            name = f"{arch} {'stock' if loss is None else loss}"
            specs.append((name, arch, loss, False))
            if gradient_balance:
                specs.append((name + " +gb", arch, loss, True))
    return specs


def round_robin(cases, warmup, repeats, deadline=None):
    """{case name: [what case.step() returned in each timed round]}: every round steps each
    case once, the order rotated every round so that drifts of the machine hit all cases
    alike; the `warmup` rounds are not kept. With `deadline` (a time.monotonic() value), no new
    round starts after it once one round has been timed."""
    results = {c.name: [] for c in cases}
    for rnd in range(warmup + repeats):
        if deadline is not None and rnd > warmup and time.monotonic() > deadline:
            break
        order = cases[rnd % len(cases):] + cases[: rnd % len(cases)]
        for case in order:
            result = case.step()
            if rnd >= warmup:
                results[case.name].append(result)
    return results


def time_cases(cases, warmup, repeats, stock_of, deadline=None):
    """Median seconds per iteration of each case and median of per-round ratios to its stock
    (rounds as round_robin's)."""
    times = round_robin(cases, warmup, repeats, deadline)
    out = {}
    for c in cases:
        ratios = [t / s for t, s in zip(times[c.name], times[stock_of[c.name]])]
        out[c.name] = (statistics.median(times[c.name]), statistics.median(ratios))
    return out


def peak_memory(spec, args):
    """(peak RSS, peak RSS - RSS before training) in MiB of one case over 3 iterations, in a
    subprocess (see the module docstring)."""
    cmd = [sys.executable, "-m", "benchmarks.train_speed", "--memory-of", json.dumps(spec),
           "--data-dir", os.path.abspath(args.data_dir), "--num-classes", str(args.num_classes)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    before, peak = map(float, proc.stdout.strip().splitlines()[-1].split())
    return peak, peak - before


def _status_mib(field):
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


def memory_of(spec, args):
    """Subprocess mode: build one case, then reset the peak RSS (Linux clear_refs) and train 3
    iterations; print "RSS before training, peak RSS while training" in MiB."""
    cfg = make_cfg(spec[1], spec[2], "cpu", args.data)
    case = Case(spec[0], cfg, make_batch(cfg, cfg.SOLVER.IMS_PER_BATCH), spec[3])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _status_mib("VmRSS")
    with EventStorage():
        for _ in range(3):
            case.step()
    print(before, _status_mib("VmHWM"))


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--archs", nargs="+", default=["mask_rcnn"],
                        choices=["mask_rcnn", "cascade"])
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--gradient-balance", action="store_true",
                        help="also time every model with the gradient-balance recorder on")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory")
    parser.add_argument("--num-classes", type=int, default=60)
    parser.add_argument("--data-dir", default="output/train_speed_data")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    args.data = prepare_data(args.data_dir, args.num_classes)
    if args.memory_of:
        return memory_of(json.loads(args.memory_of), args)

    specs = case_specs(args.archs, args.losses, args.gradient_balance)
    cfg0 = make_cfg(args.archs[0], None, args.device, args.data)
    batch = make_batch(cfg0, cfg0.SOLVER.IMS_PER_BATCH)
    batch = batch_to(batch, args.device)
    stock_of = {name: f"{arch} stock" for name, arch, _, _ in specs}
    with EventStorage():
        cases = [Case(name, make_cfg(arch, loss, args.device, args.data), batch, gb)
                 for name, arch, loss, gb in specs]
        result = time_cases(cases, args.warmup, args.repeats, stock_of)
    if args.device == "cuda":
        memory = {c.name: (c.peak_mib, None) for c in cases} if args.memory else {}
    del cases
    if args.device == "cpu":
        memory = {s[0]: peak_memory(s, args) for s in specs} if args.memory else {}

    device = torch.cuda.get_device_name() if args.device == "cuda" else (
        f"cpu, {torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, {device}; batch {cfg0.SOLVER.IMS_PER_BATCH} images of "
          f"{cfg0.INPUT.MIN_SIZE_TRAIN[0]} px, {args.num_classes} classes, "
          f"{cfg0.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE} RoIs/image; median of {args.repeats} "
          f"rounds after {args.warmup} warm-up")
    head = ["model", "s/iter", "x stock"]
    if memory:
        cuda = args.device == "cuda"
        head += ["peak GPU MiB"] if cuda else ["peak RSS MiB", "of which training MiB"]
    rows = [[name, sec, ratio, *memory.get(name, ())][:len(head)]
            for name, (sec, ratio) in result.items()]
    print(tabulate(rows, headers=head, tablefmt="github",
                   floatfmt=("", ".4f", ".3f", ".0f", ".0f")))


if __name__ == "__main__":
    main()
