"""Gumbel Optimised Loss (GOL; Alexandridis et al., ECCV 2022), as in the official mmdetection
code (kostas1515/GOL ``mmdet/models/losses/droploss.py`` with ``use_classif='gumbel'``, the loss
of its LVIS v1 configs ``configs/gol/droploss_*_gumbel.py``): DropLoss whose binary
cross-entropy links each class logit to a probability through the Gumbel CDF instead of the
sigmoid."""
import torch
from torch.nn import functional as F

from .droploss import DropLoss
from .precision import float32_loss


def gumbel_cdf(logits):
    """p = exp(-exp(-z)) elementwise: the Gumbel (maximum) CDF, GOL's activation."""
    return torch.exp(-torch.exp(-logits))


class GumbelLoss(DropLoss):
    """:class:`DropLoss` (C logits, no background column; tail classes by image frequency <
    lambda_; tail negatives ignored on foreground RoIs and dropped at random on background RoIs)
    with the Gumbel link:

        loss = sum_{i,j} w_ij BCE(p_ij, y_ij) / N,  p_ij = exp(-exp(-clamp(z_ij, lo, hi))),

    BCE on the probability as ``F.binary_cross_entropy`` computes it (each log floored at -100),
    so values and gradients are the official ones, including two of its traits: a logit outside
    [lo, hi] gets no gradient, and a positive entry with p (1 - p) < 1e-12 (z < -3.32) gets
    almost none (PyTorch's BCE gradient divides by max(p (1 - p), 1e-12)).

    Scores at test time (:meth:`get_probs`): exp(-exp(-z)) of the unclamped logits, as the
    official ``get_activation``, and a background column of zeros.

    Classifier hooks read by the predictor: ``num_logits`` = C, ``bias_init`` and
    ``weight_init``: the official ``init_cfg`` of ``fc_cls``, Constant val=0.001, bias=-2
    (every weight 0.001, every bias -2: initial scores exp(-exp(2)) = 6.2e-4).

    Args:
        image_frequency: (C,) per-class training image frequencies in [0, 1], or None (a
            placeholder filled from a checkpoint, with ``num_classes``).
        lambda_: frequency threshold of the tail classes (the official LVIS v1 configs: 0.0011).
        clamp: (lo, hi) range of the logits inside the loss (official: (-4, 10)).
        bias_init: constant of the classifier bias.
        weight_init: constant of the classifier weights (None: the classifier's own init).
        loss_weight: multiplies the loss.
        num_classes: C; required when ``image_frequency`` is None.
    """

    def __init__(self, image_frequency=None, lambda_=0.0011, clamp=(-4.0, 10.0), bias_init=-2.0,
                 weight_init=0.001, loss_weight=1.0, num_classes=None):
        super().__init__(image_frequency, lambda_=lambda_, loss_weight=loss_weight,
                         num_classes=num_classes)
        lo, hi = clamp
        if not lo < hi:
            raise ValueError(f"clamp must be (lo, hi) with lo < hi, got {tuple(clamp)}")
        self.clamp = (float(lo), float(hi))
        self.bias_init = bias_init
        self.weight_init = weight_init

    def binary_loss(self, logits, labels, kept):
        """Summed weighted BCE of the (N, C) logits through the Gumbel link (class docstring).

        Args:
            logits: (N, C). labels: (N,) int64 in [0, C] (C: background).
            kept: (N, C) weights of the negative entries; the positive entries have weight 1.
        """
        targets = F.one_hot(labels, self.num_classes + 1)[:, : self.num_classes].to(logits.dtype)
        weight = torch.where(targets.bool(), torch.ones_like(kept), kept)
        probs = gumbel_cdf(logits.clamp(*self.clamp))
        return F.binary_cross_entropy(probs, targets, weight=weight, reduction="sum")

    @float32_loss  # F.binary_cross_entropy refuses to run under autocast
    def forward(self, logits, labels):
        """As :meth:`EQLLoss.forward`: (N, C) logits, (N,) labels in [0, C] ->
        {"loss_cls": scalar}."""
        return super().forward(logits, labels)

    def get_probs(self, logits):
        """Scores (N, C + 1): the Gumbel CDF of the (N, C) logits and a background column of
        zeros (detectron2's inference ignores it)."""
        probs = gumbel_cdf(logits)
        return torch.cat([probs, probs.new_zeros(probs.shape[0], 1)], dim=1)

    def extra_repr(self):
        return f"{super().extra_repr()}, clamp={self.clamp}"
