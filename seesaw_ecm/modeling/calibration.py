"""Test-time calibration of the box predictors' class scores (MODEL.ROI_HEADS.CALIBRATION): it
corrects a trained model's bias towards frequent classes without retraining.

- "norcal", NorCal (Pan et al., NeurIPS 2021; the official detectron2 project tydpan/NorCal):
  every foreground score is divided by its class's training count to the power GAMMA, the
  background score is left as it is, and with RENORMALIZE each proposal's C + 1 scores are then
  divided by their sum. For a softmax head this is the official default (``WITH "exps"``,
  ``RENORM True``: the exponentials of the logits re-weighted, then normalised), written on the
  probabilities, where the softmax's own normaliser cancels; without RENORMALIZE it is the
  official ``WITH "probs"``: the re-weighted probabilities, not normalised again.
- "logit_adjustment" (Menon et al., ICLR 2021): TAU x log(prior) is subtracted from each class
  logit (prior = count / total count; the background logit is left as it is), before the loss's
  own activation (``cls_loss.get_probs``).

Both work on every head of the project through the (R, C + 1) probabilities (background last)
that ``cls_loss.get_probs`` returns: softmax heads (CE, cosine CE, LOCE, BaGS), Seesaw's C + 2
outputs (class softmax x p_fg, p_bg last), and sigmoid heads (ECM, EQLv2: sigmoid(z_c) x (1 -
p_bg), p_bg last; Federated: sigmoid of every column; EQL, DropLoss: a background column of
zeros). Logit adjustment needs the class logits as columns, which BaGS' group layout has not.
In a cascade, NorCal applies once to the stages' mean scores (MODEL.CASCADE.TEST_SCORE
"probs"); logit adjustment to every stage's logits ("probs") or to their mean ("logits").

The counts (COUNTS "model") are those the loss keeps in the checkpoint (Seesaw's ``cum_samples``,
ECM's ``sample_counts``, BaGS' ``class_counts``, EQL / DropLoss' ``image_frequency``); a loss
that keeps none (CE, cosine CE, EQLv2, Federated, LOCE) gets the instance counts of
DATASETS.TRAIN. A class never counted is treated as the rarest counted class. GAMMA 0 (NorCal)
or TAU 0 (logit adjustment) returns the loss's probabilities untouched, bit for bit.
"""
import functools

import torch
from detectron2.data import DatasetCatalog
from torch import nn

from ..data.statistics import dataset_class_counts
from ..distributed import on_main_process
from ..errors import SeesawEcmError

METHODS = ("none", "norcal", "logit_adjustment")
COUNTS = ("model", "instance_count", "image_count")
# The buffers of per-class counts the losses keep, as COUNTS "model" looks for them
LOSS_COUNT_BUFFERS = ("cum_samples", "sample_counts", "class_counts", "image_frequency")


def norcal(probs, counts, gamma, renormalize=True):
    """NorCal's scores.

    Args:
        probs: (R, C + 1) class scores, background last.
        counts: (C,) positive per-class training counts.
        gamma: exponent of the counts; renormalize: divide each row by its sum.
    Returns:
        (R, C + 1) scores: probs[:, c] / counts[c]^gamma for c < C, the background unchanged,
        each row divided by its sum if `renormalize`.
    """
    weights = torch.cat([counts.to(probs).pow(-gamma), probs.new_ones(1)])
    scores = probs * weights
    if renormalize:
        scores = scores / scores.sum(dim=1, keepdim=True)
    return scores


def adjust_logits(logits, counts, tau):
    """Logit adjustment of the first C columns of `logits` (R, C or more; C = counts.numel()):
    z_c - tau log(counts[c] / sum(counts)); the other columns (background) unchanged."""
    num_classes = counts.numel()
    log_prior = (counts / counts.sum()).log().to(logits)
    return torch.cat([logits[:, :num_classes] - tau * log_prior, logits[:, num_classes:]], dim=1)


class ScoreCalibration(nn.Module):
    """The calibration of one box predictor's scores (see the module docstring). No parameters;
    the training counts it holds itself (a loss without counts, or COUNTS other than "model") are
    a non-persistent buffer: checkpoints are the same with and without calibration."""

    def __init__(self, method, gamma=0.0, tau=0.0, renormalize=True, counts=None):
        """
        Args:
            method: "norcal" or "logit_adjustment".
            gamma: NorCal's exponent; tau: logit adjustment's factor.
            renormalize: NorCal's per-proposal normalisation.
            counts: (C,) per-class training counts, or None: those of the loss (its
                LOSS_COUNT_BUFFERS buffer), read at each call (they come with the checkpoint).
        """
        super().__init__()
        if method not in METHODS[1:]:
            raise ValueError(f"method {method!r}: valid choices are {METHODS[1:]}")
        self.method, self.gamma, self.tau, self.renormalize = method, gamma, tau, renormalize
        self.register_buffer("counts", None if counts is None else
                             torch.as_tensor(counts, dtype=torch.float64), persistent=False)

    @classmethod
    def from_config(cls, cfg, cls_loss):
        """The calibration MODEL.ROI_HEADS.CALIBRATION asks for, for a predictor whose loss is
        `cls_loss`, or None (METHOD "none"). Counts the training set if the loss keeps no
        counts (or COUNTS asks for them)."""
        check_config(cfg)
        calib = cfg.MODEL.ROI_HEADS.CALIBRATION
        if calib.METHOD == "none":
            return None
        counts = None
        if calib.COUNTS != "model" or loss_counts(cls_loss) is None:
            counts = training_counts(cfg, "instance_count" if calib.COUNTS == "model"
                                     else calib.COUNTS)
        return cls(calib.METHOD, gamma=calib.GAMMA, tau=calib.TAU,
                   renormalize=calib.RENORMALIZE, counts=counts)

    @property
    def is_identity(self):
        """Whether the scores stay the loss's own (GAMMA or TAU 0)."""
        return (self.gamma if self.method == "norcal" else self.tau) == 0

    def class_counts(self, cls_loss):
        """(C,) float64 counts, each >= the smallest positive one."""
        counts = self.counts if self.counts is not None else loss_counts(cls_loss).double()
        if not (counts > 0).any():
            raise SeesawEcmError(
                f"The class counts of {type(cls_loss).__name__} are not set (all 0 or NaN: "
                "weights without them?): set MODEL.ROI_HEADS.CALIBRATION.COUNTS "
                "\"instance_count\" to count DATASETS.TRAIN instead.")
        return counts.clamp(min=counts[counts > 0].min())

    def forward(self, cls_loss, class_outputs, rescale=True):
        """(R, C + 1) calibrated scores, background last, of a predictor's class outputs
        (`class_outputs`: the tuple its ``_split`` gives, as ``cls_loss.get_probs`` takes it);
        `rescale` False leaves out NorCal's step (for :meth:`rescale`, later)."""
        if self.method == "logit_adjustment" and not self.is_identity:
            if getattr(cls_loss, "num_logits", 0) > cls_loss.num_classes + 1:
                raise SeesawEcmError(
                    f"MODEL.ROI_HEADS.CALIBRATION.METHOD \"logit_adjustment\" needs one logit per "
                    f"class, which the group layout of {type(cls_loss).__name__} has not: use "
                    "\"norcal\".")
            counts = self.class_counts(cls_loss)
            class_outputs = (adjust_logits(class_outputs[0], counts, self.tau),
                             *class_outputs[1:])
        probs = cls_loss.get_probs(*class_outputs)
        return self.rescale(cls_loss, probs) if rescale else probs

    def rescale(self, cls_loss, probs):
        """NorCal on (R, C + 1) scores `probs` (unchanged for logit adjustment or GAMMA 0)."""
        if self.method != "norcal" or self.is_identity:
            return probs
        return norcal(probs, self.class_counts(cls_loss), self.gamma, self.renormalize)

    def extra_repr(self):
        value = f"gamma={self.gamma}" if self.method == "norcal" else f"tau={self.tau}"
        counts = "loss" if self.counts is None else "training set"
        return f"{self.method}, {value}, renormalize={self.renormalize}, counts={counts}"


def check_config(cfg):
    """Raise SeesawEcmError for a MODEL.ROI_HEADS.CALIBRATION.METHOD or COUNTS not known."""
    calib = cfg.MODEL.ROI_HEADS.CALIBRATION
    for key, choices in (("METHOD", METHODS), ("COUNTS", COUNTS)):
        if calib[key] not in choices:
            raise SeesawEcmError(f"MODEL.ROI_HEADS.CALIBRATION.{key} {calib[key]!r}: valid "
                                 f"choices are {', '.join(map(repr, choices))}")


def loss_counts(cls_loss):
    """(C,) per-class counts that `cls_loss` keeps (LOSS_COUNT_BUFFERS; ECM's background count
    left out), or None."""
    for name in LOSS_COUNT_BUFFERS:
        counts = getattr(cls_loss, name, None)
        if isinstance(counts, torch.Tensor):
            return counts[:cls_loss.num_classes]
    return None


def training_counts(cfg, statistic):
    """(C,) `statistic` counts over DATASETS.TRAIN (main process, shared with every rank),
    counted once for all the predictors of a model (cascade stages, TSD's sibling)."""
    names = tuple(cfg.DATASETS.TRAIN)
    if not names:
        raise SeesawEcmError(
            "MODEL.ROI_HEADS.CALIBRATION needs the training class counts, counted on "
            "DATASETS.TRAIN, which is empty: give the training datasets (registered, e.g. with "
            "train_net.py --dataset), or use a loss that keeps counts with COUNTS \"model\".")
    # the registered loader functions are part of the key: a dataset registered again is
    # counted again
    loaders = tuple(DatasetCatalog.data.get(name) for name in names)
    return _counted(names, loaders, cfg.MODEL.ROI_HEADS.NUM_CLASSES, statistic).copy()


@functools.lru_cache(maxsize=4)
def _counted(names, loaders, num_classes, statistic):
    return on_main_process(dataset_class_counts, list(names), num_classes, statistic)
