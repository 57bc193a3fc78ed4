"""The cascade ROI heads (Cascade Mask R-CNN) with the long-tail box predictor in every stage,
as detectron2's CascadeROIHeads or, one MODEL.CASCADE key per difference, as mmdetection's
CascadeRoIHead (the cascade of the official Seesaw and ECM runs)."""
import copy

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads.cascade_rcnn import CascadeROIHeads, _ScaleGradient
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference
from detectron2.modeling.roi_heads.mask_head import build_mask_head, mask_rcnn_inference
from detectron2.modeling.roi_heads.roi_heads import select_foreground_proposals
from detectron2.structures import Instances
from detectron2.utils.events import get_event_storage
from torch import nn

from ..errors import SeesawEcmError
from .cls_loss import build_cls_loss
from .mask_head import with_mask_options
from .predictor import build_box_predictor, pooled_shape
from .roi_pooling import RoIFeatures
from .topk_inference import TopKPerClassFilter

TEST_SCORES = ("probs", "logits")


@ROI_HEADS_REGISTRY.register()
class LongTailCascadeROIHeads(CascadeROIHeads):
    """CascadeROIHeads in which every stage's box predictor is a LongTailOutputLayers (a TSD
    one with MODEL.TSD.ENABLED).

    Each stage has its own IoU (ROI_BOX_CASCADE_HEAD.IOUS), regression weights (BBOX_REG_WEIGHTS),
    box head, class-agnostic regression and copy of the classification loss, as in the official
    mmdetection cascade configs: for Seesaw every stage counts its own samples. The class
    statistics (ECM, Federated) are computed once and copied.

    With MODEL.CASCADE at its defaults this is detectron2's cascade: stages 2 and 3 relabel the
    stage-1 RoIs after refinement, gradients into the pooled features are scaled by 1 / stages,
    one mask head trains on stage-1 foreground RoIs, and test scores are the mean of the stages'
    (R, C + 1) probabilities. Each key switches one part to mmdetection's CascadeRoIHead:

    - MASK_PER_STAGE: one mask head per stage, trained on that stage's sampled foreground RoIs
      (the boxes that stage classified and regressed); at test each predicts on the final boxes
      and the sigmoid masks are averaged.
    - STAGE_LOSS_WEIGHTS: every loss of stage i (classification terms, box, mask) times w_i, and
      no gradient scaling.
    - RESAMPLE_PER_STAGE: each stage drops the previous stage's ground-truth RoIs from the
      refined boxes, adds the ground truth again, matches at its IoU and samples
      ROI_HEADS.BATCH_SIZE_PER_IMAGE RoIs at POSITIVE_FRACTION.
    - TEST_SCORE "logits": the stages' raw classification outputs are averaged, then the loss's
      activation is applied once (``cls_loss.get_probs``).

    As LongTailROIHeads, the mask head has the options of MODEL.CARAFE.MASK_HEAD and
    MODEL.MASK_SCORING, and `topk_filter` (TEST.AP_FIXED) runs before it.
    """

    @configurable
    def __init__(self, *, mask_per_stage=False, stage_loss_weights=(), resample_per_stage=False,
                 test_score="probs", topk_filter=None, **kwargs):
        """topk_filter: a TopKPerClassFilter applied to the detections before the mask head, or
        None; the others: one MODEL.CASCADE key each (see above); kwargs: as CascadeROIHeads."""
        super().__init__(**kwargs)
        self.topk_filter = topk_filter
        self.mask_per_stage = mask_per_stage and self.mask_on
        self.stage_loss_weights = list(stage_loss_weights) or [1.0] * self.num_cascade_stages
        # mmdetection weights the losses instead of scaling the gradient by 1 / stages
        self.box_grad_scale = 1.0 if stage_loss_weights else 1.0 / self.num_cascade_stages
        self.resample_per_stage = resample_per_stage
        self.test_score = test_score

    @classmethod
    def check_config(cls, cfg):
        """Raise SeesawEcmError for MODEL.CASCADE values these heads cannot run (also called
        by seesaw_ecm.validation before anything is built)."""
        cascade = cfg.MODEL.CASCADE
        stages = len(cfg.MODEL.ROI_BOX_CASCADE_HEAD.IOUS)
        if cascade.STAGE_LOSS_WEIGHTS and len(cascade.STAGE_LOSS_WEIGHTS) != stages:
            raise SeesawEcmError(
                f"MODEL.CASCADE.STAGE_LOSS_WEIGHTS {list(cascade.STAGE_LOSS_WEIGHTS)} needs one "
                f"weight per stage ({stages}, as ROI_BOX_CASCADE_HEAD.IOUS), or [] for none.")
        if cascade.TEST_SCORE not in TEST_SCORES:
            raise SeesawEcmError(
                f"MODEL.CASCADE.TEST_SCORE {cascade.TEST_SCORE!r}: valid choices are {TEST_SCORES}")
        if cascade.MASK_PER_STAGE and (cfg.MODEL.MASK_SCORING.ON or cfg.MODEL.CARAFE.MASK_HEAD):
            raise SeesawEcmError(
                "MODEL.CASCADE.MASK_PER_STAGE (three mask heads) does not support "
                "MODEL.MASK_SCORING.ON or MODEL.CARAFE.MASK_HEAD yet: turn one of them off.")

    @classmethod
    def from_config(cls, cfg, input_shape):
        cls.check_config(cfg)
        ret = super().from_config(cfg, input_shape)
        cascade = cfg.MODEL.CASCADE
        ret.update(mask_per_stage=cascade.MASK_PER_STAGE,
                   stage_loss_weights=cascade.STAGE_LOSS_WEIGHTS,
                   resample_per_stage=cascade.RESAMPLE_PER_STAGE, test_score=cascade.TEST_SCORE,
                   topk_filter=TopKPerClassFilter.from_config(cfg, ret["box_predictors"]))
        return ret

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        cls_loss = build_cls_loss(cfg)
        ret["box_predictors"] = [
            build_box_predictor(
                cfg, head.output_shape, pooled_shape(cfg, input_shape),
                box2box_transform=stock.box2box_transform, cls_loss=copy.deepcopy(cls_loss),
            )
            for head, stock in zip(ret["box_heads"], ret["box_predictors"])
        ]
        return ret

    @classmethod
    def _init_mask_head(cls, cfg, input_shape):
        ret = super()._init_mask_head(cfg, input_shape)
        if not ret:
            return ret
        if cfg.MODEL.CASCADE.MASK_PER_STAGE:  # independently initialized heads, no options
            size = cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION
            channels = input_shape[cfg.MODEL.ROI_HEADS.IN_FEATURES[0]].channels
            shape = ShapeSpec(channels=channels, width=size, height=size)
            ret["mask_head"] = nn.ModuleList(
                build_mask_head(cfg, shape) for _ in cfg.MODEL.ROI_BOX_CASCADE_HEAD.IOUS)
        else:
            ret["mask_head"] = with_mask_options(cfg, ret["mask_head"], input_shape)
        return ret

    def forward_with_given_boxes(self, features, instances):
        """CascadeROIHeads' (masks and keypoints of the given detections) on the detections
        that topk_filter keeps."""
        if self.topk_filter is not None:
            instances = self.topk_filter(instances)
        return super().forward_with_given_boxes(features, instances)

    def forward(self, images, features, proposals, targets=None):
        if not self.training:
            return super().forward(images, features, proposals)
        proposals = self.label_and_sample_proposals(proposals, targets)
        losses, stage_proposals = self._forward_box(features, proposals, targets)
        if self.mask_on:
            for stage in range(self.num_cascade_stages if self.mask_per_stage else 1):
                losses.update(self._mask_loss(features, stage_proposals[stage], stage))
        losses.update(self._forward_keypoint(features, proposals))
        return proposals, losses

    def _forward_box(self, features, proposals, targets=None):
        """The cascade's box stages.

        Returns:
            in training, (losses, the proposals of every stage); in inference, instances.
        """
        box_features = [features[f] for f in self.box_in_features]
        head_outputs = []  # (predictor, predictions, proposals) per stage
        boxes = None
        for k in range(self.num_cascade_stages):
            if k > 0:
                proposals = self._next_stage_proposals(boxes, proposals, k, targets)
            predictions = self._run_stage(box_features, proposals, k)
            boxes = self.box_predictor[k].predict_boxes(predictions, proposals)
            head_outputs.append((self.box_predictor[k], predictions, proposals))
        if self.training:
            return self._stage_losses(head_outputs), [h[2] for h in head_outputs]
        predictor = self.box_predictor[-1]
        instances, _ = fast_rcnn_inference(
            boxes, self._cascade_scores(head_outputs), [x.image_size for x in proposals],
            predictor.test_score_thresh, predictor.test_nms_thresh, predictor.test_topk_per_image)
        return instances

    def _run_stage(self, features, proposals, stage):
        rois = RoIFeatures(self.box_pooler, features, [x.proposal_boxes for x in proposals],
                           self._scale_gradient)
        return self.box_predictor[stage].predict_rois(self.box_head[stage], rois)

    def _scale_gradient(self, box_features):
        """The pooled RoI features, their gradient scaled in training by box_grad_scale
        (inference needs no scaling, and the autograd Function is not traceable)."""
        if not self.training:
            return box_features
        return _ScaleGradient.apply(box_features, self.box_grad_scale)

    def _next_stage_proposals(self, boxes, proposals, stage, targets):
        """The RoIs of `stage` > 0 from the boxes the previous stage regressed (`boxes`, per image
        (Ri, 4)) on its RoIs (`proposals`), labelled (training) by this stage's matcher."""
        if self.training and self.resample_per_stage:  # as mmdetection's refine_bboxes
            boxes = [b[~p.from_gt] for b, p in zip(boxes, proposals)]
        proposals = self._create_proposals_from_boxes(boxes, [x.image_size for x in proposals])
        if not self.training:
            return proposals
        if self.resample_per_stage:
            with get_event_storage().name_scope(f"stage{stage}"):
                return self.label_and_sample_proposals(proposals, targets, stage)
        return self._match_and_label_boxes(proposals, stage, targets)

    @torch.no_grad()
    def label_and_sample_proposals(self, proposals, targets, stage=0):
        """detectron2's sampling with the matcher of `stage`. With RESAMPLE_PER_STAGE the
        ground truth is added (PROPOSAL_APPEND_GT) with a ``from_gt`` flag, so the next stage
        can drop those RoIs as mmdetection does."""
        if not self.resample_per_stage:
            return super().label_and_sample_proposals(proposals, targets)
        proposals = [Instances(p.image_size, proposal_boxes=p.proposal_boxes,
                               from_gt=torch.zeros(len(p), dtype=torch.bool,
                                                   device=p.proposal_boxes.device))
                     for p in proposals]
        if self.proposal_append_gt:
            proposals = [Instances.cat([p, Instances(
                t.image_size, proposal_boxes=t.gt_boxes,
                from_gt=torch.ones(len(t), dtype=torch.bool, device=t.gt_boxes.device))])
                for p, t in zip(proposals, targets)]
        # detectron2's sampler reads one matcher and appends the gt itself: lend it this stage's
        # matcher and let it skip the (already done) append
        saved = self.proposal_matcher, self.proposal_append_gt
        self.proposal_matcher, self.proposal_append_gt = self.proposal_matchers[stage], False
        try:
            return super().label_and_sample_proposals(proposals, targets)
        finally:
            self.proposal_matcher, self.proposal_append_gt = saved

    def _needs_mask_targets(self, stage):
        """Whether the RoIs of `stage` > 0 need the gt masks of their matches."""
        return self.mask_per_stage

    @torch.no_grad()
    def _match_and_label_boxes(self, proposals, stage, targets):
        """detectron2's relabelling, plus the matched gt masks where a mask head trains on this
        stage's RoIs (from the matches detectron2 computes, which it does not keep)."""
        if not (self.mask_on and self._needs_mask_targets(stage)):
            return super()._match_and_label_boxes(proposals, stage, targets)
        matcher, matches = self.proposal_matchers[stage], []

        def recording_matcher(iou):
            matches.append(matcher(iou))
            return matches[-1]

        self.proposal_matchers[stage] = recording_matcher
        try:
            proposals = super()._match_and_label_boxes(proposals, stage, targets)
        finally:
            self.proposal_matchers[stage] = matcher
        for p, t, (matched_idxs, _) in zip(proposals, targets, matches):
            if len(t):
                p.gt_masks = t.gt_masks[matched_idxs]
        return proposals

    def _stage_losses(self, head_outputs):
        """The box stages' losses, `{name}_stage{i}`, each times the stage's weight."""
        losses = {}
        storage = get_event_storage()
        for stage, (predictor, predictions, proposals) in enumerate(head_outputs):
            with storage.name_scope(f"stage{stage}"):
                stage_losses = predictor.losses(predictions, proposals)
            weight = self.stage_loss_weights[stage]
            losses.update({f"{k}_stage{stage}": v * weight for k, v in stage_losses.items()})
        return losses

    def _cascade_scores(self, head_outputs):
        """Per image (Ri, C + 1) class scores, background last, from every stage's outputs;
        a calibration's (MODEL.ROI_HEADS.CALIBRATION) NorCal step on the stages' mean."""
        n = self.num_cascade_stages
        if self.test_score == "probs":
            per_stage = [h[0].predict_probs(h[1], h[2], rescale=False) for h in head_outputs]
            mean = [sum(s) * (1.0 / n) for s in zip(*per_stage)]
            last = head_outputs[-1][0]
            if last.calibration is None:
                return mean
            return [last.calibration.rescale(last.cls_loss, m) for m in mean]
        mean_logits = sum(h[1][0] for h in head_outputs) / n
        predictor, _, proposals = head_outputs[-1]
        return predictor.predict_probs((mean_logits, None), proposals)

    def _mask_loss(self, features, proposals, stage):
        """The mask loss of `stage` (its own head with MASK_PER_STAGE) on its foreground RoIs."""
        head = self.mask_head[stage] if self.mask_per_stage else self.mask_head
        proposals, _ = select_foreground_proposals(proposals, self.num_classes)
        x = self.mask_pooler([features[f] for f in self.mask_in_features],
                             [p.proposal_boxes for p in proposals])
        loss = head(x, proposals)["loss_mask"] * self.stage_loss_weights[stage]
        return {f"loss_mask_stage{stage}" if self.mask_per_stage else "loss_mask": loss}

    def _forward_mask(self, features, instances):
        """Inference masks; with MASK_PER_STAGE the mean of every head's sigmoid masks."""
        if not self.mask_per_stage:
            return super()._forward_mask(features, instances)
        x = self.mask_pooler([features[f] for f in self.mask_in_features],
                             [i.pred_boxes for i in instances])
        per_head = []
        for head in self.mask_head:
            mask_rcnn_inference(head.layers(x), instances)  # sets pred_masks = sigmoid
            per_head.append([i.pred_masks for i in instances])
        for inst, masks in zip(instances, zip(*per_head)):
            inst.pred_masks = sum(masks) / len(masks)
        return instances
