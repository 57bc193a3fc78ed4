"""Test-time augmentation (TEST.AUG: flips and several scales) for every ROI heads class of the
project: detectron2's GeneralizedRCNNWithTTA, which already handles the cascade and masks (box
pass on every augmented image, union mapped back to the original image, per-class NMS, at most
TEST.DETECTIONS_PER_IMAGE detections (LVIS: 300), then masks predicted on those boxes in every
augmented image and averaged), with two additions:

- scores from the mask pass: with MODEL.MASK_SCORING the mask head rescores each instance (class
  score x predicted mask IoU); detectron2 keeps only the masks of that pass, so the rescoring
  would be lost. Here the scores are the mean over the augmented images of that pass's scores
  (class score x mean predicted IoU; unchanged without mask scoring).
- a clear error, before anything runs, for settings TTA cannot serve (TEST.AP_FIXED).

HTC-Lite's context needs nothing here: its forward_with_given_boxes (the mask pass) adds it.
"""
import torch
from detectron2.modeling import GeneralizedRCNNWithTTA

from ..errors import SeesawEcmError


def check_tta_config(cfg):
    """Raise SeesawEcmError for TEST.AUG settings that cannot work (no-op when it is off)."""
    if not cfg.TEST.AUG.ENABLED:
        return
    if not cfg.TEST.AUG.MIN_SIZES:
        raise SeesawEcmError("TEST.AUG.ENABLED needs at least one scale in TEST.AUG.MIN_SIZES.")
    if cfg.TEST.AP_FIXED.ENABLED:
        raise SeesawEcmError(
            "TEST.AUG (test-time augmentation) merges each image's detections to its "
            "TEST.DETECTIONS_PER_IMAGE best, which TEST.AP_FIXED's top-K-per-class inference "
            "does not have: turn one of them off.")
    if cfg.MODEL.KEYPOINT_ON or cfg.MODEL.LOAD_PROPOSALS:
        raise SeesawEcmError("TEST.AUG does not support MODEL.KEYPOINT_ON or "
                             "MODEL.LOAD_PROPOSALS (detectron2's GeneralizedRCNNWithTTA).")


class LongTailRCNNWithTTA(GeneralizedRCNNWithTTA):
    """GeneralizedRCNNWithTTA that keeps the scores of the mask pass (mask scoring)."""

    def __init__(self, cfg, model, tta_mapper=None, batch_size=3):
        check_tta_config(cfg)
        super().__init__(cfg, model, tta_mapper, batch_size)
        self._merged = None

    def _rescale_detected_boxes(self, augmented_inputs, merged_instances, tfms):
        # the merged detections, whose scores _reduce_pred_masks replaces (same image's call)
        self._merged = merged_instances
        return super()._rescale_detected_boxes(augmented_inputs, merged_instances, tfms)

    def _reduce_pred_masks(self, outputs, tfms):
        """The averaged masks (detectron2); also sets the merged detections' scores to the mean
        of the mask pass's scores over the augmented images."""
        self._merged.scores = torch.stack([o.scores for o in outputs]).mean(dim=0)
        self._merged = None
        return super()._reduce_pred_masks(outputs, tfms)
