"""detectron2's optimizer with one more SOLVER.CLIP_GRADIENTS.CLIP_TYPE: "full_model".

detectron2 0.6 clips each parameter's gradient separately ("value", "norm"); the ECM recipe
clips the norm of all gradients together (torch.nn.utils.clip_grad_norm_ over every parameter,
as mmdetection's grad_clip and Mask2Former's "full_model" clip type).
"""
import functools

import torch
from detectron2.solver import build_optimizer as build_detectron2_optimizer
from detectron2.solver.build import _generate_optimizer_class_with_gradient_clipping
from detectron2.utils.events import _CURRENT_STORAGE_STACK

from .deferred_scalars import put_scalars
from .errors import SeesawEcmError

# SOLVER.CLIP_GRADIENTS.CLIP_TYPE values: detectron2's GradientClipType and "full_model"
CLIP_TYPES = ("value", "norm", "full_model")


def check_clip_config(cfg):
    """Raise SeesawEcmError for an unknown SOLVER.CLIP_GRADIENTS.CLIP_TYPE or a clip at <= 0."""
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE not in CLIP_TYPES:
        raise SeesawEcmError(f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE {clip.CLIP_TYPE!r} is unknown; "
                             f"choose one of {', '.join(map(repr, CLIP_TYPES))}.")
    if clip.ENABLED and clip.CLIP_VALUE <= 0:
        raise SeesawEcmError(f"SOLVER.CLIP_GRADIENTS.CLIP_VALUE is {clip.CLIP_VALUE}; clipping "
                             "needs a value > 0 (or SOLVER.CLIP_GRADIENTS.ENABLED False).")


def clip_full_model(parameters, max_norm, norm_type):
    """clip_grad_norm_ of all `parameters` together; inside training, the norm before clipping
    goes to the EventStorage as `grad_norm` (read at the next write: deferred_scalars)."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm, norm_type)
    if _CURRENT_STORAGE_STACK:  # an EventStorage is open (training)
        put_scalars(grad_norm=norm)
    return norm


def build_optimizer(cfg, model):
    """detectron2's build_optimizer; with CLIP_GRADIENTS.CLIP_TYPE "full_model" its step first
    clips the norm of all gradients together at CLIP_VALUE (detectron2 rejects that type)."""
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not (clip.ENABLED and clip.CLIP_TYPE == "full_model"):
        return build_detectron2_optimizer(cfg, model)
    unclipped = cfg.clone()
    unclipped.defrost()
    unclipped.SOLVER.CLIP_GRADIENTS.ENABLED = False
    optimizer = build_detectron2_optimizer(unclipped, model)
    optimizer.__class__ = _generate_optimizer_class_with_gradient_clipping(
        type(optimizer), global_clipper=functools.partial(
            clip_full_model, max_norm=clip.CLIP_VALUE, norm_type=clip.NORM_TYPE))
    return optimizer
