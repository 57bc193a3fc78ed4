"""DropLoss (Hsieh et al., AAAI 2021), as in the official detectron2 code
(timy90022/DropLoss ``DropLossFastRCNNOutputs.drop_loss``): EQL whose background RoIs keep the
negatives of tail classes at random, at the batch's share of tail-class foreground RoIs."""
import torch

from .eql import EQLLoss


class DropLoss(EQLLoss):
    """:class:`EQLLoss` (C sigmoid logits, prior bias, image-frequency tail classes) with a
    stochastic rule for background RoIs.

    Ignored negatives (weight 0) of entry (i, j), j a tail class (f_j < lambda_):

    - foreground RoI i: always (as EQL);
    - background RoI i: when u_ij > r, u_ij ~ U(0, 1) drawn per entry (one ``torch.rand(N, C)``
      per call, as the official ``rand_like``), r = share of the batch's foreground RoIs whose
      class is a tail class. So a tail negative of a background RoI is kept with probability r;
      a batch without foreground RoIs (r undefined, NaN in the official code) keeps them all.

    Args: as :class:`EQLLoss`; the official shipped config sets lambda_ = 0.00177 (its code
    default is 0.0010062).
    """

    def __init__(self, image_frequency=None, lambda_=0.00177, prior_prob=0.001, loss_weight=1.0,
                 num_classes=None):
        super().__init__(image_frequency, lambda_=lambda_, prior_prob=prior_prob,
                         loss_weight=loss_weight, num_classes=num_classes)

    def ignored_negatives(self, labels, tail):
        """(N, C) bool, drawn anew at every call (see the class docstring); computed on the
        device, without reading a value back.

        Args:
            labels: (N,) int64 in [0, C].
            tail: (C,) bool, :meth:`tail_classes`.
        """
        fg = labels < self.num_classes
        draws = torch.rand(labels.numel(), self.num_classes, device=labels.device)
        # NaN without foreground RoIs (0 / 0): every comparison is False, every negative kept
        tail_fg = (tail[labels.clamp(max=self.num_classes - 1)] & fg).sum()
        keep_share = tail_fg.float() / fg.sum()
        # foreground rows drop every tail negative: their threshold is below any draw
        threshold = torch.where(fg, -1.0, keep_share)
        return (draws > threshold[:, None]) & tail[None, :]

    def kept_negatives(self, labels, tail, dtype):
        """(N, C) weights of the negative entries, ``dtype``: 0 where :meth:`ignored_negatives`
        (drawn anew), else 1."""
        return torch.logical_not(self.ignored_negatives(labels, tail)).to(dtype)
