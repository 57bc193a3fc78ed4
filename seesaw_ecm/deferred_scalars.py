"""Training scalars kept as device tensors and read on the host once per logging period.

detectron2's ``EventStorage.put_scalar`` takes a float, so a metric computed on the GPU (say an
accuracy of the box classifier) costs one device-to-host sync per step where it is put.
:func:`put_scalars` keeps the 0-dim tensors instead, with their iteration and name (name scope
included); :func:`flush` reads everything pending with one transfer and puts each value into the
storage's history at its own iteration, so metrics.json, TensorBoard and the printed log hold the
values ``put_scalar(name, float(value))`` would have put. :class:`FlushScalarsHook` (the Trainer
places it just before detectron2's writers) flushes before each write. In a loop without the
hook the pending values are flushed once MAX_PENDING of them have accumulated, or by
:func:`flush`. Scalars of CPU tensors cost no sync: they are put at once, unless
:func:`defer_cpu_tensors` says otherwise (tools/count_syncs: a CPU run standing for a GPU one).
"""
import contextlib
import itertools

import torch
from detectron2.engine import HookBase
from detectron2.utils.events import get_event_storage

MAX_PENDING = 1000  # scalars kept before a flush without the hook (1 sync per ~100 steps)
_PENDING = "_seesaw_ecm_pending_scalars"  # the attribute of the EventStorage that holds them
_defer_cpu = [False]


@contextlib.contextmanager
def defer_cpu_tensors():
    """Within it, scalars of CPU tensors are kept until the flush too, as device tensors are."""
    old, _defer_cpu[0] = _defer_cpu[0], True
    try:
        yield
    finally:
        _defer_cpu[0] = old


def put_scalars(*, smoothing_hint=True, valid=None, **scalars):
    """Put 0-dim tensors {name: value} into the current EventStorage at this iteration, later.

    Args:
        smoothing_hint: as ``EventStorage.put_scalar``.
        valid: None, or a 0-dim bool tensor: when it is False none of `scalars` is put (as
            ``if valid: storage.put_scalars(...)`` would, without reading `valid` now).
    """
    storage = get_event_storage()
    if not _defer_cpu[0] and all(v.device.type == "cpu" for v in scalars.values()):
        if valid is None or bool(valid):
            storage.put_scalars(smoothing_hint=smoothing_hint, **scalars)
        return
    pending = storage.__dict__.setdefault(_PENDING, [])
    for name, value in scalars.items():
        pending.append((storage.iter, storage._current_prefix + name, value.detach(), valid,
                        smoothing_hint))
    if len(pending) >= MAX_PENDING:
        flush(storage)


def flush(storage=None):
    """Put the pending scalars of `storage` (default: the current one) into its history, at the
    iterations they were computed: one device-to-host transfer per device."""
    storage = storage or get_event_storage()
    pending = storage.__dict__.pop(_PENDING, None)
    if not pending:
        return
    values = {}  # index in `pending` -> (value, valid) as Python floats
    by_device = lambda i: str(pending[i][2].device)  # noqa: E731
    for _, group in itertools.groupby(sorted(range(len(pending)), key=by_device), by_device):
        group = list(group)
        rows = torch.stack([torch.stack([pending[i][2].to(torch.float64), _as_float(
            pending[i][3], pending[i][2])]) for i in group]).tolist()
        values.update(zip(group, rows))
    current, prefix = storage.iter, storage._current_prefix
    storage._current_prefix = ""
    try:
        for i, (iteration, name, _, _, hint) in enumerate(pending):
            value, valid = values[i]
            if valid:
                storage.iter = iteration
                storage.put_scalar(name, value, smoothing_hint=hint)
    finally:
        storage.iter, storage._current_prefix = current, prefix


def _as_float(valid, like):
    """`valid` (None or a 0-dim bool tensor) as a float64 0-dim tensor on `like`'s device."""
    if valid is None:
        return torch.ones((), dtype=torch.float64, device=like.device)
    return valid.to(like.device, torch.float64)


class FlushScalarsHook(HookBase):
    """Flushes the pending scalars before detectron2's PeriodicWriter writes: at every
    `period`-th iteration (the writer's) and at the last one. Place it just before the writer."""

    def __init__(self, period=20):
        self.period = period

    def after_step(self):
        it = self.trainer.iter
        if (it + 1) % self.period == 0 or it == self.trainer.max_iter - 1:
            flush(self.trainer.storage)

    def after_train(self):
        flush(self.trainer.storage)
