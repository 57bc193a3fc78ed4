"""The LVIS 2020 entry's per-part configs (configs/LVISv1/htc_lite_R_50_FPN_2x_seesaw_normed_mask_
<part>_rfs.yaml): each is the Seesaw HTC-Lite recipe with exactly its part's keys changed, and
the config with every part changes the union of them, and the full entry recipe adds exactly the
second issue's parts. (test_config.py builds every model.)"""
import glob
import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from test_cascade import small_cfg
from test_htc_lite import batch
from test_recipes import resolve
from test_resnest import _live

PREFIX = "configs/LVISv1/htc_lite_R_50_FPN_2x_seesaw_normed_mask_"
BASE = PREFIX + "rfs.yaml"
PARTS = {
    "syncbn": {"MODEL.RESNETS.NORM": "SyncBN", "MODEL.FPN.NORM": "SyncBN",
               "MODEL.ROI_BOX_HEAD.NORM": "SyncBN", "MODEL.ROI_MASK_HEAD.NORM": "SyncBN"},
    "dcnv2": {"MODEL.BACKBONE.NAME": "build_resnet_fpn_dcn_backbone",
              "MODEL.RESNETS.DEFORM_ON_PER_STAGE": [False, True, True, True],
              "MODEL.RESNETS.DEFORM_MODULATED": True},
    "carafe": {"MODEL.BACKBONE.NAME": "build_resnet_fpn_carafe_backbone",
               "MODEL.CARAFE.MASK_HEAD": True},
    "mask_scoring": {"MODEL.MASK_SCORING.ON": True},
    "train_aug": {"INPUT.LONG_EDGE_TRAIN": (768, 1792), "INPUT.CROP.ENABLED": True,
                  "INPUT.CROP.TYPE": "absolute", "INPUT.CROP.SIZE": (1280, 1280),
                  "INPUT.CROP_AFTER_RESIZE": True},
    "instaboost": {"INPUT.INSTABOOST.ENABLED": True},
    "tta": {"TEST.AUG.ENABLED": True, "TEST.AUG.MIN_SIZES": (900, 1050, 1200, 1350, 1500),
            "TEST.AUG.MAX_SIZE": 2000},  # TEST.AUG.FLIP: True by default
}


def flat(node, prefix=""):
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def changes(path):
    base, cfg = flat(resolve(BASE)), flat(resolve(path))
    return {k: v for k, v in cfg.items() if base[k] != v}


def expected(*parts):
    return {k: list(v) if isinstance(v, tuple) else v
            for part in parts for k, v in PARTS[part].items()}


@pytest.mark.parametrize("part", PARTS)
def test_each_part_config_changes_its_part_only(part):
    assert changes(f"{PREFIX}{part}_rfs.yaml") == expected(part)


def test_the_config_with_every_part():
    assert changes(PREFIX + "lvis2020_parts_rfs.yaml") == expected(*PARTS)


ENTRY = "configs/LVISv1/htc_lite_ResNeSt_200_FPG_2x_seesaw_normed_mask_lvis2020_entry_rfs.yaml"


def test_the_full_entry_recipe_is_every_part_plus_resnest_fpg_and_tsd():
    parts, entry = flat(resolve(PREFIX + "lvis2020_parts_rfs.yaml")), flat(resolve(ENTRY))
    added = {k: v for k, v in entry.items() if parts[k] != v}
    assert added == {
        "MODEL.WEIGHTS": "",  # the backbone's ImageNet weights: MODEL.RESNEST.WEIGHTS
        "MODEL.BACKBONE.NAME": "build_fpg_backbone",
        "MODEL.FPG.BOTTOM_UP": "build_resnest_backbone",
        "MODEL.FPG.NORM": "SyncBN", "MODEL.RESNEST.DEPTH": 200, "MODEL.RESNEST.NORM": "SyncBN",
        "MODEL.RESNEST.DEFORM_ON_PER_STAGE": [False, True, True, True],
        "MODEL.RESNEST.WEIGHTS": "pretrained/resnest200e.safetensors",
        "MODEL.TSD.ENABLED": True, "INPUT.FORMAT": "RGB",
        "MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53], "MODEL.PIXEL_STD": [58.395, 57.12, 57.375],
    }
    # the first issue's parts are all still on, CARAFE in the mask head only (FPG has no FPN)
    for key, value in expected(*(p for p in PARTS if p != "carafe")).items():
        assert entry[key] == value or key == "MODEL.BACKBONE.NAME", key
    assert entry["MODEL.CARAFE.MASK_HEAD"] and entry["MODEL.LONG_TAIL.LOSS"] == "seesaw"
    header = open(ENTRY).read()
    for gain in ("+2.9", "+0.5", "+1.6", "+6.9", "+2.5", "+1.5", "+2.6", "fine-tune"):
        assert gain in header, gain


def test_the_full_entry_model_trains_and_infers_at_toy_scale():
    """Every part of the entry recipe together (ResNeSt with DCNv2, FPG, HTC-Lite with TSD in
    every stage, mask scoring, CARAFE mask head, Seesaw), shrunk to a toy size: one training
    step reaches every part's parameters, and inference gives mask-scored detections."""
    cfg = small_cfg(ENTRY, "MODEL.RESNEST.DEPTH", 14, "MODEL.RESNEST.WEIGHTS", "",
                    "MODEL.FPG.OUT_CHANNELS", 32, "MODEL.FPG.STACK_TIMES", 5,
                    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 64,
                    "MODEL.RPN.POST_NMS_TOPK_TEST", 32, "TEST.DETECTIONS_PER_IMAGE", 10,
                    "TEST.AUG.ENABLED", False, "MODEL.BACKBONE.FREEZE_AT", 0)
    torch.manual_seed(0)
    model = build_model(cfg)
    _live(model.backbone)  # timm starts each block's last BN scale at 0: no gradient before it
    model.train()
    with EventStorage():
        losses = model(batch())
    for name in ("loss_pc_cls_stage2", "loss_pc_loc_stage0", "loss_cls_sibling_stage1",
                 "loss_mask_iou", "loss_context", "loss_mask"):  # TSD, mask scoring, HTC-Lite
        assert torch.isfinite(losses[name]), name
    sum(losses.values()).backward()
    named = dict(model.named_parameters())
    for part in ("bottom_up.body.layer3.0.conv2.conv.conv_offset.",  # DCNv2 in ResNeSt
                 "backbone.stacks.", "roi_heads.box_predictor.2.cls_tower.",  # FPG, TSD
                 "roi_heads.mask_head.mask_head.deconv.content_encoder.",  # CARAFE
                 "roi_heads.mask_head.mask_iou_head.", "roi_heads.context_encoder."):
        params = [p for n, p in named.items() if part in n]
        assert params and any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), part
    model.eval()
    with torch.no_grad():
        out = model(batch())[0]["instances"]
    assert len(out) <= 10 and out.has("pred_masks") and torch.isfinite(out.scores).all()


DEMO = "configs/Demo/htc_lite_R18_FPN_seesaw.yaml"
DEMO_ROWS = {  # configs/Demo/LVIS2020/ ablation rows -> the keys each changes on DEMO
    "htc_lite_R18_FPN_seesaw_mask_scoring": {"MODEL.MASK_SCORING.ON": True},
    "htc_lite_R18_FPN_seesaw_carafe": PARTS["carafe"],
    "htc_lite_R18_FPN_seesaw_train_aug": {
        "INPUT.LONG_EDGE_TRAIN": (55, 129), "INPUT.CROP.ENABLED": True,
        "INPUT.CROP.TYPE": "absolute", "INPUT.CROP.SIZE": (92, 92),
        "INPUT.CROP_AFTER_RESIZE": True},
    "htc_lite_R18_FPN_seesaw_instaboost": PARTS["instaboost"],
    "htc_lite_R18_FPN_seesaw_tta": {"TEST.AUG.ENABLED": True, "TEST.AUG.MIN_SIZES": (108, 144),
                                    "TEST.AUG.MAX_SIZE": 144},
    "htc_lite_R18_FPN_seesaw_syncbn": {k: v for k, v in PARTS["syncbn"].items()
                                       if "BOX_HEAD" not in k},  # the box head has FCs only
    "htc_lite_R18_FPN_seesaw_tsd": {"MODEL.TSD.ENABLED": True},
    "htc_lite_R18_FPG_seesaw": {"MODEL.BACKBONE.NAME": "build_fpg_backbone",
                                "MODEL.FPG.OUT_CHANNELS": 64},
    "htc_lite_ResNeSt_14_FPN_seesaw": {"MODEL.BACKBONE.NAME": "build_resnest_fpn_backbone",
                                       "MODEL.RESNEST.DEPTH": 14, "MODEL.RESNEST.NORM": "BN"},
}
DEMO_ROWS["htc_lite_ResNeSt_14_FPN_seesaw_dcnv2"] = dict(
    DEMO_ROWS["htc_lite_ResNeSt_14_FPN_seesaw"],
    **{"MODEL.RESNEST.DEFORM_ON_PER_STAGE": [False, True, True, True]})


@pytest.mark.parametrize("row", DEMO_ROWS)
def test_each_demo_ablation_row_changes_its_part_only(row):
    """The built-in set's ablation rows (docs/LVIS2020.md): each is the demo HTC-Lite Seesaw
    config with exactly its part's keys (and its own OUTPUT_DIR)."""
    base, cfg = flat(resolve(DEMO)), flat(resolve(f"configs/Demo/LVIS2020/{row}.yaml"))
    changed = {k: v for k, v in cfg.items() if base[k] != v and k != "OUTPUT_DIR"}
    assert changed == {k: list(v) if isinstance(v, tuple) else v
                       for k, v in DEMO_ROWS[row].items()}
    assert {os.path.basename(p)[:-5] for p in glob.glob("configs/Demo/LVIS2020/*.yaml")} == set(
        DEMO_ROWS)
