"""GPU check, correctness section: every loss, box predictor and mask head computes on the device
what it computes on the CPU (float32), stays finite and close under mixed precision, and the
Seesaw counts are all-reduced on device tensors.

Each comparison is the largest absolute difference over a tensor divided by the largest
absolute value of the reference (CPU float32), over the loss values, the gradients and the
probabilities; it must not exceed TOLERANCE of the dtype compared. On the CPU (rehearsal) the
"device" is the CPU again and mixed precision is bfloat16, so the same code runs everywhere.
"""
import contextlib
import copy
import os
import shutil
import socket
import tempfile
import time
from unittest import mock

import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import multiprocessing as mp
from torch.nn import functional as F

from seesaw_ecm import add_seesaw_ecm_config
from seesaw_ecm.modeling.mask_head import NormedMaskRCNNConvUpsampleHead
from seesaw_ecm.modeling import cls_loss
from seesaw_ecm.modeling.cls_loss import build_cls_loss
from seesaw_ecm.modeling.predictor import LongTailOutputLayers

from benchmarks.harness import LOSSES
from tools.gpu_check.seesaw_rank import labels_for, rank_labels, run_rank

# Largest allowed |device - CPU float32| / max |CPU float32|. float32 with TF32 off: the device
# sums in another order (measured ~1e-6). float16 / bfloat16 (10 / 7 mantissa bits) round every
# matmul input; the largest errors are in the stock mask head's deconv weight gradient (sums of
# 64 x 28 x 28 products whose signs cancel): measured on the CPU at full sizes, 0.040 in float16
# (scaled as below) and up to 0.11 in bfloat16. Each tolerance is about twice that.
TOLERANCE = {"float32": 1e-4, "float16": 8e-2, "bfloat16": 2e-1}
# Under float16 autocast the backward pass is scaled as detectron2's AMPTrainer scales it (a
# torch GradScaler: first scale 2**16, halved after a step with non-finite gradients). Unscaled,
# the stock mask head's deconv weight gradients (~1e-6 behind a predictor initialized with std
# 0.001) underflow float16, 83 % of them to 0 (first GPU run, 2026-12-04: relative error 1.02;
# the same with CPU float16). bfloat16 has float32's range: AMP does not scale it.
LOSS_SCALE = {torch.float16: 2.0 ** 16}
SIZES = {  # RoIs, classes, box feature width, mask RoIs, mask head width
    "full": dict(rois=1024, classes=1203, box_dim=1024, mask_rois=64, mask_dim=256),
    "tiny": dict(rois=256, classes=50, box_dim=256, mask_rois=8, mask_dim=64),
}


def rel_err(value, reference):
    value, reference = value.detach().double().cpu(), reference.detach().double().cpu()
    scale = reference.abs().max().clamp(min=1e-12)
    return float((value - reference).abs().max() / scale)


class Checks:
    """Collects named comparisons: {"name", "dtype", "err", "tol", "passed"}."""

    def __init__(self):
        self.rows = []

    def compare(self, name, dtype, values, references):
        """values, references: dicts of tensors with the same keys; also requires finiteness."""
        err = max(rel_err(values[k], references[k]) for k in references)
        finite = all(bool(torch.isfinite(v).all()) for v in values.values())
        tol = TOLERANCE[dtype]
        self.rows.append(dict(name=name, dtype=dtype, err=err, tol=tol, finite=finite,
                              passed=finite and err <= tol))

    def require(self, name, ok, detail=""):
        self.rows.append(dict(name=name, passed=bool(ok), detail=detail))


def class_counts(num_classes):
    """A long-tailed per-class count vector (LVIS-like: 1,000 down to 1)."""
    return torch.logspace(3, 0, num_classes).round()


def make_loss(name, num_classes):
    """The classification loss `name` as build_cls_loss builds it, with the class statistics
    of a long-tailed set (class_counts) in place of those of a training set."""
    def statistics(cfg, statistic):
        counts = class_counts(num_classes).double().numpy()
        return counts / counts.max() if statistic == "image_frequency" else counts.astype("int64")

    with mock.patch.object(cls_loss, "class_statistics", statistics):
        return build_cls_loss(base_cfg(name, num_classes))


def autocast(device, amp_dtype):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def base_cfg(loss, num_classes):
    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.MODEL.LONG_TAIL.LOSS = loss
    cfg.MODEL.LONG_TAIL.OBJECTNESS = loss == "seesaw"
    if loss == "loce":
        cfg.MODEL.ROI_HEADS.NAME = "LOCEROIHeads"
    return cfg


def fix_sampling(loss, labels):
    """Federated samples its negative classes at random, differently on each device: fix the
    class set (drawn once on the CPU) so both devices compute the same loss."""
    if hasattr(loss, "sample_classes"):
        classes = loss.sample_classes(labels.cpu())
        loss.sample_classes = lambda lab: classes.to(lab.device)


def backward(loss, leaves, amp_dtype):
    """loss.backward() as AMP training runs it: scaled by the largest power of two up to
    LOSS_SCALE[amp_dtype] that leaves every gradient of `leaves` finite (GradScaler's first
    scale, and its back-off); returns the scale to divide the gradients by."""
    scale = LOSS_SCALE.get(amp_dtype, 1.0)
    while True:
        for x in leaves:
            x.grad = None
        (loss * scale).backward(retain_graph=scale > 1)
        if scale <= 1 or all(bool(torch.isfinite(x.grad).all()) for x in leaves
                             if x.grad is not None):
            return scale
        scale /= 2


def loss_outputs(loss, logits, labels, device, amp_dtype=None):
    """Loss terms, d(sum of terms)/d(logits) and probabilities of `loss` on `device`; with
    `amp_dtype` the logits come in that dtype (as from a classifier under autocast)."""
    loss = loss.to(device).train()
    inputs = [x.to(device, amp_dtype or x.dtype).clone().requires_grad_() for x in logits]
    torch.manual_seed(0)  # losses that draw samples (DropLoss, BaGS) draw the same ones
    with autocast(device, amp_dtype):
        terms = loss(*inputs, labels.to(device))
        probs = loss.get_probs(*inputs)
    scale = backward(sum(terms.values()), inputs, amp_dtype)
    out = {k: v.float() for k, v in terms.items()}
    out.update({f"grad{i}": x.grad.float() / scale for i, x in enumerate(inputs)},
               probs=probs.float())
    if hasattr(loss, "cum_samples"):
        out["cum_samples"] = loss.cum_samples
    return out


# Losses that draw random samples on the device of their inputs: one seed gives the same draws
# on one device only, so on CUDA they are checked for finite values against the CPU, and exactly
# against autocast on the same device, as every other loss.
RANDOM_DRAWS = ("droploss", "gol", "bags")


def compare_to_cpu(checks, what, loss_name, device, got, ref):
    """`got` (on `device`) against `ref` (CPU); finite values only for RANDOM_DRAWS on CUDA."""
    if loss_name in RANDOM_DRAWS and device.type != "cpu":
        checks.require(f"{what}: {device.type} finite",
                       all(bool(torch.isfinite(v).all()) for v in got.values()))
    else:
        checks.compare(f"{what}: {device.type} = cpu", "float32", got, ref)


def check_losses(checks, size, device, amp_dtype):
    g = torch.Generator().manual_seed(0)
    n, c = size["rois"], size["classes"]
    amp_name = str(amp_dtype).split(".")[-1]
    for name in [x for x in LOSSES if x != "cosine_ce"]:  # the same loss as "ce"
        ref_loss = make_loss(name, c)
        labels = labels_for(n, c, g)
        fix_sampling(ref_loss, labels)
        if ref_loss.uses_objectness:
            logits = [torch.randn(n, c, generator=g) * 3, torch.randn(n, 2, generator=g)]
        else:  # (N, C + 1) unless the loss says otherwise (EQL: C, BaGS: C + 1 + groups)
            logits = [torch.randn(n, getattr(ref_loss, "num_logits", c + 1), generator=g) * 3]
        dev_loss = copy.deepcopy(ref_loss).to(device)
        for step in range(2):  # Seesaw: the second step sees the counts of the first
            amp_loss = copy.deepcopy(dev_loss)
            ref = loss_outputs(ref_loss, logits, labels, torch.device("cpu"))
            got = loss_outputs(dev_loss, logits, labels, device)
            amp = loss_outputs(amp_loss, logits, labels, device, amp_dtype)
            compare_to_cpu(checks, f"loss {name} step {step}", name, device, got, ref)
            checks.compare(f"loss {name} step {step}: autocast = float32", amp_name, amp, got)
    federated = make_loss("federated", c).to(device)
    labels = labels_for(n, c, g).to(device)
    classes = federated.sample_classes(labels)
    present = labels[labels < c].unique()
    # the present classes (background takes a place too), then negatives up to the places
    places = federated.num_sampled_classes - int((labels == c).any())
    ok = (classes.unique().numel() == classes.numel() == max(min(places, c), present.numel())
          and bool(torch.isin(present, classes).all()) and bool((classes < c).all()))
    checks.require(f"federated sample_classes on {device.type}: distinct, present included", ok,
                   detail=f"{classes.numel()} classes")


def proposals_for(n_images, rois, num_classes, generator):
    out = []
    for _ in range(n_images):
        xy = torch.rand(rois, 2, generator=generator) * 600
        wh = torch.rand(rois, 2, generator=generator) * 200 + 8
        inst = Instances((800, 800))
        inst.proposal_boxes = Boxes(torch.cat([xy, xy + wh], 1))
        inst.gt_boxes = Boxes(torch.cat([xy + 4, xy + wh - 4], 1))
        inst.gt_classes = labels_for(rois, num_classes, generator)
        out.append(inst)
    return out


def head_outputs(head, x, run, device, amp_dtype=None):
    """`run(head, x)` -> dict of tensors incl. a scalar "loss"; adds parameter gradients."""
    head = head.to(device).train()
    head.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # losses that draw samples (DropLoss, BaGS) draw the same ones
    with autocast(device, amp_dtype):
        out = run(head, x.to(device))
    scale = backward(out["loss"], list(head.parameters()), amp_dtype)
    out = {k: v.float() for k, v in out.items()}
    out.update({f"grad {k}": p.grad.float() / scale for k, p in head.named_parameters()
                if p.grad is not None})
    return out


def check_heads(checks, size, device, amp_dtype):
    """Each loss's LongTailOutputLayers (forward, predict_probs, losses, gradients) and the
    normed and stock mask heads (logits, BCE loss, gradients)."""
    g = torch.Generator().manual_seed(1)
    c, per_image = size["classes"], size["rois"] // 2
    proposals = proposals_for(2, per_image, c, g)

    def run_predictor(head, x):
        props = [p.to(x.device) for p in proposals]
        scores, deltas = head(x)
        losses = head.losses((scores, deltas), props)
        probs = torch.cat(head.predict_probs((scores, deltas), props))
        return dict(losses, loss=sum(losses.values()), probs=probs, deltas=deltas)

    x = torch.randn(2 * per_image, size["box_dim"], generator=g).relu()
    amp_name = str(amp_dtype).split(".")[-1]
    for loss in LOSSES:
        cfg = base_cfg(loss, c)
        torch.manual_seed(0)
        cls_loss = make_loss(loss, c)
        fix_sampling(cls_loss, torch.cat([p.gt_classes for p in proposals]))
        head = LongTailOutputLayers(cfg, ShapeSpec(channels=size["box_dim"]), cls_loss=cls_loss)
        with EventStorage():
            ref = head_outputs(copy.deepcopy(head), x, run_predictor, torch.device("cpu"))
            got = head_outputs(copy.deepcopy(head), x, run_predictor, device)
            amp = head_outputs(copy.deepcopy(head), x, run_predictor, device, amp_dtype)
        compare_to_cpu(checks, f"predictor {loss}", loss, device, got, ref)
        checks.compare(f"predictor {loss}: autocast = float32", amp_name, amp, got)

    targets = (torch.rand(size["mask_rois"], 28, 28, generator=g) > 0.5).float()
    labels = torch.randint(c, (size["mask_rois"],), generator=g)

    def run_mask(head, x):
        logits = head.layers(x)[torch.arange(len(labels)), labels.to(x.device)]
        loss = F.binary_cross_entropy_with_logits(logits, targets.to(x.device))
        return {"loss": loss, "logits": logits}

    x = torch.randn(size["mask_rois"], 256, 14, 14, generator=g).relu()
    for cls in (MaskRCNNConvUpsampleHead, NormedMaskRCNNConvUpsampleHead):
        cfg = base_cfg("seesaw", c)
        cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = size["mask_dim"]
        torch.manual_seed(0)
        head = cls(cfg, ShapeSpec(channels=256, width=14, height=14))
        ref = head_outputs(copy.deepcopy(head), x, run_mask, torch.device("cpu"))
        got = head_outputs(copy.deepcopy(head), x, run_mask, device)
        amp = head_outputs(copy.deepcopy(head), x, run_mask, device, amp_dtype)
        checks.compare(f"mask head {cls.__name__}: {device.type} = cpu", "float32", got, ref)
        checks.compare(f"mask head {cls.__name__}: autocast = float32", amp_name, amp, got)


def start_allreduce(device, num_classes, tmp, world=2):
    """Spawn `world` gloo ranks that each run a Seesaw training step on device tensors."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return mp.spawn(run_rank, args=(world, port, str(device), num_classes, tmp), nprocs=world,
                    join=False)


def check_allreduce(checks, ranks, device, num_classes, tmp, deadline):
    """Every rank's cum_samples after its step equal the bincount of all ranks' labels."""
    while not ranks.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ranks.processes:
                p.kill()
            raise TimeoutError("the Seesaw all-reduce ranks did not finish in time")
    world = len(ranks.processes)
    results = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]
    expected = sum(torch.bincount(rank_labels(r, num_classes), minlength=num_classes + 1)
                   for r in range(world))[:num_classes].float()
    ok = all(torch.equal(r["cum_samples"], expected) and r["finite"] for r in results)
    checks.require(f"seesaw counts all-reduced over {world} gloo ranks on {device.type}", ok,
                   detail=f"tensors on {results[0]['device']}")


def run(device, tiny, deadline):
    """The section: returns {"tolerance", "checks", "passed"}."""
    size = SIZES["tiny" if tiny else "full"]
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    checks = Checks()
    tmp = tempfile.mkdtemp(prefix="gpu_check_ranks_")
    ranks = start_allreduce(device, size["classes"], tmp)  # they start while the rest runs
    # full float32 on the device (TF32 would round matmul / conv inputs to 10 bits)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        check_losses(checks, size, device, amp_dtype)
        check_heads(checks, size, device, amp_dtype)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    try:
        check_allreduce(checks, ranks, device, size["classes"], tmp, deadline)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"sizes": size, "tolerance": TOLERANCE, "checks": checks.rows,
            "passed": all(r["passed"] for r in checks.rows)}
