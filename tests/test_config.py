"""Config keys and every shipped config."""
import glob
import re

import pytest
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import seesaw_ecm.config
from seesaw_ecm import add_seesaw_ecm_config

CONFIGS = sorted(glob.glob("configs/**/*.yaml", recursive=True))


def test_keys_and_defaults():
    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    lt = cfg.MODEL.LONG_TAIL
    assert (lt.LOSS, lt.CLASSIFIER, lt.TEMPERATURE, lt.OBJECTNESS) == ("ce", "auto", 20.0, False)
    assert (lt.FEDERATED.NUM_CLASSES, lt.FEDERATED.FREQ_WEIGHT_POWER) == (50, 0.5)
    assert (lt.SEESAW.P, lt.SEESAW.Q, lt.SEESAW.EPS) == (0.8, 2.0, 1e-2)
    assert lt.ECM.FG_BG_RATIO == 6.3313 and lt.ECM.STATISTIC == "instance_count"
    assert (lt.PRIOR_PROB, lt.EQL.LAMBDA_, lt.DROPLOSS.LAMBDA_) == (0.001, 0.0011, 0.00177)
    assert (lt.EQLV2.GAMMA, lt.EQLV2.MU, lt.EQLV2.ALPHA) == (12.0, 0.8, 4.0)
    assert (lt.BAGS.BIN_SPLIT, lt.BAGS.BETA, lt.TRAINABLE) == ((10, 100, 1000), 8.0, [])
    assert cfg.DATASETS.LVIS_FORMAT == [] and cfg.SOLVER.CLIP_GRADIENTS_GLOBAL_NORM == 0.0
    cascade = cfg.MODEL.CASCADE  # detectron2's cascade unless switched
    assert (cascade.MASK_PER_STAGE, cascade.STAGE_LOSS_WEIGHTS, cascade.RESAMPLE_PER_STAGE,
            cascade.TEST_SCORE) == (False, [], False, "probs")
    # detectron2 rejects unknown keys, so the keys must exist before merging a config
    bare = get_cfg()
    with pytest.raises(AssertionError, match="Non-existent key: MODEL.LONG_TAIL.LOSS"):
        bare.merge_from_list(["MODEL.LONG_TAIL.LOSS", "seesaw"])


def test_every_key_has_a_comment():
    lines = open(seesaw_ecm.config.__file__).read().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s+cfg\.[A-Z_.]+ = (?!CN\(\))", line):
            assert "#" in line or lines[i - 1].strip().startswith("#"), line


@pytest.mark.parametrize("path", CONFIGS)
def test_shipped_config_loads_and_builds(path):
    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    cfg.merge_from_file(path)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.LONG_TAIL.STATISTICS_FROM = "checkpoint"  # no LVIS on this machine
    cfg.MODEL.RESNEST.WEIGHTS = ""  # nor ImageNet weights (random initialisation)
    if "LVISv1" in path:
        assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 1203 and cfg.SOLVER.IMS_PER_BATCH == 16
        assert cfg.DATASETS.TRAIN == ("lvis_v1_train",) and cfg.TEST.DETECTIONS_PER_IMAGE == 300
        if "_rfs" in path:
            assert cfg.DATALOADER.SAMPLER_TRAIN == "RepeatFactorTrainingSampler"
            assert cfg.DATALOADER.REPEAT_THRESHOLD == 0.001
            assert cfg.DATALOADER.REPEAT_ROUNDING == "ceil"
        # the schedule is in epochs (MAX_ITER derived at start) and the file itself states it
        assert cfg.SOLVER.EPOCHS in (6, 12, 24) and len(cfg.SOLVER.EPOCH_STEPS) == 2
        text = " ".join(open(path).read().replace("#", " ").split())
        steps = cfg.SOLVER.EPOCH_STEPS
        assert f"{cfg.SOLVER.EPOCHS} epochs, lr steps at epochs {steps[0]} and {steps[1]}" in text
    if "cascade" in path:
        assert cfg.MODEL.ROI_HEADS.NAME == "LongTailCascadeROIHeads"
        assert cfg.MODEL.ROI_BOX_CASCADE_HEAD.IOUS == (0.5, 0.6, 0.7)
        mmdet = "LVISv1" in path or "_mmdet" in path  # mmdetection's cascade (MODEL.CASCADE)
        assert cfg.MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS == (
            (10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0),
            (1 / 0.033, 1 / 0.033, 1 / 0.067, 1 / 0.067) if mmdet else (30.0, 30.0, 15.0, 15.0))
        assert cfg.MODEL.CASCADE.STAGE_LOSS_WEIGHTS == ([1.0, 0.5, 0.25] if mmdet else [])
        assert cfg.MODEL.CASCADE.MASK_PER_STAGE == mmdet
        if "LVISv1" in path:
            assert cfg.MODEL.RESNETS.DEPTH == 101 and cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN == 2000
    if "htc_lite" in path:
        assert cfg.MODEL.META_ARCHITECTURE == "HTCLiteRCNN"
        assert cfg.MODEL.ROI_HEADS.NAME == "HTCLiteROIHeads"
        assert cfg.MODEL.HTC_LITE.CONTEXT and cfg.MODEL.HTC_LITE.INTERLEAVED
        assert not cfg.MODEL.CASCADE.MASK_PER_STAGE  # HTC-Lite has one mask head
        if "LVISv1" in path:  # box stages as mmdetection's cascade
            assert cfg.MODEL.CASCADE.STAGE_LOSS_WEIGHTS == [1.0, 0.5, 0.25]
            assert cfg.MODEL.CASCADE.RESAMPLE_PER_STAGE and cfg.MODEL.CASCADE.TEST_SCORE == "logits"
        assert cfg.MODEL.ROI_BOX_CASCADE_HEAD.IOUS == (0.5, 0.6, 0.7)
        if "LVISv1" in path:
            resnest = "resnest" in cfg.MODEL.BACKBONE.NAME or "resnest" in cfg.MODEL.FPG.BOTTOM_UP
            assert (f"ResNeSt_{cfg.MODEL.RESNEST.DEPTH}_" if resnest
                    else f"R_{cfg.MODEL.RESNETS.DEPTH}_") in path
    for loss in ("federated", "cosine_ce"):
        if loss in path:
            assert cfg.MODEL.LONG_TAIL.LOSS == loss
    if "ecm" in path:  # the official clip 5; the main job's cascade 35 (its config: why)
        clip = 35.0 if path == "configs/Demo/cascade_mask_rcnn_R18_FPN_ecm.yaml" else 5.0
        assert cfg.MODEL.LONG_TAIL.LOSS == "ecm" and cfg.SOLVER.CLIP_GRADIENTS_GLOBAL_NORM == clip
    if "seesaw" in path:
        assert cfg.MODEL.LONG_TAIL.LOSS == "seesaw" and cfg.MODEL.LONG_TAIL.OBJECTNESS
    model = build_model(cfg)
    assert model.roi_heads.num_classes == cfg.MODEL.ROI_HEADS.NUM_CLASSES
    if "cascade" in path or "htc_lite" in path:
        assert len(model.roi_heads.box_predictor) == 3
