"""Decoupled classifier training (MODEL.LONG_TAIL.TRAIN_ONLY_CLASSIFIER), the second stage of
the BaGS recipe: a trained model whose box classifiers alone keep learning."""
from detectron2.layers import FrozenBatchNorm2d

from ..errors import SeesawEcmError
from .predictor import LongTailOutputLayers


def train_only_classifier(model):
    """Freeze `model` (in place) except the classifiers of its LongTailOutputLayers.

    Every parameter gets requires_grad False but those of each box predictor's ``cls_score``
    and ``objectness`` (every cascade stage's); box regression, box head, mask head, RPN,
    FPN and backbone stay as loaded (as the official ``freeze`` config: bbox_head "feat",
    everything else "all"). BatchNorm layers become FrozenBatchNorm2d (detectron2's
    conversion), so their statistics do not drift either. Returns the names of the
    parameters left trainable.
    """
    predictors = [m for m in model.modules() if isinstance(m, LongTailOutputLayers)]
    if not predictors:
        raise SeesawEcmError(
            "MODEL.LONG_TAIL.TRAIN_ONLY_CLASSIFIER needs the long-tail box predictor: set "
            "MODEL.ROI_HEADS.NAME to LongTailROIHeads or LongTailCascadeROIHeads.")
    model.requires_grad_(False)
    for predictor in predictors:
        for layer in (predictor.cls_score, predictor.objectness):
            if layer is not None:
                layer.requires_grad_(True)
    FrozenBatchNorm2d.convert_frozen_batchnorm(model)
    return [name for name, p in model.named_parameters() if p.requires_grad]
