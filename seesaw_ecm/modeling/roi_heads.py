"""The standard (Mask R-CNN) ROI heads with the long-tail box predictor (LongTailOutputLayers,
or TSD's with MODEL.TSD.ENABLED); the cascade ones are in cascade.py. Both compose the same
options: the mask head's (mask_head.with_mask_options: CARAFE upsampling, mask scoring) and the
top-K-per-class filter of TEST.AP_FIXED (topk_inference.TopKPerClassFilter)."""
from detectron2.config import configurable
from detectron2.modeling import ROI_HEADS_REGISTRY, StandardROIHeads

from ..errors import SeesawEcmError
from .mask_head import with_mask_options
from .predictor import build_box_predictor, pooled_shape
from .roi_pooling import RoIFeatures
from .topk_inference import TopKPerClassFilter


@ROI_HEADS_REGISTRY.register()
class LongTailROIHeads(StandardROIHeads):
    """StandardROIHeads whose box predictor is configured by MODEL.LONG_TAIL (loss, cosine
    classifier, decoupled objectness) and MODEL.TSD, whose mask head has the options of
    MODEL.CARAFE.MASK_HEAD and MODEL.MASK_SCORING, and which, with TEST.AP_FIXED, runs the mask
    head only on the detections that may be in their class' top K."""

    @configurable
    def __init__(self, *, topk_filter=None, **kwargs):
        """topk_filter: a TopKPerClassFilter applied to the detections before the mask head, or
        None; kwargs: as StandardROIHeads."""
        super().__init__(**kwargs)
        self.topk_filter = topk_filter

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["topk_filter"] = TopKPerClassFilter.from_config(cfg, [ret["box_predictor"]])
        return ret

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        if cfg.MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES:
            raise SeesawEcmError(f"{cls.__name__} does not support "
                                 "MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES: set it False.")
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictor"] = build_box_predictor(cfg, ret["box_head"].output_shape,
                                                   pooled_shape(cfg, input_shape))
        return ret

    @classmethod
    def _init_mask_head(cls, cfg, input_shape):
        ret = super()._init_mask_head(cfg, input_shape)
        if ret:
            ret["mask_head"] = with_mask_options(cfg, ret["mask_head"], input_shape)
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

    def forward_with_given_boxes(self, features, instances):
        """StandardROIHeads' (masks and keypoints of the given detections) on the detections
        that topk_filter keeps."""
        if self.topk_filter is not None:
            instances = self.topk_filter(instances)
        return super().forward_with_given_boxes(features, instances)
