"""Softmax cross-entropy baseline over C + 1 logits (background last)."""
from torch import nn
from torch.nn import functional as F

from .precision import float32_loss


class CrossEntropyLoss(nn.Module):
    """Plain softmax cross-entropy averaged over the N sampled RoIs.

    Args:
        num_classes: C, the number of foreground classes; label C is background.
        loss_weight: multiplies the loss.
    """

    uses_objectness = False

    def __init__(self, num_classes, loss_weight=1.0):
        super().__init__()
        self.num_classes = num_classes
        self.loss_weight = loss_weight

    @float32_loss
    def forward(self, logits, labels):
        """
        Args:
            logits: (N, C + 1) logits, column C = background.
            labels: (N,) int64 in [0, C].

        Returns:
            dict with the scalar ``loss_cls`` (0 connected to the graph when N = 0).
        """
        loss = F.cross_entropy(logits, labels, reduction="sum")
        return {"loss_cls": loss * (self.loss_weight / max(labels.numel(), 1))}

    def get_probs(self, logits):
        """Scores (N, C + 1) = softmax(logits)."""
        return F.softmax(logits, dim=-1)

    def extra_repr(self):
        return f"num_classes={self.num_classes}, loss_weight={self.loss_weight}"
