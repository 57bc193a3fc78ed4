"""Weighted sigmoid binary cross-entropy with one positive column per row, fused: the shared
kernel of the sigmoid losses (ECM, EQL, DropLoss, EQLv2, Federated), and its helpers for the
one positive entry of each row (also used by GOL's kernel)."""
import torch
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

# softplus(x) = x beyond it: exact in float32 and float64
_SOFTPLUS_THRESHOLD = 40
_aten = torch.ops.aten


def sigmoid_bce(logits, labels, weight, target_weight=None, entry_weight=None, scale=1.0,
                bias=None, sigmoid_sums=False, columns=None):
    """sum_{i,c} W_ic * BCE_with_logits(x_ic, t_ic), x = scale * logits + bias,
    t_ic = [c == labels_i].

    W_ic = weight_c * entry_weight_ic for the negative entries, ``target_weight``_i for the
    positive one (default weight_{labels_i}). Same value as
    ``F.binary_cross_entropy_with_logits(x, one_hot, weight=W, reduction="sum")``, as stably:
    BCE(x, 0) = softplus(x) and BCE(x, 1) = softplus(-x), each computed directly (no
    cancellation). Cheaper: no one-hot or (N, K) weight tensor is built, the weighted sum over
    the columns is one matrix-vector product, the positive entries are an (N,) correction, and
    the backward, dL/dlogits = scale * W (sigmoid(x) - t), is one fused pass over (N, K)
    (``softplus_backward`` with the column weights broadcast; with an affine x, the forward
    computes ``log_sigmoid_forward(-x)``, which keeps exp(-|x|), and the backward
    ``log_sigmoid_backward`` reads it: no second exponential).

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
        columns: (K',) int64 distinct columns, or None (all K): the sum runs over these columns
            only (the others have weight 0; a row whose label is not among them has no
            positive entry). The forward reads only them; the backward writes the (N, K)
            gradient in one pass, zeros elsewhere (no scatter). Not with ``scale``, ``bias``,
            ``entry_weight`` or ``sigmoid_sums``.

    Returns:
        the scalar sum, or (sum, (K,) negative sums, (N,) positive sigmoids) with
        ``sigmoid_sums``.
    """
    if columns is not None and (scale != 1 or bias is not None or entry_weight is not None
                                or sigmoid_sums):
        raise ValueError("sigmoid_bce: columns cannot be combined with scale, bias, "
                         "entry_weight or sigmoid_sums")
    out = _SigmoidBCE.apply(logits, labels, weight, target_weight, entry_weight, scale, bias,
                            sigmoid_sums, columns)
    return out if sigmoid_sums else out[0]


def positive_entries(labels, num_columns):
    """(flat, columns, has): flat index into the (N, K) entries of each row's positive entry
    and its column (both clamped into range), and whether the row has one."""
    cols = labels.clamp(max=num_columns - 1)
    rows = torch.arange(labels.numel(), device=labels.device)
    return rows * num_columns + cols, cols, labels < num_columns


def replace_positive_entries(matrix, flat, has, values):
    """In place: the positive entry of each row that has one set to ``values`` ((N,) or a
    number); the other entries unchanged."""
    entries = matrix.view(-1)
    entries.index_copy_(0, flat, torch.where(has, values, entries.index_select(0, flat)))


class _SigmoidBCE(torch.autograd.Function):

    @staticmethod
    def forward(ctx, logits, labels, weight, target_weight, entry_weight, scale, bias,
                sigmoid_sums, columns):
        logits = logits.contiguous()  # (a copy only if not): entries read by flat index
        full = (logits, labels, weight)
        if columns is not None:  # the sub-problem on the columns; the backward on full width
            position = labels.new_full((logits.shape[1] + 1,), columns.numel())
            position[columns] = torch.arange(columns.numel(), device=labels.device)
            labels = position[labels.clamp(max=logits.shape[1])]
            logits, weight = logits.index_select(1, columns), weight.index_select(0, columns)
            full = (*full[:2], full[2].new_zeros(full[2].shape).index_copy_(0, columns, weight))
        n, k = logits.shape
        flat, cols, has = positive_entries(labels, k)
        affine = bias is not None or scale != 1
        if affine:  # minus_x = -x, one pass; log_sigmoid_forward keeps exp(-|x|) for the backward
            minus_x = (torch.add(-bias, logits, alpha=-scale) if bias is not None
                       else logits * -scale)
            negatives, exp_abs = _aten.log_sigmoid_forward(minus_x)  # -softplus(x)
            x_pos = -minus_x.view(-1).index_select(0, flat)
            saved = (minus_x, exp_abs)
        else:
            negatives = F.softplus(logits, threshold=_SOFTPLUS_THRESHOLD)
            x_pos = logits.view(-1).index_select(0, flat)
            saved = (full[0], None)
        if entry_weight is not None:
            negatives.mul_(entry_weight)
        replace_positive_entries(negatives, flat, has, 0)  # counted below as softplus(-x)
        w_pos = weight.index_select(0, cols) if target_weight is None else target_weight
        positives = F.softplus(-x_pos, threshold=_SOFTPLUS_THRESHOLD) * w_pos
        negative_sum = negatives.matmul(weight).sum()
        loss = (-negative_sum if affine else negative_sum) + positives.masked_fill(~has, 0).sum()
        del negatives
        ctx.scale, ctx.affine = scale, affine
        sigmoid_pos = torch.sigmoid(x_pos)
        if not sigmoid_sums:  # full width: labels, weight (0 off the columns) and logits
            ctx.save_for_backward(*saved, full[1], full[2], has, target_weight, entry_weight,
                                  sigmoid_pos, None)
            return loss, None, None
        sigmoid = _sigmoid(*saved, affine)
        if entry_weight is not None:
            sigmoid.mul_(entry_weight)
        replace_positive_entries(sigmoid, flat, has, 0)
        # saved for the backward, which reads it without modifying it (a second backward may)
        ctx.save_for_backward(None, None, labels, weight, has, target_weight, None, sigmoid_pos,
                              sigmoid)
        sums = (sigmoid.new_ones(n).matmul(sigmoid), sigmoid_pos.clone())
        ctx.mark_non_differentiable(*sums)
        return (loss, *sums)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, *unused):
        (x, exp_abs, labels, weight, has, target_weight, entry_weight, sigmoid_pos,
         sigmoid) = ctx.saved_tensors
        flat, cols, _ = positive_entries(labels, weight.numel())
        factor = grad * ctx.scale
        column_factor = weight * factor
        if sigmoid is not None:
            grad_logits = sigmoid * column_factor
        else:
            grad_logits = _sigmoid(x, exp_abs, ctx.affine, column_factor.expand(x.shape))
            if entry_weight is not None:
                grad_logits.mul_(entry_weight)
        w_pos = weight.index_select(0, cols) if target_weight is None else target_weight
        replace_positive_entries(grad_logits, flat, has, (sigmoid_pos - 1) * w_pos * factor)
        return grad_logits, None, None, None, None, None, None, None, None


def _sigmoid(x, exp_abs, affine, factor=None):
    """factor * sigmoid(x) (N, K) in one pass (factor: (N, K), may be expanded; None: 1).

    ``x``, ``exp_abs`` as the forward saves them: x and None, or with ``affine`` -x and exp(-|x|)
    (log_sigmoid_forward's buffer; empty on CUDA, whose backward recomputes it)."""
    if factor is None and not affine:
        return torch.sigmoid(x)
    if factor is None:
        factor = x.new_ones(()).expand(x.shape)
    if affine:  # d/du log(sigmoid(u)) = sigmoid(-u), u = -x
        return _aten.log_sigmoid_backward(factor, x, exp_abs)
    return _aten.softplus_backward(factor, x, 1.0, _SOFTPLUS_THRESHOLD)
