"""ROI heads that install the long-tail box predictor (LongTailOutputLayers)."""
from detectron2.modeling import ROI_HEADS_REGISTRY, StandardROIHeads

from .predictor import LongTailOutputLayers


@ROI_HEADS_REGISTRY.register()
class LongTailROIHeads(StandardROIHeads):
    """StandardROIHeads whose box predictor is configured by MODEL.LONG_TAIL (loss, cosine
    classifier, decoupled objectness)."""

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictor"] = LongTailOutputLayers(cfg, ret["box_head"].output_shape)
        return ret
