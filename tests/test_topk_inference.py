"""Top-K-per-class inference (TEST.AP_FIXED) of every ROI head: no per-image cap, and masks
only for the detections that can be in a class' top K over the test set or in an image's top."""
import math

import pytest
import torch
from detectron2.modeling import build_model

from seesaw_ecm.modeling.topk_inference import RunningKthScore

C, K, PER_IMAGE = 3, 6, 2


@pytest.mark.parametrize("min_buffer", [1, 1 << 16])
def test_running_kth_score_equals_sorting_all_scores(min_buffer, monkeypatch):
    monkeypatch.setattr(RunningKthScore, "MIN_BUFFER", min_buffer)
    gen = torch.Generator().manual_seed(0)
    running = RunningKthScore(4, 5)
    seen_c, seen_s = [], []
    for step in range(30):
        n = int(torch.randint(0, 12, (1,), generator=gen))
        classes = torch.randint(0, 3, (n,), generator=gen)  # class 3 never occurs
        scores = torch.round(torch.rand(n, generator=gen) * 20) / 20  # ties
        running.update(classes, scores)
        seen_c.append(classes)
        seen_s.append(scores)
        running.merge()
        all_c, all_s = torch.cat(seen_c), torch.cat(seen_s)
        for c in range(4):
            mine = all_s[all_c == c].sort(descending=True).values
            expected = mine[4] if len(mine) >= 5 else float("-inf")
            assert running.threshold[c] == expected, (step, c)


def test_running_kth_score_keeps_thresholds_fresh_on_a_small_test_set():
    """The filter's use (admit what reaches the running K-th, then add it) on 40 images of
    5,000 i.i.d. detections over 60 classes, K = 126 (the synthetic set's AP-fixed): about as
    many admitted as with thresholds refreshed every image, K C (1 + ln(N M / (C K))) expected.
    With a 65,536-score buffer (the thresholds -inf for the first 14 images) 84k passed."""
    num_classes, k, num_images, per_image = 60, 126, 40, 5000
    gen = torch.Generator().manual_seed(0)
    running, admitted = RunningKthScore(num_classes, k), 0
    for _ in range(num_images):
        classes = torch.randint(0, num_classes, (per_image,), generator=gen)
        scores = torch.rand(per_image, generator=gen)
        keep = scores >= running.threshold[classes]
        admitted += int(keep.sum())
        running.update(classes[keep], scores[keep])
    fresh = k * num_classes * (1 + math.log(num_images * per_image / (num_classes * k)))
    assert admitted < 1.6 * fresh


@pytest.fixture
def small_cfg(make_cfg):
    """small_cfg(config, *opts): `config` with C classes, 30 proposals, PER_IMAGE detections."""
    return lambda config, *opts: make_cfg(
        config, "MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.NUM_CLASSES", C, "DATASETS.TRAIN", "()",
        "OUTPUT_DIR", "", "MODEL.RPN.POST_NMS_TOPK_TEST", 30, "TEST.DETECTIONS_PER_IMAGE",
        PER_IMAGE, *opts)


def _detections(out):
    """{(image, class, score, box)} of model outputs, and their masks by the same key."""
    dets, masks = set(), {}
    for i, o in enumerate(out):
        inst = o["instances"]
        for c, s, b, m in zip(inst.pred_classes.tolist(), inst.scores.tolist(),
                              inst.pred_boxes.tensor.tolist(), inst.pred_masks):
            key = (i, c, s, tuple(b))
            dets.add(key)
            masks[key] = m
    return dets, masks


CONFIGS = [("configs/Synthetic/mask_rcnn_R18_FPN_ce.yaml", "LongTailROIHeads"),
           ("configs/Synthetic/cascade_mask_rcnn_R18_FPN_seesaw.yaml", "LongTailCascadeROIHeads"),
           ("configs/Synthetic/htc_lite_R18_FPN_seesaw.yaml", "HTCLiteROIHeads")]


@pytest.mark.parametrize("config, heads", CONFIGS)
def test_heads_keep_what_ap_fixed_needs_and_mask_only_that(config, heads, monkeypatch, small_cfg):
    monkeypatch.setattr(RunningKthScore, "MIN_BUFFER", 1)  # thresholds refreshed every image
    torch.manual_seed(0)
    cfg = small_cfg(config, "TEST.AP_FIXED.ENABLED", True, "TEST.AP_FIXED.TOPK_PER_CLASS", K,
                    "MODEL.ROI_HEADS.NAME", heads)
    model = build_model(cfg)
    heads = model.roi_heads
    predictors = heads.box_predictor
    for p in predictors if isinstance(predictors, torch.nn.ModuleList) else [predictors]:
        assert p.test_topk_per_image == -1 and p.test_score_thresh == 1e-4
    images = [{"image": torch.rand(3, 64, 64) * 255, "height": 64, "width": 64}
              for _ in range(4)]
    mask_inputs = []
    mask_head_forward = heads.mask_head.forward
    heads.mask_head.forward = lambda x, instances: (
        mask_inputs.append(sum(len(i) for i in instances)), mask_head_forward(x, instances))[1]

    def infer():
        model.eval()  # restarts the running K-th scores
        with torch.no_grad():
            return [model([im])[0] for im in images]

    topk_filter = heads.topk_filter
    assert topk_filter.k == K and topk_filter.keep_per_image == PER_IMAGE
    heads.topk_filter = None  # every detection above the threshold, masks for all
    everything, all_masks = _detections(infer())
    heads.topk_filter = topk_filter
    del mask_inputs[:]
    kept, masks = _detections(infer())
    assert kept <= everything and len(kept) < len(everything) and len(everything) > 5 * PER_IMAGE
    assert sum(mask_inputs) == len(kept)  # the mask head saw only the kept detections
    for key in kept:
        assert torch.equal(masks[key], all_masks[key])
    # kept: each image's PER_IMAGE best, and each class' top K over all images
    for i in range(len(images)):
        mine = sorted((d for d in everything if d[0] == i), key=lambda d: -d[2])
        assert set(mine[:PER_IMAGE]) <= kept
    for c in range(C):
        best = sorted((d for d in everything if d[1] == c), key=lambda d: -d[2])[:K]
        assert set(best) <= kept, c
    # a second evaluation starts afresh: the same detections
    outs = infer()
    assert _detections(outs)[0] == kept
    # those flagged in_image_cap are exactly what the model returns without AP-fixed
    flagged = {(i, c, s, tuple(b)) for i, o in enumerate(outs)
               for c, s, b, f in zip(o["instances"].pred_classes.tolist(),
                                     o["instances"].scores.tolist(),
                                     o["instances"].pred_boxes.tensor.tolist(),
                                     o["instances"].in_image_cap.tolist()) if f}
    heads.topk_filter = None
    for p in predictors if isinstance(predictors, torch.nn.ModuleList) else [predictors]:
        p.test_topk_per_image = PER_IMAGE
    standard = _detections(infer())[0]
    assert flagged == standard and 0 < len(standard) <= PER_IMAGE * len(images)


def test_stock_heads_are_refused_with_the_fix_and_their_weights_fit_the_fix(small_cfg):
    """detectron2's StandardROIHeads (the CE baseline) has no top-K inference: the config
    check names LongTailROIHeads with LOSS 'ce', which loads the same weights exactly."""
    from seesaw_ecm.engine import check_lvis_metrics_config
    from seesaw_ecm.errors import SeesawEcmError

    config = "configs/Synthetic/mask_rcnn_R18_FPN_ce.yaml"
    stock = small_cfg(config, "TEST.AP_FIXED.ENABLED", True)
    assert stock.MODEL.ROI_HEADS.NAME == "StandardROIHeads"
    with pytest.raises(SeesawEcmError, match="LongTailROIHeads"):
        check_lvis_metrics_config(stock)
    fixed = small_cfg(config, "TEST.AP_FIXED.ENABLED", True,
                      "MODEL.ROI_HEADS.NAME", "LongTailROIHeads")
    check_lvis_metrics_config(fixed)
    stock.TEST.AP_FIXED.ENABLED = False
    state = build_model(stock).state_dict()
    result = build_model(fixed).load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.parametrize("config, heads", CONFIGS)
def test_heads_without_ap_fixed_have_no_filter_and_keep_the_per_image_cap(config, heads, small_cfg):
    model = build_model(small_cfg(config, "MODEL.ROI_HEADS.NAME", heads))
    assert model.roi_heads.topk_filter is None
    predictors = model.roi_heads.box_predictor
    for p in predictors if isinstance(predictors, torch.nn.ModuleList) else [predictors]:
        assert p.test_topk_per_image == PER_IMAGE
