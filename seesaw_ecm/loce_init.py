"""LOCE's initialisation pass (Feng et al., ICCV 2021; the official ``InitializerHook`` with its
``DistributedBalancedSampler``): before iteration 1, the training forward of the LOCE model over
a class-balanced set of training images, in eval mode and without gradients, so that every
class's feature memory is filled and its mean score measured before the first update."""
import logging
import math
import time

import torch
from detectron2.data.build import trivial_batch_collator
from detectron2.data.common import DatasetFromList, MapDataset
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.events import EventStorage
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from .data.mapper import CheckedDatasetMapper
from .epochs import train_dataset_dicts
from .errors import SeesawEcmError

logger = logging.getLogger(__name__)


def balanced_image_indices(dataset_dicts, images_per_class, rank=0, world_size=1):
    """The indices into `dataset_dicts` that `rank` forwards, as the official
    DistributedBalancedSampler: one group per class, in order of first appearance in the dataset
    (the classes of one image by index), of the images holding a non-crowd annotation of it
    (images with none form one more group, as the official); of each group the first
    ``images_per_class x world_size`` images in dataset order (the group cycled when shorter),
    of which rank r takes every world_size-th from the r-th. Groups one after another:
    ``images_per_class x groups`` indices per rank (an image repeats for each of its classes)."""
    groups = {}
    for index, record in enumerate(dataset_dicts):
        classes = sorted({a["category_id"] for a in record.get("annotations", ())
                          if not a.get("iscrowd", 0)})
        for c in classes or [None]:
            groups.setdefault(c, []).append(index)
    total = images_per_class * world_size
    indices = []
    for images in groups.values():
        indices += (images * math.ceil(total / len(images)))[:total][rank::world_size]
    return indices


@torch.no_grad()
def run_init_pass(model, batches, log_period=100):
    """The official pass: every batch of `batches` (lists of mapped training dicts) through the
    training forward of `model`, its losses discarded, without gradients and with the model in
    eval mode as the official (mmdetection's val_step of the eval-mode model): detectron2 picks
    the training path by the mode flag, so the model is in train mode but its batch-norm and
    dropout layers, the only layers whose eval mode changes the official forward, in eval mode.
    The LOCE ROI heads enqueue every ground-truth box's features and update the mean scores as
    in training. Every module's mode is restored; the metrics go to a private EventStorage.
    Returns the number of batches."""
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    for m in model.modules():
        if isinstance(m, (_BatchNorm, _DropoutNd)):
            m.eval()
    count = 0
    try:
        with EventStorage():
            for count, batch in enumerate(batches, 1):
                model(batch)
                if count % log_period == 0:
                    logger.info(f"LOCE initialisation pass: batch {count} / {len(batches)}")
    finally:
        for m, training in modes:
            m.training = training
    return count


def images_per_class(cfg):
    """MODEL.LONG_TAIL.LOCE.INIT_PASS.IMAGES_PER_CLASS; 0 = the official QUEUE_SIZE // 16 (at
    least 1)."""
    loce = cfg.MODEL.LONG_TAIL.LOCE
    if loce.INIT_PASS.IMAGES_PER_CLASS < 0:
        raise SeesawEcmError(f"MODEL.LONG_TAIL.LOCE.INIT_PASS.IMAGES_PER_CLASS "
                             f"{loce.INIT_PASS.IMAGES_PER_CLASS}: set 0 (QUEUE_SIZE // 16, the "
                             "official) or a positive number of images per class and GPU.")
    return loce.INIT_PASS.IMAGES_PER_CLASS or max(1, loce.QUEUE_SIZE // 16)


class LOCEInitPassHook(HookBase):
    """Runs :func:`run_init_pass` in before_train over this rank's
    :func:`balanced_image_indices` of DATASETS.TRAIN (mapped by the training mapper, in batches
    of the per-GPU training batch). A resumed run (iteration > 0) gets its memory, which
    checkpoints do not hold, refilled the same way, but keeps the checkpoint's mean scores (an
    uninterrupted run has them; the official reruns the whole pass on resume)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.images_per_class = images_per_class(cfg)

    def before_train(self):
        cfg, world = self.cfg, comm.get_world_size()
        dicts = train_dataset_dicts(cfg)
        chosen = balanced_image_indices(dicts, self.images_per_class, comm.get_rank(), world)
        loader = torch.utils.data.DataLoader(
            MapDataset(DatasetFromList([dicts[i] for i in chosen], copy=False),
                       CheckedDatasetMapper(cfg, True)),
            batch_size=max(1, cfg.SOLVER.IMS_PER_BATCH // world), shuffle=False,
            num_workers=cfg.DATALOADER.NUM_WORKERS, collate_fn=trivial_batch_collator)
        model = self.trainer.model
        model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        memory, score = model.roi_heads.memory, model.roi_heads.box_predictor.cls_loss.mean_score
        before, resumed = score.clone(), self.trainer.iter > 0
        logger.info(f"LOCE initialisation pass: {len(chosen)} images ({self.images_per_class} "
                    f"per class and GPU) in {len(loader)} batches, eval mode, no gradients"
                    + (f"; resuming at iteration {self.trainer.iter}: it refills the feature "
                       "memory, the mean scores stay the checkpoint's" if resumed else ""))
        start = time.perf_counter()
        run_init_pass(model, loader)
        measured = int((score[:-1] != before[:-1]).sum())
        if resumed:
            score.copy_(before)
        filled = 0 if memory.filled is None else int((memory.filled > 0).sum())
        logger.info(f"LOCE initialisation pass done in {time.perf_counter() - start:.1f} s: "
                    f"feature memory filled for {filled} of {memory.num_classes} classes, mean "
                    f"score " + ("kept" if resumed else f"measured for {measured}"))


def loce_init_hooks(cfg):
    """[LOCEInitPassHook] for LOCE ROI heads with MODEL.LONG_TAIL.LOCE.INIT_PASS.ENABLED, else
    []: what the Trainer adds to its hooks."""
    loce = cfg.MODEL.ROI_HEADS.NAME == "LOCEROIHeads"
    return [LOCEInitPassHook(cfg)] if loce and cfg.MODEL.LONG_TAIL.LOCE.INIT_PASS.ENABLED else []
