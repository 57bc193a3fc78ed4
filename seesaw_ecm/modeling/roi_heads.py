"""ROI heads that install the long-tail box predictor (LongTailOutputLayers, or TSD's with
MODEL.TSD.ENABLED): a standard (Mask R-CNN) one here, and a cascade (Cascade Mask R-CNN) one in
cascade.py; both infer top K per class with TEST.AP_FIXED (TopKPerClassHeads)."""
from detectron2.modeling import ROI_HEADS_REGISTRY, StandardROIHeads

from ..errors import SeesawEcmError
from .carafe import CARAFEMaskHeadMixin
from .cascade import LongTailCascadeROIHeads  # noqa: F401 (its import path before cascade.py)
from .mask_scoring import MaskScoringMixin
from .roi_pooling import RoIFeatures
from .topk_inference import TopKPerClassHeads
from .tsd import build_box_predictor, pooled_shape


@ROI_HEADS_REGISTRY.register()
class LongTailROIHeads(TopKPerClassHeads, MaskScoringMixin, CARAFEMaskHeadMixin, StandardROIHeads):
    """StandardROIHeads whose box predictor is configured by MODEL.LONG_TAIL (loss, cosine
    classifier, decoupled objectness) and MODEL.TSD."""

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        if cfg.MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES:
            raise SeesawEcmError(f"{cls.__name__} does not support "
                                 "MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES: set it False.")
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictor"] = build_box_predictor(cfg, ret["box_head"].output_shape,
                                                   pooled_shape(cfg, input_shape))
        return ret

    def _forward_box(self, features, proposals):
        """StandardROIHeads._forward_box with the predictor pooling what it needs (TSD pools
        again); without TRAIN_ON_PRED_BOXES."""
        rois = RoIFeatures(self.box_pooler, [features[f] for f in self.box_in_features],
                           [x.proposal_boxes for x in proposals])
        predictions = self.box_predictor.predict_rois(self.box_head, rois)
        if self.training:
            return self.box_predictor.losses(predictions, proposals)
        return self.box_predictor.inference(predictions, proposals)[0]
