"""Schedules stated in epochs (SOLVER.EPOCHS, SOLVER.EPOCH_STEPS), as the official configs do.

One epoch is what mmdetection's EpochBasedRunner calls one: a pass over the training list as
the sampler defines it (each image once; ceil(r_i) times under "ceil" repeat-factor sampling;
sum r_i images in expectation under detectron2's stochastic rounding), and its iterations are
len(data_loader) of mmdetection's `DistributedGroupSampler` / `GroupSampler`: the images are split
into the two aspect-ratio groups (width / height > 1 or not) and each group is padded up to whole
global batches, so

    iterations per epoch = sum over groups g of ceil(images in g / IMS_PER_BATCH)

(samples_per_gpu x num_gpus = IMS_PER_BATCH). MAX_ITER = EPOCHS x that, STEPS = EPOCH_STEPS x
that: the learning rate drops at the first iteration of the epoch, as mmdetection's step policy
by epoch. Warm-up stays in iterations (SOLVER.WARMUP_ITERS), as in the official configs.
"""
import logging
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from detectron2.data import get_detection_dataset_dicts
from detectron2.engine import HookBase

from .data.samplers import CeilRepeatSampler, copies_per_image, sampling_of
from .errors import SeesawEcmError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochSchedule:
    images: float          # images in one epoch before padding (expected for "stochastic")
    iters_per_epoch: int   # mmdetection's len(data_loader)
    ims_per_batch: int
    epochs: int
    epoch_steps: tuple
    copies: torch.Tensor = field(default=None, compare=False, repr=False)  # (N,) per image

    @property
    def epoch_size(self):
        """Images per epoch after the padding to whole batches."""
        return self.iters_per_epoch * self.ims_per_batch

    @property
    def max_iter(self):
        return self.epochs * self.iters_per_epoch

    @property
    def steps(self):
        return tuple(s * self.iters_per_epoch for s in self.epoch_steps)

    def describe(self):
        return (f"{self.images:,.1f} images per epoch -> {self.iters_per_epoch:,} iterations of "
                f"{self.ims_per_batch} images ({self.epoch_size:,} images with the padding); "
                f"{self.epochs} epochs = MAX_ITER {self.max_iter:,} "
                f"({self.max_iter * self.ims_per_batch:,} images seen), epoch steps "
                f"{tuple(self.epoch_steps)} = STEPS {self.steps}")


def derive_schedule(dataset_dicts, *, sampling, threshold, ims_per_batch, epochs,
                    epoch_steps=()):
    """The EpochSchedule of `dataset_dicts` (detectron2 dataset dicts with height / width)."""
    copies = copies_per_image(dataset_dicts, sampling, threshold)
    wide = torch.tensor([d["width"] / d["height"] > 1 for d in dataset_dicts])
    iters = sum(math.ceil(copies[wide == g].sum().item() / ims_per_batch)
                for g in (False, True))
    return EpochSchedule(copies.sum().item(), iters, ims_per_batch, epochs, tuple(epoch_steps),
                         copies)


def check_epoch_keys(cfg):
    epochs, steps = cfg.SOLVER.EPOCHS, tuple(cfg.SOLVER.EPOCH_STEPS)
    if epochs < 0 or (epochs == 0 and steps):
        raise SeesawEcmError(
            f"SOLVER.EPOCH_STEPS {steps} needs SOLVER.EPOCHS > 0 (got {epochs}); set "
            "SOLVER.EPOCHS, or use SOLVER.STEPS with SOLVER.MAX_ITER.")
    if epochs and cfg.SOLVER.REFERENCE_WORLD_SIZE:
        raise SeesawEcmError(
            "SOLVER.REFERENCE_WORLD_SIZE would rescale IMS_PER_BATCH and MAX_ITER after the "
            "epoch schedule is derived; set it to 0 (SOLVER.EPOCHS already derives MAX_ITER from "
            "IMS_PER_BATCH) or set SOLVER.EPOCHS 0.")
    if any(not 0 < s < epochs for s in steps) or list(steps) != sorted(set(steps)):
        raise SeesawEcmError(
            f"SOLVER.EPOCH_STEPS {steps} must increase and lie strictly between 0 and "
            f"SOLVER.EPOCHS {epochs}.")


def train_dataset_dicts(cfg):
    """DATASETS.TRAIN as detectron2's train loader reads it (same filtering, same order)."""
    return get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE
        if cfg.MODEL.KEYPOINT_ON else 0,
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None)


def schedule_from_cfg(cfg, dataset_dicts, sampling):
    """EpochSchedule of a config (SOLVER.EPOCHS may be 0: then only the epoch length matters)
    under `sampling` (sampling_of(cfg), not None)."""
    return derive_schedule(
        dataset_dicts, sampling=sampling, threshold=cfg.DATALOADER.REPEAT_THRESHOLD,
        ims_per_batch=cfg.SOLVER.IMS_PER_BATCH, epochs=cfg.SOLVER.EPOCHS,
        epoch_steps=cfg.SOLVER.EPOCH_STEPS)


@dataclass(frozen=True)
class TrainPlan:
    """What training takes from DATASETS.TRAIN, read once by :func:`plan_training`.

    cfg: the config to train with (with SOLVER.EPOCHS > 0 a copy whose SOLVER.MAX_ITER and
    STEPS are derived); schedule: the EpochSchedule (None with SOLVER.EPOCHS 0); ceil: under
    "ceil" repeat-factor rounding the (dataset dicts, CeilRepeatSampler) of the train loader,
    its epochs padded to the schedule's epoch size, else None (detectron2's train loader then
    builds its own sampler).
    """
    cfg: object
    schedule: Optional[EpochSchedule] = None
    ceil: Optional[tuple] = None


def plan_training(cfg):
    """The TrainPlan of cfg: the epoch keys checked, DATASETS.TRAIN read at most once (only when
    the schedule is in epochs or the sampler rounds up), the schedule derived from it (a
    deterministic function of the annotation files and cfg, hence the same on every rank) and
    logged."""
    sampling = sampling_of(cfg)
    check_epoch_keys(cfg)
    if cfg.SOLVER.EPOCHS and sampling is None:
        raise SeesawEcmError(
            f"SOLVER.EPOCHS needs DATALOADER.SAMPLER_TRAIN \"TrainingSampler\" or "
            f"\"RepeatFactorTrainingSampler\" (got {cfg.DATALOADER.SAMPLER_TRAIN!r}); set "
            "SOLVER.EPOCHS 0 and SOLVER.MAX_ITER instead.")
    if not cfg.SOLVER.EPOCHS and sampling != "ceil":
        return TrainPlan(cfg)
    dicts = train_dataset_dicts(cfg)
    schedule = schedule_from_cfg(cfg, dicts, sampling)
    ceil = (dicts, CeilRepeatSampler(schedule.copies, schedule.epoch_size)) \
        if sampling == "ceil" else None
    if not cfg.SOLVER.EPOCHS:
        return TrainPlan(cfg, None, ceil)
    cfg = cfg.clone()
    cfg.defrost()
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = schedule.max_iter, schedule.steps
    cfg.freeze()
    logger.info(f"Epoch schedule ({sampling} sampling of {cfg.DATASETS.TRAIN}): "
                + schedule.describe() + " (SOLVER.EPOCHS 0 to set MAX_ITER and STEPS instead)")
    return TrainPlan(cfg, schedule, ceil)


class EpochProgressHook(HookBase):
    """Puts `images_seen` (and, with a known epoch size, `epoch`, fractional) into the
    EventStorage every iteration (metrics.json, TensorBoard) and logs each finished epoch."""

    def __init__(self, ims_per_batch, epoch_size=None):
        self._batch = ims_per_batch
        self._epoch_size = epoch_size

    def after_step(self):
        seen = (self.trainer.iter + 1) * self._batch
        scalars = {"images_seen": seen}
        if self._epoch_size:
            scalars["epoch"] = seen / self._epoch_size
            if seen % self._epoch_size < self._batch:
                logger.info(f"Epoch {seen // self._epoch_size} finished at iteration "
                            f"{self.trainer.iter + 1}: {seen:,} images seen")
        self.trainer.storage.put_scalars(smoothing_hint=False, **scalars)
