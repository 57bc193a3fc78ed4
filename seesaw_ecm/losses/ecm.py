"""Effective Class-Margin loss (Cho & Kraehenbuehl, ECCV 2022), as in the official code: C + 1
sigmoid columns (column C = background), margins and weights from class statistics alone."""
import warnings

import torch
from torch import nn

from .precision import float32_loss
from .sigmoid_bce import sigmoid_bce


WEIGHT_DTYPES = ("float64", "float32")  # precisions of the class weights (see below)


def effective_class_margins(class_counts, fg_bg_ratio=6.3313, weight_dtype="float64"):
    """ECM statistics of the C foreground classes plus the background column, float64 tensors.

    With n = [n_0, ..., n_{C-1}, n_bg], n_bg = fg_bg_ratio * sum(n_0..n_{C-1}), and for every
    column n_pos = n_c, n_neg = sum(n) - n_c, a_c = n_neg / n_pos:

    - pos_margin = log((n_pos^1/4 + n_neg^1/4) / n_neg^1/4) = log1p(a^-1/4)
    - neg_margin = log((n_pos^1/4 + n_neg^1/4) / n_pos^1/4) = log1p(a^1/4)
    - margin = pos_margin - neg_margin = 1/4 log(n_pos / n_neg) = -1/4 log(a)
    - weight = a * log((1 + a) / a) = a * log1p(1 / a)

    The log1p forms keep full float64 precision for both very rare (a >> 1) and very frequent
    (a << 1) columns.

    ``weight_dtype`` "float32" computes the weights as the official code does instead: counts,
    background count, a and a * log((1 + a) / a) all in float32. (1 + a) / a then rounds to a
    multiple of float32's epsilon above 1 for the rarest classes (LVIS v1: w = 1.110 instead of
    1.000 for a class of one instance). The margins are float64 either way (they agree).

    Zero counts: a class never seen in training would get an infinite margin. Its count is
    clamped to 1, the smallest count of a class present in the training set (the same floor
    the Seesaw loss applies to its counts); a warning says how many classes were clamped.
    The background count is computed from the clamped counts.

    Args:
        class_counts: (C,) per-class training counts (tensor or sequence), >= 0.
        fg_bg_ratio: background count over the foreground total.
        weight_dtype: "float64" (exact) or "float32" (the official computation of the weight).

    Returns:
        dict of (C + 1,) float64 tensors: counts, pos_margin, neg_margin, margin, weight.
    """
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype {weight_dtype!r}: valid choices are {WEIGHT_DTYPES}")
    counts = torch.as_tensor(class_counts, dtype=torch.float64).flatten()
    if not (torch.isfinite(counts).all() and (counts >= 0).all()):
        raise ValueError("class_counts must be finite and >= 0")
    if fg_bg_ratio <= 0:
        raise ValueError(f"fg_bg_ratio must be > 0, got {fg_bg_ratio}")
    num_zero = int((counts < 1).sum())
    if num_zero:
        warnings.warn(f"ECM: {num_zero} of {counts.numel()} classes have a count < 1 "
                      "(never seen in training); their counts are clamped to 1.")
    counts = counts.clamp(min=1)
    counts = torch.cat([counts, counts.sum()[None] * fg_bg_ratio])
    a = (counts.sum() - counts) / counts
    weight = a * torch.log1p(1 / a)
    if weight_dtype == "float32":  # the official get_detection_weight, on float32 counts
        n = counts[:-1].float()
        n = torch.cat([n, n.sum()[None] * fg_bg_ratio])
        a32 = (n.sum() - n) / n
        weight = (a32 * ((1 + a32) / a32).log()).double()
    return {
        "counts": counts,
        "pos_margin": torch.log1p(a.pow(-0.25)),
        "neg_margin": torch.log1p(a.pow(0.25)),
        "margin": -0.25 * torch.log(a),
        "weight": weight,
    }


def background_scaled_sigmoid(logits):
    """(N, C + 1) logits, background last -> scores sigmoid(z_c) (1 - sigmoid(z_bg)) for c < C
    and sigmoid(z_bg) in the last column (ECM's and EQLv2's inference).

    1 - sigmoid(z_bg) is computed as sigmoid(-z_bg): the same value, but it does not round to 0
    in float32 for z_bg > ~17 (a confident background), which would erase every class score."""
    foreground = torch.sigmoid(-logits[:, -1:])
    return torch.cat([logits[:, :-1].sigmoid() * foreground, logits[:, -1:].sigmoid()], dim=1)


class ECMLoss(nn.Module):
    """Weighted sigmoid loss with effective class margins over C + 1 columns.

    loss = sum_{i,c} w_c * BCE(sigmoid(2 z_ic + pos_margin_c - neg_margin_c), t_ic) / N
    with one-hot targets t over the C + 1 columns (a background RoI is a positive of column C).
    This equals the published form with p_pos = e^(z + pos) / (e^(z + pos) + e^(-z + neg)).

    The statistics (``sample_counts``, ``margin``, ``weight``; (C + 1,) float64) are computed
    once, by :func:`effective_class_margins` (the weights at ``weight_dtype`` precision), and
    kept as persistent buffers, so a checkpoint holds them and evaluation needs no dataset. For
    an eval-only model built before loading a checkpoint, pass ``class_counts=None,
    num_classes=C``: the buffers are NaN placeholders that ``load_state_dict`` fills;
    ``forward`` refuses to run until they are set.

    Args:
        class_counts: (C,) per-class training counts, or None for placeholders.
        fg_bg_ratio: background count over the foreground total.
        loss_weight: multiplies the loss.
        num_classes: C; required when ``class_counts`` is None, else checked against it.
        weight_dtype: "float64" (exact weights) or "float32" (the official code's rounding).
    """

    uses_objectness = False

    def __init__(self, class_counts=None, fg_bg_ratio=6.3313, loss_weight=1.0, num_classes=None,
                 weight_dtype="float64"):
        super().__init__()
        if class_counts is None:
            if num_classes is None:
                raise ValueError("ECMLoss needs class_counts or, for placeholders, num_classes")
            placeholder = torch.full((num_classes + 1,), float("nan"), dtype=torch.float64)
            stats = {"counts": placeholder, "margin": placeholder, "weight": placeholder}
        else:
            stats = effective_class_margins(class_counts, fg_bg_ratio, weight_dtype)
            if num_classes is not None and num_classes + 1 != stats["counts"].numel():
                raise ValueError(f"num_classes={num_classes} but {stats['counts'].numel() - 1} "
                                 "class counts were given")
        self.num_classes = stats["counts"].numel() - 1
        self.fg_bg_ratio = fg_bg_ratio
        self.loss_weight = loss_weight
        self.weight_dtype = weight_dtype
        self.register_buffer("sample_counts", stats["counts"].clone())
        self.register_buffer("margin", stats["margin"].clone())
        self.register_buffer("weight", stats["weight"].clone())
        self._has_statistics = class_counts is not None

    @float32_loss
    def forward(self, logits, labels):
        """
        Args:
            logits: (N, C + 1) logits, column C = background.
            labels: (N,) int64 in [0, C], C = background.

        Returns:
            dict with the scalar ``loss_cls`` (weighted sum over all entries / N, times
            ``loss_weight``).
        """
        if not self._has_statistics:
            raise RuntimeError("ECMLoss has placeholder class statistics: build it with "
                               "class_counts, or load_state_dict a checkpoint holding them.")
        # BCE(2 z + margin), summed with the column weights: no one-hot, fused backward
        loss = sigmoid_bce(logits, labels, self.weight.to(logits.dtype), scale=2.0,
                           bias=self.margin.to(logits.dtype))
        return {"loss_cls": loss * (self.loss_weight / max(labels.numel(), 1))}

    def get_probs(self, logits):
        """Scores (N, C + 1): sigmoid(z_c) * (1 - sigmoid(z_bg)) for c < C, and sigmoid(z_bg) in
        the last column; no margins at inference."""
        return background_scaled_sigmoid(logits)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._has_statistics = bool(all(torch.isfinite(b).all() for b in
                                        (self.sample_counts, self.margin, self.weight)))

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, fg_bg_ratio={self.fg_bg_ratio}, "
                f"loss_weight={self.loss_weight}, weight_dtype={self.weight_dtype}")
