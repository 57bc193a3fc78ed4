"""ROI heads that install the long-tail box predictor (LongTailOutputLayers): a standard
(Mask R-CNN) one here, and a cascade (Cascade Mask R-CNN) one in cascade.py; both infer top K
per class with TEST.AP_FIXED (TopKPerClassHeads)."""
from detectron2.modeling import ROI_HEADS_REGISTRY, StandardROIHeads

from .carafe import CARAFEMaskHeadMixin
from .cascade import LongTailCascadeROIHeads  # noqa: F401 (its import path before cascade.py)
from .mask_scoring import MaskScoringMixin
from .predictor import LongTailOutputLayers
from .topk_inference import TopKPerClassHeads


@ROI_HEADS_REGISTRY.register()
class LongTailROIHeads(TopKPerClassHeads, MaskScoringMixin, CARAFEMaskHeadMixin, StandardROIHeads):
    """StandardROIHeads whose box predictor is configured by MODEL.LONG_TAIL (loss, cosine
    classifier, decoupled objectness)."""

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictor"] = LongTailOutputLayers(cfg, ret["box_head"].output_shape)
        return ret
