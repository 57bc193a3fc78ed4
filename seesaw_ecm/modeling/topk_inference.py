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
"""
import torch
from detectron2.config import configurable


class RunningKthScore:
    """Per class, the K-th best score among the scores given so far (-inf below K of them).

    Memory: at most K scores per class plus a pending buffer, merged (one sort) when it
    outgrows the kept ones, so each score is sorted O(log) times overall.
    """

    MIN_BUFFER = 1 << 16

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


class TopKPerClassHeads:
    """Mixin for ROI heads (before the detectron2 class in the bases): with
    TEST.AP_FIXED.ENABLED the box predictors keep every detection above
    TEST.AP_FIXED.SCORE_THRESH (no per-image cap), and `select_top_k_per_class` keeps, before
    the mask head, each image's TEST.DETECTIONS_PER_IMAGE best and the detections at or above
    their class' running K-th score. Off: nothing changes. The running scores restart whenever
    the module changes mode (detectron2's inference_context puts the model in eval mode for
    each evaluation)."""

    @configurable
    def __init__(self, *, topk_per_class=0, keep_per_image=100, **kwargs):
        """topk_per_class: K (0 = off); keep_per_image: detections of each image always kept."""
        super().__init__(**kwargs)
        self.topk_per_class = topk_per_class
        self.keep_per_image = keep_per_image
        self._running = None

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ap_fixed = cfg.TEST.AP_FIXED
        if ap_fixed.ENABLED:
            ret["topk_per_class"] = ap_fixed.TOPK_PER_CLASS
            ret["keep_per_image"] = cfg.TEST.DETECTIONS_PER_IMAGE
            for predictor in ret.get("box_predictors") or [ret["box_predictor"]]:
                predictor.test_topk_per_image = -1
                predictor.test_score_thresh = ap_fixed.SCORE_THRESH
        return ret

    def train(self, mode=True):
        self._running = None
        return super().train(mode)

    def select_top_k_per_class(self, instances):
        """Per image Instances (sorted by score, as fast_rcnn_inference returns them) -> those
        that may be in the final top K of their class, or in the image's own top (its first
        keep_per_image, flagged in the (R,) bool field `in_image_cap`)."""
        if not self.topk_per_class:
            return instances
        if self._running is None:
            self._running = RunningKthScore(self.num_classes, self.topk_per_class)
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

    def forward_with_given_boxes(self, features, instances):
        return super().forward_with_given_boxes(features, self.select_top_k_per_class(instances))
