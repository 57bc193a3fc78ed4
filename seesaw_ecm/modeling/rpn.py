"""detectron2's RPN with mmdetection's floor on its low-quality matches (``min_pos_iou``).

Both label an anchor positive when it is, ties included, the best anchor of some ground-truth
box, even below the positive IoU threshold ("low-quality matches"). mmdetection's MaxIoUAssigner
does so only for boxes whose best anchor reaches ``min_pos_iou`` (0.3 in the RPN of the official
Seesaw / ECM configs); detectron2 has no floor: a box whose best IoU is 0.05 still gets its
positive anchors. ``MODEL.PROPOSAL_GENERATOR.NAME "LowQualityFloorRPN"`` with
``MODEL.RPN.LOW_QUALITY_MIN_IOU`` sets the floor; 0 is detectron2's RPN exactly.
"""
from detectron2.layers import nonzero_tuple
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.proposal_generator import PROPOSAL_GENERATOR_REGISTRY, RPN


class LowQualityFloorMatcher(Matcher):
    """A Matcher whose low-quality matches are made only for ground-truth boxes whose best
    prediction has a quality >= ``low_quality_min_iou`` (0: detectron2's Matcher)."""

    def __init__(self, thresholds, labels, low_quality_min_iou=0.0):
        super().__init__(thresholds, labels, allow_low_quality_matches=True)
        self.low_quality_min_iou = low_quality_min_iou

    def set_low_quality_matches_(self, match_labels, match_quality_matrix):
        """match_labels: (N,) int8, set to 1 in place for the best predictions of every box
        whose best quality reaches the floor; match_quality_matrix: (M, N) ground truth x
        predictions."""
        if self.low_quality_min_iou <= 0:
            return super().set_low_quality_matches_(match_labels, match_quality_matrix)
        highest, _ = match_quality_matrix.max(dim=1)
        best = (match_quality_matrix == highest[:, None]) & (
            highest[:, None] >= self.low_quality_min_iou)
        match_labels[nonzero_tuple(best)[1]] = 1


@PROPOSAL_GENERATOR_REGISTRY.register()
class LowQualityFloorRPN(RPN):
    """detectron2's RPN labelling its anchors with a LowQualityFloorMatcher at
    MODEL.RPN.LOW_QUALITY_MIN_IOU."""

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["anchor_matcher"] = LowQualityFloorMatcher(
            cfg.MODEL.RPN.IOU_THRESHOLDS, cfg.MODEL.RPN.IOU_LABELS,
            low_quality_min_iou=cfg.MODEL.RPN.LOW_QUALITY_MIN_IOU)
        return ret
