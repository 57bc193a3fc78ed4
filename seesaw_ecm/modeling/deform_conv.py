"""Deformable convolution (DCNv1) and modulated deformable convolution (DCNv2) on
`torchvision.ops.deform_conv2d`, for detectron2 installs without its compiled ops.

detectron2 0.6's `DeformConv` / `ModulatedDeformConv` call `detectron2._C` (on CPU, DCNv1 runs
forward through torchvision but has no backward, and DCNv2 has neither). torchvision's op is the
same computation on CPU and CUDA, with autograd, and reads the same tensors: offset
(N, 2 * G * kh * kw, Ho, Wo) with (dy, dx) interleaved per kernel tap, tap-major within each of
the G deformable groups, and mask (N, G * kh * kw, Ho, Wo). The classes below subclass detectron2's,
so constructor arguments, attributes and state_dict keys are unchanged and checkpoints load both
ways; only `forward` differs.

detectron2's deformable ResNet blocks (MODEL.RESNETS.DEFORM_ON_PER_STAGE) take their conv class
from detectron2 itself, with no registry or key to choose it: the backbone builders
"build_resnet_dcn_backbone" and "build_resnet_fpn_dcn_backbone" registered here (and
build_resnet_fpn_carafe_backbone) build detectron2's model and then switch its convs to these
classes where detectron2 has no compiled ops (:func:`with_torchvision_deform_convs`).
"""
import torch
from detectron2.layers import deform_conv as d2_deform_conv
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from torch import nn
from torchvision.ops import deform_conv2d

from ..errors import SeesawEcmError


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


# detectron2's deformable convs -> the same computed by torchvision (subclasses: forward only)
TORCHVISION_OPS = {d2_deform_conv.DeformConv: DeformConv,
                   d2_deform_conv.ModulatedDeformConv: ModulatedDeformConv}


def with_torchvision_deform_convs(module):
    """`module` (returned, changed in place) with every detectron2 DeformConv /
    ModulatedDeformConv in it computed by torchvision, where detectron2 was built without its
    ops; a real build keeps its own. The classes above differ from detectron2's only in forward,
    so each conv changes class in place: its weights (and the random numbers drawn to
    initialize them) are those of the stock build."""
    if not compiled_deform_conv_available():
        for m in module.modules():
            if type(m) in TORCHVISION_OPS:
                m.__class__ = TORCHVISION_OPS[type(m)]
    return module


@BACKBONE_REGISTRY.register()
def build_resnet_dcn_backbone(cfg, input_shape):
    """detectron2's build_resnet_backbone whose deformable blocks (MODEL.RESNETS.
    DEFORM_ON_PER_STAGE, DEFORM_MODULATED) also run where detectron2 has no compiled ops."""
    return with_torchvision_deform_convs(build_resnet_backbone(cfg, input_shape))


@BACKBONE_REGISTRY.register()
def build_resnet_fpn_dcn_backbone(cfg, input_shape):
    """detectron2's build_resnet_fpn_backbone with build_resnet_dcn_backbone's deformable
    blocks."""
    return with_torchvision_deform_convs(build_resnet_fpn_backbone(cfg, input_shape))


# detectron2's builders whose deformable blocks need its compiled ops -> the builder to name
DCN_BUILDERS = {"build_resnet_backbone": "build_resnet_dcn_backbone",
                "build_resnet_fpn_backbone": "build_resnet_fpn_dcn_backbone"}


def check_deform_conv_config(cfg):
    """Raise SeesawEcmError when MODEL.RESNETS.DEFORM_ON_PER_STAGE asks a stock detectron2
    builder (MODEL.BACKBONE.NAME, or FPG's MODEL.FPG.BOTTOM_UP) for deformable blocks that this
    detectron2 install cannot compute (no compiled ops)."""
    if not any(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE) or compiled_deform_conv_available():
        return
    builders = {"MODEL.BACKBONE.NAME": cfg.MODEL.BACKBONE.NAME}
    if cfg.MODEL.BACKBONE.NAME == "build_fpg_backbone":
        builders["MODEL.FPG.BOTTOM_UP"] = cfg.MODEL.FPG.BOTTOM_UP
    for key, name in builders.items():
        if name in DCN_BUILDERS:
            raise SeesawEcmError(
                f"MODEL.RESNETS.DEFORM_ON_PER_STAGE: {key} {name!r} builds detectron2's "
                "deformable convs, which need its compiled ops, and this detectron2 has none; "
                f"set {key} {DCN_BUILDERS[name]!r} (the same model, computed by torchvision).")
