"""Balanced Group Softmax (BaGS; Li et al., CVPR 2020), in the LVIS v1 form of the official
code (tztztztztz/eqlv2 ``mmdet/models/losses/group_softmax.py``; the first version is
FishYuLi/BalancedGroupSoftmax): one softmax per group of classes of similar training instance
count, each with an "others" logit, plus a binary foreground / background group."""
import bisect

import torch
from torch import nn
from torch.nn import functional as F

_DROPPED = -100  # group target of a RoI the group does not train on (ignore_index)


class BalancedGroupSoftmax(nn.Module):
    """Softmax cross-entropy within each group, summed over the groups.

    Groups: a foreground class with n training instances goes to group
    ``bisect_right(bin_split, n)`` (default bins [0, 10), [10, 100), [100, 1000), [1000, inf)),
    and the last group holds background alone. Logit layout, (N, C + 1 + G) for G groups:
    group by group, [others, the group's classes in class order]. In the background group
    "others" is foreground, so that group is the binary [foreground, background].

    Loss of group g: labels are the position of the RoI's class in g, 0 ("others") for RoIs of
    any other group; CE summed over the kept RoIs / max(number kept, 1). The background group
    keeps every RoI. A foreground group keeps its positives and ``beta`` x as many "others"
    drawn uniformly without replacement (all of them when fewer; none when the group has no
    positive in the batch), as the official ``_sample_others``.

    Inference: in-group softmax of each class times P(foreground) of the background group;
    P(background) in the last column.

    ``class_counts`` (C,) instance counts are a persistent buffer (checkpoints carry them; the
    groups are derived from them). For a model built before loading a checkpoint pass
    ``class_counts=None, num_classes=C``: NaN placeholders, filled by ``load_state_dict``.

    Classifier hook read by the predictor: ``num_logits`` = C + 1 + G.

    Args:
        class_counts: (C,) training instance counts, or None.
        beta: "others" kept per positive in a foreground group (8).
        bin_split: instance-count boundaries of the foreground groups.
        loss_weight: multiplies the loss.
        num_classes: C; required when ``class_counts`` is None, else checked against it.
    """

    uses_objectness = False

    def __init__(self, class_counts=None, beta=8.0, bin_split=(10, 100, 1000), loss_weight=1.0,
                 num_classes=None):
        super().__init__()
        if list(bin_split) != sorted(bin_split):
            raise ValueError(f"bin_split must be increasing, got {bin_split}")
        if class_counts is None:
            if num_classes is None:
                raise ValueError("BalancedGroupSoftmax needs class_counts or, for placeholders, "
                                 "num_classes")
            counts = torch.full((num_classes,), float("nan"), dtype=torch.float64)
        else:
            counts = torch.as_tensor(class_counts, dtype=torch.float64).flatten()
            if not (torch.isfinite(counts).all() and (counts >= 0).all()):
                raise ValueError("class_counts must be finite and >= 0")
            if num_classes is not None and num_classes != counts.numel():
                raise ValueError(f"num_classes={num_classes} but {counts.numel()} class counts "
                                 "were given")
        self.num_classes = counts.numel()
        self.beta = beta
        self.bin_split = tuple(bin_split)
        self.num_groups = len(self.bin_split) + 2
        self.num_logits = self.num_classes + 1 + self.num_groups
        self.loss_weight = loss_weight
        self.register_buffer("class_counts", counts)
        self._assign_groups()

    def _assign_groups(self):
        """Index maps from ``class_counts`` (non-persistent buffers, follow the device):
        ``label_group`` (C + 1,) group of each label, ``label_position`` (C + 1,) its position
        in the group (1-based; 0 = others), ``class_column`` (C,) its logit column, and the
        python list ``group_sizes`` (classes per group)."""
        self._has_statistics = bool(torch.isfinite(self.class_counts).all())
        groups = [bisect.bisect_right(self.bin_split, float(n)) if self._has_statistics else 0
                  for n in self.class_counts] + [self.num_groups - 1]
        sizes = [0] * self.num_groups
        position = []
        for g in groups:  # once per model build / checkpoint load, not per batch
            sizes[g] += 1
            position.append(sizes[g])
        starts = [sum(size + 1 for size in sizes[:g]) for g in range(self.num_groups)]
        device = self.class_counts.device
        group = torch.tensor(groups, device=device)
        position = torch.tensor(position, device=device)
        self.group_sizes = sizes
        self.register_buffer("label_group", group, persistent=False)
        self.register_buffer("label_position", position, persistent=False)
        self.register_buffer("class_column", (torch.tensor(starts, device=device)[group]
                                              + position)[:-1], persistent=False)

    def _groups(self, logits):
        """The (N, size + 1) logits of each group, in group order."""
        return logits.split([size + 1 for size in self.group_sizes], dim=1)

    def group_targets(self, labels, group):
        """(N,) int64 labels within `group`: position of the class, 0 for "others"."""
        mine = self.label_group[labels] == group
        return torch.where(mine, self.label_position[labels], torch.zeros_like(labels))

    def sample_others(self, targets):
        """(N,) bool RoIs that a foreground group trains on (see the class docstring), drawn on
        the device without reading a count back: the others with the floor(beta x positives)
        smallest of N uniform keys (a uniform draw without replacement).

        Args:
            targets: (N,) int64 labels within the group, 0 = others.
        """
        positive = targets > 0
        num_sampled = (positive.sum() * self.beta).floor()
        keys = torch.rand(targets.shape, device=targets.device).masked_fill_(positive, 2)
        rank = torch.empty_like(targets)
        rank[keys.argsort()] = torch.arange(targets.numel(), device=targets.device)
        # ranks of the others: 0 .. (number of others - 1); none when no positive
        return positive | (rank < num_sampled)

    def forward(self, logits, labels):
        """
        Args:
            logits: (N, C + 1 + G) logits in the group layout.
            labels: (N,) int64 in [0, C], C = background.

        Returns:
            dict with the scalar ``loss_cls`` = sum over groups of the mean CE of the kept
            RoIs, times ``loss_weight``.
        """
        if not self._has_statistics:
            raise RuntimeError("BalancedGroupSoftmax has placeholder class statistics: build it "
                               "with class_counts, or load_state_dict a checkpoint holding them.")
        losses = []
        for group, group_logits in enumerate(self._groups(logits)):
            targets = self.group_targets(labels, group)
            if group < self.num_groups - 1:  # the background group keeps every RoI
                keep = self.sample_others(targets)
                targets = targets.masked_fill(~keep, _DROPPED)
                num_kept = keep.sum().clamp(min=1)
            else:
                num_kept = max(targets.numel(), 1)
            ce = F.cross_entropy(group_logits, targets, ignore_index=_DROPPED, reduction="sum")
            losses.append(ce / num_kept)
        loss = sum(losses)
        return {"loss_cls": loss * self.loss_weight}

    def get_probs(self, logits):
        """Scores (N, C + 1): in-group softmax of each class times P(foreground) of the
        background group, and P(background) in the last column."""
        in_group = torch.cat([F.softmax(g, dim=1) for g in self._groups(logits)], dim=1)
        background = in_group[:, -2:]  # [foreground ("others"), background]
        return torch.cat([in_group[:, self.class_column] * background[:, :1],
                          background[:, 1:]], dim=1)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._assign_groups()

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, beta={self.beta}, bin_split={self.bin_split}, "
                f"group_sizes={self.group_sizes}, loss_weight={self.loss_weight}")
