"""The random number generators' states, as plain tensors and numbers, for trainer checkpoints.

A run resumed from a checkpoint continues the uninterrupted run only if its random draws (the
ROI and anchor sampling in torch, the augmentations in numpy and Python's `random`) continue
from where they were when the checkpoint was written. The states are stored as tensors, ints
and floats so that checkpoints still load with ``torch.load(weights_only=True)``.
"""
import contextlib
import random

import numpy as np
import torch


def rng_states():
    """{"torch": ByteTensor, "cuda": [ByteTensor per device], "numpy": {...}, "random": {...}}
    of this process."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "random": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss": gauss},
    }


def set_rng_states(states):
    """Restore what :func:`rng_states` returned (CUDA states only when both have CUDA)."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"][: torch.cuda.device_count()])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    r = states["random"]
    random.setstate((r["version"], tuple(r["internal"].tolist()), r["gauss"]))


@contextlib.contextmanager
def kept_rng():
    """Run the block and restore the generators as they were before it."""
    states = rng_states()
    try:
        yield
    finally:
        set_rng_states(states)
