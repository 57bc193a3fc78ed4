"""Cosine-similarity (normalized) layers used by the Seesaw and ECM heads.

Both layers follow mmdetection's ``NormedLinear`` / ``NormedConv2d``: the weight and the input
are L2-normalized (dividing by ``norm + eps``), the input is scaled by ``temperature`` and the
bias is added unnormalized. Plain torch: importing this module does not import detectron2.
"""
from torch import nn
from torch.nn import functional as F


class NormedLinear(nn.Linear):
    """Linear layer computing ``temperature * cos(x, w_j) + b_j`` for every output ``j``.

    Args:
        in_features, out_features, bias: as in ``nn.Linear``.
        temperature: scale of the normalized input (tau = 20 in the official configs).
        eps: added to the L2 norms before dividing.

    Shapes: input (..., in_features) -> output (..., out_features).
    Weights are initialized normal(std=0.01), the bias to 0.
    """

    def __init__(self, in_features, out_features, bias=True, temperature=20.0, eps=1e-6):
        super().__init__(in_features, out_features, bias=bias)
        self.temperature = temperature
        self.eps = eps
        nn.init.normal_(self.weight, std=0.01)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x):
        weight = self.weight / (self.weight.norm(dim=1, keepdim=True) + self.eps)
        x = x / (x.norm(dim=-1, keepdim=True) + self.eps) * self.temperature
        return F.linear(x, weight, self.bias)

    def extra_repr(self):
        return f"{super().extra_repr()}, temperature={self.temperature}"


class NormedConv2d(nn.Conv2d):
    """Conv2d whose weight is normalized over input channels and whose input is normalized over
    channels at every pixel, then scaled by ``temperature``; the bias is added unnormalized.

    The weight (out, in, kh, kw) is divided by its L2 norm over dim 1 (in-channels), separately
    for every output channel and kernel position (mmdetection's default,
    ``norm_over_kernel=False``). For a 1x1 kernel the output at each pixel is
    ``temperature * cos(x[:, :, y, x], w_j) + b_j``.

    Args:
        in_channels, out_channels, kernel_size, **kwargs: as in ``nn.Conv2d``.
        temperature: scale of the normalized input (tau = 20 in the official configs).
        eps: added to the L2 norms before dividing.

    Shapes: input (B, in_channels, H, W) -> output (B, out_channels, H', W').
    """

    def __init__(self, in_channels, out_channels, kernel_size=1, temperature=20.0, eps=1e-6,
                 **kwargs):
        super().__init__(in_channels, out_channels, kernel_size, **kwargs)
        self.temperature = temperature
        self.eps = eps

    def forward(self, x):
        weight = self.weight / (self.weight.norm(dim=1, keepdim=True) + self.eps)
        x = x / (x.norm(dim=1, keepdim=True) + self.eps) * self.temperature
        return self._conv_forward(x, weight, self.bias)

    def extra_repr(self):
        return f"{super().extra_repr()}, temperature={self.temperature}"
