"""TSD (MODEL.TSD): the offset RoI pooling against torchvision's roi_align, its gradients, the
progressive constraint against the paper's formula, the predictor's wiring (translated RoIs,
Seesaw in the TSD branch), switches, and a few training steps in every ROI heads class."""
import re

import pytest
import torch
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from torch.nn import functional as F
from torchvision.ops import box_iou, roi_align

from seesaw_ecm.errors import SeesawEcmError
from seesaw_ecm.losses import ProgressiveConstraintLoss
from seesaw_ecm.modeling import TSDOutputLayers
from seesaw_ecm.modeling.roi_pooling import RoIFeatures, deformable_roi_align
from seesaw_ecm.validation import config_problems
from test_cascade import build, small_cfg
from test_htc_lite import batch  # two 64x64 images with 2 and 1 objects (box-shaped masks)

MASK = "configs/Synthetic/mask_rcnn_R18_FPN_seesaw_tsd.yaml"
CASCADE = "configs/Synthetic/cascade_mask_rcnn_R18_FPN_seesaw_tsd.yaml"
HTC = "configs/Synthetic/htc_lite_R18_FPN_seesaw_tsd.yaml"
ALL = (MASK, CASCADE, HTC)


def pyramid(dtype=torch.float32):
    """Two levels (strides 4 and 8) of 2 images, 3 channels, and 4 RoIs inside the 64x64
    images: (features, scales, rois (R, 5), levels (R,))."""
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(2, 3, 16, 16, generator=g, dtype=dtype),
                torch.randn(2, 3, 8, 8, generator=g, dtype=dtype)]
    rois = torch.tensor([[0, 10.3, 12.1, 30.7, 40.2], [1, 5.5, 6.0, 20.0, 18.5],
                         [0, 20.0, 8.0, 52.0, 44.0], [1, 14.2, 20.9, 50.1, 55.3]], dtype=dtype)
    return features, [0.25, 0.125], rois, torch.tensor([0, 0, 1, 1])


def reference_roi_align(features, scales, rois, levels, sampling_ratio, size=7):
    return torch.cat([roi_align(features[lvl], rois[i:i + 1], size, scales[lvl], sampling_ratio,
                                aligned=True) for i, lvl in enumerate(levels.tolist())])


def test_zero_offsets_are_roi_align():
    features, scales, rois, levels = pyramid()
    for s in (1, 2, 3):
        out = deformable_roi_align(features, scales, rois, levels, torch.zeros(4, 7, 7, 2), s)
        assert out.shape == (4, 3, 7, 7)
        torch.testing.assert_close(out, reference_roi_align(features, scales, rois, levels, s))


def test_uniform_offset_is_roi_align_of_the_moved_roi():
    features, scales, rois, levels = pyramid()
    shift = torch.tensor([[0.1, -0.05], [-0.2, 0.15], [0.05, 0.1], [0.0, -0.1]])  # (dx, dy)
    size = rois[:, 3:] - rois[:, 1:3]
    moved = rois.clone()
    moved[:, 1:] += (shift * size).repeat(1, 2)
    out = deformable_roi_align(features, scales, rois, levels,
                               shift[:, None, None].expand(-1, 7, 7, 2), 2)
    torch.testing.assert_close(out, reference_roi_align(features, scales, moved, levels, 2))


def test_offset_of_one_bin_moves_that_bin_only():
    features, scales, rois, levels = pyramid()
    offsets = torch.zeros(4, 7, 7, 2)
    offsets[2, 3, 5] = torch.tensor([0.3, -0.2])  # RoI 2, row 3, column 5
    out = deformable_roi_align(features, scales, rois, levels, offsets, 2)
    base = deformable_roi_align(features, scales, rois, levels, torch.zeros(4, 7, 7, 2), 2)
    changed = (out - base).abs().sum(1) > 0  # (R, P, P)
    assert changed.nonzero().tolist() == [[2, 3, 5]]


def test_offsets_and_features_receive_gradients():
    g = torch.Generator().manual_seed(1)
    features = [torch.randn(2, 2, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)]
    rois = torch.tensor([[0, 4.3, 6.1, 20.7, 28.2], [1, 10.0, 2.5, 30.0, 18.5]],
                        dtype=torch.float64)
    offsets = (0.1 * torch.randn(2, 3, 3, 2, generator=g, dtype=torch.float64)).requires_grad_()

    def pool(offsets, features):
        return deformable_roi_align([features], [0.25], rois, torch.zeros(2, dtype=int), offsets)

    assert torch.autograd.gradcheck(pool, (offsets, *features))


def test_empty_rois():
    features, scales, _, _ = pyramid()
    out = deformable_roi_align(features, scales, torch.zeros(0, 5), torch.zeros(0, dtype=int),
                               torch.zeros(0, 7, 7, 2))
    assert out.shape == (0, 3, 7, 7)


def paper_pc(tsd, sibling, margin):
    """|sibling - tsd + m|_+ per entry (the paper's M_cls / M_loc), m clipped at 1 - sibling as
    the official code, averaged; a loop."""
    total = 0.0
    for t, s in zip(tsd.tolist(), sibling.tolist()):
        total += max(0.0, s - t + min(margin, 1.0 - s))
    return total / max(len(tsd), 1)


def test_progressive_constraint_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    tsd_p, sib_p = torch.rand(20, generator=g).requires_grad_(), torch.rand(20, generator=g)
    sib_p[:3] = torch.tensor([0.95, 0.99, 1.0])  # margin clipped at 1 - sibling
    tsd_iou, sib_iou = torch.rand(7, generator=g).requires_grad_(), torch.rand(7, generator=g)
    sib_p.requires_grad_()
    for m_c, m_r in ((0.3, 0.3), (0.1, 0.5), (0.0, 0.0)):
        loss = ProgressiveConstraintLoss(m_c, m_r)(tsd_p, sib_p, tsd_iou, sib_iou)
        assert loss["loss_pc_cls"].item() == pytest.approx(paper_pc(tsd_p, sib_p, m_c))
        assert loss["loss_pc_loc"].item() == pytest.approx(paper_pc(tsd_iou, sib_iou, m_r))
    # margins change the loss; the sibling side gets no gradient; the weight scales both
    a = ProgressiveConstraintLoss(0.3, 0.3)(tsd_p, sib_p, tsd_iou, sib_iou)
    b = ProgressiveConstraintLoss(0.1, 0.1)(tsd_p, sib_p, tsd_iou, sib_iou)
    assert a["loss_pc_cls"] > b["loss_pc_cls"] and a["loss_pc_loc"] > b["loss_pc_loc"]
    sum(a.values()).backward()
    assert sib_p.grad is None and (tsd_p.grad <= 0).all() and (tsd_p.grad < 0).any()
    half = ProgressiveConstraintLoss(0.3, 0.3, loss_weight=0.5)(tsd_p, sib_p, tsd_iou, sib_iou)
    torch.testing.assert_close(half["loss_pc_loc"], 0.5 * a["loss_pc_loc"])
    empty = ProgressiveConstraintLoss()(tsd_p[:0], sib_p[:0], tsd_iou[:0], sib_iou[:0])
    assert empty["loss_pc_cls"].item() == 0 and empty["loss_pc_loc"].item() == 0


def training_step(model, seed=0):
    model.train()
    torch.manual_seed(seed)
    with EventStorage():
        return model(batch())


def spy_predictions(monkeypatch, model):
    """Record each TSD predictor's (predictions, proposals) given to its losses."""
    seen = []
    for predictor in model.modules():
        if isinstance(predictor, TSDOutputLayers):
            original = predictor.losses

            def losses(predictions, proposals, _original=original):
                seen.append((predictions, proposals))
                return _original(predictions, proposals)

            monkeypatch.setattr(predictor, "losses", losses)
    return seen


def test_progressive_constraint_in_the_predictor(monkeypatch):
    """loss_pc_* from the predictions, recomputed here: softmax probability of the label (CE),
    IoU of the regressed boxes (the TSD's decoded from the translated RoIs) with the gt."""
    model = build(MASK, "MODEL.LONG_TAIL.LOSS", "ce", "MODEL.LONG_TAIL.OBJECTNESS", False)
    seen = spy_predictions(monkeypatch, model)
    losses = training_step(model)
    (scores, deltas, extras), proposals = seen[0]
    gt = torch.cat([p.gt_classes for p in proposals])
    gt_boxes = torch.cat([p.gt_boxes.tensor for p in proposals])
    boxes = torch.cat([p.proposal_boxes.tensor for p in proposals])
    rows = torch.arange(len(gt))
    fg = gt < 4
    transform = model.roi_heads.box_predictor.box2box_transform

    def ious(deltas, rois):
        d = deltas.view(len(deltas), -1, 4)[rows, gt.clamp(max=3)]
        pred = transform.apply_deltas(d, rois)
        return box_iou(pred, gt_boxes).diagonal()[fg]

    sib_scores, sib_deltas = extras.sibling
    expected_cls = paper_pc(F.softmax(scores, 1)[rows, gt], F.softmax(sib_scores, 1)[rows, gt], 0.3)
    expected_loc = paper_pc(ious(deltas, extras.boxes), ious(sib_deltas, boxes), 0.3)
    assert losses["loss_pc_cls"].item() == pytest.approx(expected_cls, rel=1e-4)
    assert losses["loss_pc_loc"].item() == pytest.approx(expected_loc, rel=1e-4)
    assert fg.sum() > 0 and expected_loc > 0


def test_boxes_are_decoded_from_the_translated_rois():
    model = build(MASK)
    predictor = model.roi_heads.box_predictor
    last = predictor.reg_offset[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([2.0, -1.0]))  # shift (0.2 w, -0.1 h) at OFFSET_SCALE 0.1
        predictor.bbox_pred.weight.zero_()
        predictor.bbox_pred.bias.zero_()
    proposals = [Instances((64, 64), proposal_boxes=Boxes(torch.tensor(
        [[10.0, 10.0, 30.0, 50.0], [0.0, 4.0, 40.0, 24.0]])))]
    model.eval()
    with torch.no_grad():
        features = model.backbone(torch.zeros(1, 3, 64, 64))
        heads = model.roi_heads
        rois = RoIFeatures(heads.box_pooler, [features[f] for f in heads.box_in_features],
                           [p.proposal_boxes for p in proposals])
        predictions = predictor.predict_rois(heads.box_head, rois)
        boxes = predictor.predict_boxes(predictions, proposals)[0].view(2, -1, 4)
    expected = torch.tensor([[14.0, 6.0, 34.0, 46.0], [8.0, 2.0, 48.0, 22.0]])
    torch.testing.assert_close(boxes, expected[:, None].expand_as(boxes))
    assert predictions[2].sibling is None  # the sibling head does not run at inference


@pytest.mark.parametrize("config", ALL)
def test_offsets_and_both_branches_train(config):
    """Every part of TSD gets a gradient; Seesaw runs in both branches, each with its own
    counts."""
    model = build(config)
    losses = training_step(model)
    names = {re.sub(r"_stage\d$", "", k) for k in losses}
    assert {"loss_cls", "loss_objectness", "loss_box_reg", "loss_pc_cls", "loss_pc_loc",
            "loss_cls_sibling", "loss_objectness_sibling", "loss_box_reg_sibling"} <= names
    sum(losses.values()).backward()
    predictors = [m for m in model.modules() if isinstance(m, TSDOutputLayers)]
    assert len(predictors) == (1 if config == MASK else 3)
    for p in predictors:
        for part in (p.offset_fc, p.cls_offsets, p.reg_offset, p.cls_tower, p.reg_tower,
                     p.cls_score, p.objectness, p.sibling.cls_score):
            grads = [q.grad for q in part.parameters()]
            assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
        assert p.cls_loss is not p.sibling.cls_loss
        assert p.cls_loss.cum_samples.sum() > 0 and p.sibling.cls_loss.cum_samples.sum() > 0


def test_switches_change_the_result():
    def run(*opts):
        losses = training_step(build(MASK, *opts))
        return {k: v.item() for k, v in losses.items()}

    base = run()
    assert "loss_cls_sibling" not in run("MODEL.TSD.ENABLED", False)
    wider = run("MODEL.TSD.PC_CLS_MARGIN", 0.6, "MODEL.TSD.PC_LOC_MARGIN", 0.6)
    assert wider["loss_pc_cls"] > base["loss_pc_cls"] and wider["loss_pc_loc"] > base[
        "loss_pc_loc"]
    off = run("MODEL.TSD.PC_LOSS_WEIGHT", 0.0)
    assert off["loss_pc_cls"] == 0 and off["loss_pc_loc"] == 0
    for opts in (("MODEL.TSD.OFFSET_SCALE", 0.0), ("MODEL.TSD.SAMPLING_RATIO", 1)):
        other = run(*opts)  # same weights (seed): only the pooling differs
        assert other["loss_cls"] != base["loss_cls"], opts
        assert other["loss_cls_sibling"] == base["loss_cls_sibling"], opts


def test_tsd_on_changes_inference():
    """Same weights but TSD's own: the switch replaces the sibling at inference."""
    plain, tsd = build(MASK, "MODEL.TSD.ENABLED", False), build(MASK)
    assert not isinstance(plain.roi_heads.box_predictor, TSDOutputLayers)
    prefix = "roi_heads.box_predictor."
    missing, unexpected = tsd.load_state_dict(
        {k.replace(prefix, prefix + "sibling."): v for k, v in plain.state_dict().items()},
        strict=False)
    assert not unexpected and missing and all(k.startswith(prefix) for k in missing)
    outputs = []
    for model in (plain, tsd):
        model.eval()
        with torch.no_grad():
            outputs.append(model(batch())[0]["instances"].pred_boxes.tensor)
    assert outputs[0].shape != outputs[1].shape or not torch.allclose(*outputs)


def test_bad_values_are_named_before_building():
    cfg = small_cfg(MASK, "MODEL.TSD.SAMPLING_RATIO", 0, "MODEL.TSD.PC_LOC_MARGIN", 1.5,
                    "DATASETS.TRAIN", "('x',)")
    problems = " ".join(config_problems(cfg))
    assert "MODEL.TSD.SAMPLING_RATIO 0" in problems
    with pytest.raises(SeesawEcmError, match="PC_LOC_MARGIN 1.5"):
        build(MASK, "MODEL.TSD.PC_LOC_MARGIN", 1.5)


def test_unsupported_combinations_are_named():
    with pytest.raises(SeesawEcmError, match="TSD"):
        build("configs/Synthetic/mask_rcnn_R18_FPN_loce.yaml", "MODEL.TSD.ENABLED", True)
    with pytest.raises(SeesawEcmError, match="TRAIN_ON_PRED_BOXES"):
        build(MASK, "MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES", True)


@pytest.mark.slow
@pytest.mark.parametrize("config", ALL)
def test_trains_a_few_iterations(config):
    model = build(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    offsets = model.roi_heads.box_predictor
    offsets = (offsets if isinstance(offsets, TSDOutputLayers) else offsets[0]).cls_offsets
    before = [p.detach().clone() for p in offsets.parameters()]
    for step in range(3):
        losses = training_step(model, seed=step)
        total = sum(losses.values())
        assert torch.isfinite(total), losses
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, offsets.parameters()))
    model.eval()
    with torch.no_grad():
        out = model(batch())
    assert out[0]["instances"].pred_masks.shape[1:] == (64, 64)


def test_box2box_transform_of_each_stage():
    model = build(CASCADE)
    for predictor, weights in zip(model.roi_heads.box_predictor,
                                  small_cfg(CASCADE).MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS):
        assert isinstance(predictor.box2box_transform, Box2BoxTransform)
        assert tuple(predictor.box2box_transform.weights) == tuple(weights)
        assert predictor.sibling.box2box_transform is predictor.box2box_transform
