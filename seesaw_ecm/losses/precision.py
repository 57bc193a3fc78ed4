"""Losses in float32 under mixed precision (autocast): one decorator for every loss's forward."""
import functools

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def float32_loss(forward):
    """Run a loss function (or a loss module's ``forward``) in float32 under autocast.

    Its float16 / bfloat16 tensor arguments (logits computed under autocast) are cast to float32
    (gradients flow back in their own dtype), and autocast is off inside, so no op of the loss
    (e.g. the matmul of ECM's weighted sum) is run in 16 bits. float32 / float64 arguments and
    integer labels are passed unchanged: float32 training computes exactly as without it.

    Written by hand: ``torch.amp.custom_fwd(cast_inputs=...)`` does the same for one fixed
    device type and stores attributes on its first argument (an autograd ``ctx``).
    """

    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        device = tensors[0].device.type if tensors else "cpu"
        args = [_up(a) for a in args]
        kwargs = {k: _up(v) for k, v in kwargs.items()}
        with torch.autocast(device, enabled=False):
            return forward(*args, **kwargs)

    return wrapper


def _up(x):
    return x.float() if isinstance(x, torch.Tensor) and x.dtype in LOW_PRECISION else x
