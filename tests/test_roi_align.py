"""seesaw_ecm/roi_align.py: the vectorized CPU backward of RoIAlign against torchvision's own
kernel (the independent computation), inside detectron2's poolers and the whole model, and the
MODEL.ROI_ALIGN.VECTORIZED_BACKWARD switch."""
import pytest
import torch
from detectron2.layers import ROIAlign
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage
from torchvision.ops import roi_align

from seesaw_ecm.engine import Trainer
from seesaw_ecm.roi_align import (ROIAlignVectorizedBackward, roi_align_backward,
                                  use_vectorized_roi_align_backward)
from test_cascade import CASCADE, small_cfg
from test_htc_lite import batch

# (batch index, x0, y0, x1, y1) on a 3-image batch of 9 x 11 maps at scale 0.5 (18 x 22 px):
# unsorted images, image 2 without RoIs, RoIs over every border and past it, one wholly
# outside, a degenerate one (x1 < x0), a sub-cell one, one covering the image.
ROIS = torch.tensor([
    [1, 2.0, 3.0, 15.0, 12.0],
    [0, -6.0, -4.0, 7.0, 5.0],
    [1, 10.0, 8.0, 30.0, 25.0],
    [0, 0.0, 0.0, 22.0, 18.0],
    [0, 40.0, 40.0, 50.0, 52.0],
    [1, 9.0, 9.0, 4.0, 12.0],
    [0, 5.3, 6.1, 5.9, 6.4],
    [1, 21.0, 1.0, 23.5, 17.0],
], dtype=torch.float64)


def torchvision_grad(x, rois, grad, ratio, aligned, size=(5, 4)):
    x = x.detach().requires_grad_()
    roi_align(x, rois, size, 0.5, ratio, aligned).backward(grad)
    return x.grad


@pytest.mark.parametrize("ratio", [0, 1, 3])
@pytest.mark.parametrize("aligned", [True, False])
def test_backward_equals_torchvision(ratio, aligned):
    gen = torch.Generator().manual_seed(ratio)
    x = torch.randn(3, 6, 9, 11, dtype=torch.float64, generator=gen)
    grad = torch.randn(len(ROIS), 6, 5, 4, dtype=torch.float64, generator=gen)
    want = torchvision_grad(x, ROIS, grad, ratio, aligned)
    got = roi_align_backward(grad, ROIS, x.shape, 0.5, ratio, aligned)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got[2].abs().sum() == 0 and want[0].abs().sum() > 0  # image 2 has no RoIs


def test_backward_float32_many_rois_and_mass():
    """Float32 at the demo's sizes (to rounding); with every sample inside the map the gradient
    keeps its total (each bin's average spreads weights that sum to one)."""
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=gen) * 24  # the map covers 48 x 48 px at scale 0.5
    wh = torch.rand(200, 2, generator=gen) * 22 + 1
    rois = torch.cat([torch.randint(0, 4, (200, 1), generator=gen).float(), xy, xy + wh], 1)
    x = torch.randn(4, 16, 24, 24, generator=gen)
    grad = torch.randn(200, 16, 7, 7, generator=gen)
    want = torchvision_grad(x, rois, grad, 0, True, size=7)
    got = roi_align_backward(grad, rois, x.shape, 0.5, 0, True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert got.sum().item() == pytest.approx(grad.sum().item(), rel=1e-4)


def test_no_rois_gives_zeros():
    got = roi_align_backward(torch.zeros(0, 6, 5, 4), torch.zeros(0, 5), (2, 6, 9, 11), 0.5, 0,
                             True)
    assert got.shape == (2, 6, 9, 11) and not got.any()


def pooler():
    # boxes under 16 px on the first level, the others on the second
    return ROIPooler(5, (0.5, 0.25), sampling_ratio=0, pooler_type="ROIAlignV2",
                     canonical_box_size=16, canonical_level=2)


def test_swapped_pooler_same_output_and_gradient():
    gen = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 6, 16, 20, generator=gen), torch.randn(2, 6, 8, 10, generator=gen)]
    boxes = [Boxes(torch.tensor([[1.0, 2.0, 20.0, 30.0], [0.0, 0.0, 39.0, 31.0]])),
             Boxes(torch.tensor([[5.0, 5.0, 9.0, 8.0], [10.0, 3.0, 38.0, 30.0]]))]
    results = []
    for swap in (False, True):
        p = pooler()
        if swap:
            assert use_vectorized_roi_align_backward(p) == 2
            assert all(type(m) is ROIAlignVectorizedBackward for m in p.level_poolers)
        xs = [f.clone().requires_grad_() for f in feats]
        out = p(xs, boxes)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        results.append((out.detach(), [x.grad for x in xs], type(out.grad_fn).__name__))
    (out0, grads0, fn0), (out1, grads1, fn1) = results
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)  # the forward is torchvision's
    for g0, g1 in zip(grads0, grads1):
        assert g0.abs().sum() > 0
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-6)
    assert "RoIAlignFunction" not in fn0


def test_swapped_layer_uses_torchvision_without_gradient_and_scripts():
    layer = ROIAlign((5, 4), 0.5, 0, aligned=True)
    use_vectorized_roi_align_backward(layer)
    x = torch.randn(3, 6, 9, 11)
    rois = ROIS.float()
    with torch.no_grad():
        assert layer(x.requires_grad_(), rois).grad_fn is None
    assert "RoIAlignFunction" in type(layer(x, rois).grad_fn).__name__
    scripted = torch.jit.script(layer)
    torch.testing.assert_close(scripted(x.detach(), rois), layer(x.detach(), rois), rtol=0,
                               atol=0)


@pytest.mark.parametrize("on", [False, True])
def test_config_switch_builds_the_model_with_it(on):
    cfg = small_cfg(CASCADE, "MODEL.ROI_ALIGN.VECTORIZED_BACKWARD", on)
    model = Trainer.build_model(cfg)
    swapped = sum(type(m) is ROIAlignVectorizedBackward for m in model.modules())
    levels = len(cfg.MODEL.ROI_HEADS.IN_FEATURES)
    # the box pooler (the cascade's three stages share it) and the mask pooler, one per level
    assert swapped == (2 * levels if on else 0)


def test_model_gradients_equal_with_and_without_the_switch():
    grads = []
    for on in (False, True):
        torch.manual_seed(0)
        model = Trainer.build_model(small_cfg(CASCADE, "MODEL.ROI_ALIGN.VECTORIZED_BACKWARD", on))
        model.train()
        torch.manual_seed(1)
        with EventStorage():
            sum(model(batch()).values()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        # summation order only: ~1e-6 of the largest entry (2026-12-03)
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4,
                                   atol=1e-5 * g.abs().max().item(), msg=name)


def test_benchmark_prints_each_case_with_a_rounding_level_difference(capsys):
    from benchmarks.roi_align_backward import CASES, main
    main(["--rounds", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == len(CASES)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[1]) > 0 and float(cells[2]) > 0
        assert float(cells[3]) == pytest.approx(float(cells[2]) / float(cells[1]), rel=0.05)
        assert float(cells[4]) < 1e-5
