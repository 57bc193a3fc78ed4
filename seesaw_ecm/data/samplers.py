"""Repeat-factor sampling with mmdetection's `ClassBalancedDataset` semantics ("ceil" rounding).

detectron2's `RepeatFactorTrainingSampler` repeats image i floor(r_i) times plus once more with
probability frac(r_i) (DATALOADER.REPEAT_ROUNDING "stochastic", kept unchanged). The official
Seesaw / ECM runs use mmdetection's `ClassBalancedDataset`: image i appears exactly ceil(r_i)
times in every epoch, r_i = max over its categories c of max(1, sqrt(t / f_c)), f_c = fraction
of training images containing c. `CeilRepeatSampler` streams such epochs:

- epoch e = the repeated list shuffled by a generator seeded with seed + e (as mmdetection's
  samplers), padded to `epoch_size` with its own first elements (mmdetection pads each epoch to
  whole global batches the same way; `seesaw_ecm.epochs` computes that size);
- the epochs are concatenated into one global stream; rank r takes positions r, r + W, r + 2W,
  ... (W = world size), detectron2's `TrainingSampler` sharding: every position goes to exactly
  one rank, none is skipped. `epoch_size` is a multiple of the global batch, so each rank reads
  the same number of images from each epoch;
- the stream is a function of (seed, position): `start` (a global position, e.g. iteration k x
  IMS_PER_BATCH on resume) makes the sampler yield what the uninterrupted one yields from there.
"""
import itertools

import torch
from detectron2.data.samplers import RepeatFactorTrainingSampler
from detectron2.utils import comm
from torch.utils.data import Sampler

from ..errors import SeesawEcmError

ROUNDINGS = ("stochastic", "ceil")
# The samplings an epoch is defined for: DATALOADER.SAMPLER_TRAIN (+ REPEAT_ROUNDING)
SAMPLINGS = ("none", "stochastic", "ceil")


def repeat_factors(dataset_dicts, threshold):
    """(N,) float32 r_i of detectron2's `repeat_factors_from_category_frequency` (the same
    threshold formula as mmdetection; computed in float64, returned as float32)."""
    return RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
        dataset_dicts, threshold)


def repeat_counts(dataset_dicts, threshold):
    """(N,) int64 ceil(r_i): copies of each image per epoch under "ceil" rounding. detectron2
    returns r_i as float32, so this differs from mmdetection's float64 ceil only where r_i lies
    within 6e-8 (relative) above an integer."""
    return torch.ceil(repeat_factors(dataset_dicts, threshold)).long()


def sampling_of(cfg):
    """"none" | "stochastic" | "ceil" for DATALOADER.SAMPLER_TRAIN and REPEAT_ROUNDING; None for
    another detectron2 sampler (no epoch definition here)."""
    rounding = cfg.DATALOADER.REPEAT_ROUNDING
    if rounding not in ROUNDINGS:
        raise SeesawEcmError(
            f"DATALOADER.REPEAT_ROUNDING {rounding!r} is unknown; choose one of "
            f"{', '.join(repr(r) for r in ROUNDINGS)}.")
    name = cfg.DATALOADER.SAMPLER_TRAIN
    if name == "RepeatFactorTrainingSampler":
        return rounding
    if rounding != "stochastic":
        raise SeesawEcmError(
            f"DATALOADER.REPEAT_ROUNDING {rounding!r} applies to repeat-factor sampling but "
            f"DATALOADER.SAMPLER_TRAIN is {name!r}; set SAMPLER_TRAIN "
            "\"RepeatFactorTrainingSampler\" or leave REPEAT_ROUNDING \"stochastic\".")
    if name == "TrainingSampler":
        return "none"
    return None


def copies_per_image(dataset_dicts, sampling, threshold):
    """(N,) float64 copies of each image in one epoch of `sampling` (expected ones for
    "stochastic")."""
    if sampling == "none":
        return torch.ones(len(dataset_dicts), dtype=torch.float64)
    if sampling == "stochastic":
        return repeat_factors(dataset_dicts, threshold).double()
    if sampling == "ceil":
        return repeat_counts(dataset_dicts, threshold).double()
    raise SeesawEcmError(f"Unknown sampling {sampling!r}; choose one of {SAMPLINGS}.")


class CeilRepeatSampler(Sampler):
    """Infinite index stream of epochs in which image i appears exactly counts[i] times (plus the
    padding up to `epoch_size`); see the module docstring for shuffling, sharding and `start`."""

    def __init__(self, counts, epoch_size=None, *, shuffle=True, seed=None, start=0):
        """
        Args:
            counts: (N,) int tensor, copies of each image per epoch (>= 1).
            epoch_size: images per epoch after padding (>= counts.sum(); default counts.sum()).
            seed: shared by all ranks; None = detectron2's shared random seed (deterministic
                under cfg.SEED, as detectron2's samplers).
            start: global stream position of the first index (0 = a fresh run).
        """
        self._indices = torch.repeat_interleave(torch.arange(len(counts)), counts.long())
        self.epoch_size = len(self._indices) if epoch_size is None else int(epoch_size)
        if self.epoch_size < len(self._indices):
            raise ValueError(f"epoch_size {epoch_size} < {len(self._indices)} repeated images")
        self._shuffle = shuffle
        self._seed = int(comm.shared_random_seed() if seed is None else seed)
        self._rank = comm.get_rank()
        self._world_size = comm.get_world_size()
        self.start = int(start)

    def epoch(self, e):
        """The global index list of epoch e (epoch_size entries)."""
        indices = self._indices
        if self._shuffle:
            g = torch.Generator()
            g.manual_seed(self._seed + e)
            indices = indices[torch.randperm(len(indices), generator=g)]
        pad = self.epoch_size - len(indices)
        # pad with the epoch's own first elements (several rounds if the list is shorter)
        return torch.cat([indices] + [indices] * (pad // len(indices))
                         + [indices[:pad % len(indices)]]).tolist()

    def _stream(self, first_epoch):
        for e in itertools.count(first_epoch):
            yield from self.epoch(e)

    def __iter__(self):
        first_epoch, offset = divmod(self.start, self.epoch_size)
        yield from itertools.islice(
            self._stream(first_epoch), offset + self._rank, None, self._world_size)
