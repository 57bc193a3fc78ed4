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
from detectron2.layers import deform_conv as d2_deform_conv
from detectron2.modeling.backbone import resnet as d2_resnet
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
