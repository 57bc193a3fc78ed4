"""Feature Pyramid Grids (FPG; Chen et al. 2020, arXiv 2004.03580) as a detectron2 neck: a port
of the published architecture, mmdetection's `FPG` with its configs' transitions
(configs/fpg/*_fpg_crop640_50e_coco.py), written for detectron2.

The grid: lateral 1x1 convs give P2..P5 from the bottom-up features, P6 = max-pool (stride 2)
of P5 (as detectron2's LastLevelMaxPool). Then STACK_TIMES bottom-up pathways; node (s, i),
level i of pathway s, is the sum of
    same_up       3x3 stride-2 conv of node (s, i - 1)                (i > 0)
    lateral       1x1 conv of node (s - 1, i)
    across_down   3x3 conv of node (s - 1, i + 1), upsampled x2 first  (i < top)
    skip          1x1 conv of the pathway-0 feature of level i
each transition being ReLU -> conv -> norm. Node (s, i) is skipped (it passes node (s - 1, i)
on) for s < top - i: level i starts (top - i) pathways late, the staircase of the published
`skip_inds` [(0, 1, 2, 3), (0, 1, 2), (0, 1), (0,), ()]. Outputs: ReLU -> 3x3 conv (with bias,
no norm) of the last pathway.
"""
import fvcore.nn.weight_init as weight_init
from detectron2.layers import Conv2d, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn
from torch.nn import functional as F

from ..errors import SeesawEcmError


def _act_conv_norm(channels, kernel_size, stride, norm):
    """ReLU -> conv (kernel_size, stride, 'same' padding; bias only without norm) -> norm."""
    conv = Conv2d(channels, channels, kernel_size, stride=stride, padding=kernel_size // 2,
                  bias=not norm, norm=get_norm(norm, channels))
    weight_init.c2_xavier_fill(conv)  # mmdetection's Caffe2Xavier init of the FPG convs
    return nn.Sequential(nn.ReLU(), conv)


class FPG(Backbone):
    """FPG on top of a bottom-up network.

    forward(x) -> {"p2": ..., "p6": ...}: one (N, out_channels, H / s, W / s) map per level,
    s = the strides of in_features, then twice the last.
    """

    def __init__(self, bottom_up, in_features, out_channels, stack_times, norm="BN"):
        """
        Args:
            bottom_up: a Backbone whose outputs include in_features (increasing strides, each
                twice the previous).
            stack_times: bottom-up pathways (the published FPG: 9); at least one per level.
            norm: detectron2 norm name (get_norm) after every transition conv; "" = none.
        """
        super().__init__()
        shapes = bottom_up.output_shape()
        if set(in_features) - set(shapes):
            raise SeesawEcmError(f"MODEL.FPG.IN_FEATURES {list(in_features)}: the bottom-up "
                                 f"network outputs {list(shapes)} (set its OUT_FEATURES).")
        strides = [shapes[f].stride for f in in_features]
        if any(b != 2 * a for a, b in zip(strides, strides[1:])):
            raise SeesawEcmError(f"MODEL.FPG.IN_FEATURES {list(in_features)} must have strides "
                                 f"doubling level to level, got {strides}.")
        levels = len(in_features) + 1  # + the max-pooled top level
        if stack_times < levels:
            raise SeesawEcmError(f"MODEL.FPG.STACK_TIMES {stack_times}: the lowest level joins "
                                 f"the grid after {levels - 1} pathways; use at least {levels}.")
        self.bottom_up = bottom_up
        self.in_features = list(in_features)
        self.lateral_convs = nn.ModuleList(
            Conv2d(shapes[f].channels, out_channels, 1) for f in in_features)
        for conv in self.lateral_convs:
            weight_init.c2_xavier_fill(conv)
        # stacks[s][i]: the transitions into node (s, i); empty where the node is skipped
        self.stacks = nn.ModuleList(
            nn.ModuleList(self._node(i, levels, out_channels, norm) if s >= levels - 1 - i
                          else nn.ModuleDict() for i in range(levels))
            for s in range(stack_times))
        self.output_convs = nn.ModuleList(
            _act_conv_norm(out_channels, 3, 1, "") for _ in range(levels))
        strides.append(2 * strides[-1])
        self._out_features = [f"p{s.bit_length() - 1}" for s in strides]
        self._out_feature_strides = dict(zip(self._out_features, strides))
        self._out_feature_channels = {f: out_channels for f in self._out_features}
        self._size_divisibility = strides[-2]  # as detectron2's FPN: the bottom-up's coarsest

    @staticmethod
    def _node(i, levels, channels, norm):
        node = nn.ModuleDict({"lateral": _act_conv_norm(channels, 1, 1, norm),
                              "skip": _act_conv_norm(channels, 1, 1, norm)})
        if i > 0:
            node["same_up"] = _act_conv_norm(channels, 3, 2, norm)
        if i < levels - 1:
            node["across_down"] = _act_conv_norm(channels, 3, 1, norm)
        return node

    @property
    def size_divisibility(self):
        return self._size_divisibility

    def forward(self, x):
        bottom_up = self.bottom_up(x)
        first = [conv(bottom_up[f]) for conv, f in zip(self.lateral_convs, self.in_features)]
        first.append(F.max_pool2d(first[-1], kernel_size=1, stride=2))
        prev = first
        for stack in self.stacks:
            nodes = []
            for i, node in enumerate(stack):
                if not node:  # skipped: pass the previous pathway's feature on
                    nodes.append(prev[i])
                    continue
                y = node["lateral"](prev[i]) + node["skip"](first[i])
                if "same_up" in node:
                    y = y + node["same_up"](nodes[i - 1])
                if "across_down" in node:
                    # to the size of level i (= x2 nearest when the sizes divide, as mmdetection)
                    up = F.interpolate(prev[i + 1], size=prev[i].shape[-2:], mode="nearest")
                    y = y + node["across_down"](up)
                nodes.append(y)
            prev = nodes
        return {f: conv(p) for f, conv, p in zip(self._out_features, self.output_convs, prev)}


@BACKBONE_REGISTRY.register()
def build_fpg_backbone(cfg, input_shape):
    """FPG (MODEL.FPG) on the bottom-up network MODEL.FPG.BOTTOM_UP builds."""
    c = cfg.MODEL.FPG
    if c.BOTTOM_UP not in BACKBONE_REGISTRY:
        raise SeesawEcmError(f"MODEL.FPG.BOTTOM_UP {c.BOTTOM_UP!r} is not in detectron2's "
                             "BACKBONE_REGISTRY (e.g. build_resnet_backbone, "
                             "build_resnest_backbone).")
    bottom_up = BACKBONE_REGISTRY.get(c.BOTTOM_UP)(cfg, input_shape)
    return FPG(bottom_up, c.IN_FEATURES, c.OUT_CHANNELS, c.STACK_TIMES, norm=c.NORM)
