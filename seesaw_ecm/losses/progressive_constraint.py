"""The progressive constraint (PC) of TSD (Song et al., "Revisiting the Sibling Head in Object
Detector", CVPR 2020, Eq. 6-7): the disentangled (TSD) head must beat the sibling head it
replaces by a margin, in the classification score of the true class and in the IoU of the
regressed box."""
import torch
from torch import nn
from torch.nn import functional as F

from .precision import float32_loss


def _hinge_mean(tsd, sibling, margin):
    """mean |sibling - tsd + min(1 - sibling, margin)|_+; the sibling side is detached."""
    sibling = sibling.detach()
    margin = torch.clamp(1 - sibling, max=margin)
    return F.relu(sibling + margin - tsd).sum() / max(tsd.numel(), 1)


class ProgressiveConstraintLoss(nn.Module):
    """M_cls + M_loc of TSD, each averaged over its entries.

    M_cls = |H(y | sibling) - H(y | TSD) + m_c|_+ over every sampled RoI (background included),
    H(y | .) the probability of the RoI's label y; M_loc = |IoU(sibling box, gt) - IoU(TSD box,
    gt) + m_r|_+ over the foreground RoIs. As the official code, the sibling terms are detached
    (the constraint trains the TSD branch only) and each margin is clipped to 1 - the sibling's
    value, so the target never exceeds 1.

    Args:
        cls_margin: m_c; loc_margin: m_r (the official configs: 0.3 and 0.3).
        loss_weight: multiplies both terms (0 turns the constraint off).
    """

    def __init__(self, cls_margin=0.3, loc_margin=0.3, loss_weight=1.0):
        super().__init__()
        self.cls_margin = cls_margin
        self.loc_margin = loc_margin
        self.loss_weight = loss_weight

    @float32_loss
    def forward(self, tsd_probs, sibling_probs, tsd_ious, sibling_ious):
        """
        Args:
            tsd_probs, sibling_probs: (N,) probability of each sampled RoI's label, TSD and
                sibling head.
            tsd_ious, sibling_ious: (M,) IoU with its ground truth of each foreground RoI's box
                regressed by either head.

        Returns:
            dict of scalars ``loss_pc_cls`` and ``loss_pc_loc`` (0 without entries).
        """
        return {
            "loss_pc_cls": self.loss_weight * _hinge_mean(tsd_probs, sibling_probs,
                                                          self.cls_margin),
            "loss_pc_loc": self.loss_weight * _hinge_mean(tsd_ious, sibling_ious,
                                                          self.loc_margin),
        }

    def extra_repr(self):
        return (f"cls_margin={self.cls_margin}, loc_margin={self.loc_margin}, "
                f"loss_weight={self.loss_weight}")
