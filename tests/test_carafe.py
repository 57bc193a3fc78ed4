"""CARAFE in plain PyTorch (seesaw_ecm.modeling.carafe): the op against a loop over output pixels
and taps, chunked == in one piece (values and gradients), the CARAFEPack kernels, and the FPN
variant that upsamples with it."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

from seesaw_ecm import add_seesaw_ecm_config
from seesaw_ecm.modeling.carafe import CARAFEFPN, CARAFEPack, carafe


def _loop_carafe(x, kernels, k, scale):
    n, c, h, w = x.shape
    groups = kernels.shape[1] // (k * k)
    out = torch.zeros(n, c, h * scale, w * scale, dtype=x.dtype)
    for b in range(n):
        for ch in range(c):
            g = ch // (c // groups)
            for i in range(h * scale):
                for j in range(w * scale):
                    for a in range(k):
                        for t in range(k):
                            y, xx = i // scale + a - k // 2, j // scale + t - k // 2
                            if 0 <= y < h and 0 <= xx < w:
                                out[b, ch, i, j] += kernels[b, g * k * k + a * k + t, i, j] * \
                                    x[b, ch, y, xx]
    return out


@pytest.mark.parametrize("k,scale,groups", [(5, 2, 1), (3, 2, 2), (3, 3, 1)])
def test_carafe_matches_loop(k, scale, groups):
    torch.manual_seed(0)
    x = torch.randn(1, 4, 3, 4, dtype=torch.float64)
    kernels = torch.randn(1, groups * k * k, 3 * scale, 4 * scale, dtype=torch.float64)
    torch.testing.assert_close(carafe(x, kernels, k, scale), _loop_carafe(x, kernels, k, scale))


def test_chunked_equals_one_piece_with_gradients():
    torch.manual_seed(1)
    x = torch.randn(1, 3, 7, 4, dtype=torch.float64, requires_grad=True)
    kernels = torch.randn(1, 25, 14, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(1, 3, 14, 8, dtype=torch.float64)
    row_bytes = 3 * 25 * 4 * 8
    results = []
    for chunk in (None, 2 * row_bytes, 1):  # one piece, 2-row chunks (a shorter last), 1 row
        out = carafe(x, kernels, 5, 2, chunk_bytes=chunk)
        gx, gk = torch.autograd.grad((out * weight).sum(), (x, kernels))
        results.append((out, gx, gk))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b)


def test_pack_kernels_are_normalized_and_content_aware():
    torch.manual_seed(2)
    pack = CARAFEPack(6, scale=2, up_kernel=3, compressed_channels=4)
    torch.nn.init.normal_(pack.content_encoder.weight)
    x = torch.randn(1, 6, 4, 5)
    kernels = pack.kernels(x)
    assert kernels.shape == (1, 9, 8, 10)
    torch.testing.assert_close(kernels.sum(1), torch.ones(1, 8, 10))
    assert (kernels > 0).all() and kernels.std() > 0.05
    out = pack(x)
    torch.testing.assert_close(out, _loop_carafe(x.double(), kernels.double(), 3, 2).float())
    # at init the kernels are nearly uniform: the output is close to a 3x3 box filter
    fresh = CARAFEPack(6, scale=2, up_kernel=3)
    box = torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=True)
    torch.testing.assert_close(fresh(x)[..., ::2, ::2], box, atol=2e-2, rtol=0)


def test_pack_kernels_equal_pixel_shuffle_and_an_empty_batch_backpropagates():
    """The kernels' pixel shuffle (written as view + permute) equals torch's, and an empty batch
    (a mask head on a batch without foreground RoIs) runs forward and backward: torch's own
    pixel_shuffle backward fails there with a wrongly shaped gradient."""
    torch.manual_seed(3)
    pack = CARAFEPack(6, scale=2, up_kernel=3, up_group=2, compressed_channels=4)
    torch.nn.init.normal_(pack.content_encoder.weight)
    x = torch.randn(2, 6, 4, 5)
    shuffled = torch.nn.functional.pixel_shuffle(
        pack.content_encoder(pack.channel_compressor(x)), 2)
    expected = shuffled.view(2, 2, 9, 8, 10).softmax(dim=2).view(2, 18, 8, 10)
    torch.testing.assert_close(pack.kernels(x), expected)
    empty = torch.zeros(0, 6, 14, 14, requires_grad=True)
    out = pack(empty)
    assert out.shape == (0, 6, 28, 28)
    (out.sum() + sum(p.sum() * 0 for p in pack.parameters())).backward()
    assert empty.grad.shape == empty.shape


@pytest.fixture
def fpn_cfg(make_cfg):
    """fpn_cfg(name): the synthetic R18-FPN base with backbone builder `name`, 8 channels."""
    return lambda name: make_cfg("configs/Synthetic/Base-Synthetic-R18-FPN.yaml",
                                 "MODEL.BACKBONE.NAME", name, "MODEL.FPN.OUT_CHANNELS", 8,
                                 "MODEL.CARAFE.CHUNK_MB", 0)


def test_fpn_carafe_replaces_nearest_upsampling(fpn_cfg):
    torch.manual_seed(3)
    fpn = build_backbone(fpn_cfg("build_resnet_fpn_carafe_backbone"), ShapeSpec(channels=3))
    assert isinstance(fpn, CARAFEFPN) and len(fpn.upsamplers) == len(fpn.in_features) - 1
    torch.manual_seed(3)
    plain = build_backbone(fpn_cfg("build_resnet_fpn_backbone"), ShapeSpec(channels=3))
    missing, unexpected = plain.load_state_dict(fpn.state_dict(), strict=False)
    assert not missing and all(k.startswith("upsamplers.") for k in unexpected)
    x = torch.randn(1, 3, 64, 64)
    out, ref = fpn(x), plain(x)
    assert out.keys() == ref.keys() and all(out[k].shape == ref[k].shape for k in out)
    # the coarsest level has no upsampling; the finer ones differ from nearest upsampling
    torch.testing.assert_close(out["p5"], ref["p5"])
    assert not torch.allclose(out["p2"], ref["p2"])
    # nearest upsampling is CARAFE with all the kernel weight on the centre tap
    for up in fpn.upsamplers:
        torch.nn.init.zeros_(up.content_encoder.weight)
        with torch.no_grad():
            up.content_encoder.bias.view(25, 4)[12] = 1e4  # pixel shuffle: tap-major
    torch.testing.assert_close(fpn(x)["p2"], ref["p2"])
    sum(v.sum() for v in fpn(x).values()).backward()
    assert fpn.bottom_up.stem.conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("config", ["mask_rcnn_R18_FPN_seesaw", "htc_lite_R18_FPN_seesaw"])
def test_mask_head_upsamples_with_carafe(config):
    from detectron2.modeling.roi_heads import build_roi_heads
    from detectron2.structures import Boxes, Instances

    shapes = {f"p{i}": ShapeSpec(channels=8, stride=2 ** i) for i in range(2, 7)}
    features = {k: torch.randn(1, 8, 64 // s.stride, 64 // s.stride) for k, s in shapes.items()}
    for on in (False, True):
        cfg = get_cfg()
        add_seesaw_ecm_config(cfg)
        cfg.merge_from_file(f"configs/Synthetic/{config}.yaml")
        cfg.merge_from_list(["MODEL.ROI_HEADS.NUM_CLASSES", 3, "MODEL.ROI_MASK_HEAD.CONV_DIM", 8,
                             "MODEL.LONG_TAIL.STATISTICS_FROM", "checkpoint",
                             "MODEL.CARAFE.MASK_HEAD", on, "MODEL.MASK_SCORING.ON", on])
        heads = build_roi_heads(cfg, shapes).eval()
        head = heads.mask_head.mask_head if on else heads.mask_head
        assert isinstance(head.deconv, CARAFEPack) == on
        names = [name for name, _ in head.named_children()]
        assert names.index("deconv") == names.index("predictor") - 2  # then ReLU, predictor
        inst = Instances((64, 64), pred_boxes=Boxes(torch.tensor([[4.0, 4, 40, 30]])),
                         scores=torch.tensor([0.9]), pred_classes=torch.tensor([1]))
        with torch.no_grad():
            out = heads.forward_with_given_boxes(features, [inst])[0]
        assert out.pred_masks.shape == (1, 1, 28, 28)
