"""Gumbel Optimised Loss (GOL; Alexandridis et al., ECCV 2022), as in the official mmdetection
code (kostas1515/GOL ``mmdet/models/losses/droploss.py`` with ``use_classif='gumbel'``, the loss
of its LVIS v1 configs ``configs/gol/droploss_*_gumbel.py``): DropLoss whose binary
cross-entropy links each class logit to a probability through the Gumbel CDF instead of the
sigmoid."""
import torch
from torch.autograd.function import once_differentiable

from .droploss import DropLoss
from .precision import float32_loss
from .sigmoid_bce import positive_entries, replace_positive_entries

# F.binary_cross_entropy's floor of each log and of p (1 - p) in its gradient
_LOG_FLOOR, _BCE_EPS = -100.0, 1e-12


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
        return _GumbelBCE.apply(logits, labels, kept, *self.clamp)

    @float32_loss
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


class _GumbelBCE(torch.autograd.Function):
    """sum_ij W_ij BCE(p_ij, t_ij), p = exp(-exp(-clamp(z, lo, hi))), t_ij = [j == labels_i],
    W = kept on the negative entries and 1 on the positive ones: the value and gradient of
    ``F.binary_cross_entropy(p, t, weight=W, reduction="sum")`` after the clamp and the link (each
    log floored at -100 and computed as it does, log1p(-p) and log(p); the gradient
    W (p - t) / max(p (1 - p), 1e-12) dp/dz, 0 outside [lo, hi]), fused by hand: that composite
    took ~19x plain cross-entropy on the CPU at LVIS width (PyTorch's BCE kernel evaluates both
    logs of every entry, elementwise), no one-hot or weight matrix is built here, the negatives'
    weighted sum is one dot product and the positive entries an (N,) correction.

    Args of ``apply``: logits (N, K) float; labels (N,) int64 (>= K: no positive entry);
    kept (N, K) float weights of the negative entries (not read on the positive ones); lo, hi.
    """

    @staticmethod
    def forward(ctx, logits, labels, kept, lo, hi):
        logits = logits.contiguous()  # entries read by flat index
        flat, _, has = positive_entries(labels, logits.shape[1])
        u = logits.clamp(lo, hi).neg_().exp_()  # exp(-z), z clamped
        p = torch.neg(u).exp_()
        negatives = torch.neg(p).log1p_().clamp_min_(_LOG_FLOOR)  # log(1 - p)
        replace_positive_entries(negatives, flat, has, 0)  # counted below as log(p)
        p_pos = p.view(-1).index_select(0, flat)
        positives = p_pos.log().clamp_min_(_LOG_FLOOR).masked_fill_(~has, 0)
        loss = -(torch.dot(negatives.view(-1), kept.reshape(-1)) + positives.sum())
        outside = (logits < lo).logical_or_(logits > hi)  # where the clamp stops the gradient
        ctx.save_for_backward(p, u, labels, kept, outside)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        p, u, labels, kept, outside = ctx.saved_tensors
        flat, _, has = positive_entries(labels, p.shape[1])
        # dBCE/dp = (p - t) / max(p (1 - p), eps), times dp/dz = p u
        den = torch.rsub(p, 1).mul_(p).clamp_min_(_BCE_EPS)
        grad_logits = torch.mul(p, u).mul_(p).div_(den).mul_(kept)  # the negatives: t = 0
        p_pos = p.view(-1).index_select(0, flat)
        pos = (p_pos - 1) / den.view(-1).index_select(0, flat) * p_pos * u.view(-1).index_select(
            0, flat)
        replace_positive_entries(grad_logits, flat, has, pos)
        grad_logits.masked_fill_(outside, 0).mul_(grad)
        return grad_logits, None, None, None, None
