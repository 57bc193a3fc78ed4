"""LOCE ROI heads (Feng et al., ICCV 2021; official ``loce_roi_head.py``): LongTailROIHeads whose
box branch, in training, keeps the equilibrium loss's running mean scores up to date and adds
memory-replayed RoI features of low-scoring classes to the batch."""
import logging

import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.structures import Boxes, Instances

from ..errors import SeesawEcmError
from ..losses import EquilibriumLoss
from .feature_memory import FeatureMemory, jittered_boxes
from .roi_heads import LongTailROIHeads

logger = logging.getLogger(__name__)

MEMORY_DTYPES = {"float32": torch.float32, "float16": torch.float16}
INSTANCE_INDEX = "gt_instance_index"  # a "gt_" field: detectron2 copies it to the proposals


@ROI_HEADS_REGISTRY.register()
class LOCEROIHeads(LongTailROIHeads):
    """In training, per iteration (the official order):

    1. the RoI features of 16 jittered boxes around every ground-truth box are pooled
       (detached; in one pooler call with the sampled proposals) and enqueued in the
       :class:`FeatureMemory`;
    2. classes are drawn from the memory by inverse mean score and their features appended to
       the box head's input, as extra foreground RoIs with their regression targets;
    3. the equilibrium loss's mean scores are updated from this batch's scores (one entry per
       ground-truth instance, one per replayed class), then the losses are computed.

    Before iteration 1 the initialisation pass (seesaw_ecm/loce_init.py,
    MODEL.LONG_TAIL.LOCE.INIT_PASS) runs these steps over a class-balanced set of training
    images without gradients, so that training starts with filled memories and measured mean
    scores. Inference is LongTailROIHeads' (plain softmax scores). MODEL.LONG_TAIL.LOSS must be
    "loce".
    """

    @configurable
    def __init__(self, *, memory, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(self.box_predictor.cls_loss, EquilibriumLoss):
            raise SeesawEcmError('ROI_HEADS.NAME "LOCEROIHeads" needs MODEL.LONG_TAIL.LOSS '
                                 '"loce" (the equilibrium loss whose mean scores it updates).')
        self.memory = memory
        self._jittered = self._targets = None  # of the training forward that runs

    @classmethod
    def from_config(cls, cfg, input_shape):
        if cfg.MODEL.TSD.ENABLED:  # its replayed features would need TSD's offset pooling
            raise SeesawEcmError("LOCEROIHeads does not support MODEL.TSD.ENABLED: set it False.")
        ret = super().from_config(cfg, input_shape)
        loce = cfg.MODEL.LONG_TAIL.LOCE
        if loce.MEMORY_DTYPE not in MEMORY_DTYPES:
            raise SeesawEcmError(f"MODEL.LONG_TAIL.LOCE.MEMORY_DTYPE {loce.MEMORY_DTYPE!r}: "
                                 f"choose one of {sorted(MEMORY_DTYPES)}")
        if loce.MEMORY_DEVICE not in ("cpu", "model"):
            raise SeesawEcmError(f"MODEL.LONG_TAIL.LOCE.MEMORY_DEVICE {loce.MEMORY_DEVICE!r}: "
                                 "choose 'cpu' or 'model'")
        channels = input_shape[cfg.MODEL.ROI_HEADS.IN_FEATURES[0]].channels
        resolution = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
        memory = FeatureMemory(
            cfg.MODEL.ROI_HEADS.NUM_CLASSES, (channels, resolution, resolution),
            queue_size=loce.QUEUE_SIZE, sampled_classes=loce.SAMPLED_CLASSES,
            sampled_features=loce.SAMPLED_FEATURES, dtype=MEMORY_DTYPES[loce.MEMORY_DTYPE],
            device=loce.MEMORY_DEVICE)
        logger.info(
            f"LOCE feature memory: {memory.num_classes} classes x {memory.queue_size} x "
            f"{memory.feature_shape} {loce.MEMORY_DTYPE} = {memory.nbytes() / 1e9:.3f} GB on "
            f"{'the CPU' if loce.MEMORY_DEVICE == 'cpu' else 'the model device'} (allocated "
            "when first filled)")
        ret["memory"] = memory
        return ret

    @torch.no_grad()
    def label_and_sample_proposals(self, proposals, targets):
        """detectron2's sampling; each foreground proposal also gets the batch-wide index of
        its ground-truth instance (``gt_instance_index``) for the mean-score update."""
        offset = 0
        for target in targets:
            target.set(INSTANCE_INDEX, torch.arange(offset, offset + len(target),
                                                    device=target.gt_classes.device))
            offset += len(target)
        return super().label_and_sample_proposals(proposals, targets)

    def forward(self, images, features, proposals, targets=None):
        if self.training:  # drawn first, as the official enqueue draws before the sampling
            self._jittered = [jittered_boxes(t.gt_boxes.tensor, t.image_size) for t in targets]
            self._targets = targets
        try:
            return super().forward(images, features, proposals, targets)
        finally:
            self._jittered = self._targets = None

    def _pool(self, features, proposals):
        """(RoI features of the proposals, of the jittered boxes) from one call of the box
        pooler, which syncs the host per call (its level assignment): both lists in one."""
        pairs = list(zip(proposals, self._jittered))
        boxes = [Boxes.cat([p.proposal_boxes, Boxes(j)]) for p, j in pairs]
        pooled = self.box_pooler([features[f] for f in self.box_in_features], boxes)
        parts = pooled.split([n for p, j in pairs for n in (len(p), len(j))])
        return cat(parts[0::2]), cat(parts[1::2])

    def _enqueue(self, pooled, targets):
        repeat = lambda x: x.repeat_interleave(16, dim=0)  # noqa: E731  (16 boxes per GT)
        self.memory.enqueue(pooled.detach(), cat([repeat(t.gt_classes) for t in targets]),
                            cat(self._jittered),
                            cat([repeat(t.gt_boxes.tensor) for t in targets]))

    def _forward_box(self, features, proposals):
        if not self.training:
            return super()._forward_box(features, proposals)
        loss = self.box_predictor.cls_loss
        box_features, jittered_features = self._pool(features, proposals)
        self._enqueue(jittered_features, self._targets)
        replay, labels, replay_boxes, replay_gt = self.memory.sample(
            loss.mean_score, box_features.device)
        box_features = self.box_head(torch.cat([box_features, replay.to(box_features)]))
        predictions = self.box_predictor(box_features)
        replayed = Instances((0, 0), proposal_boxes=Boxes(replay_boxes),
                             gt_boxes=Boxes(replay_gt), gt_classes=labels)
        entries = cat([p.get(INSTANCE_INDEX) if p.has(INSTANCE_INDEX)
                       else torch.full_like(p.gt_classes, -1) for p in proposals]
                      + [-1 - labels])  # one entry per replayed class
        gt_classes = cat([p.gt_classes for p in proposals] + [labels])
        loss.update_mean_score(predictions[0].detach(), gt_classes, entries)
        return self.box_predictor.losses(predictions, list(proposals) + [replayed])
