"""Decoupled training (MODEL.LONG_TAIL.TRAINABLE): a trained model of which only some parts keep
learning, as the second stages of BaGS (the box classifier) and LOCE (classifier, box
regression, RPN, mask head)."""
import re

from detectron2.layers import FrozenBatchNorm2d
from torch import nn

from ..errors import SeesawEcmError


def freeze_all_but(model, patterns):
    """Freeze `model` (in place) except the parameters whose names match (``re.match``) one of
    `patterns`; BatchNorm layers left without a trainable parameter become FrozenBatchNorm2d
    (detectron2's conversion), so their statistics do not drift either.

    Returns:
        the names of the parameters left trainable.
    """
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as e:
        raise SeesawEcmError(f"MODEL.LONG_TAIL.TRAINABLE: {e} in {list(patterns)}") from e
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(any(p.match(name) for p in compiled))
        if param.requires_grad:
            trainable.append(name)
    if not trainable:
        raise SeesawEcmError(
            f"MODEL.LONG_TAIL.TRAINABLE {list(patterns)} matches no parameter of the model; "
            r"e.g. 'roi_heads\.box_predictor\.(\d+\.)?cls_score\.' is the box classifier.")
    frozen_bn = [name for name, m in model.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm)
                 and not any(p.requires_grad for p in m.parameters())]
    for name in frozen_bn:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, FrozenBatchNorm2d.convert_frozen_batchnorm(getattr(owner, child)))
    return trainable
