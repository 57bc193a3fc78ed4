"""Model parts that seesaw_ecm registers with detectron2."""
from .carafe import CARAFEFPN, CARAFEPack
from .deform_conv import build_resnet_dcn_backbone, build_resnet_fpn_dcn_backbone
from .fpg import FPG
from .mask_head import NormedMaskRCNNConvUpsampleHead
from .cls_loss import LOSS_SPECS, build_cls_loss
from .predictor import LongTailOutputLayers
from .htc_lite import GlobalContextEncoder, HTCLiteRCNN, HTCLiteROIHeads
from .cascade import LongTailCascadeROIHeads
from .roi_heads import LongTailROIHeads
from .loce import LOCEROIHeads
from .resnest import ResNeSt
from .rpn import LowQualityFloorRPN
from .tsd import TSDOutputLayers

__all__ = ["CARAFEFPN", "CARAFEPack", "FPG", "LOSS_SPECS", "GlobalContextEncoder", "HTCLiteRCNN",
           "HTCLiteROIHeads", "LongTailCascadeROIHeads", "LOCEROIHeads", "LongTailOutputLayers",
           "LongTailROIHeads", "LowQualityFloorRPN", "NormedMaskRCNNConvUpsampleHead", "ResNeSt",
           "TSDOutputLayers", "build_cls_loss", "build_resnet_dcn_backbone",
           "build_resnet_fpn_dcn_backbone"]
