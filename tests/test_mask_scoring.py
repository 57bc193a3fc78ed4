"""Mask scoring (seesaw_ecm.modeling.mask_scoring): the MaskIoU head, its IoU targets (against
mmdetection's definition computed directly), its loss, and the rescoring at inference, in the
Mask R-CNN, cascade and HTC-Lite ROI heads."""
import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage

from seesaw_ecm.errors import SeesawEcmError
from seesaw_ecm.modeling.mask_scoring import (
    MaskIoUHead, MaskScoringHead, mask_iou_targets)

C = 3


def test_head_shapes_and_mask_input_matters():
    torch.manual_seed(0)
    head = MaskIoUHead(8, 14, num_classes=C, conv_dim=16, fc_dim=32)
    features, logits = torch.randn(5, 8, 14, 14), torch.randn(5, 28, 28)
    out = head(features, logits)
    assert out.shape == (5, C)
    assert head.fcs[0].in_features == 16 * 7 * 7 and len(head.convs) == 4
    assert not torch.allclose(out, head(features, -logits))
    assert head(features[:0], logits[:0]).shape == (0, C)


def _mmdet_iou_target(logit, gt_full, box, side):
    """mmdetection's MaskIoUHead.get_targets for one RoI: gt area inside the box / whole gt area
    as the area ratio, target mask = the gt inside the integer box, pooled to side x side."""
    x0, y0, x1, y1 = box
    inside = gt_full[y0:y1, x0:x1].float()
    ratio = inside.sum() / (gt_full.sum() + 1e-7)
    # box sizes are multiples of side and masks are blocks aligned to the bins: exact pooling
    target = inside.view(side, (y1 - y0) // side, side, (x1 - x0) // side).amax((1, 3))
    pred = (logit > 0.5).float()
    overlap = (pred * target).sum()
    full_area = target.sum() / (ratio + 1e-7)
    return overlap / (pred.sum() + full_area - overlap)


def test_iou_targets_match_mmdetection_definition():
    torch.manual_seed(1)
    side = 4
    gts = torch.zeros(3, 24, 24, dtype=torch.bool)
    gts[0, 4:16, 6:14] = True  # partly outside the box below
    gts[1, 8:12, 8:16] = True  # inside
    gts[1, 20:24, 0:4] = True  # a second part far outside
    gts[2, 0:24, 0:24] = True  # the whole image
    boxes = [[4, 8, 12, 16], [8, 8, 16, 16], [0, 0, 16, 8]]
    inst = Instances((24, 24), proposal_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32)),
                     gt_masks=BitMasks(gts))
    logits = torch.randn(3, side, side) * 2
    got = mask_iou_targets(logits, [inst])
    expected = torch.stack([_mmdet_iou_target(lg, g, b, side)
                            for lg, g, b in zip(logits, gts, boxes)])
    torch.testing.assert_close(got, expected)
    assert got[1] < 1 and (got > 0).all()
    # a perfect prediction of an instance that lies inside its box has IoU 1
    inside = Instances((24, 24), proposal_boxes=Boxes(torch.tensor([[8.0, 8, 16, 16]])),
                       gt_masks=BitMasks(gts[1:2] & (torch.arange(24) < 16)[:, None]))
    perfect = torch.full((1, side, side), -5.0)
    perfect[0, 0:2, :] = 5.0
    torch.testing.assert_close(mask_iou_targets(perfect, [inside]), torch.ones(1))
    # the same shapes as polygons: the whole-instance area comes from the polygons
    poly = PolygonMasks([[[6, 4, 14, 4, 14, 16, 6, 16]]])
    as_poly = Instances((24, 24), proposal_boxes=Boxes(torch.tensor([boxes[0]], dtype=torch.float)),
                        gt_masks=poly)
    torch.testing.assert_close(mask_iou_targets(logits[:1], [as_poly]), got[:1])


def _mask_head(num_classes=C):
    return MaskRCNNConvUpsampleHead(ShapeSpec(channels=8, height=4, width=4),
                                    num_classes=num_classes, conv_dims=[8])


def _fg_instances():
    gts = torch.zeros(2, 32, 32, dtype=torch.bool)
    gts[0, 4:20, 4:20] = True
    gts[1, 10:30, 2:12] = True
    return [Instances((32, 32), proposal_boxes=Boxes(torch.tensor([[2.0, 2, 22, 22],
                                                                   [0.0, 8, 16, 32]])),
                      gt_masks=BitMasks(gts), gt_classes=torch.tensor([2, 0]))]


def test_loss_is_mse_on_positive_targets_and_reaches_the_head():
    torch.manual_seed(2)
    head = MaskScoringHead(_mask_head(), MaskIoUHead(8, 4, C, conv_dim=8, fc_dim=16),
                           loss_weight=0.7).train()
    torch.nn.init.normal_(head.mask_head.predictor.weight)  # logits on both sides of 0.5
    x = torch.randn(2, 8, 4, 4)
    instances = _fg_instances()
    with EventStorage():
        losses = head(x, instances)
    assert set(losses) == {"loss_mask", "loss_mask_iou"}
    logits = head.mask_head.layers(x)
    class_logits = logits[[0, 1], [2, 0]]
    pred = head.mask_iou_head(x, class_logits)[[0, 1], [2, 0]]
    target = mask_iou_targets(class_logits, instances)
    keep = target > 0
    assert keep.any()
    torch.testing.assert_close(
        losses["loss_mask_iou"], 0.7 * ((pred[keep] - target[keep]) ** 2).mean())
    losses["loss_mask_iou"].backward()
    for p in head.mask_iou_head.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_wrapped_head_must_return_mask_logits():
    with pytest.raises(SeesawEcmError, match="MASK_SCORING"):
        MaskScoringHead(torch.nn.Conv2d(1, 1, 1), MaskIoUHead(8, 4, C))


@pytest.fixture
def small_cfg(make_cfg):
    """small_cfg(config, *opts): `config` with C classes and narrow mask / box / scoring heads."""
    return lambda config, *opts: make_cfg(
        config, "MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.NUM_CLASSES", C,
        "MODEL.LONG_TAIL.STATISTICS_FROM", "checkpoint", "DATASETS.TRAIN", "()",
        "MODEL.ROI_MASK_HEAD.CONV_DIM", 8, "MODEL.ROI_BOX_HEAD.FC_DIM", 16,
        "MODEL.MASK_SCORING.CONV_DIM", 8, "MODEL.MASK_SCORING.FC_DIM", 16, *opts)


SHAPES = {f"p{i}": ShapeSpec(channels=8, stride=2 ** i) for i in range(2, 7)}


@pytest.mark.parametrize("config", ["mask_rcnn_R18_FPN_seesaw", "cascade_mask_rcnn_R18_FPN_seesaw",
                                    "htc_lite_R18_FPN_seesaw"])
def test_switch_rescores_at_inference(config, small_cfg):
    path = f"configs/Synthetic/{config}.yaml"
    features = {k: torch.randn(1, 8, 64 // s.stride, 64 // s.stride) for k, s in SHAPES.items()}
    boxes = Boxes(torch.tensor([[4.0, 4, 40, 30], [20.0, 10, 60, 60]]))
    scores = torch.tensor([0.9, 0.4])
    results, off_context = {}, None
    for on in (False, True):
        torch.manual_seed(3)
        heads = build_roi_heads(small_cfg(path, "MODEL.MASK_SCORING.ON", on), SHAPES).eval()
        assert isinstance(heads.mask_head, MaskScoringHead) == on
        if on and getattr(heads, "context_encoder", None) is not None:
            # HTC-Lite's context encoder is built after the mask heads: same weights as "off"
            heads.context_encoder.load_state_dict(off_context)
        elif not on and getattr(heads, "context_encoder", None) is not None:
            off_context = heads.context_encoder.state_dict()
        inst = Instances((64, 64), pred_boxes=boxes, scores=scores.clone(),
                         pred_classes=torch.tensor([1, 2]))
        with torch.no_grad():
            results[on] = heads.forward_with_given_boxes(features, [inst])[0]
        if on:
            mask_features = heads.mask_pooler([features[f] for f in heads.mask_in_features],
                                              [boxes])
            if getattr(heads, "context_encoder", None) is not None:  # HTC-Lite adds its context
                with torch.no_grad():
                    context, _ = heads.context_encoder(features[heads.context_in_feature])
                mask_features = mask_features + context[0]
            with torch.no_grad():
                logits = heads.mask_head.mask_head.layers(mask_features)
                iou = heads.mask_head.mask_iou_head(
                    mask_features, logits[[0, 1], [1, 2]])[[0, 1], [1, 2]]
            torch.testing.assert_close(results[on].scores, scores * iou)
    torch.testing.assert_close(results[False].scores, scores)
    assert not torch.allclose(results[True].scores, scores)
    torch.testing.assert_close(results[True].pred_masks, results[False].pred_masks)


@pytest.mark.parametrize("config", ["mask_rcnn_R18_FPN_seesaw", "cascade_mask_rcnn_R18_FPN_seesaw"])
def test_heads_compose_carafe_then_mask_scoring_as_the_plain_parts(config, small_cfg):
    """The ROI heads' mask head with both options is detectron2's head with its deconvolution
    replaced by CARAFE, inside a MaskScoringHead: the same modules and weights (same seed) as
    the parts composed by hand in that order; the other order is refused."""
    from detectron2.modeling.roi_heads.mask_head import build_mask_head

    from seesaw_ecm.modeling.carafe import carafe_kwargs, with_carafe_upsampling

    cfg = small_cfg(f"configs/Synthetic/{config}.yaml", "MODEL.MASK_SCORING.ON", True,
                    "MODEL.CARAFE.MASK_HEAD", True)
    heads = build_roi_heads(cfg, SHAPES)
    torch.manual_seed(5)
    built = type(heads)._init_mask_head(cfg, SHAPES)["mask_head"]
    torch.manual_seed(5)
    inner = build_mask_head(cfg, ShapeSpec(channels=8, height=14, width=14))
    by_hand = MaskScoringHead(with_carafe_upsampling(inner, **carafe_kwargs(cfg)),
                              MaskIoUHead(8, 14, C, conv_dim=8, fc_dim=16),
                              loss_weight=cfg.MODEL.MASK_SCORING.LOSS_WEIGHT)
    assert repr(built) == repr(by_hand) and repr(heads.mask_head) == repr(by_hand)
    assert built.loss_weight == by_hand.loss_weight
    mine = built.state_dict()
    assert mine.keys() == by_hand.state_dict().keys()
    assert all(torch.equal(mine[k], v) for k, v in by_hand.state_dict().items())
    with pytest.raises(SeesawEcmError, match="CARAFE.MASK_HEAD"):
        with_carafe_upsampling(by_hand, **carafe_kwargs(cfg))


def test_htc_lite_trains_with_mask_scoring():
    from tests.test_htc_lite import batch, htc_cfg
    torch.manual_seed(4)
    model = build_model(htc_cfg(
        "MODEL.MASK_SCORING.ON", True, "MODEL.MASK_SCORING.FC_DIM", 16,
        "MODEL.MASK_SCORING.CONV_DIM", 8, "MODEL.FPN.OUT_CHANNELS", 16,
        "MODEL.ROI_MASK_HEAD.CONV_DIM", 8, "MODEL.ROI_BOX_HEAD.FC_DIM", 16)).train()
    with EventStorage():
        losses = model(batch([[], []]))
    assert torch.isfinite(losses["loss_mask_iou"])
    sum(losses.values()).backward()
    assert model.roi_heads.mask_head.mask_iou_head.predictor.weight.grad.abs().sum() > 0
