"""Test-time augmentation (TEST.AUG, seesaw_ecm/modeling/tta.py) on every
ROI heads class: equal to plain inference at one unflipped scale, different with flips and
scales, the per-image cap after merging, HTC-Lite's context in the mask pass, mask scoring's
scores kept. The train_net.py run is in test_train_net.py."""
import pytest
import torch
from detectron2.modeling import build_model

from seesaw_ecm.errors import SeesawEcmError
from seesaw_ecm.modeling.tta import LongTailRCNNWithTTA
from seesaw_ecm.validation import config_problems
from test_cascade import small_cfg
from test_htc_lite import batch  # two 64x64 images

CONFIGS = ["configs/Synthetic/mask_rcnn_R18_FPN_seesaw.yaml",
           "configs/Synthetic/cascade_mask_rcnn_R18_FPN_seesaw.yaml",
           "configs/Synthetic/htc_lite_R18_FPN_seesaw.yaml"]


def images():
    return [{k: v for k, v in r.items() if k != "instances"} for r in batch()]


def tta_model(config, *opts):
    cfg = small_cfg(config, "TEST.AUG.ENABLED", True, "TEST.AUG.MAX_SIZE", 200, *opts)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    return model, LongTailRCNNWithTTA(cfg, model)


def assert_same(a, b):
    assert len(a) == len(b) > 0
    torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor)
    torch.testing.assert_close(a.scores, b.scores)
    assert torch.equal(a.pred_classes, b.pred_classes)
    torch.testing.assert_close(a.pred_masks.float(), b.pred_masks.float())


@pytest.mark.parametrize("config, scoring", [(c, False) for c in CONFIGS] + [(CONFIGS[2], True)])
def test_one_unflipped_scale_is_plain_inference_and_augmentation_changes_it(config, scoring):
    """At the input's own scale without flip, TTA (box pass, merge, mask pass on the merged
    boxes) gives plain inference's detections (with mask scoring: its rescored scores); with a
    flip and two more scales the detections differ."""
    model, tta = tta_model(config, "MODEL.MASK_SCORING.ON", scoring, "MODEL.MASK_SCORING.FC_DIM",
                           16, "MODEL.MASK_SCORING.CONV_DIM", 8,
                           "TEST.AUG.MIN_SIZES", "(64,)", "TEST.AUG.FLIP", False)
    with torch.no_grad():
        plain = [model([image])[0] for image in images()]  # TTA runs each image alone
        same = tta(images())
        tta.tta_mapper.min_sizes, tta.tta_mapper.flip = (48, 96), True
        augmented = tta(images())
    for p, s, a in zip(plain, same, augmented):
        assert_same(p["instances"], s["instances"])
        assert a["instances"].pred_masks.shape[1:] == (64, 64)
    a, p = augmented[0]["instances"], plain[0]["instances"]
    assert len(a) != len(p) or not torch.allclose(a.scores, p.scores)


@pytest.mark.parametrize("config", CONFIGS)
def test_detections_capped_after_merging(config):
    """TEST.DETECTIONS_PER_IMAGE holds for the merged detections, while the augmented images
    together found more."""
    model, tta = tta_model(config, "TEST.DETECTIONS_PER_IMAGE", 3, "TEST.AUG.MIN_SIZES",
                           "(48, 64, 96)", "TEST.AUG.FLIP", True)
    found, union = [], tta._get_augmented_boxes

    def spy(*args):
        boxes, scores, classes = union(*args)
        found.append(len(boxes))
        return boxes, scores, classes

    tta._get_augmented_boxes = spy
    with torch.no_grad():
        out = tta(images())
    assert [len(o["instances"]) for o in out] == [3, 3]
    assert min(found) > 3


def test_htc_lite_mask_pass_uses_the_context():
    """The mask pass on the merged boxes (forward_with_given_boxes) computes the context of
    every augmented image and adds it: its masks change when the context is left out there."""
    model, tta = tta_model(CONFIGS[2], "TEST.AUG.MIN_SIZES", "(48, 64)", "TEST.AUG.FLIP", True)
    heads = model.roi_heads
    given, in_mask_pass, encoded = heads.forward_with_given_boxes, [False], []

    def mask_pass(features, instances):
        in_mask_pass[0] = True
        out = given(features, instances)
        in_mask_pass[0] = False
        return out

    heads.forward_with_given_boxes = mask_pass
    heads.context_encoder.register_forward_hook(
        lambda module, inputs, output: encoded.append(len(inputs[0])) if in_mask_pass[0] else None)
    with torch.no_grad():
        with_context = tta(images())
    # 4 augmented images per image, in batches of 3: 2 mask-pass batches per image
    assert encoded == [3, 1, 3, 1]
    with torch.no_grad():
        heads.forward_with_given_boxes = lambda features, instances: heads._forward_mask(
            features, instances)  # the mask pass without the context
        without = tta(images())
    for w, c in zip(without, with_context):
        torch.testing.assert_close(w["instances"].scores, c["instances"].scores)  # same boxes
    assert not torch.allclose(without[0]["instances"].pred_masks,
                              with_context[0]["instances"].pred_masks)


@pytest.mark.parametrize("opts, message", [
    (("TEST.AP_FIXED.ENABLED", True), "AP_FIXED"),
    (("TEST.AUG.MIN_SIZES", "()"), "MIN_SIZES"),
])
def test_settings_tta_cannot_serve_are_clear_errors(opts, message):
    cfg = small_cfg(CONFIGS[0], "TEST.AUG.ENABLED", True, *opts)
    assert any(message in p for p in config_problems(cfg, eval_only=True))
    with pytest.raises(SeesawEcmError, match=message):
        LongTailRCNNWithTTA(cfg, build_model(cfg))
