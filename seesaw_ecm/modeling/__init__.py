"""Model parts that seesaw_ecm registers with detectron2."""
from .mask_head import NormedMaskRCNNConvUpsampleHead
from .predictor import LongTailOutputLayers, build_cls_loss
from .roi_heads import LongTailROIHeads

__all__ = ["LongTailOutputLayers", "LongTailROIHeads", "NormedMaskRCNNConvUpsampleHead",
           "build_cls_loss"]
