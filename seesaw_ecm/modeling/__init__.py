"""Model parts that seesaw_ecm registers with detectron2."""
from .mask_head import NormedMaskRCNNConvUpsampleHead
from .cls_loss import LOSS_SPECS, build_cls_loss
from .predictor import LongTailOutputLayers
from .htc_lite import GlobalContextEncoder, HTCLiteRCNN, HTCLiteROIHeads
from .roi_heads import LongTailCascadeROIHeads, LongTailROIHeads

__all__ = ["LOSS_SPECS", "GlobalContextEncoder", "HTCLiteRCNN", "HTCLiteROIHeads",
           "LongTailCascadeROIHeads",
           "LongTailOutputLayers", "LongTailROIHeads", "NormedMaskRCNNConvUpsampleHead",
           "build_cls_loss"]
