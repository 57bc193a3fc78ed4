"""The cascade's MODEL.CASCADE switches (detectron2's vs mmdetection's cascade), each checked to
change what it claims to change, in LongTailCascadeROIHeads and in HTC-Lite's box stages; the
cascade RPN settings. The mmdetection-cascade configs' training runs are in test_train_net.py."""
import re

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.events import EventStorage
from torch.nn import functional as F

from seesaw_ecm import add_seesaw_ecm_config
from seesaw_ecm.errors import SeesawEcmError
from seesaw_ecm.validation import config_problems
from test_htc_lite import batch  # two 64x64 images with 2 and 1 objects (box-shaped masks)

C = 4
CASCADE = "configs/Synthetic/cascade_mask_rcnn_R18_FPN_seesaw.yaml"
MMDET = "configs/Synthetic/cascade_mask_rcnn_R18_FPN_seesaw_mmdet.yaml"
HTC = "configs/Synthetic/htc_lite_R18_FPN_seesaw.yaml"
WEIGHTS = [1.0, 0.5, 0.25]


def small_cfg(config=MMDET, *opts):
    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    cfg.merge_from_file(config)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.NUM_CLASSES", C,
                         "DATASETS.TRAIN", "()", "OUTPUT_DIR", "",
                         "MODEL.LONG_TAIL.STATISTICS_FROM", "checkpoint", *opts])
    return cfg


def build(config=MMDET, *opts, seed=0):
    cfg = small_cfg(config, *opts)
    torch.manual_seed(seed)
    return build_model(cfg)


def train_forward(model, seed=0):
    """Training losses of one forward (sampling seeded), with the RoIs of every box stage."""
    heads = model.roi_heads
    stage_rois = []
    run_stage = heads._run_stage

    def recording(features, proposals, stage, *args):
        # copies: HTC-Lite later swaps the last stage's boxes for the refined ones
        stage_rois.append([Instances(p.image_size, **p.get_fields()) for p in proposals])
        return run_stage(features, proposals, stage, *args)

    heads._run_stage = recording
    model.train()
    torch.manual_seed(seed)
    with EventStorage():
        losses = model(batch())
    del heads._run_stage
    return losses, stage_rois


def test_defaults_are_detectron2s_cascade():
    heads = build(CASCADE).roi_heads
    assert not heads.mask_per_stage and not heads.resample_per_stage
    assert heads.stage_loss_weights == [1.0] * 3 and heads.box_grad_scale == 1 / 3
    assert heads.test_score == "probs" and not isinstance(heads.mask_head, torch.nn.ModuleList)


@pytest.mark.parametrize("per_stage, resample", [(True, True), (True, False), (False, True)])
def test_mask_heads_trained_on_their_stages_rois(per_stage, resample):
    model = build(MMDET, "MODEL.CASCADE.MASK_PER_STAGE", per_stage,
                  "MODEL.CASCADE.RESAMPLE_PER_STAGE", resample)
    heads = model.roi_heads
    mask_heads = list(heads.mask_head) if per_stage else [heads.mask_head]
    assert len(mask_heads) == (3 if per_stage else 1)
    seen = []
    hooks = [h.register_forward_pre_hook(lambda m, args: seen.append((m, args[1])))
             for h in mask_heads]
    losses, stage_rois = train_forward(model)
    for h in hooks:
        h.remove()
    names = [f"loss_mask_stage{k}" for k in range(3)] if per_stage else ["loss_mask"]
    assert [k for k in losses if k.startswith("loss_mask")] == names
    sum(losses.values()).backward()
    trained = [h for h in heads.modules() if hasattr(h, "predictor") and h.predictor.weight.grad
               is not None and h.predictor.weight.grad.abs().sum() > 0]
    assert len(trained) == len(mask_heads)
    # head k saw exactly the foreground RoIs of box stage k, with that stage's boxes
    assert [m for m, _ in seen] == mask_heads
    for k, (_, instances) in enumerate(seen):
        for inst, rois in zip(instances, stage_rois[k]):
            fg = rois.proposal_boxes.tensor[rois.gt_classes < C]
            assert len(fg) > 0 and torch.equal(inst.proposal_boxes.tensor, fg)
            assert len(inst.gt_masks) == len(fg)


@pytest.mark.parametrize("config", [MMDET, HTC])
def test_stage_loss_weights_scale_each_stages_losses(config):
    opts = ["MODEL.CASCADE.RESAMPLE_PER_STAGE", True]
    ones, _ = train_forward(build(config, *opts, "MODEL.CASCADE.STAGE_LOSS_WEIGHTS", [1.0] * 3))
    weighted, _ = train_forward(build(config, *opts, "MODEL.CASCADE.STAGE_LOSS_WEIGHTS", WEIGHTS))
    assert set(ones) == set(weighted)
    staged = [k for k in ones if "_stage" in k]
    assert len(staged) == (12 if config == MMDET else 9)  # cls, objectness, box (, mask) x 3
    for key in staged:
        w = WEIGHTS[int(key[-1])]
        torch.testing.assert_close(weighted[key], w * ones[key], rtol=1e-5, atol=0)
    for key in set(ones) - set(staged):  # RPN, HTC-Lite's one mask head and context
        torch.testing.assert_close(weighted[key], ones[key])


@pytest.mark.parametrize("config", [CASCADE, HTC])
def test_gradient_scaling_only_without_stage_weights(config):
    """detectron2 scales the gradient into the pooled features by 1 / 3; mmdetection's weights
    replace that: with weights [1, 1, 1] the box losses are the same and the backbone gets 3x
    the gradient from them."""
    grads = []
    for opts in ([], ["MODEL.CASCADE.STAGE_LOSS_WEIGHTS", [1.0] * 3]):
        model = build(config, *opts)
        losses, _ = train_forward(model)
        sum(v for k, v in losses.items() if "_stage" in k).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.backbone.parameters()
                                if p.grad is not None]))
    assert grads[0].abs().sum() > 0
    # float sums in another order: compare at the scale of the gradient
    torch.testing.assert_close(grads[1], 3 * grads[0], rtol=1e-3,
                               atol=1e-3 * grads[0].abs().max().item())


def test_box_loss_is_smooth_l1_with_the_configured_beta():
    model = build(MMDET)
    assert model.proposal_generator.smooth_l1_beta == 1 / 9
    assert model.proposal_generator.anchor_boundary_thresh == 0
    for predictor in model.roi_heads.box_predictor:
        assert predictor.smooth_l1_beta == 1.0
        # one foreground RoI; regression error 0.5 per coordinate (L1 would give 4 x 0.5)
        box = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
        target = predictor.box2box_transform.get_deltas(box, box + 2)
        loss = predictor.box_reg_loss(box, box + 2, target + 0.5, torch.tensor([0]))
        torch.testing.assert_close(loss, torch.tensor(4 * 0.5 * 0.5 ** 2 / 1.0))
    weights = [p.box2box_transform.weights for p in model.roi_heads.box_predictor]
    stds = [(0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067)]
    assert weights == [tuple(1 / s for s in std) for std in stds]


def expected_sample_count(rois, targets, iou, batch_size=64, fraction=0.25):
    """How many RoIs detectron2's sampler keeps out of `rois` (gt included) at `iou`."""
    positive = pairwise_iou(targets.gt_boxes, rois).max(dim=0).values >= iou
    n_pos = min(int(positive.sum()), int(batch_size * fraction))
    return n_pos + min(int((~positive).sum()), batch_size - n_pos)


@pytest.mark.parametrize("config", [MMDET, HTC])
def test_resampling_changes_the_later_stages_rois(config):
    targets = [x["instances"] for x in batch()]
    _, relabelled = train_forward(build(config, "MODEL.CASCADE.RESAMPLE_PER_STAGE", False))
    _, resampled = train_forward(build(config, "MODEL.CASCADE.RESAMPLE_PER_STAGE", True))
    for stage, iou in ((1, 0.6), (2, 0.7)):
        for i, gt in enumerate(targets):
            prev, rois = resampled[stage - 1][i], resampled[stage][i]
            # the previous stage's RoIs without its gt ones, plus the gt again, then sampled
            candidates = Boxes.cat([Boxes(prev.proposal_boxes.tensor[~prev.from_gt]), gt.gt_boxes])
            expected = expected_sample_count(candidates, gt, iou)
            assert len(rois) == expected == 64
            assert sorted(rois.proposal_boxes.tensor[rois.from_gt].tolist()) == sorted(
                gt.gt_boxes.tensor.tolist())
            # detectron2: stage 1's RoIs (gt ones included), refined: no exact gt box left
            same = relabelled[stage][i]
            assert len(same) == len(relabelled[0][i]) and not same.has("from_gt")
            exact = (same.proposal_boxes.tensor[:, None] == gt.gt_boxes.tensor[None]).all(-1)
            assert not exact.any()


def seesaw_scores(logits):
    """Official Seesaw activation of (R, C + 2) logits: softmax over C x objectness p_fg."""
    return F.softmax(logits[:, :C], dim=1) * F.softmax(logits[:, C:], dim=1)[:, :1]


def ecm_scores(logits):
    """ECM activation of (R, C + 1) logits: sigmoid(z_c) x (1 - sigmoid(z_bg))."""
    return logits[:, :C].sigmoid() * (1 - logits[:, C:].sigmoid())


def ce_scores(logits):
    return F.softmax(logits, dim=1)[:, :C]


@pytest.mark.parametrize("config, loss, objectness, activation", [
    (MMDET, "seesaw", True, seesaw_scores), (MMDET, "ecm", False, ecm_scores),
    (MMDET, "ce", False, ce_scores), (HTC, "seesaw", True, seesaw_scores)])
def test_test_scores_are_the_activation_of_the_mean_logits(config, loss, objectness, activation):
    outputs = {}
    for mode in ("logits", "probs"):
        model = build(config, "MODEL.LONG_TAIL.LOSS", loss, "MODEL.LONG_TAIL.OBJECTNESS",
                      objectness, "MODEL.CASCADE.TEST_SCORE", mode,
                      "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0).eval()
        raw = []
        hooks = [p.register_forward_hook(lambda m, i, o: raw.append(o[0]))
                 for p in model.roi_heads.box_predictor]
        with torch.no_grad():
            instances = model(batch()[:1])[0]["instances"]
        for h in hooks:
            h.remove()
        assert len(raw) == 3 and len(instances) > 0
        outputs[mode] = raw, instances.scores
    raw, scores = outputs["logits"]
    of_mean_logits = activation(sum(raw) / 3).flatten()
    mean_of_probs = (sum(activation(r) for r in raw) / 3).flatten()
    for score in scores:  # every output score is one of the averaged-logit class scores
        assert torch.isclose(of_mean_logits, score, rtol=1e-5, atol=1e-7).any()
    assert not torch.allclose(of_mean_logits, mean_of_probs, rtol=1e-3)
    # the "probs" run on the same weights keeps detectron2's mean of probabilities
    for score in outputs["probs"][1]:
        assert torch.isclose(mean_of_probs, score, rtol=1e-5, atol=1e-7).any()


def test_masks_at_test_are_the_mean_of_every_heads_sigmoid():
    model = build(MMDET).eval()
    heads = model.roi_heads
    logits = []
    hooks = [h.predictor.register_forward_hook(lambda m, i, o: logits.append(o))
             for h in heads.mask_head]
    with torch.no_grad():
        instances = model.inference(batch()[:1], do_postprocess=False)[0]
    for h in hooks:
        h.remove()
    assert len(logits) == 3 and len(instances) > 0
    rows = torch.arange(len(instances))
    expected = sum(x[rows, instances.pred_classes].sigmoid() for x in logits) / 3
    torch.testing.assert_close(instances.pred_masks[:, 0], expected)


@pytest.mark.parametrize("thresh", [0, -1])
def test_rpn_ignores_border_anchors_only_with_a_boundary_threshold(thresh):
    model = build(MMDET, "MODEL.RPN.BOUNDARY_THRESH", thresh)
    rpn = model.proposal_generator
    images = model.preprocess_image(batch())
    features = model.backbone(images.tensor)
    anchors = rpn.anchor_generator([features[f] for f in rpn.in_features])
    targets = [x["instances"] for x in batch()]
    torch.manual_seed(0)
    labels, _ = rpn.label_and_sample_anchors(anchors, targets)
    boxes = Boxes.cat(anchors).tensor
    h, w = targets[0].image_size
    crossing = (boxes[:, 0] < 0) | (boxes[:, 1] < 0) | (boxes[:, 2] >= w) | (boxes[:, 3] >= h)
    assert crossing.any() and (~crossing).any()
    for label in labels:
        if thresh == 0:
            assert (label[crossing] == -1).all() and (label[~crossing] >= 0).any()
        else:
            assert (label[crossing] >= 0).any()


@pytest.mark.parametrize("config, opts, message", [
    (MMDET, ("MODEL.CASCADE.STAGE_LOSS_WEIGHTS", [1.0, 0.5]), "one weight per stage (3"),
    (MMDET, ("MODEL.CASCADE.TEST_SCORE", "mean"), "MODEL.CASCADE.TEST_SCORE 'mean': valid"),
    (HTC, ("MODEL.CASCADE.MASK_PER_STAGE", True), "HTCLiteROIHeads has one mask head")])
def test_invalid_switches_are_clear_before_building(config, opts, message):
    cfg = small_cfg(config, *opts)
    problems = config_problems(cfg, eval_only=True)  # train_net's validation pass
    assert len(problems) == 1 and message in problems[0], problems
    with pytest.raises(SeesawEcmError, match=re.escape(message)):
        build_model(cfg)
