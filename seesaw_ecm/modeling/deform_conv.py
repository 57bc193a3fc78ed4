"""Deformable convolution (DCNv1) and modulated deformable convolution (DCNv2) on
`torchvision.ops.deform_conv2d`, for detectron2 installs without its compiled ops.

detectron2 0.6's `DeformConv` / `ModulatedDeformConv` call `detectron2._C` (on CPU, DCNv1 runs
forward through torchvision but has no backward, and DCNv2 has neither). torchvision's op is the
same computation on CPU and CUDA, with autograd, and reads the same tensors: offset
(N, 2 * G * kh * kw, Ho, Wo) with (dy, dx) interleaved per kernel tap, tap-major within each of
the G deformable groups, and mask (N, G * kh * kw, Ho, Wo). The classes below subclass detectron2's,
so constructor arguments, attributes and state_dict keys are unchanged and checkpoints load both
ways; only `forward` differs.
"""
import torch
from detectron2.layers import deform_conv as d2_deform_conv
from detectron2.modeling.backbone import resnet as d2_resnet
from torch import nn
from torchvision.ops import deform_conv2d


def _forward(module, x, offset, mask):
    # torchvision also takes an empty batch (no RoIs / images): no special case as detectron2's
    x = deform_conv2d(x, offset, module.weight, module.bias, stride=module.stride,
                      padding=module.padding, dilation=module.dilation, mask=mask)
    if module.norm is not None:
        x = module.norm(x)
    if module.activation is not None:
        x = module.activation(x)
    return x


class DeformConv(d2_deform_conv.DeformConv):
    """detectron2's DeformConv (DCNv1, no bias) computed by torchvision.

    forward(x (N, C, H, W), offset (N, 2 * G * kh * kw, Ho, Wo)) -> (N, out_channels, Ho, Wo).
    """

    def forward(self, x, offset):
        return _forward(self, x, offset, None)


class ModulatedDeformConv(d2_deform_conv.ModulatedDeformConv):
    """detectron2's ModulatedDeformConv (DCNv2) computed by torchvision.

    forward(x (N, C, H, W), offset (N, 2 * G * kh * kw, Ho, Wo), mask (N, G * kh * kw, Ho, Wo),
    the modulation scalars, already in [0, 1]) -> (N, out_channels, Ho, Wo).
    """

    def forward(self, x, offset, mask):
        return _forward(self, x, offset, mask)


class ModulatedDeformConvPack(ModulatedDeformConv):
    """DCNv2 that predicts its own offsets: a drop-in for a plain conv (as mmcv's
    ModulatedDeformConv2dPack, and the conv2_offset / conv2 pair of detectron2's
    DeformBottleneckBlock, whose offset split this follows).

    `conv_offset` (same kernel, stride, padding and dilation) predicts from x the offsets and
    the modulation logits, 3 * G * kh * kw channels. It starts at zero, as in mmcv and
    detectron2: a new pack samples the regular grid with modulation sigmoid(0) = 0.5.
    forward(x (N, C, H, W)) -> (N, out_channels, Ho, Wo).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        taps = self.deformable_groups * self.kernel_size[0] * self.kernel_size[1]
        self.conv_offset = nn.Conv2d(self.in_channels, 3 * taps, self.kernel_size,
                                     stride=self.stride, padding=self.padding,
                                     dilation=self.dilation)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    @classmethod
    def from_conv(cls, conv, deformable_groups=1):
        """A pack with the geometry, weight and bias of `conv` (an nn.Conv2d), on its device."""
        pack = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                   padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                   deformable_groups=deformable_groups, bias=conv.bias is not None)
        pack.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            pack.weight.copy_(conv.weight)
            if conv.bias is not None:
                pack.bias.copy_(conv.bias)
        return pack

    def forward(self, x):
        # detectron2's split; conv_offset learns whichever channel order the op reads
        first, second, mask = torch.chunk(self.conv_offset(x), 3, dim=1)
        return super().forward(x, torch.cat((first, second), dim=1), mask.sigmoid())


def compiled_deform_conv_available():
    """Whether detectron2._C has the deformable convolution op (a real build, not a stub)."""
    try:
        from detectron2 import _C

        _C.modulated_deform_conv_forward  # noqa: B018  (the stub raises on attribute access)
    except (ImportError, AttributeError, RuntimeError):
        return False
    return True


def use_torchvision_deform_conv_if_uncompiled():
    """Point detectron2's deformable ResNet blocks (MODEL.RESNETS.DEFORM_ON_PER_STAGE,
    DEFORM_MODULATED) at the classes above when detectron2 was built without its ops.

    `DeformBottleneckBlock` looks the classes up in its module's globals when it is built, and
    there is no registry or config key to choose them, so the names are replaced there. A real
    build of detectron2 keeps its own ops.
    """
    if not compiled_deform_conv_available():
        d2_resnet.DeformConv = DeformConv
        d2_resnet.ModulatedDeformConv = ModulatedDeformConv
