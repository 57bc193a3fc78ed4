"""Training-time scale and crop of the LVIS 2020 entry (INPUT.LONG_EDGE_TRAIN,
INPUT.CROP_AFTER_RESIZE): the longer edge resized to a length drawn from a range, then a random
crop (mmdetection's order: resize, crop, flip), on detectron2's augmentations.

detectron2 0.6 resizes by the shorter edge (ResizeShortestEdge) and its config-driven crop
(INPUT.CROP) runs before the resize; the crop itself (RandomCrop), the flip and the mapper's box
recomputation from the cropped masks (recompute_boxes) are reused as they are.
"""
import numpy as np
from detectron2.data import transforms as T
from detectron2.data.detection_utils import build_augmentation
from detectron2.data.transforms import ResizeShortestEdge, ResizeTransform
from PIL import Image

from ..errors import SeesawEcmError


class ResizeLongestEdge(T.Augmentation):
    """Resize keeping the aspect ratio so that the longer edge is a length drawn uniformly from
    [min_length, max_length] (detectron2 0.6 has no such augmentation; mmdetection's Resize with
    multiscale_mode "range" draws the long and the short edge, here only the long one counts)."""

    def __init__(self, min_length, max_length, interp=Image.BILINEAR):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        h, w = image.shape[:2]
        length = np.random.randint(self.min_length, self.max_length + 1)
        # shorter edge at `length`, then capped so the longer edge is `length`
        newh, neww = ResizeShortestEdge.get_output_shape(h, w, length, length)
        return ResizeTransform(h, w, newh, neww, self.interp)


def check_train_augmentation_config(cfg):
    """Raise SeesawEcmError for INPUT.LONG_EDGE_TRAIN / CROP_AFTER_RESIZE that cannot work."""
    lengths = cfg.INPUT.LONG_EDGE_TRAIN
    if lengths and not (len(lengths) == 2 and 0 < lengths[0] <= lengths[1]):
        raise SeesawEcmError(f"INPUT.LONG_EDGE_TRAIN must be () or (min, max) with "
                             f"0 < min <= max (the entry: (768, 1792)), got {tuple(lengths)}.")
    if cfg.INPUT.CROP_AFTER_RESIZE and not cfg.INPUT.CROP.ENABLED:
        raise SeesawEcmError("INPUT.CROP_AFTER_RESIZE moves detectron2's INPUT.CROP after the "
                             "resize: set INPUT.CROP.ENABLED True (and its TYPE and SIZE).")


def train_augmentations(cfg):
    """The training augmentations: detectron2's (shorter-edge resize, flip), with the resize by
    the longer edge when INPUT.LONG_EDGE_TRAIN is set, and INPUT.CROP before the resize
    (detectron2) or after it (INPUT.CROP_AFTER_RESIZE). Returns (augmentations, whether they
    crop)."""
    check_train_augmentation_config(cfg)
    augs = build_augmentation(cfg, is_train=True)  # [resize, flip (if any)]
    if cfg.INPUT.LONG_EDGE_TRAIN:
        augs[0] = ResizeLongestEdge(*cfg.INPUT.LONG_EDGE_TRAIN)
    if cfg.INPUT.CROP.ENABLED:
        augs.insert(1 if cfg.INPUT.CROP_AFTER_RESIZE else 0,
                    T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
    return augs, cfg.INPUT.CROP.ENABLED
