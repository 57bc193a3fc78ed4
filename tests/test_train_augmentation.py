"""The LVIS 2020 entry's training augmentation in the training mapper: resize by the longer edge,
random crop after it with boxes and masks recomputed (against a computation written here), and
InstaBoost (PyPI instaboostfast)."""
import sys

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.structures import BitMasks, BoxMode
from PIL import Image

from seesaw_ecm import add_seesaw_ecm_config
from seesaw_ecm.data.augmentation import ResizeLongestEdge
from seesaw_ecm.data.instaboost import InstaBoost, mask_to_polygons
from seesaw_ecm.data.mapper import CheckedDatasetMapper
from seesaw_ecm.errors import SeesawEcmError
from seesaw_ecm.validation import config_problems

W, H = 100, 80
# a triangle (its box is not tight once a crop cuts it diagonally) and a rectangle
POLYGONS = [[10.0, 10.0, 90.0, 10.0, 10.0, 70.0], [60.0, 40.0, 95.0, 40.0, 95.0, 75.0, 60.0, 75.0]]


def cfg_with(*opts):
    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    cfg.merge_from_list(["MODEL.MASK_ON", True, "INPUT.RANDOM_FLIP", "none", *opts])
    return cfg


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 60, (H, W, 3), dtype=np.uint8)
    for k, poly in enumerate(POLYGONS):
        rle = mask_util.frPyObjects([poly], H, W)
        image[mask_util.decode(mask_util.merge(rle)).astype(bool)] = (200, 120 + 60 * k, 40)
    path = tmp_path_factory.mktemp("aug") / "image.png"
    Image.fromarray(image).save(path)
    anns = [{"bbox": list(mask_util.toBbox(mask_util.merge(mask_util.frPyObjects([p], H, W)))),
             "bbox_mode": BoxMode.XYWH_ABS, "segmentation": [p], "category_id": k, "iscrowd": 0}
            for k, p in enumerate(POLYGONS)]
    return {"file_name": str(path), "height": H, "width": W, "image_id": 1, "annotations": anns}


def rasterize(polygons, h, w):
    return mask_util.decode(mask_util.merge(mask_util.frPyObjects(polygons, h, w))).astype(bool)


def tight_box(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


def test_longest_edge_drawn_from_the_range_aspect_kept():
    aug = ResizeLongestEdge(150, 170)
    np.random.seed(0)
    for h, w in [(80, 100), (300, 120), (64, 64)]:
        tfm = aug.get_transform(np.zeros((h, w, 3), np.uint8))
        assert 150 <= max(tfm.new_h, tfm.new_w) <= 170
        assert abs(tfm.new_h / tfm.new_w - h / w) < 0.02


def test_crop_after_resize_recomputes_boxes_and_masks(record):
    """Long edge drawn from [150, 170], then a 64 x 64 crop: the masks are the resized polygons
    rasterized and cropped, the boxes their tight boxes (not the cropped original boxes)."""
    mapper = CheckedDatasetMapper(cfg_with(
        "INPUT.LONG_EDGE_TRAIN", (150, 170), "INPUT.CROP.ENABLED", True, "INPUT.CROP.TYPE",
        "absolute", "INPUT.CROP.SIZE", (64, 64), "INPUT.CROP_AFTER_RESIZE", True), True)
    for seed in range(3):
        np.random.seed(seed)
        out = mapper(record)
        np.random.seed(seed)  # the same draws, in the augmentations' order: length, crop corner
        length = np.random.randint(150, 171)
        new_h, new_w = int(H * length / W + 0.5), length
        y0, x0 = np.random.randint(new_h - 64 + 1), np.random.randint(new_w - 64 + 1)
        assert out["image"].shape == (3, 64, 64)
        inst = out["instances"]
        masks = BitMasks.from_polygon_masks(inst.gt_masks, 64, 64).tensor.numpy()
        kept = 0
        for k, poly in enumerate(POLYGONS):
            scaled = np.array(poly) * np.tile([new_w / W, new_h / H], 3 if k == 0 else 4)
            expected = rasterize([list(scaled)], new_h, new_w)[y0:y0 + 64, x0:x0 + 64]
            if expected.sum() < 4:
                continue
            i = kept
            kept += 1
            assert inst.gt_classes[i] == k
            iou = (masks[i] & expected).sum() / (masks[i] | expected).sum()
            assert iou > 0.9, (seed, k, iou)
            np.testing.assert_allclose(inst.gt_boxes.tensor[i].numpy(), tight_box(expected),
                                       atol=1.5)
        assert kept == len(inst) > 0


def test_crop_position_is_the_switch(record):
    """The same crop before the resize (detectron2's order) gives an image whose long edge is
    the drawn length, not the crop size."""
    opts = ("INPUT.LONG_EDGE_TRAIN", (150, 150), "INPUT.CROP.ENABLED", True, "INPUT.CROP.TYPE",
            "absolute", "INPUT.CROP.SIZE", (64, 64))
    np.random.seed(0)
    before = CheckedDatasetMapper(cfg_with(*opts), True)(record)["image"]
    after = CheckedDatasetMapper(cfg_with(*opts, "INPUT.CROP_AFTER_RESIZE", True), True)(record)
    assert max(before.shape[1:]) == 150 and after["image"].shape[1:] == (64, 64)


def test_instaboost_changes_the_sample_and_keeps_masks_and_boxes_consistent(record):
    size = ("INPUT.MIN_SIZE_TRAIN", (H,), "INPUT.MAX_SIZE_TRAIN", W)  # no resize
    plain = CheckedDatasetMapper(cfg_with(*size), True)
    boosted = CheckedDatasetMapper(cfg_with(
        *size, "INPUT.INSTABOOST.ENABLED", True, "INPUT.INSTABOOST.AUG_RATIO", 1.0,
        "INPUT.INSTABOOST.COLOR_PROB", 0.0, "INPUT.INSTABOOST.DX", 10.0,
        "INPUT.INSTABOOST.DY", 10.0), True)
    assert isinstance(boosted.instaboost, InstaBoost) and plain.instaboost is None
    changed = 0
    for seed in range(3):
        np.random.seed(seed)
        a = plain(record)
        np.random.seed(seed)
        b = boosted(record)
        inst = b["instances"]
        assert b["image"].shape == a["image"].shape and len(inst) > 0
        masks = BitMasks.from_polygon_masks(inst.gt_masks, *inst.image_size).tensor.numpy()
        for mask, box in zip(masks, inst.gt_boxes.tensor.numpy()):
            np.testing.assert_allclose(box, tight_box(mask), atol=1.5)
        changed += not (torch.equal(a["image"], b["image"])
                        and torch.allclose(a["instances"].gt_boxes.tensor, inst.gt_boxes.tensor))
    assert changed >= 2


def test_polygons_of_a_mask_in_parts():
    """instaboostfast's own polygon step raises on numpy >= 1.24 for a mask in two parts of
    different sizes; the replacement gives one polygon per part, rasterizing back to the mask."""
    from instaboostfast import pycococreater
    mask = np.zeros((20, 30), np.uint8)
    mask[2:5, 2:5] = 1
    mask[8:18, 10:27] = 1
    if np.lib.NumpyVersion(np.__version__) >= "1.24.0":
        with pytest.raises(ValueError):
            pycococreater.binary_mask_to_polygon(mask)
    polygons = mask_to_polygons(mask)
    assert len(polygons) == 2
    back = rasterize(polygons, 20, 30)
    assert (back & mask.astype(bool)).sum() / (back | mask.astype(bool)).sum() > 0.8


def test_instaboost_leaves_rle_masks_alone(record):
    boost = InstaBoost(aug_ratio=1.0)
    image = np.zeros((H, W, 3), np.uint8)
    rle = [dict(a, segmentation={"size": [H, W], "counts": "0"}) for a in record["annotations"]]
    assert boost(image, rle) == (image, rle)


def test_missing_package_and_bad_settings_are_clear_errors(monkeypatch):
    monkeypatch.setitem(sys.modules, "instaboostfast", None)  # import fails
    cfg = cfg_with("INPUT.INSTABOOST.ENABLED", True)
    with pytest.raises(SeesawEcmError, match="instaboostfast"):
        CheckedDatasetMapper(cfg, True)
    assert any("instaboostfast" in p for p in config_problems(cfg))
    for opts, message in [(("INPUT.LONG_EDGE_TRAIN", (900, 700)), "LONG_EDGE_TRAIN"),
                          (("INPUT.CROP_AFTER_RESIZE", True), "CROP.ENABLED")]:
        assert any(message in p for p in config_problems(cfg_with(*opts)))
