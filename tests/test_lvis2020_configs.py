"""The LVIS 2020 entry's per-part configs (configs/LVISv1/htc_lite_R_50_FPN_2x_seesaw_normed_mask_
<part>_rfs.yaml): each is the Seesaw HTC-Lite recipe with exactly its part's keys changed, and
the config with every part changes the union of them. (test_config.py builds every model.)"""
import pytest

from test_recipes import resolve

PREFIX = "configs/LVISv1/htc_lite_R_50_FPN_2x_seesaw_normed_mask_"
BASE = PREFIX + "rfs.yaml"
PARTS = {
    "syncbn": {"MODEL.RESNETS.NORM": "SyncBN", "MODEL.FPN.NORM": "SyncBN",
               "MODEL.ROI_BOX_HEAD.NORM": "SyncBN", "MODEL.ROI_MASK_HEAD.NORM": "SyncBN"},
    "dcnv2": {"MODEL.RESNETS.DEFORM_ON_PER_STAGE": [False, True, True, True],
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
