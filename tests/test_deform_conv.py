"""Deformable convolutions on torchvision (seesaw_ecm.modeling.deform_conv), used by the
backbone builders build_resnet_dcn_backbone / build_resnet_fpn_dcn_backbone in detectron2's
deformable ResNet blocks when detectron2 has no compiled ops."""
import glob
import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.layers import deform_conv as d2
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import resnet

from seesaw_ecm.config import add_seesaw_ecm_config
from seesaw_ecm.errors import SeesawEcmError
from seesaw_ecm.modeling import deform_conv
from seesaw_ecm.modeling.deform_conv import DeformConv, ModulatedDeformConv
from seesaw_ecm.validation import config_problems


def _bilinear(img, y, x):
    """img (H, W) sampled at (y, x); pixels outside the image are 0 (the DCN convention)."""
    h, w = img.shape
    if y <= -1 or y >= h or x <= -1 or x >= w:
        return 0.0
    y0, x0 = math.floor(y), math.floor(x)
    total = 0.0
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                total += wy * wx * img[yy, xx].item()
    return total


def _direct_dcn(x, offset, mask, weight, stride, pad, dil):
    """The DCNv2 formula, one output value at a time: offsets (dy, dx) interleaved per tap,
    tap-major within each deformable group; input channel c belongs to group c // (C / G)."""
    n, c, _, _ = x.shape
    o, cin_per_group, kh, kw = weight.shape
    k = kh * kw
    g = offset.shape[1] // (2 * k)
    ho, wo = offset.shape[-2:]
    out = torch.zeros(n, o, ho, wo, dtype=x.dtype)
    for b in range(n):
        for oc in range(o):
            wgroup = oc // (o // (c // cin_per_group))
            for i in range(ho):
                for j in range(wo):
                    acc = 0.0
                    for ci in range(cin_per_group):
                        ch = wgroup * cin_per_group + ci
                        dg = ch // (c // g)
                        for a in range(kh):
                            for t in range(kw):
                                tap = a * kw + t
                                dy = offset[b, dg * 2 * k + 2 * tap, i, j].item()
                                dx = offset[b, dg * 2 * k + 2 * tap + 1, i, j].item()
                                m = 1.0 if mask is None else mask[b, dg * k + tap, i, j].item()
                                y = i * stride - pad + a * dil + dy
                                xx = j * stride - pad + t * dil + dx
                                acc += weight[oc, ci, a, t].item() * m * _bilinear(
                                    x[b, ch], y, xx)
                    out[b, oc, i, j] = acc
    return out


@pytest.mark.parametrize("stride,pad,dil,groups,dgroups", [
    (1, 1, 1, 1, 2), (2, 1, 1, 2, 1), (1, 2, 2, 1, 1)])
def test_modulated_matches_direct_bilinear_sampling(stride, pad, dil, groups, dgroups):
    torch.manual_seed(0)
    conv = ModulatedDeformConv(4, 2, 3, stride=stride, padding=pad, dilation=dil, groups=groups,
                               deformable_groups=dgroups, bias=False).double()
    x = torch.randn(1, 4, 5, 6, dtype=torch.float64)
    ho = (5 + 2 * pad - 2 * dil - 1) // stride + 1
    wo = (6 + 2 * pad - 2 * dil - 1) // stride + 1
    offset = 2 * torch.randn(1, 18 * dgroups, ho, wo, dtype=torch.float64)
    mask = torch.rand(1, 9 * dgroups, ho, wo, dtype=torch.float64)
    expected = _direct_dcn(x, offset, mask, conv.weight.detach(), stride, pad, dil)
    torch.testing.assert_close(conv(x, offset, mask).detach(), expected)


def test_deform_v1_matches_direct_bilinear_sampling():
    torch.manual_seed(1)
    conv = DeformConv(3, 2, 3, padding=1).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    offset = 1.5 * torch.randn(2, 18, 4, 4, dtype=torch.float64)
    expected = _direct_dcn(x, offset, None, conv.weight.detach(), 1, 1, 1)
    torch.testing.assert_close(conv(x, offset).detach(), expected)


def test_zero_offset_unit_mask_is_plain_convolution():
    torch.manual_seed(2)
    x = torch.randn(2, 4, 7, 6)
    v2 = ModulatedDeformConv(4, 6, 3, stride=2, padding=1, groups=2, bias=True)
    torch.nn.init.normal_(v2.bias)
    v1 = DeformConv(4, 6, 3, stride=2, padding=1, groups=2)
    zero = torch.zeros(2, 18, 4, 3)
    torch.testing.assert_close(
        v2(x, zero, torch.ones(2, 9, 4, 3)),
        F.conv2d(x, v2.weight, v2.bias, stride=2, padding=1, groups=2))
    torch.testing.assert_close(v1(x, zero), F.conv2d(x, v1.weight, stride=2, padding=1, groups=2))
    # the mask scales each tap: mask 0 -> output is the bias
    torch.testing.assert_close(v2(x, zero, torch.zeros(2, 9, 4, 3)),
                               v2.bias[None, :, None, None].expand(2, 6, 4, 3))


def test_gradcheck():
    torch.manual_seed(3)
    conv = ModulatedDeformConv(2, 2, 3, padding=1).double()
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    offset = (0.7 * torch.randn(1, 18, 3, 3, dtype=torch.float64)).requires_grad_()
    mask = torch.rand(1, 9, 3, 3, dtype=torch.float64, requires_grad=True)
    weight = conv.weight.detach().clone().requires_grad_()
    bias = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def f(x, offset, mask, weight, bias):
        return torch.func.functional_call(conv, {"weight": weight, "bias": bias},
                                          (x, offset, mask))

    assert torch.autograd.gradcheck(f, (x, offset, mask, weight, bias), eps=1e-6, atol=1e-5)


def test_state_dict_keys_are_detectron2s():
    ours = ModulatedDeformConv(4, 4, 3, padding=1, norm=torch.nn.BatchNorm2d(4))
    theirs = d2.ModulatedDeformConv(4, 4, 3, padding=1, norm=torch.nn.BatchNorm2d(4))
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())


def _tiny_resnet_cfg(modulated):
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 8
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 4
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 16
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE = [False, True, True, True]
    cfg.MODEL.RESNETS.DEFORM_MODULATED = modulated
    cfg.MODEL.RESNETS.DEFORM_NUM_GROUPS = 1
    return cfg


@pytest.mark.parametrize("modulated", [True, False])
def test_dcn_backbone_trains_on_cpu(modulated):
    assert not deform_conv.compiled_deform_conv_available()  # this install: the stub
    torch.manual_seed(4)
    model = BACKBONE_REGISTRY.get("build_resnet_dcn_backbone")(
        _tiny_resnet_cfg(modulated), ShapeSpec(channels=3))
    blocks = [m for m in model.modules() if isinstance(m, resnet.DeformBottleneckBlock)]
    assert len(blocks) == 4 + 6 + 3
    expected = ModulatedDeformConv if modulated else DeformConv
    assert all(type(b.conv2) is expected for b in blocks)
    # non-zero offsets, so that the offset convolutions get gradients too
    for b in blocks:
        torch.nn.init.normal_(b.conv2_offset.weight, std=0.1)
    out = model(torch.randn(2, 3, 32, 32))["res5"]
    assert out.shape == (2, 128, 1, 1)
    out.square().sum().backward()
    for b in blocks:
        assert b.conv2.weight.grad.abs().sum() > 0
        assert b.conv2_offset.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("stock, ours", [("build_resnet_backbone", "build_resnet_dcn_backbone"),
                                         ("build_resnet_fpn_backbone",
                                          "build_resnet_fpn_dcn_backbone")])
def test_dcn_backbone_is_the_stock_model_with_torchvision_convs(stock, ours):
    """Same modules, weights (same seed) and outputs as detectron2's builder, whose deformable
    convs run here only because their forward is borrowed for the comparison."""
    cfg = _tiny_resnet_cfg(True)
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = cfg.MODEL.RESNETS.OUT_FEATURES
    cfg.MODEL.FPN.OUT_CHANNELS = 8
    torch.manual_seed(0)
    theirs = BACKBONE_REGISTRY.get(stock)(cfg, ShapeSpec(channels=3))
    torch.manual_seed(0)
    mine = BACKBONE_REGISTRY.get(ours)(cfg, ShapeSpec(channels=3))
    assert [n for n, _ in theirs.named_modules()] == [n for n, _ in mine.named_modules()]
    kinds = {type(m) for m in theirs.modules()} ^ {type(m) for m in mine.modules()}
    assert kinds == {d2.ModulatedDeformConv, ModulatedDeformConv}
    state = mine.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in theirs.state_dict().items())
    for m in theirs.modules():  # the stub has no op: compute detectron2's convs by torchvision
        if type(m) is d2.ModulatedDeformConv:
            m.forward = ModulatedDeformConv.forward.__get__(m)
    x = torch.randn(1, 3, 32, 32)
    theirs.eval(), mine.eval()
    with torch.no_grad():
        for name, value in theirs(x).items():
            assert torch.equal(value, mine(x)[name]), name


def test_real_build_keeps_detectron2_ops(monkeypatch):
    monkeypatch.setattr(deform_conv, "compiled_deform_conv_available", lambda: True)
    build = BACKBONE_REGISTRY.get("build_resnet_dcn_backbone")
    model = build(_tiny_resnet_cfg(True), ShapeSpec(channels=3))
    convs = [type(m) for m in model.modules() if isinstance(m, d2.ModulatedDeformConv)]
    assert convs and set(convs) == {d2.ModulatedDeformConv}


def _dcn_cfg(*opts):
    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    cfg.merge_from_list(["MODEL.RESNETS.DEFORM_ON_PER_STAGE", [False, True, True, True],
                         "DATASETS.TRAIN", ("x",), *opts])
    return cfg


@pytest.mark.parametrize("key, stock", [("MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone"),
                                        ("MODEL.BACKBONE.NAME", "build_resnet_backbone"),
                                        ("MODEL.FPG.BOTTOM_UP", "build_resnet_backbone")])
def test_stock_builder_with_deformable_blocks_is_refused_with_the_builder_to_name(key, stock):
    opts = [key, stock] + (["MODEL.BACKBONE.NAME", "build_fpg_backbone"]
                           if key == "MODEL.FPG.BOTTOM_UP" else [])
    fix = deform_conv.DCN_BUILDERS[stock]
    with pytest.raises(SeesawEcmError, match=f"{key} '{stock}'.*set {key} '{fix}'"):
        deform_conv.check_deform_conv_config(_dcn_cfg(*opts))
    assert any(fix in p for p in config_problems(_dcn_cfg(*opts)))


@pytest.mark.parametrize("opts", [
    ["MODEL.BACKBONE.NAME", "build_resnet_fpn_dcn_backbone"],
    ["MODEL.BACKBONE.NAME", "build_resnet_fpn_carafe_backbone"],
    ["MODEL.BACKBONE.NAME", "build_fpg_backbone", "MODEL.FPG.BOTTOM_UP",
     "build_resnet_dcn_backbone"],
    ["MODEL.RESNETS.DEFORM_ON_PER_STAGE", [False] * 4]])
def test_builders_that_run_deformable_blocks_pass_the_check(opts):
    deform_conv.check_deform_conv_config(_dcn_cfg(*opts))


def test_stock_builder_passes_the_check_with_compiled_ops(monkeypatch):
    monkeypatch.setattr(deform_conv, "compiled_deform_conv_available", lambda: True)
    deform_conv.check_deform_conv_config(_dcn_cfg())


def test_every_shipped_config_with_deformable_blocks_names_a_builder_that_runs_them():
    configs = sorted(glob.glob("configs/**/*.yaml", recursive=True))
    deformable = []
    for path in configs:
        cfg = get_cfg()
        add_seesaw_ecm_config(cfg)
        cfg.merge_from_file(path)
        deform_conv.check_deform_conv_config(cfg)
        deformable += [path] * any(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE)
    assert "configs/LVISv1/htc_lite_R_50_FPN_2x_seesaw_normed_mask_dcnv2_rfs.yaml" in deformable
