"""Weighted sigmoid binary cross-entropy with one positive column per row, fused: the shared
kernel of the sigmoid losses (ECM, EQL, DropLoss, EQLv2, Federated)."""
import torch
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

# softplus(x) = x beyond it: exact in float32 and float64
_SOFTPLUS_THRESHOLD = 40


def sigmoid_bce(logits, labels, weight, target_weight=None, entry_weight=None, scale=1.0,
                bias=None, sigmoid_sums=False):
    """sum_{i,c} W_ic * BCE_with_logits(x_ic, t_ic), x = scale * logits + bias,
    t_ic = [c == labels_i].

    W_ic = weight_c * entry_weight_ic for the negative entries, ``target_weight``_i for the
    positive one (default weight_{labels_i}). Same value as
    ``F.binary_cross_entropy_with_logits(x, one_hot, weight=W, reduction="sum")``, as stably:
    BCE(x, 0) = softplus(x) and BCE(x, 1) = softplus(-x), each computed directly (no
    cancellation). Cheaper: no one-hot or (N, K) weight tensor is built, the weighted sum over
    the columns is one matrix-vector product, and the backward is fused,
    dL/dlogits = scale * W (sigmoid(x) - t), from one saved (N, K) tensor.

    Args:
        logits: (N, K) float.
        labels: (N,) int64, the positive column of each row; a row with labels_i >= K has none
            (all its entries negative).
        weight: (K,) weights of the negative entries, dtype of ``logits``.
        target_weight: (N,) weight of each row's positive entry, or None.
        entry_weight: (N, K) factors of the negative entries (e.g. 0 / 1: ignored / kept), or
            None (all 1). Its value on a positive entry is not read. A float mask, not a bool
            one: multiplying by it is vectorised, masking with a random bool mask is not.
        scale: a Python float; bias: (K,) or None (x = scale * logits + bias).
        sigmoid_sums: also return, detached, the sums over the rows of sigmoid(x) on the
            negative entries, times entry_weight ((K,)), and sigmoid(x) of each row's positive
            entry ((N,); any value for a row without one), for losses that collect gradient
            statistics (|dBCE/dx| = sigmoid(x) on a negative, 1 - sigmoid(x) on a positive).

    Returns:
        the scalar sum, or (sum, (K,) negative sums, (N,) positive sigmoids) with
        ``sigmoid_sums``.
    """
    out = _SigmoidBCE.apply(logits, labels, weight, target_weight, entry_weight, scale, bias,
                            sigmoid_sums)
    return out if sigmoid_sums else out[0]


def _positives(labels, num_columns):
    """(rows, columns, has): index of each row's positive entry (clamped into range) and
    whether the row has one."""
    rows = torch.arange(labels.numel(), device=labels.device)
    return rows, labels.clamp(max=num_columns - 1), labels < num_columns


def _negative_sigmoid(x, entry_weight, rows, cols, has):
    """sigmoid(x) * entry_weight, 0 on the positive entries; and sigmoid of the positives."""
    sigmoid = torch.sigmoid(x)
    if entry_weight is not None:
        sigmoid.mul_(entry_weight)
    positives = torch.sigmoid(x[rows, cols])
    sigmoid[rows, cols] = torch.where(has, 0, sigmoid[rows, cols])
    return sigmoid, positives


class _SigmoidBCE(torch.autograd.Function):

    @staticmethod
    def forward(ctx, logits, labels, weight, target_weight, entry_weight, scale, bias,
                sigmoid_sums):
        if bias is not None:
            x = torch.add(bias, logits, alpha=scale)
        else:
            x = logits * scale if scale != 1 else logits
        rows, cols, has = _positives(labels, x.shape[1])
        x_pos = x[rows, cols]
        w_pos = weight[cols] if target_weight is None else target_weight
        negatives = F.softplus(x, threshold=_SOFTPLUS_THRESHOLD)
        if entry_weight is not None:
            negatives.mul_(entry_weight)
        # positive entries: out of the weighted column sums, counted as softplus(-x) instead
        negatives[rows, cols] = torch.where(has, 0, negatives[rows, cols])
        positives = F.softplus(-x_pos, threshold=_SOFTPLUS_THRESHOLD)
        loss = negatives.matmul(weight).sum() + (positives * w_pos).masked_fill(~has, 0).sum()
        del negatives
        ctx.scale = scale
        if not sigmoid_sums:  # the backward computes sigmoid(x)
            ctx.save_for_backward(x, labels, weight, target_weight, entry_weight, None, None)
            return loss, None, None
        sigmoid, sigmoid_pos = _negative_sigmoid(x, entry_weight, rows, cols, has)
        ctx.save_for_backward(None, labels, weight, target_weight, None, sigmoid, sigmoid_pos)
        sums = (sigmoid.sum(dim=0), sigmoid_pos.clone())
        ctx.mark_non_differentiable(*sums)
        return (loss, *sums)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, *unused):
        x, labels, weight, target_weight, entry_weight, sigmoid, sigmoid_pos = ctx.saved_tensors
        rows, cols, has = _positives(labels, weight.numel())
        factor = grad * ctx.scale
        w_pos = weight[cols] if target_weight is None else target_weight
        if sigmoid is None:
            grad_logits, sigmoid_pos = _negative_sigmoid(x, entry_weight, rows, cols, has)
            grad_logits.mul_(weight * factor)
        else:  # saved by the forward: not modified, a second backward may read it
            grad_logits = sigmoid * (weight * factor)
        positive = (sigmoid_pos - 1) * w_pos * factor
        grad_logits[rows, cols] = torch.where(has, positive, grad_logits[rows, cols])
        return grad_logits, None, None, None, None, None, None, None
