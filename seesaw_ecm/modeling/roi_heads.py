"""ROI heads that install the long-tail box predictor (LongTailOutputLayers): a standard
(Mask R-CNN) one and a cascade (Cascade Mask R-CNN) one; both infer top K per class with
TEST.AP_FIXED (TopKPerClassHeads)."""
import copy

from detectron2.modeling import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.roi_heads.cascade_rcnn import CascadeROIHeads

from .predictor import LongTailOutputLayers, build_cls_loss
from .topk_inference import TopKPerClassHeads


@ROI_HEADS_REGISTRY.register()
class LongTailROIHeads(TopKPerClassHeads, StandardROIHeads):
    """StandardROIHeads whose box predictor is configured by MODEL.LONG_TAIL (loss, cosine
    classifier, decoupled objectness)."""

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictor"] = LongTailOutputLayers(cfg, ret["box_head"].output_shape)
        return ret


@ROI_HEADS_REGISTRY.register()
class LongTailCascadeROIHeads(TopKPerClassHeads, CascadeROIHeads):
    """CascadeROIHeads in which every stage's box predictor is a LongTailOutputLayers.

    Each stage keeps detectron2's cascade recipe (ROI_BOX_CASCADE_HEAD.IOUS 0.5 / 0.6 / 0.7 and
    BBOX_REG_WEIGHTS, class-agnostic regression, gradients into the box heads scaled by 1 /
    stages) and gets its own copy of the classification loss, as in the official mmdetection
    cascade configs: for Seesaw every stage counts its own samples. The class statistics (ECM,
    Federated) are computed once and copied. At inference detectron2 averages the stages'
    (R, C + 1) probabilities, which every LongTailOutputLayers returns whatever its loss.
    """

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        cls_loss = build_cls_loss(cfg)
        ret["box_predictors"] = [
            LongTailOutputLayers(
                cfg, head.output_shape, box2box_transform=stock.box2box_transform,
                cls_loss=copy.deepcopy(cls_loss),
            )
            for head, stock in zip(ret["box_heads"], ret["box_predictors"])
        ]
        return ret
