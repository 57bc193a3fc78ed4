"""Equalization Loss v2 (Tan et al., CVPR 2021), as in the official mmdetection code
(tztztztztz/eqlv2 ``mmdet/models/losses/eqlv2.py``): a sigmoid BCE over C + 1 columns whose
per-class positive and negative weights follow the accumulated gradient ratio of each class."""
import torch
from torch import distributed as dist
from torch import nn

from .ecm import background_scaled_sigmoid
from .eql import prior_bias
from .precision import float32_loss
from .sigmoid_bce import sigmoid_bce


class EQLv2Loss(nn.Module):
    """loss = sum_{i,j} w_ij BCE(z_ij, y_ij) / N over N RoIs and C + 1 columns (column C =
    background, a positive of background RoIs), with w_ij = pos_w_j if y_ij = 1 else neg_w_j:

        neg_w_j = sigmoid(gamma (g_j - mu)),  pos_w_j = 1 + alpha (1 - neg_w_j),

    g_j = pos_grad_j / (neg_grad_j + 1e-10); the background column has weights 1. The first
    call (no gradient collected yet) uses weights 1 everywhere.

    After each training-mode call the gradient magnitudes |dBCE/dz| = |sigmoid(z) - y| of that
    call, times its weights, are summed per foreground class over the positive entries
    (``pos_grad``) and the negative ones (``neg_grad``), all-reduced (SUM) across ranks under
    ``torch.distributed`` (skipped in a single process, where the official call fails), and
    accumulated. Both (C,) float32 accumulators are persistent buffers: checkpoints carry them
    and a resumed run continues with the same weights.

    Classifier hooks read by the predictor: ``num_logits`` = C + 1 and
    ``bias_init`` = -log((1 - pi) / pi) on every column (the official sigmoid bbox head's
    ``bias_init_with_prob(0.001)``).

    Args:
        num_classes: C; label C is background.
        gamma, mu: slope and centre of the negative-weight mapping (12, 0.8).
        alpha: strength of the positive re-weighting (4).
        prior_prob: initial sigmoid probability of every column.
        loss_weight: multiplies the loss.
    """

    uses_objectness = False

    def __init__(self, num_classes, gamma=12.0, mu=0.8, alpha=4.0, prior_prob=0.001,
                 loss_weight=1.0):
        super().__init__()
        self.num_classes = num_classes
        self.num_logits = num_classes + 1
        self.gamma = gamma
        self.mu = mu
        self.alpha = alpha
        self.loss_weight = loss_weight
        self.bias_init = prior_bias(prior_prob)
        self.register_buffer("pos_grad", torch.zeros(num_classes))
        self.register_buffer("neg_grad", torch.zeros(num_classes))
        self._collected = False

    def class_weights(self):
        """(pos_w, neg_w), each (C + 1,), from the accumulated gradients (ones before the
        first collection)."""
        ones = self.pos_grad.new_ones(self.num_classes + 1)
        if not self._collected:
            return ones, ones
        ratio = self.pos_grad / (self.neg_grad + 1e-10)
        neg_w = torch.cat([torch.sigmoid(self.gamma * (ratio - self.mu)), ones[:1]])
        return 1 + self.alpha * (1 - neg_w), neg_w

    @float32_loss
    def forward(self, logits, labels):
        """
        Args:
            logits: (N, C + 1) logits, column C = background.
            labels: (N,) int64 in [0, C], C = background.

        Returns:
            dict with the scalar ``loss_cls`` = sum of the weighted BCE / N, times
            ``loss_weight``. In training mode the gradient accumulators are updated after.
        """
        pos_w, neg_w = (w.to(logits.dtype) for w in self.class_weights())
        # negatives weighted by column (neg_w), each row's positive by pos_w of its label
        out = sigmoid_bce(logits, labels, neg_w, target_weight=pos_w[labels],
                          sigmoid_sums=self.training)
        if self.training:
            loss, negative_sums, positive_sigmoid = out
            self._collect(labels, negative_sums * neg_w, (1 - positive_sigmoid) * pos_w[labels])
        else:
            loss = out
        return {"loss_cls": loss * (self.loss_weight / max(labels.numel(), 1))}

    @torch.no_grad()
    def _collect(self, labels, negative, positive):
        """Add this call's weighted gradient magnitudes per class: ``negative`` (C + 1,)
        summed over the negative entries of each column, ``positive`` (N,) of each row's
        positive entry (|dBCE/dz| = sigmoid(z) on a negative, 1 - sigmoid(z) on a positive)."""
        pos = torch.zeros_like(negative).index_add_(0, labels, positive)[: self.num_classes]
        neg = negative[: self.num_classes]
        both = torch.stack([pos, neg]).to(self.pos_grad.dtype)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(both)
        self.pos_grad += both[0]
        self.neg_grad += both[1]
        self._collected = True

    def get_probs(self, logits):
        """Scores (N, C + 1): sigmoid(z_c) * (1 - sigmoid(z_bg)) for c < C, and sigmoid(z_bg)
        in the last column (the official ``get_activation``)."""
        return background_scaled_sigmoid(logits)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        # any RoI is a negative of every other class: neg_grad > 0 once anything was collected
        self._collected = bool((self.neg_grad > 0).any())

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, gamma={self.gamma}, mu={self.mu}, "
                f"alpha={self.alpha}, loss_weight={self.loss_weight}")
