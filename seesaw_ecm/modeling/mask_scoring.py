"""Mask scoring (Mask Scoring R-CNN, as mmdetection's MaskIoUHead / MaskScoringRoIHead): a head
that predicts the IoU of each predicted mask with its ground truth; at inference the instance
score becomes class score x predicted mask IoU.

Switched on by MODEL.MASK_SCORING.ON for every ROI heads class of the project (LongTailROIHeads,
the cascade heads and HTC-Lite; mask_head.with_mask_options): a MaskScoringHead wraps the mask
head that detectron2 builds, so each ROI heads class keeps its own mask forward (HTC-Lite's
context included) and calls the wrapper where it called the mask head.
"""
import torch
from detectron2.modeling.roi_heads.mask_head import (
    BaseMaskRCNNHead, mask_rcnn_inference, mask_rcnn_loss)
from detectron2.structures import BitMasks
from fvcore.nn import weight_init
from torch import nn
from torch.nn import functional as F

from ..errors import SeesawEcmError


class MaskIoUHead(nn.Module):
    """Predicts the IoU of a predicted mask with its ground truth, per class.

    Input: RoI mask features (R, D, P, P) and the mask logits of each RoI's class (R, M, M), M a
    multiple of P (28 and 14 by default); the sigmoid of the logits is max-pooled to P x P and
    concatenated as one more channel. Then NUM_CONVS 3x3 convs (the last with stride 2), two FC
    layers and a linear layer: output (R, num_classes) IoU predictions.
    """

    def __init__(self, in_channels, pooler_resolution, num_classes, num_convs=4, conv_dim=256,
                 fc_dim=1024):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels + 1 if i == 0 else conv_dim, conv_dim, 3,
                      stride=2 if i == num_convs - 1 else 1, padding=1)
            for i in range(num_convs))
        side = (pooler_resolution - 1) // 2 + 1 if num_convs else pooler_resolution
        first_fc = (conv_dim if num_convs else in_channels + 1) * side * side
        self.fcs = nn.ModuleList([nn.Linear(first_fc, fc_dim), nn.Linear(fc_dim, fc_dim)])
        self.predictor = nn.Linear(fc_dim, num_classes)
        # mmdetection's init: convs kaiming normal (fan_out), FCs kaiming uniform (a=1, fan_in),
        # predictor normal(0.01); biases 0
        for conv in self.convs:
            weight_init.c2_msra_fill(conv)
        for fc in self.fcs:
            nn.init.kaiming_uniform_(fc.weight, a=1, mode="fan_in", nonlinearity="leaky_relu")
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.predictor.weight, std=0.01)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, features, mask_logits):
        """features (R, D, P, P), mask_logits (R, M, M) -> predicted IoU (R, num_classes)."""
        scale = mask_logits.shape[-1] // features.shape[-1]
        mask = F.max_pool2d(mask_logits.sigmoid()[:, None], scale, scale)
        x = torch.cat([features, mask], dim=1)
        for conv in self.convs:
            x = F.relu(conv(x))
        x = x.flatten(1)
        for fc in self.fcs:
            x = F.relu(fc(x))
        return self.predictor(x)


def _full_mask_areas(gt_masks):
    """Area in pixels of each whole gt mask: (N,) float."""
    if isinstance(gt_masks, BitMasks):
        return gt_masks.tensor.flatten(1).sum(1).float()
    return gt_masks.area().float()  # PolygonMasks: sum of the polygons' areas


def mask_iou_targets(mask_logits, instances, binary_threshold=0.5):
    """IoU of each binarized predicted mask with the whole gt mask of its RoI.

    mask_logits: (R, M, M) logits of each foreground RoI's gt class; instances: the R RoIs
    (proposal_boxes, gt_masks), per image. Returns (R,).

    As mmdetection: the prediction is binarized by `logit > binary_threshold` (its
    mask_thr_binary 0.5, applied to logits there too); the intersection is counted inside the RoI
    (M x M target grid) and the union with the area of the whole gt instance, including the parts
    outside the RoI. mmdetection gets that area as (gt area in the grid) / (gt area inside the box
    / whole gt area); here the whole gt area is scaled to the grid directly (x M^2 / box area),
    which is the same quantity and needs no cropping of polygons. It is kept at least the gt area
    in the grid, so that rasterization cannot make an IoU above 1.
    """
    side = mask_logits.shape[-1]
    targets, full_areas = [], []
    for inst in instances:
        if len(inst) == 0:
            continue
        boxes = inst.proposal_boxes
        # the mask loss cropped the same targets; detectron2 does not hand them out
        targets.append(inst.gt_masks.crop_and_resize(boxes.tensor, side).to(mask_logits.device))
        full_areas.append(_full_mask_areas(inst.gt_masks).to(mask_logits.device)
                          * side * side / boxes.area().clamp(min=1e-6))
    if not targets:
        return mask_logits.new_zeros(0)
    targets = torch.cat(targets).float()
    pred = (mask_logits > binary_threshold).float()
    overlap = (pred * targets).sum((1, 2))
    gt_area = torch.maximum(torch.cat(full_areas), targets.sum((1, 2)))
    return overlap / (pred.sum((1, 2)) + gt_area - overlap).clamp(min=1e-6)


class MaskScoringHead(nn.Module):
    """A detectron2 mask head (any BaseMaskRCNNHead) plus a MaskIoUHead.

    Training: the mask head's loss_mask, plus loss_mask_iou = loss_weight x MSE between the IoU
    predicted for each foreground RoI's gt class and its target (RoIs with target 0 left out, as
    mmdetection). Inference: pred_masks as the mask head, and scores = scores x predicted IoU of
    the predicted class. detectron2 keeps one score per instance, so box and mask results are both
    ranked by it (mmdetection rescores the masks only).
    """

    def __init__(self, mask_head, mask_iou_head, loss_weight=0.5):
        super().__init__()
        if not isinstance(mask_head, BaseMaskRCNNHead):
            raise SeesawEcmError(
                f"MODEL.MASK_SCORING.ON needs a mask head that returns mask logits from "
                f"layers() (a detectron2 BaseMaskRCNNHead); {type(mask_head).__name__} is not. "
                "Switch MASK_SCORING off or use such a ROI_MASK_HEAD.NAME.")
        self.mask_head = mask_head
        self.mask_iou_head = mask_iou_head
        self.loss_weight = loss_weight

    def forward(self, x, instances):
        logits = self.mask_head.layers(x)
        if self.training:
            classes = _classes(instances, "gt_classes", logits)
            class_logits = logits[torch.arange(len(logits)), classes]
            iou = self.mask_iou_head(x, class_logits)
            iou = iou[torch.arange(len(iou)), _classes(instances, "gt_classes", iou)]
            target = mask_iou_targets(class_logits.detach(), instances)
            positive = target > 0
            loss_iou = (F.mse_loss(iou[positive], target[positive]) if positive.any()
                        else iou.sum() * 0)
            loss_mask = mask_rcnn_loss(logits, instances, self.mask_head.vis_period)
            return {"loss_mask": loss_mask * self.mask_head.loss_weight,
                    "loss_mask_iou": loss_iou * self.loss_weight}
        mask_rcnn_inference(logits, instances)
        if len(logits):
            classes = _classes(instances, "pred_classes", logits)
            iou = self.mask_iou_head(x, logits[torch.arange(len(logits)), classes])
            iou = iou[torch.arange(len(iou)), _classes(instances, "pred_classes", iou)]
            for inst, iou_i in zip(instances, iou.split([len(i) for i in instances])):
                inst.scores = inst.scores * iou_i
        return instances


def _classes(instances, field, per_class):
    """(R,) class index of each RoI into per_class's dim 1 (0 when it has one class-agnostic
    channel)."""
    if per_class.shape[1] == 1:
        return per_class.new_zeros(len(per_class), dtype=torch.long)
    return torch.cat([inst.get(field) for inst in instances]).long()


def build_mask_scoring_head(cfg, mask_head, input_shape):
    """A MaskScoringHead around `mask_head` with the MaskIoUHead of MODEL.MASK_SCORING.
    input_shape: the ROI heads' input, {feature name: ShapeSpec}."""
    ms = cfg.MODEL.MASK_SCORING
    channels = input_shape[cfg.MODEL.ROI_HEADS.IN_FEATURES[0]].channels
    iou_head = MaskIoUHead(channels, cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION,
                           cfg.MODEL.ROI_HEADS.NUM_CLASSES, num_convs=ms.NUM_CONVS,
                           conv_dim=ms.CONV_DIM, fc_dim=ms.FC_DIM)
    return MaskScoringHead(mask_head, iou_head, ms.LOSS_WEIGHT)
