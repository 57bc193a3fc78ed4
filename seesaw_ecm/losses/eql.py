"""Equalization Loss (Tan et al., CVPR 2020), as in the official detectron2 code
(tztztztztz/eql.detectron2 ``EQLFastRCNNOutputs.eql_loss``): a sigmoid BCE over the C class
logits (no background logit) that ignores the negative gradients of rare classes on foreground
RoIs."""
import math

import torch
from torch import nn

from .precision import float32_loss
from .sigmoid_bce import sigmoid_bce


def prior_bias(prior_prob):
    """Classifier bias -log((1 - pi) / pi) that makes every sigmoid start at pi."""
    if not 0 < prior_prob < 1:
        raise ValueError(f"prior_prob must be in (0, 1), got {prior_prob}")
    return -math.log((1 - prior_prob) / prior_prob)


class EQLLoss(nn.Module):
    """loss = sum_{i,j} w_ij BCE(z_ij, y_ij) / N over N RoIs and C class columns, with

        w_ij = 1 - E(i) T(f_j) (1 - y_ij),

    E(i) = 1 for a foreground RoI (0 for background), T(f_j) = 1 for a tail class (image
    frequency f_j < lambda_), y = one-hot labels with all-zero rows for background RoIs.

    ``image_frequency`` (C,) f_j = (training images with class j) / (training images) is a
    persistent buffer, so checkpoints carry it. For a model built before loading a checkpoint
    pass ``image_frequency=None, num_classes=C``: the buffer is a NaN placeholder and
    ``forward`` refuses to run until it is loaded (inference needs none).

    Classifier hooks read by the predictor: ``num_logits`` = C (no background logit) and
    ``bias_init`` = -log((1 - pi) / pi) (pi = ``prior_prob``, 0.001 in the official code).

    Args:
        image_frequency: (C,) per-class training image frequencies in [0, 1], or None.
        lambda_: frequency threshold of the tail classes (LVIS v1: 0.0011 in the eqlv2
            configs; LVIS v0.5: 0.00177).
        prior_prob: initial sigmoid probability of every class.
        loss_weight: multiplies the loss.
        num_classes: C; required when ``image_frequency`` is None, else checked against it.
    """

    uses_objectness = False

    def __init__(self, image_frequency=None, lambda_=0.0011, prior_prob=0.001, loss_weight=1.0,
                 num_classes=None):
        super().__init__()
        if image_frequency is None:
            if num_classes is None:
                raise ValueError(f"{type(self).__name__} needs image_frequency or, for "
                                 "placeholders, num_classes")
            freq = torch.full((num_classes,), float("nan"))
        else:
            freq = torch.as_tensor(image_frequency, dtype=torch.float64).flatten()
            if not (torch.isfinite(freq).all() and (freq >= 0).all() and (freq <= 1).all()):
                raise ValueError("image_frequency must be in [0, 1]")
            if num_classes is not None and num_classes != freq.numel():
                raise ValueError(f"num_classes={num_classes} but {freq.numel()} class "
                                 "frequencies were given")
            freq = freq.float()
        self.num_classes = self.num_logits = freq.numel()
        self.lambda_ = lambda_
        self.loss_weight = loss_weight
        self.bias_init = prior_bias(prior_prob)
        self.register_buffer("image_frequency", freq)
        self._has_statistics = image_frequency is not None

    def tail_classes(self):
        """(C,) bool: T(f_j), the classes whose image frequency is below lambda_."""
        return self.image_frequency < self.lambda_

    def ignored_negatives(self, labels, tail):
        """(N, C) bool: the negative entries whose loss is dropped, E(i) T(f_j) here (its value
        on a positive entry is not read).

        Args:
            labels: (N,) int64 in [0, C].
            tail: (C,) bool, :meth:`tail_classes`.
        """
        return self.kept_negatives(labels, tail, torch.float32) == 0

    def binary_loss(self, logits, labels, kept):
        """Summed BCE of the (N, C) logits through the sigmoid link, one-hot targets of
        ``labels``, the negative entries weighted by ``kept``.

        Args:
            logits: (N, C). labels: (N,) int64 in [0, C] (C: background, no positive entry).
            kept: (N, C) weights of the negative entries (:meth:`kept_negatives`); the positive
                entries have weight 1.
        """
        return sigmoid_bce(logits, labels, logits.new_ones(self.num_classes), entry_weight=kept)

    def kept_negatives(self, labels, tail, dtype):
        """(N, C) weights of the negative entries, ``dtype``: 0 where :meth:`ignored_negatives`,
        else 1. EQL's rule has rank one: a foreground row keeps the classes that are not tail
        classes, a background row every class (one row gathered per RoI, no (N, C) bool
        arithmetic).

        Args:
            labels: (N,) int64 in [0, C].
            tail: (C,) bool, :meth:`tail_classes`.
        """
        rows = torch.stack([torch.logical_not(tail), torch.ones_like(tail)]).to(dtype)
        return rows.index_select(0, (labels >= self.num_classes).long())

    @float32_loss
    def forward(self, logits, labels):
        """
        Args:
            logits: (N, C) class logits (no background column).
            labels: (N,) int64 in [0, C], C = background.

        Returns:
            dict with the scalar ``loss_cls`` = sum of the weighted BCE / N, times
            ``loss_weight``.
        """
        if not self._has_statistics:
            raise RuntimeError(f"{type(self).__name__} has placeholder class statistics: build "
                               "it with image_frequency, or load_state_dict a checkpoint "
                               "holding them.")
        # targets one-hot over the C columns (background rows: none), without building them
        kept = self.kept_negatives(labels, self.tail_classes(), logits.dtype)
        loss = self.binary_loss(logits, labels, kept)
        return {"loss_cls": loss * (self.loss_weight / max(labels.numel(), 1))}

    def get_probs(self, logits):
        """Scores (N, C + 1): sigmoid of the C logits and a background column of zeros (as the
        official predict_probs; detectron2's inference ignores it)."""
        probs = logits.sigmoid()
        return torch.cat([probs, probs.new_zeros(probs.shape[0], 1)], dim=1)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._has_statistics = bool(torch.isfinite(self.image_frequency).all())

    def extra_repr(self):
        num_tail = int(self.tail_classes().sum()) if self._has_statistics else "?"
        return (f"num_classes={self.num_classes}, lambda_={self.lambda_}, "
                f"tail_classes={num_tail}, loss_weight={self.loss_weight}")
