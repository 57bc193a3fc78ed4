"""Seesaw Loss (Wang et al., CVPR 2021) with the decoupled objectness branch, as in the official
mmdetection ``SeesawLoss`` (``seesaw_ce_loss`` plus a 2-way fg/bg cross-entropy)."""
import math
import warnings

import torch
from torch import distributed as dist
from torch import nn
from torch.nn import functional as F

from .precision import float32_loss

_IGNORED = -100  # label of a row without a class term (cross_entropy's ignore_index)


def _select_rows(device):
    """Whether the class term selects the foreground rows first (less work) rather than run
    on every row with the background ignored: selecting reads their number back to the host,
    free on the CPU, a wait for the device on an accelerator."""
    return device.type == "cpu"


class SeesawLoss(nn.Module):
    """Seesaw class term on foreground RoIs plus a fg/bg objectness term on all RoIs.

    For a foreground RoI of class i, every non-target logit is shifted by log(S_ik),
    S_ik = M_ik * C_ik, before a softmax cross-entropy over the C class logits:

    - mitigation M_ik = (N_k / N_i)^p if N_k < N_i else 1, with N the cumulative counts
      (``cum_samples``) clamped to >= 1;
    - compensation C_ik = (sigma_k / max(sigma_i, eps))^q if that ratio > 1 else 1, with
      sigma = softmax(class_logits), detached.

    Both are evaluated in log space: log M_ik = p * min(log N_k - log N_i, 0) and
    log C_ik = q * max(log sigma_k - max(log sigma_i, log eps), 0). On the target (k = i) both
    are exactly 0, which is what the official ``(1 - onehot) * log(seesaw_weights)`` does.

    ``cum_samples`` (C,) counts the foreground labels seen in training. It is updated from each
    batch *before* that batch's loss (as the official code does), only in training mode, and
    is all-reduced (SUM) across ranks under ``torch.distributed`` so that every rank holds the
    global counts. It is a persistent buffer: checkpoints carry it.

    Args:
        num_classes: C, the number of foreground classes; label C is background.
        p: mitigation exponent.
        q: compensation exponent.
        eps: lower bound of sigma_i in the compensation ratio.
        loss_weight: multiplies both loss terms.
    """

    uses_objectness = True

    def __init__(self, num_classes, p=0.8, q=2.0, eps=1e-2, loss_weight=1.0):
        super().__init__()
        self.num_classes = num_classes
        self.p = p
        self.q = q
        self.eps = eps
        self.loss_weight = loss_weight
        self.register_buffer("cum_samples", torch.zeros(num_classes, dtype=torch.float))

    @torch.no_grad()
    def _update_counts(self, labels):
        # index_add_, not bincount: bincount reads its maximum back to the host on CUDA
        counts = labels.new_zeros(self.num_classes + 1).index_add_(
            0, labels, torch.ones_like(labels))[: self.num_classes]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
        self.cum_samples += counts.to(self.cum_samples.dtype)

    @float32_loss
    def forward(self, class_logits, objectness_logits, labels):
        """
        Args:
            class_logits: (N, C) class logits.
            objectness_logits: (N, 2) logits ordered [foreground, background].
            labels: (N,) int64 in [0, C], C = background.

        Returns:
            dict with scalar ``loss_cls`` (Seesaw CE summed over foreground RoIs / N) and
            ``loss_objectness`` (fg/bg CE averaged over N), both times ``loss_weight``. Without
            foreground RoIs (or with N = 0) the terms are zeros that keep the graph.
        """
        if self.training:
            self._update_counts(labels)
        num_rois = max(labels.numel(), 1)
        fg = labels < self.num_classes
        if _select_rows(class_logits.device):
            rows = fg.nonzero()[:, 0]
            loss_cls = self._seesaw_ce(class_logits[rows], labels[rows])
        else:  # on an accelerator that read would wait for the device: every row, background
            loss_cls = self._seesaw_ce(class_logits, labels.masked_fill(~fg, _IGNORED))
        loss_objectness = F.cross_entropy(objectness_logits, (~fg).long(), reduction="sum")
        scale = self.loss_weight / num_rois
        return {"loss_cls": loss_cls * scale, "loss_objectness": loss_objectness * scale}

    def _seesaw_ce(self, logits, labels):
        """Summed Seesaw cross-entropy: logits (M, C), labels (M,) < C, or ``_IGNORED`` for a
        row without a class term (a background RoI)."""
        index = labels.clamp(min=0)[:, None]  # any class for an ignored row
        log_counts = self.cum_samples.clamp(min=1).log()
        log_mitigation = (log_counts[None, :] - log_counts[index]).clamp(max=0) * self.p
        log_scores = F.log_softmax(logits.detach(), dim=1)
        log_self = log_scores.gather(1, index).clamp(min=math.log(self.eps))
        log_compensation = (log_scores - log_self).clamp(min=0) * self.q
        logits = logits + log_mitigation + log_compensation
        return F.cross_entropy(logits, labels, ignore_index=_IGNORED, reduction="sum")

    def get_probs(self, class_logits, objectness_logits):
        """Scores (N, C + 1): softmax(class_logits) * p_fg, and p_bg in the last column, with
        [p_fg, p_bg] = softmax(objectness_logits)."""
        objectness = F.softmax(objectness_logits, dim=-1)
        scores = F.softmax(class_logits, dim=-1) * objectness[..., :1]
        return torch.cat([scores, objectness[..., 1:]], dim=-1)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Tolerate checkpoints without ``cum_samples``: warn and restart the counts at 0."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        key = prefix + "cum_samples"
        if key not in state_dict:
            if key in missing_keys:
                missing_keys.remove(key)
            self.cum_samples.zero_()
            warnings.warn(f"{key} not in the loaded state_dict: Seesaw class counts restart at 0.")

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, p={self.p}, q={self.q}, eps={self.eps}, "
                f"loss_weight={self.loss_weight}")
