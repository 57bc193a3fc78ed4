"""Feature Pyramid Grids (seesaw_ecm/modeling/fpg.py) on detectron2 bottom-up networks."""
import math

import pytest
import torch
from detectron2.modeling import build_backbone

from seesaw_ecm.errors import SeesawEcmError
from seesaw_ecm.modeling.fpg import FPG

STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
C = 16  # FPG channels in these tests


@pytest.fixture
def fpg_cfg(make_cfg):
    """fpg_cfg(*opts): an FPG of C channels over a trainable ResNet-18, then `opts`."""
    return lambda *opts: make_cfg(
        None, "MODEL.BACKBONE.NAME", "build_fpg_backbone", "MODEL.RESNETS.DEPTH", 18,
        "MODEL.RESNETS.OUT_FEATURES", ["res2", "res3", "res4", "res5"],
        "MODEL.RESNETS.RES2_OUT_CHANNELS", 64, "MODEL.RESNETS.NORM", "BN",
        "MODEL.BACKBONE.FREEZE_AT", 0, "MODEL.FPG.OUT_CHANNELS", C, "MODEL.FPG.STACK_TIMES", 5,
        *opts)


def _image(h=72, w=100):
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))


def _expected_parameters(in_channels, stacks, levels=5):
    """The published grid counted by hand: node (s, i) exists for s >= levels - 1 - i; each
    has a lateral and a skip 1x1 conv, a stride-2 3x3 conv from below (i > 0) and a 3x3 conv
    from above (i < top), all bias-free with BN (2 C); lateral and output convs have biases."""
    count = sum(c * C + C for c in in_channels) + levels * (9 * C * C + C)
    for i in range(levels):
        per_node = 2 * (C * C + 2 * C) + (i > 0) * (9 * C * C + 2 * C) \
            + (i < levels - 1) * (9 * C * C + 2 * C)
        count += (stacks - (levels - 1 - i)) * per_node
    return count


def test_shapes_strides_and_gradient_reach_every_parameter(fpg_cfg):
    fpg = build_backbone(fpg_cfg())
    assert isinstance(fpg, FPG) and fpg.size_divisibility == 32
    out = fpg(_image())
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        k: (2, C, math.ceil(72 / s), math.ceil(100 / s)) for k, s in STRIDES.items()}
    assert {k: (s.channels, s.stride) for k, s in fpg.output_shape().items()} == {
        k: (C, s) for k, s in STRIDES.items()}
    sum(y.square().mean() for y in out.values()).backward()
    for name, p in fpg.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("stacks", [5, 6])
def test_grid_has_the_published_structure(stacks, fpg_cfg):
    fpg = build_backbone(fpg_cfg("MODEL.FPG.STACK_TIMES", stacks))
    grid = [p.numel() for n, p in fpg.named_parameters() if not n.startswith("bottom_up.")]
    assert sum(grid) == _expected_parameters([64, 128, 256, 512], stacks)


def test_skipped_nodes_are_the_published_staircase(fpg_cfg):
    fpg = build_backbone(fpg_cfg("MODEL.FPG.STACK_TIMES", 9))
    skipped = [tuple(s for s in range(9) if not fpg.stacks[s][i]) for i in range(5)]
    assert skipped == [(0, 1, 2, 3), (0, 1, 2), (0, 1), (0,), ()]  # mmdetection's skip_inds


def test_stack_times_changes_the_output(fpg_cfg):
    five, six = (build_backbone(fpg_cfg("MODEL.FPG.STACK_TIMES", n)).eval() for n in (5, 6))
    missing, unexpected = six.load_state_dict(five.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("stacks.5.") for k in missing)
    with torch.no_grad():  # the same weights but for the sixth pathway
        a, b = five(_image(64, 64)), six(_image(64, 64))
    assert not torch.allclose(a["p2"], b["p2"]) and not torch.allclose(a["p6"], b["p6"])


def test_on_resnest_and_bad_values(fpg_cfg):
    pytest.importorskip("timm")
    fpg = build_backbone(fpg_cfg("MODEL.FPG.BOTTOM_UP", "build_resnest_backbone",
                                 "MODEL.RESNEST.DEPTH", 14))
    assert {k: v.shape[-2:] for k, v in fpg(_image(64, 64)).items()} == {
        k: (math.ceil(64 / s),) * 2 for k, s in STRIDES.items()}
    with pytest.raises(SeesawEcmError, match="MODEL.FPG.STACK_TIMES 4"):
        build_backbone(fpg_cfg("MODEL.FPG.STACK_TIMES", 4))
    with pytest.raises(SeesawEcmError, match="MODEL.FPG.BOTTOM_UP 'resnet'"):
        build_backbone(fpg_cfg("MODEL.FPG.BOTTOM_UP", "resnet"))
    with pytest.raises(SeesawEcmError, match="bottom-up network outputs"):
        build_backbone(fpg_cfg("MODEL.RESNETS.OUT_FEATURES", ["res4"]))
    with pytest.raises(SeesawEcmError, match="strides doubling"):
        build_backbone(fpg_cfg("MODEL.FPG.IN_FEATURES", ["res2", "res4", "res5"]))


def test_htc_lite_trains_on_fpg_over_resnest_with_dcn():
    """The entry's combination (HTC-Lite, FPG, ResNeSt + DCNv2): one training step's losses and
    gradients."""
    pytest.importorskip("timm")
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage
    from test_htc_lite import batch, htc_cfg

    torch.manual_seed(0)
    model = build_model(htc_cfg(
        "MODEL.BACKBONE.NAME", "build_fpg_backbone", "MODEL.FPG.BOTTOM_UP",
        "build_resnest_backbone", "MODEL.RESNEST.DEPTH", 14, "MODEL.RESNEST.NORM", "BN",
        "MODEL.RESNEST.DEFORM_ON_PER_STAGE", [False, True, True, True],
        "MODEL.FPG.OUT_CHANNELS", C, "MODEL.FPG.STACK_TIMES", 5))
    for m in model.backbone.modules():  # timm starts each block's last BN scale at 0
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(m.weight)
    with EventStorage():
        losses = model(batch())
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    fpg, resnest = model.backbone, model.backbone.bottom_up.body
    assert fpg.stacks[4][0]["lateral"][1].weight.grad.abs().sum() > 0
    assert resnest.layer3[0].conv2.conv.conv_offset.weight.grad.abs().sum() > 0
