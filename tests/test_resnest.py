"""ResNeSt backbones through timm (seesaw_ecm/modeling/resnest.py) and the DCNv2 pack they use,
with random initialisation (no hub here)."""
import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm
from detectron2.modeling import build_backbone
from safetensors.torch import save_file
from torch import nn

from seesaw_ecm import add_seesaw_ecm_config
from seesaw_ecm.errors import SeesawEcmError
from seesaw_ecm.modeling.deform_conv import ModulatedDeformConvPack
from seesaw_ecm.modeling.resnest import NORM_CONVERSIONS, ResNeSt

timm = pytest.importorskip("timm")
CHANNELS = {"res2": 256, "res3": 512, "res4": 1024, "res5": 2048}
STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


def _live(model):
    """timm starts each block's last BN scale at 0 (the residual branch adds nothing, and gets
    no gradient but there): set every BN scale to 1 (SyncBN's too), as pretrained weights
    would."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
    return model


def _image(h=72, w=100):
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("depth", [50, 101, 200])
def test_entry_depths_give_res2_to_res5(depth):
    model = ResNeSt(depth, deform_on_per_stage=(False, True, True, True)).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 32, 32))
    assert {k: v.shape[1] for k, v in out.items()} == CHANNELS
    assert {k: s.stride for k, s in model.output_shape().items()} == STRIDES


def test_shapes_strides_and_gradient_reach_every_parameter():
    model = _live(ResNeSt(14, norm="BN", deform_on_per_stage=(False, True, True, True)))
    x = _image()
    out = model(x)
    for name, y in out.items():
        s = STRIDES[name]
        assert tuple(y.shape) == (2, CHANNELS[name], math.ceil(72 / s), math.ceil(100 / s))
        assert model.output_shape()[name].channels == CHANNELS[name]
    sum(y.square().mean() for y in out.values()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_out_features_subset_builds_only_what_it_needs():
    model = ResNeSt(14, out_features=["res3", "res4"], norm="BN")
    assert list(model(_image()).keys()) == ["res3", "res4"]
    assert not hasattr(model.body, "layer4")


def test_dcn_in_the_chosen_stages_only_and_it_changes_their_output():
    torch.manual_seed(0)
    plain = _live(ResNeSt(14, norm="BN")).eval()
    torch.manual_seed(0)
    dcn = _live(ResNeSt(14, norm="BN", deform_on_per_stage=(False, True, False, True))).eval()
    kinds = {k: {type(b.conv2.conv) for b in getattr(dcn.body, f"layer{k}")} for k in (1, 2, 3, 4)}
    assert kinds == {1: {nn.Conv2d}, 2: {ModulatedDeformConvPack}, 3: {nn.Conv2d},
                     4: {ModulatedDeformConvPack}}
    with torch.no_grad():
        a, b = plain(_image()), dcn(_image())
    assert torch.equal(a["res2"], b["res2"])  # same weights (same seed) before the first DCN
    assert not torch.allclose(a["res3"], b["res3"])


def test_deform_pack_keeps_the_conv_and_learns_offsets():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2, bias=False)
    pack = ModulatedDeformConvPack.from_conv(conv)
    x = torch.randn(2, 8, 9, 11)
    with torch.no_grad():
        # zero offsets, modulation sigmoid(0) = 0.5 (mmcv / detectron2 init)
        torch.testing.assert_close(pack(x), 0.5 * conv(x))
        pack.conv_offset.bias[2 * 9:] = 30.0  # modulation ~1: exactly the regular conv
        torch.testing.assert_close(pack(x), conv(x))
        pack.conv_offset.weight.normal_(std=0.5)  # offsets that depend on x
        assert not torch.allclose(pack(x), conv(x), atol=1e-3)
    pack(x).square().sum().backward()
    assert pack.conv_offset.weight.grad.abs().sum() > 0 and pack.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 4])
def test_freeze_at_and_frozen_bn_as_detectron2_resnet(freeze_at):
    model = ResNeSt(14, norm="BN", freeze_at=freeze_at)
    parts = ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
    frozen = (parts[:2] if freeze_at >= 1 else []) + parts[2:2 + max(freeze_at - 1, 0)]
    for name in parts:
        module = getattr(model.body, name)
        trains = [p.requires_grad for p in module.parameters()]
        bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
        assert (not any(trains), not bns) if name in frozen else (all(trains), bool(bns)), name
    everything_frozen = ResNeSt(14, norm="FrozenBN")
    assert not [m for m in everything_frozen.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [m for m in everything_frozen.modules() if isinstance(m, FrozenBatchNorm2d)]


def test_weights_file_is_loaded_also_into_the_deformable_convs(tmp_path):
    torch.manual_seed(1)
    reference = timm.create_model("resnest14d", pretrained=False)
    path = str(tmp_path / "resnest14d.pth")
    torch.save(reference.state_dict(), path)
    torch.manual_seed(2)
    model = ResNeSt(14, deform_on_per_stage=(False, False, True, False), norm="BN", weights=path)
    state = reference.state_dict()
    for key, value in model.body.state_dict().items():
        if "conv_offset" not in key:
            assert torch.equal(value, state[key]), key  # includes layer3.*.conv2.conv.weight
    assert isinstance(model.body.layer3[0].conv2.conv, ModulatedDeformConvPack)
    hub_format = str(tmp_path / "model.safetensors")  # as timm's files on the hub
    save_file(state, hub_format)
    loaded = ResNeSt(14, norm="BN", weights=hub_format).body.layer4[0].conv3.weight
    assert torch.equal(loaded, state["layer4.0.conv3.weight"])
    with pytest.raises(SeesawEcmError, match="does not fit timm's resnest26d"):
        ResNeSt(26, weights=path)


def test_missing_weights_file_and_bad_values_are_named(tmp_path):
    missing = str(tmp_path / "resnest200e.safetensors")
    with pytest.raises(SeesawEcmError, match=r"MODEL.RESNEST.WEIGHTS: no file .*resnest200e"):
        ResNeSt(200, weights=missing)
    with pytest.raises(SeesawEcmError, match="MODEL.RESNEST.DEPTH 34"):
        ResNeSt(34)
    with pytest.raises(SeesawEcmError, match="MODEL.RESNEST.NORM 'GN'"):
        ResNeSt(14, norm="GN")
    with pytest.raises(SeesawEcmError, match="OUT_FEATURES"):
        ResNeSt(14, out_features=["res6"])


def test_naive_sync_bn_keeps_the_values_and_is_batch_norm_in_one_process():
    """NORM "naiveSyncBN_N" (what sync_bn_on_cpu makes of "SyncBN" on CPU process groups):
    every BatchNorm becomes detectron2's NaiveSyncBatchNorm with its values; without a process
    group it normalizes as BatchNorm (training mode: batch statistics)."""
    torch.manual_seed(0)
    plain = _live(ResNeSt(14, norm="BN"))
    for m in plain.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
            m.running_mean.uniform_(-1, 1)
    expected = plain(_image())
    state = plain.state_dict()
    naive = NORM_CONVERSIONS["naiveSyncBN_N"](plain)
    norms = [m for m in naive.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(type(m) is NaiveSyncBatchNorm and m._stats_mode == "N" for m in norms)
    for key, value in naive.state_dict().items():
        torch.testing.assert_close(value, state[key])
    out = naive(_image())
    for name in expected:
        torch.testing.assert_close(out[name], expected[name])
    assert type(ResNeSt(14, norm="naiveSyncBN_N").body.bn1) is NaiveSyncBatchNorm


def test_resnest_fpn_from_config():
    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    cfg.merge_from_list(["MODEL.BACKBONE.NAME", "build_resnest_fpn_backbone",
                         "MODEL.RESNEST.DEPTH", 14, "MODEL.FPN.OUT_CHANNELS", 32,
                         "MODEL.FPN.IN_FEATURES", ["res2", "res3", "res4", "res5"],
                         "MODEL.RESNEST.DEFORM_ON_PER_STAGE", [False, True, True, True]])
    backbone = build_backbone(cfg)
    assert isinstance(backbone.bottom_up.body.layer4[0].conv2.conv, ModulatedDeformConvPack)
    out = backbone(_image(64, 96))
    strides = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        k: (2, 32, math.ceil(64 / s), math.ceil(96 / s)) for k, s in strides.items()}
