"""Equilibrium loss of LOCE (Feng et al., ICCV 2021), as in the official code
(fcjian/LOCE ``mmdet/models/losses/equilibrium_loss.py`` and the mean-score update of
``loce_roi_head.py``): softmax cross-entropy on logits shifted by the log of each class's
running mean classification score."""
import torch
from torch import distributed as dist
from torch import nn
from torch.nn import functional as F


class EquilibriumLoss(nn.Module):
    """loss = sum_i -log(m_{y_i} e^{z_{i,y_i}} / sum_j m_j e^{z_ij}) / N over C + 1 columns
    (background last), i.e. CE of z + log m.

    ``mean_score`` m (C + 1,) is a persistent buffer (checkpoints carry it), initialised to
    ``initial_score`` (then measured by LOCE's initialisation pass before training, where it
    runs); m_bg is fixed at ``background_score``. It is updated by
    :meth:`update_mean_score`, which the LOCE ROI heads call before every loss (the official
    order): an entry is one ground-truth instance (its positive RoIs' mean softmax score of its
    class) or one memory-sampled class; per class with n entries this batch (all ranks),
    m_c <- a m_c + (1 - a) mean(entries), a = momentum^n.

    Args:
        num_classes: C; label C is background.
        momentum: alpha of the running mean per entry (0.9).
        initial_score: initial m_c (0.01).
        background_score: fixed m_bg (0.01).
        loss_weight: multiplies the loss.
    """

    uses_objectness = False

    def __init__(self, num_classes, momentum=0.9, initial_score=0.01, background_score=0.01,
                 loss_weight=1.0):
        super().__init__()
        self.num_classes = num_classes
        self.momentum = momentum
        self.background_score = background_score
        self.loss_weight = loss_weight
        score = torch.full((num_classes + 1,), float(initial_score))
        score[num_classes] = background_score
        self.register_buffer("mean_score", score)

    def forward(self, logits, labels):
        """
        Args:
            logits: (N, C + 1) logits, column C = background.
            labels: (N,) int64 in [0, C], C = background.

        Returns:
            dict with the scalar ``loss_cls`` (mean over N, times ``loss_weight``).
        """
        shifted = logits + self.mean_score.log().to(logits.dtype)
        loss = F.cross_entropy(shifted, labels, reduction="sum")
        return {"loss_cls": loss * (self.loss_weight / max(labels.numel(), 1))}

    @torch.no_grad()
    def update_mean_score(self, logits, labels, entries):
        """Fold this batch's scores into ``mean_score`` (see the class docstring).

        Args:
            logits: (N, C + 1) logits; scores are their plain softmax.
            labels: (N,) int64 in [0, C]; background RoIs are ignored.
            entries: (N,) int64 ids; foreground RoIs with the same id form one entry (the
                same ground-truth instance, or the memory samples of one class).
        """
        num_rows, num_classes = labels.numel(), self.num_classes
        fg = labels < num_classes
        # every row's score of its label, background rows included (weight 0): fixed shapes,
        # so nothing is read back to the host
        scores = F.softmax(logits.float(), dim=1).gather(1, labels[:, None])[:, 0]
        weight = fg.to(scores.dtype)
        # entry of each row: consecutive ids of its sorted ids, background rows one id apart
        key = entries.masked_fill(~fg, torch.iinfo(entries.dtype).max)
        sorted_key, order = key.sort()
        starts = torch.ones_like(fg)
        starts[1:] = sorted_key[1:] != sorted_key[:-1]
        entry = torch.empty_like(entries)
        entry[order] = starts.cumsum(0) - 1
        entry_count = scores.new_zeros(num_rows).index_add_(0, entry, weight)
        entry_mean = scores.new_zeros(num_rows).index_add_(0, entry, scores * weight)
        entry_mean /= entry_count.clamp(min=1)
        # class of each entry (C: background, or a slot no row uses)
        entry_class = labels.new_full((num_rows,), num_classes).scatter_(0, entry, labels)
        used = (entry_count > 0).to(scores.dtype)
        stats = torch.stack([
            scores.new_zeros(num_classes + 1).index_add_(0, entry_class, entry_mean * used),
            scores.new_zeros(num_classes + 1).index_add_(0, entry_class, used)])[:, :num_classes]
        # contiguous: a collective reads the storage as one block (a column view's last row
        # entries would be left out of the sum)
        stats = stats.contiguous()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
        total, count = stats.to(self.mean_score.dtype)
        keep = self.momentum ** count  # 1 for classes without an entry: unchanged
        self.mean_score[:-1] = keep * self.mean_score[:-1] + (1 - keep) * total / count.clamp(
            min=1)
        self.mean_score[-1] = self.background_score

    def get_probs(self, logits):
        """Scores (N, C + 1): plain softmax (no mean-score shift at inference)."""
        return F.softmax(logits, dim=-1)

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, momentum={self.momentum}, "
                f"background_score={self.background_score}, loss_weight={self.loss_weight}")
