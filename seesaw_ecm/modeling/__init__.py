"""Model parts that seesaw_ecm registers with detectron2."""
from .carafe import CARAFEFPN, CARAFEPack
from .deform_conv import use_torchvision_deform_conv_if_uncompiled
from .fpg import FPG
from .mask_head import NormedMaskRCNNConvUpsampleHead
from .cls_loss import LOSS_SPECS, build_cls_loss
from .predictor import LongTailOutputLayers
from .htc_lite import GlobalContextEncoder, HTCLiteRCNN, HTCLiteROIHeads
from .roi_heads import LongTailCascadeROIHeads, LongTailROIHeads
from .loce import LOCEROIHeads
from .resnest import ResNeSt
from .tsd import TSDOutputLayers

__all__ = ["CARAFEFPN", "CARAFEPack", "FPG", "LOSS_SPECS", "GlobalContextEncoder", "HTCLiteRCNN",
           "HTCLiteROIHeads", "LongTailCascadeROIHeads", "LOCEROIHeads", "LongTailOutputLayers",
           "LongTailROIHeads", "NormedMaskRCNNConvUpsampleHead", "ResNeSt", "TSDOutputLayers",
           "build_cls_loss"]

# detectron2 installs without compiled ops (this project's default install, whose detectron2._C is
# a stub) would fail on MODEL.RESNETS.DEFORM_ON_PER_STAGE; torchvision computes the same op.
use_torchvision_deform_conv_if_uncompiled()
