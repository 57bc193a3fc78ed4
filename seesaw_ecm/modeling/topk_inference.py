"""Top-K-per-class inference for AP-fixed (TEST.AP_FIXED): detections are no longer capped per
image; instead each class keeps its K best over the whole test set.

One pass with bounded work, instead of the two passes of large-vocab-devil's `infer_topk.py`
(a mask-free pass to estimate each class' K-th score, then a second pass): every process keeps,
per class, the K-th best score among the detections it has produced so far. That running
K-th is a lower bound on the K-th of the whole test set (over all processes), so a detection
below it can never be among the final top K: it is dropped before the mask head, which
therefore runs only on detections that may be kept (plus each image's TEST.DETECTIONS_PER_IMAGE
best, which standard AP needs). The exact top K per class over all processes is then selected
by the evaluator (seesaw_ecm.evaluation.lvis_fast.TopKPerClass). Early images keep more (the
bound starts at -inf), like the reference's first pass without its second.

The ROI heads take a :class:`TopKPerClassFilter` (or None) as their `topk_filter` argument and
apply it to their detections before the mask head.
"""
import torch
from torch import nn


class RunningKthScore:
    """Per class, the K-th best score among the scores given so far (-inf below K of them).

    Memory: at most K scores per class plus a pending buffer, merged (one sort) when it
    outgrows the kept ones (and MIN_BUFFER), so each score is sorted O(log) times overall.
    The thresholds only rise at a merge: a small MIN_BUFFER keeps them fresh on small test sets
    (K x C of a few thousand), where a stale -inf let whole images of low scores reach the mask
    head; on LVIS the kept scores (K x C = 12M) set the pace.
    """

    MIN_BUFFER = 1 << 10

    def __init__(self, num_classes, k):
        self.k = k
        self.threshold = torch.full((num_classes,), float("-inf"))
        self._kept = (torch.zeros(0, dtype=torch.long), torch.zeros(0))
        self._pending = []
        self._num_pending = 0

    def update(self, classes, scores):
        """classes (N,) int64, scores (N,) float CPU tensors of new detections."""
        above = scores >= self.threshold[classes]
        self._pending.append((classes[above], scores[above]))
        self._num_pending += int(above.sum())
        if self._num_pending > max(len(self._kept[0]), self.MIN_BUFFER):
            self.merge()

    def merge(self):
        """Fold the pending scores in; refresh the thresholds."""
        if not self._pending:
            return
        classes = torch.cat([self._kept[0]] + [p[0] for p in self._pending])
        scores = torch.cat([self._kept[1]] + [p[1] for p in self._pending])
        self._pending, self._num_pending = [], 0
        order = torch.argsort(scores, descending=True, stable=True)
        order = order[torch.argsort(classes[order], stable=True)]  # by class, score descending
        classes, scores = classes[order], scores[order]
        counts = torch.bincount(classes, minlength=len(self.threshold))
        starts = torch.cumsum(counts, 0) - counts
        keep = torch.arange(len(classes)) - starts[classes] < self.k
        self._kept = classes[keep], scores[keep]
        full = torch.nonzero(counts >= self.k).flatten()
        self.threshold[full] = scores[starts[full] + self.k - 1]


class TopKPerClassFilter(nn.Module):
    """TEST.AP_FIXED's filter of ROI heads' detections before their mask head: keeps each
    image's `keep_per_image` best and the detections at or above their class' running K-th
    score (K = `k`). No parameters; the running scores restart whenever the module changes
    mode (detectron2's inference_context puts the model in eval mode for each evaluation)."""

    def __init__(self, num_classes, k, keep_per_image=100):
        """num_classes: C; k: K of each class' top K; keep_per_image: detections of each image
        always kept (-1: all)."""
        super().__init__()
        self.num_classes, self.k, self.keep_per_image = num_classes, k, keep_per_image
        self._running = None

    @classmethod
    def from_config(cls, cfg, box_predictors):
        """The filter TEST.AP_FIXED asks for, or None (off). With it on, the box predictors
        (FastRCNNOutputLayers) keep every detection above TEST.AP_FIXED.SCORE_THRESH, no
        per-image cap."""
        ap_fixed = cfg.TEST.AP_FIXED
        if not ap_fixed.ENABLED:
            return None
        for predictor in box_predictors:
            predictor.test_topk_per_image = -1
            predictor.test_score_thresh = ap_fixed.SCORE_THRESH
        if not ap_fixed.TOPK_PER_CLASS:
            return None
        return cls(cfg.MODEL.ROI_HEADS.NUM_CLASSES, ap_fixed.TOPK_PER_CLASS,
                   cfg.TEST.DETECTIONS_PER_IMAGE)

    def train(self, mode=True):
        self._running = None
        return super().train(mode)

    def forward(self, instances):
        """Per image Instances (sorted by score, as fast_rcnn_inference returns them) -> those
        that may be in the final top K of their class, or in the image's own top (its first
        keep_per_image, flagged in the (R,) bool field `in_image_cap`)."""
        if self._running is None:
            self._running = RunningKthScore(self.num_classes, self.k)
        out = []
        for x in instances:
            classes, scores = x.pred_classes.cpu(), x.scores.float().cpu()
            keep = scores >= self._running.threshold[classes]
            self._running.update(classes[keep], scores[keep])
            # the image's own top (standard AP), marked here: detector_postprocess later drops
            # empty boxes, after which the evaluator could no longer tell which they were
            in_cap = torch.zeros_like(keep)
            in_cap[:self.keep_per_image if self.keep_per_image >= 0 else len(keep)] = True
            x.in_image_cap = in_cap.to(x.scores.device)
            out.append(x[(keep | in_cap).to(x.scores.device)])
        return out
