"""Counting the operations that force a device-to-host synchronisation on CUDA, on any device.

On CUDA the host queues kernels ahead of the GPU; an operation that needs a value or a shape
computed on the GPU makes the host wait until the GPU has caught up (a *sync*). Such operations
are the same on the CPU, so they can be counted without a GPU: :class:`SyncCounter` watches one
region of code through a torch-function mode (the Python-level reads: ``.item()``, ``.tolist()``,
``.numpy()``, ``.cpu()``, ``bool()`` / ``int()`` / ``float()`` / ``index()`` of a tensor,
printing or formatting one) and a dispatch mode (the aten operators below them and those whose
output shape depends on the data: ``nonzero`` and ``torch.where(cond)``, boolean-mask indexing
and assignment, ``masked_select``, ``unique``, ``repeat_interleave`` without ``output_size``,
``bincount``, ``equal``, torchvision's ``nms``, ...). Backward passes are seen too.

Every counted event is one operation that would sync on CUDA if its tensors were on the GPU;
on a CPU run every tensor counts as if it were, except the results of ``.cpu()`` and what is
computed from them alone (a value that the code keeps on the host otherwise, such as
detectron2's polygon masks, is counted). Not seen on a CPU run: copies by ``.to(device)``, whose
two sides are both the CPU there. Each event is reported with the innermost Python frame outside
torch that caused it (``path:line function``), so that it can be found; an event in a backward
pass carries the frame of the forward operation it differentiates.

    with SyncCounter() as syncs:
        loss = model(batch); loss.backward()
    print(syncs.total, syncs.by_op(), syncs.table())

On a GPU (``cpu_is_device=False``) copies to the host are counted, and operations on tensors
that are on the CPU are not. ``python -m tools.count_syncs`` (tools/count_syncs.py) counts one
training step (forward, backward, optimizer step) of a config against stock detectron2's.
"""
import collections
import os
import re
import sys

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Tensor methods that read a device tensor on the host, by the name they are reported under.
HOST_READS = {
    "item": "Tensor.item", "tolist": "Tensor.tolist", "numpy": "Tensor.numpy",
    "cpu": "Tensor.cpu", "__bool__": "bool(tensor)", "__int__": "int(tensor)",
    "__float__": "float(tensor)", "__index__": "index(tensor)", "__repr__": "print(tensor)",
    "__str__": "print(tensor)", "__format__": "format(tensor)",
}
# aten operators that read a value on the host or whose output shape depends on the data.
ALWAYS = {
    aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.unique_consecutive,
    aten.unique_dim, aten.unique_dim_consecutive, aten._unique, aten._unique2,
    aten.bincount, aten.equal, aten.is_nonzero, aten.histc,
}
MASK_INDEXED = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
# Functions whose reads of a value are argument checks that CUDA skips (it relies on device
# asserts): nothing inside them is counted, unless the condition says they read a value on
# CUDA too (one_hot without num_classes reads the largest label).
CPU_ONLY_CHECKS = {
    F.one_hot: lambda args, kwargs: kwargs.get("num_classes", args[1] if len(args) > 1 else -1)
    == -1,
}
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_THIS_FILE = os.path.abspath(__file__)
_HOST = "_sync_counter_on_host"  # set on tensors that are on the host on CUDA too


def _on_host(tensors, cpu_is_device=True):
    """Whether `tensors` (an op's arguments) hold a tensor and every tensor is a result of
    ``.cpu()`` (or computed from such results only), or on the CPU where `cpu_is_device` is
    False: those stay on the host on CUDA too."""
    flat = [t for t in torch.utils._pytree.tree_leaves(tensors) if isinstance(t, torch.Tensor)]
    return bool(flat) and all(getattr(t, _HOST, False) or (
        not cpu_is_device and t.device.type == "cpu") for t in flat)


def _mark_host(result):
    for t in torch.utils._pytree.tree_leaves(result):
        if isinstance(t, torch.Tensor):
            setattr(t, _HOST, True)
    return result


def _is_mask(index):
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def _dispatch_name(func, args, kwargs):
    """The name to count `func` under, or None if it does not sync on CUDA."""
    packet = func.overloadpacket
    if packet in ALWAYS:
        return str(packet).split(".", 1)[-1] if packet is not aten._local_scalar_dense else (
            "item (aten._local_scalar_dense)")
    if packet in MASK_INDEXED and len(args) > 1 and any(_is_mask(i) for i in args[1] or ()):
        return f"{packet.__name__} with a boolean mask"
    if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "repeat_interleave without output_size"
    if packet is aten.masked_fill and isinstance(args[2], torch.Tensor):
        return "masked_fill with a tensor value"
    if func.namespace == "torchvision" and packet.__name__ == "nms":
        return "torchvision.nms"
    if packet in (aten._to_copy, aten.copy_) and _copies_to_host(func, args, kwargs):
        return "copy to the host"
    return None


def _copies_to_host(func, args, kwargs):
    """Whether a _to_copy / copy_ copies a device tensor (not a CPU one) to the CPU."""
    if func.overloadpacket is aten.copy_:
        src, dst = args[0:2][::-1]
        return src.device.type != "cpu" and dst.device.type == "cpu"
    device = kwargs.get("device")
    return args[0].device.type != "cpu" and device is not None and torch.device(
        device).type == "cpu"


def _location():
    """'path:line function' of the innermost frame outside torch and this module; in a
    backward pass that of the forward operation whose backward runs, when anomaly mode
    recorded it, marked "(backward)"."""
    node = torch._C._current_autograd_node()
    recorded = node.metadata.get("traceback_") if node is not None else None
    if recorded:
        frames = re.findall(r'File "(.*)", line (\d+), in (\S+)', "".join(recorded))
        for path, line, function in reversed(frames):
            if not path.startswith(_TORCH_DIR) and os.path.abspath(path) != _THIS_FILE:
                return f"{_short(path)}:{line} {function} (backward)"
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if not path.startswith(_TORCH_DIR) and os.path.abspath(path) != _THIS_FILE:
            return f"{_short(path)}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


def _short(path):
    """A path relative to the working directory or to site-packages."""
    path = os.path.abspath(path)
    rel = os.path.relpath(path)
    if not rel.startswith(".."):
        return rel
    marker = os.sep + "site-packages" + os.sep
    return path.split(marker, 1)[1] if marker in path else path


class _Counting:
    """A mode that adds to a SyncCounter."""

    def __init__(self, counter):
        super().__init__()
        self.counter = counter


class _FunctionMode(_Counting, TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = HOST_READS.get(getattr(func, "__name__", None))
        check = CPU_ONLY_CHECKS.get(func)
        if check is not None:
            name = f"{func.__name__} without num_classes" if check(args, kwargs) else ""
        if name is None or self.counter._muted:
            return func(*args, **kwargs)
        if _on_host((args, kwargs), self.counter.cpu_is_device):
            name = ""
        if name:
            self.counter._add(name)
        self.counter._muted += 1  # what it does inside is this one event
        try:
            result = func(*args, **kwargs)
        finally:
            self.counter._muted -= 1
        if func.__name__ != "cpu":
            return result
        if result is args[0]:  # already on the CPU: mark a view, not the tensor itself
            result = result.view_as(result)
        return _mark_host(result)


class _DispatchMode(_Counting, TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _on_host((args, kwargs), self.counter.cpu_is_device):
            return _mark_host(func(*args, **kwargs))
        if not self.counter._muted:
            name = _dispatch_name(func, args, kwargs)
            if name:
                self.counter._add(name)
        return func(*args, **kwargs)


class SyncCounter:
    """Context manager that counts the syncing operations run inside it (see the module doc).

    Attributes:
        events: collections.Counter {(operation, location): count}.
    """

    def __init__(self, backward_origins=True, cpu_is_device=True):
        """
        Args:
            backward_origins: locate the syncs of backward passes at the forward operations
                they differentiate (autograd's anomaly mode records those, without its NaN
                checks; slower), instead of at the call of backward.
            cpu_is_device: count operations on CPU tensors as if they were on the GPU (a CPU
                run standing for a GPU one); False where the model runs on a GPU, so that
                what the code keeps on the host is not counted.
        """
        self.cpu_is_device = cpu_is_device
        self.events = collections.Counter()
        self._muted = 0
        self._modes = []
        self.backward_origins = backward_origins

    def _add(self, name):
        self.events[name, _location()] += 1

    def __enter__(self):
        self._modes = [_FunctionMode(self), _DispatchMode(self)]
        if self.backward_origins:
            self._modes.insert(0, torch.autograd.set_detect_anomaly(True, check_nan=False))
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._modes = []

    @property
    def total(self):
        return sum(self.events.values())

    def by_op(self):
        """{operation: count}, largest first."""
        out = collections.Counter()
        for (op, _), n in self.events.items():
            out[op] += n
        return dict(out.most_common())

    def by_location(self):
        """{location: count}, largest first."""
        out = collections.Counter()
        for (_, where), n in self.events.items():
            out[where] += n
        return dict(out.most_common())

    def difference(self, other):
        """collections.Counter {(operation, location): this count - `other`'s}, where they
        differ (negative where `other` has more)."""
        keys = set(self.events) | set(other.events)
        return collections.Counter({k: self.events[k] - other.events[k] for k in keys
                                    if self.events[k] != other.events[k]})

    def table(self, events=None):
        """Text: one line per (count, operation, location) of `events` (default: this
        counter's), largest count first."""
        events = self.events if events is None else events
        return "\n".join(f"{n:5d}  {op:<40} {where}"
                         for (op, where), n in sorted(events.items(), key=lambda e: (-e[1], e[0])))
