"""Gradient-balance diagnostic: per class, the positive and negative gradient magnitudes that
reach the classifier logits during training (the quantity Seesaw Loss is built to balance).

For a box predictor whose classification output is z (R, C+1 or C+2; the first C columns are
the class logits in every layout of this package and in detectron2's own predictor), with
RoI labels y (R,) in [0, C] (C = background) and L the total training loss, the accumulators
hold, summed over every training iteration and every rank:

    positive[c] = sum over RoIs r with y_r == c of |dL/dz_rc|
    negative[c] = sum over RoIs r with y_r != c (other classes and background) of |dL/dz_rc|
    samples[c]  = number of RoIs r with y_r == c

The background column (C + 1 layouts) and the two objectness columns (Seesaw's C + 2 layout)
are not accumulated: they are not class classifiers. One row per box predictor (one per
cascade stage). Opt-in with MODEL.LONG_TAIL.GRADIENT_BALANCE.ENABLED; when off nothing is
installed, so training runs exactly the code it runs without this module.
"""
import json
import logging
import os

import numpy as np
import torch
import torch.distributed as dist
from detectron2.data import MetadataCatalog
from detectron2.engine import HookBase
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch import nn

from .data.statistics import dataset_class_counts
from .errors import SeesawEcmError
from .fileio import write_atomic

logger = logging.getLogger(__name__)

JSON_NAME = "gradient_balance.json"
CHECKPOINT_KEY = "gradient_balance"
GROUPS = ("r", "c", "f")


class GradientBalance:
    """Accumulators of positive / negative logit-gradient magnitudes per stage and class.

    Not an nn.Module on purpose: it is no part of the model (model-zoo exports and weights
    stay unchanged); the trainer's checkpointer saves it through ``state_dict``.

    Each rank adds the RoIs of the current iteration to ``step`` (on the device of the
    gradients, in the scale of the loss that was back-propagated); :meth:`end_step` adds it,
    divided by that loss scale, to ``pending``, unless the optimizer step was skipped (mixed
    precision: inf / nan gradients); :meth:`sync` all-reduces ``pending`` across ranks into
    ``total`` (float64, CPU), which is what the checkpoint, the JSON and the logged scalars
    hold.
    """

    def __init__(self, num_classes, num_stages=1):
        self.num_classes = num_classes
        self.num_stages = num_stages
        # [positive, negative, samples] x stage x class
        self.total = torch.zeros(3, num_stages, num_classes, dtype=torch.float64)
        self.step = None
        self.pending = None
        self.iterations = 0

    def record(self, stage, scores, gt_classes):
        """Accumulate dL/dscores of this forward pass when backward reaches it.

        Args:
            stage: row of the accumulators (cascade stage; 0 for Mask R-CNN).
            scores: (R, C + 1) or (R, C + 2) classification logits; columns 0..C-1 are classes.
            gt_classes: (R,) int64 labels in [0, C], C = background.
        """
        if scores.requires_grad:
            labels = gt_classes.detach()
            scores.register_hook(lambda grad: self._accumulate(stage, labels, grad))

    @torch.no_grad()
    def _accumulate(self, stage, labels, grad):
        """grad: (R, >= C) dL/dz; labels: (R,). Vectorised (no loop over classes) and without a
        host sync: background RoIs add zeros to class 0 instead of being selected out."""
        num_classes = self.num_classes
        g = grad[:, :num_classes].abs()  # (R, C), summed in float64 below
        fg = labels < num_classes
        idx = torch.where(fg, labels, 0)
        # (R,) |dL/dz_{r,y_r}| of the foreground RoIs, 0 for the background ones
        on_label = torch.where(fg, g.gather(1, idx[:, None]).squeeze(1).double(), 0.0)
        if self.step is None:
            self.step = torch.zeros_like(self.total, device=grad.device)
        positive = torch.zeros(num_classes, dtype=torch.float64, device=grad.device)
        positive.index_add_(0, idx, on_label)
        self.step[0, stage] += positive
        self.step[1, stage] += g.sum(dim=0, dtype=torch.float64) - positive
        self.step[2, stage] += torch.zeros_like(positive).index_add_(0, idx, fg.double())

    @torch.no_grad()
    def end_step(self, loss_scale=1.0, skipped=False):
        """Close the iteration: add its sums divided by `loss_scale` (the GradScaler's scale of
        its backward pass) to ``pending``; nothing if the optimizer skipped the step
        (`skipped`) or a sum is not finite. The sample counts are not scaled. `loss_scale` and
        `skipped` may be device tensors (0-dim): nothing is read on the host."""
        step, self.step = self.step, None
        if step is None or skipped is True:
            return
        step[:2] /= loss_scale
        # no host sync: a skipped or non-finite iteration adds zeros
        keep = torch.isfinite(step).all() & ~torch.as_tensor(skipped, device=step.device)
        self.pending = (0 if self.pending is None else self.pending) + torch.where(
            keep, step, torch.zeros_like(step))

    def sync(self, device="cpu"):
        """Add every rank's pending sums to ``total`` (a collective: call on all ranks). An
        iteration not closed by :meth:`end_step` is closed first, with loss scale 1."""
        self.end_step()
        pending = self.pending if self.pending is not None else torch.zeros_like(
            self.total, device=device)
        if comm.get_world_size() > 1:
            dist.all_reduce(pending)
        self.total += pending.cpu()
        self.pending = None

    def ratio(self):
        """(S, C) positive / negative; nan where a class received no negative gradient."""
        pos, neg = self.total[0], self.total[1]
        return torch.where(neg > 0, pos / neg.clamp(min=1e-300), torch.full_like(pos, float("nan")))

    def state_dict(self):
        return {
            "positive": self.total[0].clone(),
            "negative": self.total[1].clone(),
            "samples": self.total[2].clone(),
            "iterations": self.iterations,
        }

    def load_state_dict(self, state):
        shape = (self.num_stages, self.num_classes)
        if tuple(state["positive"].shape) != shape:
            raise SeesawEcmError(
                f"The checkpoint's gradient-balance accumulators have shape "
                f"{tuple(state['positive'].shape)}, this model needs {shape} (stages, classes)."
            )
        self.total = torch.stack([state["positive"], state["negative"], state["samples"]]).to(
            torch.float64)
        self.step = self.pending = None
        self.iterations = int(state["iterations"])


def box_predictors(model):
    """The box predictors of a (possibly DDP-wrapped) R-CNN: one, or one per cascade stage."""
    model = getattr(model, "module", model)
    predictor = getattr(getattr(model, "roi_heads", None), "box_predictor", None)
    predictors = list(predictor) if isinstance(predictor, nn.ModuleList) else [predictor]
    if not all(isinstance(p, FastRCNNOutputLayers) for p in predictors):
        raise SeesawEcmError(
            "MODEL.LONG_TAIL.GRADIENT_BALANCE needs ROI heads with FastRCNNOutputLayers box "
            "predictors (StandardROIHeads, CascadeROIHeads or the LongTail ones); got "
            f"{[type(p).__name__ for p in predictors]}. Set GRADIENT_BALANCE.ENABLED False."
        )
    return predictors


def attach(predictors, balance):
    """Make each predictor's ``losses`` record into ``balance`` (row = stage). Instance-level,
    undone by :func:`detach`; the predictor classes are not touched."""
    for stage, predictor in enumerate(predictors):
        original = type(predictor).losses.__get__(predictor)

        def losses(predictions, proposals, _stage=stage, _original=original):
            if len(proposals):
                gt_classes = torch.cat([p.gt_classes for p in proposals])
                balance.record(_stage, predictions[0], gt_classes)
            return _original(predictions, proposals)

        predictor.losses = losses


def detach(predictors):
    for predictor in predictors:
        predictor.__dict__.pop("losses", None)


def training_class_info(cfg):
    """Class names, per-class training instance counts (C,) and LVIS frequency letters (or None)
    of cfg.DATASETS.TRAIN (counts from seesaw_ecm.data.statistics)."""
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    names = list(cfg.DATASETS.TRAIN)
    counts = dataset_class_counts(names, num_classes)
    meta = MetadataCatalog.get(names[0]) if names else None
    classes = list(meta.get("thing_classes", [])) if meta else []
    if len(classes) != num_classes:
        classes = [str(i) for i in range(num_classes)]
    freq = list(meta.get("class_frequency", [])) if meta else []
    if not (len(names) == 1 and len(freq) == num_classes and set(freq) <= set(GROUPS)):
        freq = None
    return classes, counts, freq


def frequency_groups(counts, frequency=None):
    """{"r"|"c"|"f": (k,) class indices}: the LVIS frequency letters when given, else thirds of
    the classes by training count (rarest third = "r")."""
    if frequency is not None:
        letters = np.asarray(frequency)
        return {g: np.flatnonzero(letters == g) for g in GROUPS}
    order = np.argsort(np.asarray(counts), kind="stable")
    return dict(zip(GROUPS, np.array_split(order, 3)))


def summary_scalars(ratio, groups):
    """{name: value}: mean positive/negative ratio over the classes of each group, per stage.

    ratio: (S, C) array; groups: as :func:`frequency_groups`."""
    out = {}
    for stage, row in enumerate(np.asarray(ratio)):
        suffix = f"_stage{stage}" if len(ratio) > 1 else ""
        for g, idx in groups.items():
            vals = row[idx]
            vals = vals[np.isfinite(vals)]
            if vals.size:
                out[f"gradient_balance/pos_neg_ratio_{g}{suffix}"] = float(vals.mean())
    return out


def check_period(period):
    """SeesawEcmError unless `period` (GRADIENT_BALANCE.PERIOD) is a positive iteration count."""
    if period < 1:
        raise SeesawEcmError(
            f"MODEL.LONG_TAIL.GRADIENT_BALANCE.PERIOD is {period}; it counts the iterations "
            "between summaries and must be >= 1 (default 20).")


class GradientBalanceHook(HookBase):
    """Installs :class:`GradientBalance` on the box predictors for the duration of training.

    Each iteration's sums are divided by the loss scale of mixed-precision training (the
    GradScaler of detectron2's AMPTrainer) and dropped when that scaler skipped the optimizer
    step (inf / nan gradients: it then lowers its scale). Every `period` iterations, at
    checkpoint iterations and at the end it all-reduces the ranks' sums; it then logs
    :func:`summary_scalars` to the EventStorage (metrics.json, TensorBoard). At checkpoint
    iterations and at the end the main process also writes OUTPUT_DIR/gradient_balance.json.
    Register ``self.balance`` with the checkpointer (the Trainer does) so checkpoints hold the
    accumulators and --resume continues them. Place it before the PeriodicCheckpointer hook.
    """

    def __init__(self, model, period, checkpoint_period, output_dir="", class_info=None):
        """
        Args:
            model: the trainer's model (DDP-wrapped or not).
            period: iterations between summaries.
            checkpoint_period: SOLVER.CHECKPOINT_PERIOD (iterations that also sync and write).
            output_dir: where the main process writes gradient_balance.json ("" = nowhere).
            class_info: (names, counts (C,), frequency letters or None), as
                :func:`training_class_info`; None = class indices, thirds by nothing.
        """
        check_period(period)
        self.predictors = box_predictors(model)
        num_classes = self.predictors[0].num_classes
        self.balance = GradientBalance(num_classes, len(self.predictors))
        self.period, self.checkpoint_period = period, checkpoint_period
        self.output_dir = output_dir
        names, counts, freq = class_info or (
            [str(i) for i in range(num_classes)], np.zeros(num_classes, np.int64), None)
        self.class_names, self.class_counts, self.class_frequency = names, np.asarray(counts), freq
        self.groups = frequency_groups(self.class_counts, freq)
        self._device = next(self.predictors[0].parameters()).device
        self._step_scale = 1.0

    def before_train(self):
        attach(self.predictors, self.balance)
        self._step_scale = self._loss_scale()  # after resume_or_load restored the scaler

    def after_train(self):
        detach(self.predictors)

    def _loss_scale(self):
        """The GradScaler's current scale (1 without mixed precision or with a disabled one),
        a copy of its device tensor once it has one (``get_scale`` would sync the host)."""
        scaler = getattr(getattr(self.trainer, "_trainer", None), "grad_scaler", None)
        if scaler is None or not scaler.is_enabled():
            return 1.0
        scale = scaler._get_scale_async()
        return scaler.get_scale() if scale is None else scale.clone()

    def after_step(self):
        # GradScaler.update() lowers the scale exactly when it skipped the optimizer step; the
        # scale after this step is the one of the next backward pass
        scale, self._step_scale = self._step_scale, self._loss_scale()
        self.balance.end_step(scale, skipped=self._step_scale < scale)
        it = self.trainer.iter
        self.balance.iterations = it + 1
        last = it + 1 >= self.trainer.max_iter
        save = last or (self.checkpoint_period > 0 and (it + 1) % self.checkpoint_period == 0)
        if not (save or (it + 1) % self.period == 0):
            return
        self.balance.sync(self._device)
        ratio = self.balance.ratio().numpy()
        get_event_storage().put_scalars(
            smoothing_hint=False, **summary_scalars(ratio, self.groups))
        if save and self.output_dir and comm.is_main_process():
            write_atomic(os.path.join(self.output_dir, JSON_NAME), json.dumps(self.to_json()))

    def to_json(self):
        state = self.balance.state_dict()
        return {
            "iterations": state["iterations"],
            "num_classes": self.balance.num_classes,
            "num_stages": self.balance.num_stages,
            "class_names": list(self.class_names),
            "class_counts": [int(c) for c in self.class_counts],
            "class_frequency": self.class_frequency,
            "positive": state["positive"].tolist(),
            "negative": state["negative"].tolist(),
            "samples": state["samples"].tolist(),
        }
