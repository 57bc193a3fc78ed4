"""The long-tail box predictor: FastRCNNOutputLayers with a (cosine) classifier, an optional
decoupled objectness branch, and the classification loss chosen by MODEL.LONG_TAIL.LOSS; and
the factory of every ROI heads' box predictors (:func:`build_box_predictor`)."""
import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from torch import nn

from ..deferred_scalars import put_scalars
from ..layers import NormedLinear
from .calibration import ScoreCalibration
from .cls_loss import build_cls_loss, uses_cosine_classifier


def _classifier(input_size, num_outputs, cosine, temperature):
    if cosine:
        return NormedLinear(input_size, num_outputs, temperature=temperature)
    layer = nn.Linear(input_size, num_outputs)
    nn.init.normal_(layer.weight, std=0.01)
    nn.init.constant_(layer.bias, 0)
    return layer


def log_classification_stats(pred_logits, gt_classes, prefix="fast_rcnn"):
    """detectron2's ``_log_classification_stats`` (accuracy, foreground accuracy and false
    negatives of (R, C + 1) logits, background last, against (R,) labels), the same values
    (counts divided in float64), put with deferred_scalars: no host sync."""
    pred_classes = pred_logits.detach().argmax(dim=1)
    bg_class_ind = pred_logits.shape[1] - 1
    fg = (gt_classes >= 0) & (gt_classes < bg_class_ind)
    num_fg = fg.sum(dtype=torch.float64)
    correct = pred_classes == gt_classes
    put_scalars(**{f"{prefix}/cls_accuracy": correct.sum(dtype=torch.float64)
                   / gt_classes.numel()})
    put_scalars(valid=num_fg > 0, **{
        f"{prefix}/fg_cls_accuracy": (correct & fg).sum(dtype=torch.float64) / num_fg,
        f"{prefix}/false_negative": ((pred_classes == bg_class_ind) & fg).sum(
            dtype=torch.float64) / num_fg})


class LongTailOutputLayers(FastRCNNOutputLayers):
    """Box predictor whose classification branch and loss come from MODEL.LONG_TAIL.

    Layout of the classification output of :meth:`forward`, for R RoIs and C classes:
    with objectness (Seesaw), (R, C + 2) = [C class logits, fg logit, bg logit] (the official
    mmdetection layout); otherwise (R, C + 1) with background last, unless the loss sets
    ``num_logits`` (EQL, DropLoss, GOL: (R, C); BaGS: (R, C + 1 + G)). A loss's ``bias_init``
    and ``weight_init`` set the classifier's bias and weights to constants.
    :meth:`predict_probs` always returns (R, C + 1) probabilities with background last, so
    detectron2's inference and cascade score averaging work unchanged.
    """

    @configurable
    def __init__(self, input_shape, *, cls_loss, cosine=True, temperature=20.0,
                 calibration=None, **kwargs):
        """
        Args:
            cls_loss: a loss of seesaw_ecm.losses (its ``uses_objectness`` and
                ``num_logits`` decide the layout, its ``bias_init`` the classifier bias).
            cosine: NormedLinear classifier(s) instead of nn.Linear.
            temperature: scale of the cosine classifier.
            calibration: a calibration.ScoreCalibration of the test scores, or None.
            kwargs: as FastRCNNOutputLayers (box2box_transform, num_classes, ...).
        """
        super().__init__(input_shape, **kwargs)
        input_size = self.cls_score.in_features
        self.cls_loss = cls_loss
        self.calibration = calibration
        self.uses_objectness = cls_loss.uses_objectness
        # C class logits + 1 background logit (C with the objectness branch), unless the loss
        # says otherwise (EQL, DropLoss: C; BaGS: its group layout)
        num_logits = getattr(cls_loss, "num_logits", None) or (
            self.num_classes + int(not self.uses_objectness))
        self.cls_score = _classifier(input_size, num_logits, cosine, temperature)
        bias_init = getattr(cls_loss, "bias_init", None)
        if bias_init is not None:  # e.g. the sigmoid prior of EQL / EQLv2 / DropLoss
            nn.init.constant_(self.cls_score.bias, bias_init)
        weight_init = getattr(cls_loss, "weight_init", None)
        if weight_init is not None:  # GOL: constant weights, as its official init
            nn.init.constant_(self.cls_score.weight, weight_init)
        self.objectness = (
            _classifier(input_size, 2, cosine, temperature) if self.uses_objectness else None
        )

    @classmethod
    def from_config(cls, cfg, input_shape, cls_loss=None):
        ret = super().from_config(cfg, input_shape)
        cls_loss = build_cls_loss(cfg) if cls_loss is None else cls_loss
        ret.update(
            cls_loss=cls_loss,
            cosine=uses_cosine_classifier(cfg),
            temperature=cfg.MODEL.LONG_TAIL.TEMPERATURE,
            calibration=ScoreCalibration.from_config(cfg, cls_loss),
        )
        return ret

    def forward(self, x):
        """x: (R, D) or (R, D, ...) box features -> (scores (R, C + 2, C + 1 or the loss's
        num_logits), deltas (R, 4C or 4))."""
        if x.dim() > 2:
            x = torch.flatten(x, start_dim=1)
        scores = self.cls_score(x)
        if self.objectness is not None:
            scores = torch.cat([scores, self.objectness(x)], dim=1)
        return scores, self.bbox_pred(x)

    def predict_rois(self, box_head, rois):
        """Predictions for a stage's RoIs: ``rois`` (roi_pooling.RoIFeatures) pools them, the
        ROI heads' ``box_head`` maps them to this predictor's input (TSD pools again)."""
        return self(box_head(rois()))

    def _split(self, scores):
        if self.objectness is None:
            return (scores,)
        return scores[:, : self.num_classes], scores[:, self.num_classes:]

    def losses(self, predictions, proposals):
        """Loss terms of the classification loss module plus detectron2's box regression loss."""
        scores, proposal_deltas = predictions
        if len(proposals):
            gt_classes = cat([p.gt_classes for p in proposals], dim=0)
            proposal_boxes = cat([p.proposal_boxes.tensor for p in proposals], dim=0)
            # proposals without "gt_boxes" are all background: their boxes are never regressed
            gt_boxes = cat(
                [(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor for p in proposals]
            )
        else:
            gt_classes = torch.empty(0, dtype=torch.long, device=scores.device)
            proposal_boxes = gt_boxes = torch.empty((0, 4), device=scores.device)
        self._log_stats(scores, gt_classes)
        losses = self.cls_loss(*self._split(scores), gt_classes)
        losses["loss_box_reg"] = self.box_reg_loss(
            proposal_boxes, gt_boxes, proposal_deltas, gt_classes
        )
        return {k: v * self.loss_weight.get(k, 1.0) for k, v in losses.items()}

    def _log_stats(self, scores, gt_classes):
        """The accuracies detectron2's predictor logs (with objectness: of the objectness and of
        the classes), kept on the device until the trainer's next write (deferred_scalars)."""
        if gt_classes.numel() == 0:
            return
        if self.objectness is None:
            if scores.shape[1] == self.num_classes:  # no background logit: it counts as 0
                scores = torch.cat([scores, scores.new_zeros(scores.shape[0], 1)], dim=1)
            elif scores.shape[1] != self.num_classes + 1:  # a group layout: its probabilities
                scores = self.cls_loss.get_probs(scores.detach())
            # (R, C + 1) logits with background last: detectron2's own metrics apply
            log_classification_stats(scores, gt_classes)
            return
        class_logits, objectness_logits = self._split(scores.detach())
        fg = gt_classes < self.num_classes
        pred_bg = objectness_logits[:, 1] > objectness_logits[:, 0]
        num_fg = fg.float().sum()
        fg_correct = (class_logits.argmax(dim=1) == gt_classes) & fg
        put_scalars(**{"fast_rcnn/objectness_accuracy": (pred_bg != fg).float().mean()})
        put_scalars(valid=num_fg > 0, **{
            "fast_rcnn/fg_cls_accuracy": fg_correct.float().sum() / num_fg,
            "fast_rcnn/false_negative": (pred_bg & fg).float().sum() / num_fg})

    def predict_probs(self, predictions, proposals, rescale=True):
        """list of (Ri, C + 1) class probabilities per image, background last, calibrated by
        `calibration` if set (`rescale` False: without its last step, NorCal's, which the
        cascade applies to its stages' mean)."""
        class_outputs = self._split(predictions[0])
        if self.calibration is None:
            probs = self.cls_loss.get_probs(*class_outputs)
        else:
            probs = self.calibration(self.cls_loss, class_outputs, rescale)
        return probs.split([len(p) for p in proposals], dim=0)


# Predictors that take the long-tail predictor as a sibling trained beside them, by the MODEL
# node whose ENABLED key turns each on; their modules add them (tsd.py: "TSD").
# Each: cls(cfg, pooled_shape, sibling, **kwargs) -> a box predictor.
SIBLING_PREDICTORS = {}


def build_box_predictor(cfg, box_head_shape, pooled_shape, **kwargs):
    """A stage's box predictor: LongTailOutputLayers on the box head (ShapeSpec
    `box_head_shape`), or the SIBLING_PREDICTORS entry whose MODEL.<node>.ENABLED is on (e.g. a
    TSDOutputLayers), built on the pooled RoI features (ShapeSpec (C, P, P) `pooled_shape`)
    with that predictor as its sibling. kwargs: as LongTailOutputLayers (cls_loss,
    box2box_transform)."""
    predictor = LongTailOutputLayers(cfg, box_head_shape, **kwargs)
    for node, predictor_class in SIBLING_PREDICTORS.items():
        if cfg.MODEL[node].ENABLED:
            return predictor_class(cfg, pooled_shape, predictor, **kwargs)
    return predictor


def pooled_shape(cfg, input_shape):
    """ShapeSpec (C, P, P) of the box pooler's output, as detectron2's _init_box_head."""
    size = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
    channels = input_shape[cfg.MODEL.ROI_HEADS.IN_FEATURES[0]].channels
    return ShapeSpec(channels=channels, height=size, width=size)
