"""Model parts that seesaw_ecm registers with detectron2."""
from .mask_head import NormedMaskRCNNConvUpsampleHead
from .predictor import LongTailOutputLayers, build_cls_loss
from .htc_lite import GlobalContextEncoder, HTCLiteRCNN, HTCLiteROIHeads
from .roi_heads import LongTailCascadeROIHeads, LongTailROIHeads

__all__ = ["GlobalContextEncoder", "HTCLiteRCNN", "HTCLiteROIHeads", "LongTailCascadeROIHeads",
           "LongTailOutputLayers", "LongTailROIHeads", "NormedMaskRCNNConvUpsampleHead",
           "build_cls_loss"]
