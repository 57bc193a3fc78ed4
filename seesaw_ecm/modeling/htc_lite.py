"""HTC-Lite, the light Hybrid Task Cascade of the LVIS 2020 Seesaw entry: three cascade box
stages with the long-tail predictor, one mask head at the last stage trained "interleaved"
(on the last stage's foreground RoIs after that stage has refined them), and a global context
encoder instead of HTC's semantic-segmentation branch, fused into the RoI features of every box
stage and of the mask head.

detectron2 has no HTC; the context branch follows the GlobalContextHead of mmdetection
(convs on the coarsest FPN level, global average pooling, a multi-label classifier), written
here because no library ships it for detectron2.
"""
import functools

import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY, ROI_HEADS_REGISTRY, GeneralizedRCNN
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference
from detectron2.modeling.roi_heads.roi_heads import select_foreground_proposals
from detectron2.structures import Boxes
from torch import nn
from torch.nn import functional as F

from ..errors import SeesawEcmError
from ..losses.precision import float32_loss
from .cascade import LongTailCascadeROIHeads
from .roi_pooling import RoIFeatures


class GlobalContextEncoder(nn.Module):
    """Convs on one feature map, pooled to one vector per image, plus a multi-label classifier.

    Args:
        in_channels: D, channels of the input map; the context vector has D channels too, so it
            can be added to RoI features of the same FPN.
        num_classes: C, outputs of the image-level classifier.
        num_convs: 3x3 conv + ReLU layers before pooling.
    """

    def __init__(self, in_channels, num_classes, num_convs=4):
        super().__init__()
        layers = []
        for _ in range(num_convs):
            layers += [nn.Conv2d(in_channels, in_channels, 3, padding=1), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_channels, num_classes)
        for m in self.convs:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x):
        """x: (B, D, H, W) -> (context (B, D, 1, 1), image-level class logits (B, C))."""
        context = F.adaptive_avg_pool2d(self.convs(x), 1)
        return context, self.classifier(context.flatten(1))


@float32_loss
def context_loss(logits, positives, negatives=None):
    """Image-level multi-label BCE over the annotated classes only.

    Args:
        logits: (B, C) image-level class logits.
        positives: (B, C) bool, the classes with an instance in the image.
        negatives: (B, C) bool, classes verified absent (LVIS ``neg_category_ids``), or None
            when every class is annotated in every image (exhaustive, COCO-style data). With
            LVIS-format data a class that is neither positive nor negative in an image is not
            verified there and gets no loss.

    Returns:
        scalar: sum of BCE over the annotated entries / their number (0 if there are none).
    """
    annotated = torch.ones_like(positives) if negatives is None else positives | negatives
    loss = F.binary_cross_entropy_with_logits(logits, positives.to(logits.dtype), reduction="none")
    return (loss * annotated).sum() / annotated.sum().clamp(min=1)


def _image_index(boxes):
    """(R,) index of the image each box belongs to, for a list of per-image Boxes (R = their
    total number). Without a host sync (detectron2's pooler format repeats the image indices by
    a tensor of counts) and trace-safe (the sizes follow the boxes' tensors, not Python
    ``len()``, which would freeze the traced number of boxes)."""
    return torch.cat([torch.full_like(b.tensor[:, 0], i, dtype=torch.long)
                      for i, b in enumerate(boxes)])


def _clipped(boxes, image_size):
    """Boxes of (R, 4) XYXY `boxes` clipped to `image_size` (height, width): Boxes.clip without
    its host-side finiteness check (these boxes come from the RoIs that the cascade's stages
    checked; non-finite deltas make the loss non-finite, which the trainer reports)."""
    height, width = image_size
    limits = boxes.new_tensor([width, height, width, height])
    return Boxes(torch.minimum(boxes.clamp(min=0), limits))


@ROI_HEADS_REGISTRY.register()
class HTCLiteROIHeads(LongTailCascadeROIHeads):
    """Cascade box stages with the long-tail predictor (see LongTailCascadeROIHeads), a single
    mask head after the last stage, and an optional global context encoder.

    Training, per image batch: RoIs are sampled and labelled per stage as in the cascade; with
    MODEL.HTC_LITE.INTERLEAVED the mask head takes the last stage's foreground RoIs with the
    boxes that stage regressed (detached, clipped to the image, gt assignment unchanged, mask
    targets cropped at the refined boxes), otherwise the same RoIs unrefined; at most
    MODEL.HTC_LITE.MASK_MAX_FG_ROIS of them per image, drawn at random. With
    MODEL.HTC_LITE.CONTEXT the context vector of each image is added to every RoI feature of
    that image (box stages and mask head) and the image-level classifier adds
    ``loss_context``. Inference: cascade boxes and scores, masks predicted on the final boxes
    (on given boxes too, as test-time augmentation asks: :meth:`forward_with_given_boxes`).

    The annotated-negative classes of each training image come from HTCLiteRCNN (the
    meta-architecture), which hands them over before each training forward.
    """

    @configurable
    def __init__(self, *, context_encoder=None, context_in_feature="p6", context_loss_weight=1.0,
                 interleaved=True, mask_max_fg_rois=0, **kwargs):
        super().__init__(**kwargs)
        self.context_encoder = context_encoder
        self.context_in_feature = context_in_feature
        self.context_loss_weight = context_loss_weight
        self.interleaved = interleaved
        self.mask_max_fg_rois = mask_max_fg_rois  # per image; 0 = all foreground RoIs
        # set by HTCLiteRCNN before a training forward: per image a (C,) bool tensor of
        # verified-absent classes, or None for exhaustively annotated images
        self.annotated_negatives = None

    @classmethod
    def check_config(cls, cfg):
        super().check_config(cfg)
        if cfg.MODEL.CASCADE.MASK_PER_STAGE:
            raise SeesawEcmError("HTCLiteROIHeads has one mask head, after the last stage: set "
                                 "MODEL.CASCADE.MASK_PER_STAGE False.")

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        htc = cfg.MODEL.HTC_LITE
        ret["interleaved"] = htc.INTERLEAVED
        ret["mask_max_fg_rois"] = htc.MASK_MAX_FG_ROIS
        if htc.CONTEXT:
            if htc.CONTEXT_IN_FEATURE not in input_shape:
                raise SeesawEcmError(
                    f"MODEL.HTC_LITE.CONTEXT_IN_FEATURE {htc.CONTEXT_IN_FEATURE!r} is not a "
                    f"backbone output; choose one of {sorted(input_shape)}")
            ret["context_encoder"] = GlobalContextEncoder(
                input_shape[htc.CONTEXT_IN_FEATURE].channels, cfg.MODEL.ROI_HEADS.NUM_CLASSES,
                htc.CONTEXT_NUM_CONVS)
            ret["context_in_feature"] = htc.CONTEXT_IN_FEATURE
            ret["context_loss_weight"] = htc.CONTEXT_LOSS_WEIGHT
        return ret

    def _context(self, features):
        """(context (B, D, 1, 1), image-level logits (B, C)), or (None, None) without encoder."""
        if self.context_encoder is None:
            return None, None
        return self.context_encoder(features[self.context_in_feature])

    def forward(self, images, features, proposals, targets=None):
        del images
        context, logits = self._context(features)
        if not self.training:
            instances, _ = self._forward_box(features, proposals, context=context)
            if self.topk_filter is not None:  # TEST.AP_FIXED
                instances = self.topk_filter(instances)
            return self._forward_mask(features, instances, context), {}

        proposals = self.label_and_sample_proposals(proposals, targets)
        losses, (refined, last) = self._forward_box(features, proposals, targets, context)
        if self.mask_on:
            if self.interleaved:  # the boxes the last stage regressed, gt assignment unchanged
                for p, boxes in zip(last, refined):
                    p.proposal_boxes = _clipped(boxes.detach(), p.image_size)
            losses.update(self._forward_mask(features, last, context))
        if logits is not None:
            losses["loss_context"] = self.context_loss_weight * self._context_loss(logits, targets)
        return proposals, losses

    def _context_loss(self, logits, targets):
        negatives = self.annotated_negatives
        self.annotated_negatives = None  # one hand-over per forward
        if negatives is None:
            raise SeesawEcmError(
                "HTCLiteROIHeads with MODEL.HTC_LITE.CONTEXT needs the image-level annotations "
                "that META_ARCHITECTURE 'HTCLiteRCNN' provides; set MODEL.META_ARCHITECTURE "
                "HTCLiteRCNN (or MODEL.HTC_LITE.CONTEXT False).")
        positives = torch.zeros_like(logits, dtype=torch.bool)
        rows = _image_index([t.gt_boxes for t in targets])
        positives[rows, cat([t.gt_classes for t in targets])] = True
        # exhaustive images (None) have every class annotated: all absent classes are negatives
        negs = torch.stack([~positives[i] if n is None else n.to(logits.device)
                            for i, n in enumerate(negatives)])
        return context_loss(logits, positives, negs)

    def _run_stage(self, features, proposals, stage, context=None):
        boxes = [x.proposal_boxes for x in proposals]
        context = None if context is None else context[_image_index(boxes)]
        rois = RoIFeatures(self.box_pooler, features, boxes,
                           functools.partial(self._with_context, context=context))
        return self.box_predictor[stage].predict_rois(self.box_head[stage], rois)

    def _with_context(self, box_features, context):
        """Pooled RoI features (TSD's too) plus their image's context (R, D, 1, 1) or None,
        their gradient scaled as the cascade's."""
        if context is not None:
            box_features = box_features + context
        return self._scale_gradient(box_features)

    def _forward_box(self, features, proposals, targets=None, context=None):
        """As CascadeROIHeads._forward_box, with the context added in every stage.

        Returns:
            (losses in training / instances in inference, (boxes regressed by the last stage,
            per image (Ri, 4), and the last stage's proposals)).
        """
        features = [features[f] for f in self.box_in_features]
        head_outputs = []  # (predictor, predictions, proposals) per stage
        image_sizes = [x.image_size for x in proposals]
        boxes = None
        for k in range(self.num_cascade_stages):
            if k > 0:
                proposals = self._next_stage_proposals(boxes, proposals, k, targets)
            predictions = self._run_stage(features, proposals, k, context)
            boxes = self.box_predictor[k].predict_boxes(predictions, proposals)
            head_outputs.append((self.box_predictor[k], predictions, proposals))
        last = (boxes, proposals)
        if self.training:
            return self._stage_losses(head_outputs), last
        # scores as MODEL.CASCADE.TEST_SCORE says; boxes of the last stage (`boxes`)
        predictor = self.box_predictor[-1]
        instances, _ = fast_rcnn_inference(
            boxes, self._cascade_scores(head_outputs), image_sizes,
            predictor.test_score_thresh, predictor.test_nms_thresh, predictor.test_topk_per_image)
        return instances, last

    def _needs_mask_targets(self, stage):
        return stage == self.num_cascade_stages - 1  # the mask head trains on its RoIs

    def forward_with_given_boxes(self, features, instances):
        """Masks for given boxes (detectron2's test-time augmentation), with the context."""
        assert not self.training
        return self._forward_mask(features, instances, self._context(features)[0])

    def _forward_mask(self, features, instances, context=None):
        """StandardROIHeads._forward_mask with the context added to the pooled RoI features and,
        in training, at most ``mask_max_fg_rois`` foreground RoIs per image."""
        if not self.mask_on:
            return {} if self.training else instances
        if self.training:
            instances, _ = select_foreground_proposals(instances, self.num_classes)
            instances = [self._cap_foreground(x) for x in instances]
        boxes = [x.proposal_boxes if self.training else x.pred_boxes for x in instances]
        mask_features = self.mask_pooler([features[f] for f in self.mask_in_features], boxes)
        if context is not None:
            mask_features = mask_features + context[_image_index(boxes)]
        return self.mask_head(mask_features, instances)

    def _cap_foreground(self, instances):
        """A random subset of ``mask_max_fg_rois`` RoIs of one image if it has more: the
        cascade relabels every RoI per stage, so the last stage's foreground is not bounded by
        the first stage's sampling (ROI_HEADS.POSITIVE_FRACTION)."""
        cap = self.mask_max_fg_rois
        if cap <= 0 or len(instances) <= cap:
            return instances
        return instances[torch.randperm(len(instances), device=instances.gt_classes.device)[:cap]]


@META_ARCH_REGISTRY.register()
class HTCLiteRCNN(GeneralizedRCNN):
    """GeneralizedRCNN that hands each training image's verified-absent classes to the
    HTC-Lite ROI heads for the context loss: ``neg_category_ids`` of the dataset dicts, which
    the loaders (seesaw_ecm.data.datasets) give in contiguous class ids. Images without that
    key count as exhaustively annotated."""

    @staticmethod
    def _negatives(record, num_classes):
        """(C,) bool of the record's verified-absent classes, or None (exhaustive image)."""
        if "neg_category_ids" not in record:
            return None
        mask = torch.zeros(num_classes, dtype=torch.bool)
        mask[torch.as_tensor(record["neg_category_ids"], dtype=torch.long)] = True
        return mask

    def forward(self, batched_inputs):
        if self.training and getattr(self.roi_heads, "context_encoder", None) is not None:
            num_classes = self.roi_heads.num_classes
            self.roi_heads.annotated_negatives = [self._negatives(x, num_classes)
                                                  for x in batched_inputs]
        return super().forward(batched_inputs)
