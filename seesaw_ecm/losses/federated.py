"""Federated loss (Zhou et al., "Probabilistic two-stage detection", LVIS 2021 challenge): a
sigmoid BCE over the classes present in the batch plus frequency-sampled negative classes.

detectron2 0.6 lacks it (it arrived on detectron2's main branch later, as
ROI_BOX_HEAD.USE_FED_LOSS); this module follows that code's sampling and reduction.
"""
import torch
from torch import nn

from .precision import float32_loss
from .sigmoid_bce import sigmoid_bce


class FederatedLoss(nn.Module):
    """Sigmoid BCE on the columns of a sampled class set, summed and divided by N.

    For each batch the class set is: every label present in the batch (background included,
    as in detectron2, where it takes one of the ``num_sampled_classes`` places), then negative
    foreground classes drawn without replacement with probability proportional to
    ``image_count ** freq_weight_power``, until ``num_sampled_classes`` places are used. The loss
    is BCE-with-logits of the selected foreground columns against one-hot targets; the
    background column (C) is never trained.

    ``freq_weight`` (C,) is a persistent buffer, so checkpoints carry it. For a model built
    before loading a checkpoint pass ``class_image_counts=None, num_classes=C``: the buffer is a
    NaN placeholder and ``forward`` refuses to run until it is loaded (inference needs none).

    Args:
        class_image_counts: (C,) number of training images that contain each class, or None.
        num_sampled_classes: size of the class set (detectron2: FED_LOSS_NUM_CLASSES = 50).
        freq_weight_power: exponent of the image counts (FED_LOSS_FREQ_WEIGHT_POWER = 0.5).
        loss_weight: multiplies the loss.
        num_classes: C; required when ``class_image_counts`` is None, else checked against it.
    """

    uses_objectness = False

    def __init__(self, class_image_counts=None, num_sampled_classes=50, freq_weight_power=0.5,
                 loss_weight=1.0, num_classes=None):
        super().__init__()
        if class_image_counts is None:
            if num_classes is None:
                raise ValueError("FederatedLoss needs class_image_counts or, for placeholders, "
                                 "num_classes")
            freq_weight = torch.full((num_classes,), float("nan"))
        else:
            counts = torch.as_tensor(class_image_counts, dtype=torch.float64).flatten()
            if not (torch.isfinite(counts).all() and (counts >= 0).all()):
                raise ValueError("class_image_counts must be finite and >= 0")
            if num_classes is not None and num_classes != counts.numel():
                raise ValueError(f"num_classes={num_classes} but {counts.numel()} class image "
                                 "counts were given")
            freq_weight = counts.pow(freq_weight_power).float()
        if num_sampled_classes < 1:
            raise ValueError(f"num_sampled_classes must be >= 1, got {num_sampled_classes}")
        self.num_classes = freq_weight.numel()
        self.num_sampled_classes = num_sampled_classes
        self.freq_weight_power = freq_weight_power
        self.loss_weight = loss_weight
        self.register_buffer("freq_weight", freq_weight)
        self._has_statistics = class_image_counts is not None

    def sample_classes(self, labels):
        """The foreground classes whose columns the loss trains.

        Args:
            labels: (N,) int64 in [0, C].
        Returns:
            (K,) int64 distinct classes in [0, C): those present in ``labels``, then the
            sampled negatives.
        """
        present = torch.unique(labels)
        classes = present[present < self.num_classes]
        num_negatives = self.num_sampled_classes - present.numel()
        if num_negatives <= 0:
            return classes
        prob = self.freq_weight.clone()
        prob[classes] = 0
        # fewer eligible classes than places (small datasets): take them all
        num_negatives = min(num_negatives, int(torch.count_nonzero(prob)))
        if num_negatives == 0:
            return classes
        negatives = torch.multinomial(prob, num_negatives, replacement=False)
        return torch.cat([classes, negatives])

    @float32_loss
    def forward(self, logits, labels):
        """
        Args:
            logits: (N, C + 1) logits, column C = background (not trained).
            labels: (N,) int64 in [0, C], C = background.

        Returns:
            dict with the scalar ``loss_cls`` = sum of BCE over the N x K selected entries / N,
            times ``loss_weight``.
        """
        if not self._has_statistics:
            raise RuntimeError("FederatedLoss has placeholder class statistics: build it with "
                               "class_image_counts, or load_state_dict a checkpoint holding them.")
        classes = self.sample_classes(labels)
        if classes.numel() == 0:  # no class present and none eligible: nothing to train
            return {"loss_cls": logits.sum() * 0}
        # the background column (C) is never among the classes: background rows train none
        loss = sigmoid_bce(logits, labels, logits.new_ones(logits.shape[1]), columns=classes)
        return {"loss_cls": loss * (self.loss_weight / max(labels.numel(), 1))}

    def get_probs(self, logits):
        """Scores (N, C + 1) = sigmoid(logits) per column (as detectron2's sigmoid CE; the
        background column is untrained and ignored by inference)."""
        return logits.sigmoid()

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._has_statistics = bool(torch.isfinite(self.freq_weight).all())

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, num_sampled_classes={self.num_sampled_classes}, "
                f"freq_weight_power={self.freq_weight_power}, loss_weight={self.loss_weight}")
