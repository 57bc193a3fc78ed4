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

    def kept_negatives(self, labels, tail, dtype):
        """(N, C) weights of the negative entries, ``dtype``: 0 where ignored (see the class
        docstring), else 1; drawn anew at every call, on the device, without reading a value
        back. :meth:`ignored_negatives` is its zeros.

        Args:
            labels: (N,) int64 in [0, C].
            tail: (C,) bool, :meth:`tail_classes`.
        """
        fg = labels < self.num_classes
        draws = torch.rand(labels.numel(), self.num_classes, device=labels.device)
        tail_fg = (tail[labels.clamp(max=self.num_classes - 1)] & fg).sum()
        # without foreground RoIs (0 / 0, NaN in the official code) every negative is kept: 2
        keep_share = (tail_fg.float() / fg.sum()).nan_to_num(nan=2.0)
        # foreground rows drop every tail negative: their threshold is below any draw
        threshold = torch.where(fg, -1.0, keep_share)
        # in place, one pass: the draw on a tail column, -2 (below any threshold) elsewhere
        tail = tail.to(draws.dtype)
        torch.addcmul(2 * tail - 2, draws, tail, out=draws)
        return torch.le(draws, threshold[:, None], out=draws.new_empty(draws.shape, dtype=dtype))
