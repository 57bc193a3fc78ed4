"""TSD, task-aware spatial disentanglement (Song et al., "Revisiting the Sibling Head in Object
Detector", CVPR 2020; official code Sense-X/TSD on mmdetection 1.x), as a box predictor with its
progressive constraint, for every ROI heads class of the project (MODEL.TSD.ENABLED).

From the RoI's pooled feature F, small FC layers predict two spatial changes of the RoI:
- classification: an offset per output bin (P x P x 2), pooled again as a deformable RoI pooling
  (its own conv/FC tower, the box head's architecture, then the long-tail classifier: Seesaw
  and the other MODEL.LONG_TAIL losses work unchanged in this branch);
- regression: one translation of the whole RoI (2 values); its tower pools at the translated
  RoI and regresses the box from it (targets and decoding relative to the translated RoI).
Both are in units of OFFSET_SCALE x the RoI's width / height (the official trans_std 0.1).
In training the ROI heads' own box head and a long-tail predictor, the "sibling" head, are
trained beside it (losses suffixed ``_sibling``), and the progressive constraint asks TSD to
beat the sibling by a margin (losses/progressive_constraint.py). Inference uses TSD alone.

The pooling is on grid_sample (roi_pooling.py) instead of the official custom CUDA op.
"""
import copy
from typing import NamedTuple, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling.roi_heads.box_head import build_box_head
from detectron2.structures import Boxes, Instances
from detectron2.structures.boxes import matched_pairwise_iou
from detectron2.utils.events import get_event_storage
from torch import nn

from ..errors import SeesawEcmError
from ..losses import ProgressiveConstraintLoss
from .cls_loss import build_cls_loss
from .predictor import SIBLING_PREDICTORS, LongTailOutputLayers


class TSDExtras(NamedTuple):
    """What TSD's predictions carry beside (scores, deltas)."""

    boxes: torch.Tensor  # (R, 4) the RoIs translated for regression; deltas are relative to them
    sibling: Optional[Tuple[torch.Tensor, torch.Tensor]]  # sibling predictions (training only)


def _offset_branch(width, outputs):
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True),
                         nn.Linear(width, outputs))


class TSDOutputLayers(LongTailOutputLayers):
    """The TSD box predictor (see the module docstring). Its cls_score / objectness / bbox_pred
    are those of the TSD branch; ``sibling`` is the sibling head's LongTailOutputLayers.

    Predictions: (scores, deltas, :class:`TSDExtras`), scores and deltas laid out as
    LongTailOutputLayers'.
    """

    @configurable
    def __init__(self, input_shape, *, pooled_shape, sibling, cls_tower, reg_tower,
                 progressive_constraint, offset_scale=0.1, sampling_ratio=2, offset_fc_dim=256,
                 **kwargs):
        """
        Args:
            input_shape: output shape of the towers.
            pooled_shape: ShapeSpec of the pooled RoI features (C, P, P).
            sibling: LongTailOutputLayers on the ROI heads' box head (trained, not used at test).
            cls_tower, reg_tower: box heads (pooled features -> input_shape) of the branches.
            progressive_constraint: a ProgressiveConstraintLoss.
            offset_scale: offsets are in units of offset_scale x the RoI's width / height.
            sampling_ratio: samples per bin side of the offset pooling.
            offset_fc_dim: width of the FC layers that predict the offsets.
            kwargs: as LongTailOutputLayers.
        """
        super().__init__(input_shape, **kwargs)
        side = pooled_shape.height
        self.sibling = sibling
        self.cls_tower, self.reg_tower = cls_tower, reg_tower
        self.progressive_constraint = progressive_constraint
        self.offset_scale = offset_scale
        self.sampling_ratio = sampling_ratio
        self.offset_fc = nn.Sequential(
            nn.Flatten(), nn.Linear(pooled_shape.channels * side * side, offset_fc_dim),
            nn.ReLU(inplace=True))
        self.cls_offsets = _offset_branch(offset_fc_dim, side * side * 2)
        self.reg_offset = _offset_branch(offset_fc_dim, 2)
        for m in [*self.offset_fc, *self.cls_offsets, *self.reg_offset]:
            if isinstance(m, nn.Linear):  # the official init of these layers
                nn.init.kaiming_normal_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    @classmethod
    def from_config(cls, cfg, pooled_shape, sibling, cls_loss=None):
        check_config(cfg)
        tsd = cfg.MODEL.TSD
        cls_tower, reg_tower = build_box_head(cfg, pooled_shape), build_box_head(cfg, pooled_shape)
        # the TSD classifier's own loss (Seesaw counts its own samples), as each cascade stage's
        cls_loss = build_cls_loss(cfg) if cls_loss is None else copy.deepcopy(cls_loss)
        ret = super().from_config(cfg, cls_tower.output_shape, cls_loss)
        ret.update(
            pooled_shape=pooled_shape, sibling=sibling, cls_tower=cls_tower, reg_tower=reg_tower,
            progressive_constraint=ProgressiveConstraintLoss(
                tsd.PC_CLS_MARGIN, tsd.PC_LOC_MARGIN, tsd.PC_LOSS_WEIGHT),
            offset_scale=tsd.OFFSET_SCALE, sampling_ratio=tsd.SAMPLING_RATIO,
            offset_fc_dim=tsd.OFFSET_FC_DIM)
        return ret

    def predict_rois(self, box_head, rois):
        """rois: a RoIFeatures -> (scores, deltas, TSDExtras)."""
        x = rois()
        shared = self.offset_fc(x)
        side = x.shape[-1]
        cls_offsets = self.cls_offsets(shared).view(-1, side, side, 2) * self.offset_scale
        shift = self.reg_offset(shared) * self.offset_scale  # (R, 2) (dx, dy)
        x_cls = self.cls_tower(rois(cls_offsets, self.sampling_ratio))
        x_reg = self.reg_tower(rois(shift[:, None, None].expand(-1, side, side, 2),
                                    self.sampling_ratio))
        scores = self.cls_score(x_cls)
        if self.objectness is not None:
            scores = torch.cat([scores, self.objectness(x_cls)], dim=1)
        boxes = rois.rois()[:, 1:]
        size = boxes[:, 2:] - boxes[:, :2]
        moved = boxes + (shift * size).repeat(1, 2)
        sibling = self.sibling(box_head(x)) if self.training else None
        return scores, self.bbox_pred(x_reg), TSDExtras(moved, sibling)

    def predict_boxes(self, predictions, proposals):
        """Per image (Ri, 4K or 4) boxes, decoded from the translated RoIs."""
        _, deltas, extras = predictions
        boxes = self.box2box_transform.apply_deltas(deltas, extras.boxes)
        return boxes.split([len(p) for p in proposals])

    def losses(self, predictions, proposals):
        """The TSD branch's losses (LongTailOutputLayers', regression targets relative to the
        translated RoIs), the sibling's (suffixed ``_sibling``) and the progressive constraint."""
        scores, deltas, extras = predictions
        if extras.sibling is None:
            raise SeesawEcmError("TSDOutputLayers.losses needs predictions made in training mode.")
        with get_event_storage().name_scope("sibling"):
            sibling = self.sibling.losses(extras.sibling, proposals)
        losses = {f"{k}_sibling": v for k, v in sibling.items()}
        moved = []
        for p, b in zip(proposals, extras.boxes.split([len(p) for p in proposals])):
            p = Instances(p.image_size, **p.get_fields())
            p.proposal_boxes = Boxes(b)
            moved.append(p)
        losses.update(super().losses((scores, deltas), moved))
        losses.update(self._progressive_constraint(predictions, proposals))
        return losses

    def _progressive_constraint(self, predictions, proposals):
        scores, deltas, extras = predictions
        sibling_scores, sibling_deltas = extras.sibling
        if not len(proposals):
            gt_classes = torch.empty(0, dtype=torch.long, device=scores.device)
            boxes = gt_boxes = torch.empty((0, 4), device=scores.device)
        else:
            gt_classes = cat([p.gt_classes for p in proposals])
            boxes = cat([p.proposal_boxes.tensor for p in proposals])
            gt_boxes = cat([(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor
                            for p in proposals])
        rows = torch.arange(len(gt_classes), device=gt_classes.device)
        probs = self.cls_loss.get_probs(*self._split(scores))
        sibling_probs = self.sibling.cls_loss.get_probs(*self.sibling._split(sibling_scores))
        fg = (gt_classes >= 0) & (gt_classes < self.num_classes)
        return self.progressive_constraint(
            probs[rows, gt_classes], sibling_probs[rows, gt_classes],
            self._fg_ious(self, deltas, extras.boxes, gt_classes, gt_boxes, fg),
            self._fg_ious(self.sibling, sibling_deltas, boxes, gt_classes, gt_boxes, fg))

    @staticmethod
    def _fg_ious(predictor, deltas, boxes, gt_classes, gt_boxes, fg):
        """(F,) IoU with the gt box of each foreground RoI's box regressed for its class."""
        deltas, classes = deltas[fg], gt_classes[fg]
        if deltas.shape[1] != 4:  # class-specific regression
            deltas = deltas.view(len(deltas), -1, 4)[torch.arange(len(deltas)), classes]
        pred = predictor.box2box_transform.apply_deltas(deltas, boxes[fg])
        return matched_pairwise_iou(Boxes(pred), Boxes(gt_boxes[fg]))


def check_config(cfg):
    """Raise SeesawEcmError for MODEL.TSD values TSD cannot run (also called by
    seesaw_ecm.validation before anything is built)."""
    tsd = cfg.MODEL.TSD
    if tsd.SAMPLING_RATIO < 1:
        raise SeesawEcmError(f"MODEL.TSD.SAMPLING_RATIO {tsd.SAMPLING_RATIO}: samples per bin "
                             "side, at least 1 (the official op: 4).")
    for key in ("PC_CLS_MARGIN", "PC_LOC_MARGIN"):
        if not 0 <= tsd[key] <= 1:
            raise SeesawEcmError(f"MODEL.TSD.{key} {tsd[key]}: a margin of probabilities / "
                                 "IoUs, in [0, 1] (the official configs: 0.3).")
    for key in ("OFFSET_SCALE", "PC_LOSS_WEIGHT"):
        if tsd[key] < 0:
            raise SeesawEcmError(f"MODEL.TSD.{key} {tsd[key]} is negative; use 0 or more.")


SIBLING_PREDICTORS["TSD"] = TSDOutputLayers  # MODEL.TSD.ENABLED
