"""Registration and validation of LVIS-format annotation files."""
import copy
import json
import os

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from seesaw_ecm.errors import DatasetFormatError, SeesawEcmError
from seesaw_ecm.data.datasets import (
    _contiguous_negatives,
    load_lvis_format_json,
    parse_dataset_spec,
    register_from_cfg,
)

TRI = [[10.0, 10.0, 30.0, 10.0, 20.0, 30.0]]
GOOD = {
    "images": [
        {"id": 5, "height": 40, "width": 50, "coco_url": "http://x/train/000005.jpg",
         "neg_category_ids": [7], "not_exhaustive_category_ids": []},
        {"id": 6, "height": 40, "width": 50, "file_name": "sub/6.png"},
    ],
    "annotations": [
        {"id": 1, "image_id": 5, "category_id": 9, "bbox": [10, 10, 20, 20], "segmentation": TRI},
        {"id": 2, "image_id": 6, "category_id": 7, "bbox": [10, 10, 20, 20], "segmentation": TRI},
    ],
    # non-contiguous ids, out of order: mapped to contiguous 0..C-1 in id order
    "categories": [
        {"id": 9, "name": "b", "frequency": "r", "image_count": 1, "instance_count": 1},
        {"id": 7, "name": "a", "frequency": "f", "image_count": 200, "instance_count": 300},
    ],
}


def write(tmp_path, data, name="ann.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_load_maps_ids_paths_and_metadata(tmp_path):
    recs = load_lvis_format_json(write(tmp_path, GOOD), "/imgs/", "t_load")
    assert [r["file_name"] for r in recs] == ["/imgs/train/000005.jpg", "/imgs/sub/6.png"]
    assert [r["annotations"][0]["category_id"] for r in recs] == [1, 0]
    assert recs[0]["annotations"][0]["bbox_mode"] == BoxMode.XYWH_ABS
    assert recs[0]["neg_category_ids"] == [0]  # contiguous, as the category ids
    assert "neg_category_ids" not in recs[1]  # not in the file: an exhaustively annotated image
    meta = MetadataCatalog.get("t_load")
    assert meta.thing_classes == ["a", "b"]
    assert meta.thing_dataset_id_to_contiguous_id == {7: 0, 9: 1}
    assert meta.class_frequency == ["f", "r"]
    assert meta.class_instance_count == [300, 1]


def _broken(mutate):
    data = copy.deepcopy(GOOD)
    mutate(data)
    return data


@pytest.mark.parametrize(
    "data, message",
    [
        ('{"images": [', "not valid JSON"),
        ("[1, 2]", "top level is not a JSON object"),
        (_broken(lambda d: d.pop("categories")), "missing list 'categories'"),
        (_broken(lambda d: d["images"][1].pop("file_name")), "lacks file_name or coco_url"),
        (_broken(lambda d: d["annotations"][0].update(category_id=3)), "unknown category_id 3"),
        (_broken(lambda d: d["annotations"][0].update(image_id=99)), "unknown image_id 99"),
        (_broken(lambda d: d["annotations"][1].update(segmentation=[[1.0, 2.0, 3.0, 4.0]])),
         "no valid polygon"),
        (_broken(lambda d: d["annotations"][0].pop("bbox")), "annotation 1 lacks bbox"),
        (_broken(lambda d: d["images"][0].update(width=0)),
         "image 5 has width 0 and height 40; both must be positive integers"),
        (_broken(lambda d: d["images"][1].update(height=40.5)),
         "image 6 has width 50 and height 40.5; both must be positive integers"),
        (_broken(lambda d: d["images"][1].update(height="40")),
         "image 6 has width 50 and height '40'; both must be positive integers"),
        (_broken(lambda d: d["images"][0].update(neg_category_ids=[42])),
         r"unknown category ids \[42\] in 'neg_category_ids'"),
    ],
)
def test_malformed_file_gives_clear_error(tmp_path, data, message):
    path = write(tmp_path, data)
    with pytest.raises(DatasetFormatError, match=message) as e:
        load_lvis_format_json(path, "/imgs/")
    assert path in str(e.value) and "Fix the file" in str(e.value)


def test_missing_file_names_the_fix(tmp_path):
    with pytest.raises(SeesawEcmError, match="does not exist.*DATASETS.LVIS_FORMAT"):
        load_lvis_format_json(str(tmp_path / "nope.json"), "/imgs/")


def test_parse_spec():
    assert parse_dataset_spec("n=/a/b.json:/imgs/") == ("n", "/a/b.json", "/imgs/")
    for bad in ("n", "n=/a.json", "=/a.json:/i"):
        with pytest.raises(ValueError, match="NAME=JSON_FILE:IMAGE_ROOT"):
            parse_dataset_spec(bad)


def test_register_from_cfg(tmp_path):
    from detectron2.config import get_cfg

    from seesaw_ecm import add_seesaw_ecm_config

    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    path = write(tmp_path, GOOD)
    cfg.DATASETS.LVIS_FORMAT = [f"t_reg={path}:{tmp_path}/"]
    register_from_cfg(cfg)
    register_from_cfg(cfg)  # idempotent
    assert len(DatasetCatalog.get("t_reg")) == 2
    assert MetadataCatalog.get("t_reg").evaluator_type == "lvis"
    cfg.DATASETS.LVIS_FORMAT = [f"t_reg={tmp_path}/other.json:{tmp_path}/"]
    with pytest.raises(ValueError, match="already registered"):
        register_from_cfg(cfg)


def test_builtin_lvis_loaders_give_contiguous_negatives():
    """detectron2 0.6's LVIS loader keeps neg_category_ids in the file's ids: the built-in
    datasets are wrapped to map them as that loader maps category_id (id map, else id - 1)."""
    assert DatasetCatalog.data["lvis_v1_train"].contiguous_negatives
    assert DatasetCatalog.data["lvis_v0.5_val"].contiguous_negatives
    records = [{"neg_category_ids": [1, 1203]}, {"neg_category_ids": []}, {}]
    load = _contiguous_negatives("lvis_v1_val", lambda: copy.deepcopy(records))
    assert load() == [{"neg_category_ids": [0, 1202]}, {"neg_category_ids": []}, {}]
    MetadataCatalog.get("t_cocofied").set(thing_dataset_id_to_contiguous_id={5: 0, 9: 1})
    load = _contiguous_negatives("t_cocofied", lambda: [{"neg_category_ids": [9]}])
    assert load() == [{"neg_category_ids": [1]}]


def test_builtin_synthetic_sets_have_their_annotation_files_in_metadata():
    import os

    from seesaw_ecm.data.datasets import DEMO_NAMES, SYNTHETIC_NAMES, synthetic_root

    for names, folder in ((SYNTHETIC_NAMES, "synthetic_lt"), (DEMO_NAMES, "synthetic_lt_demo")):
        assert len(names) == 3
        for name, split in zip(names, ("train", "val", "holdout")):
            meta = MetadataCatalog.get(name)
            assert meta.json_file == os.path.join(
                synthetic_root(folder + ("_holdout" if split == "holdout" else "")),
                "annotations", f"lvis_v1_{split}.json")
            assert meta.evaluator_type == "lvis" and name in DatasetCatalog.list()


def test_whole_float_sizes_and_boxes_within_a_pixel_of_the_border_load(tmp_path):
    """Image sizes written as floats (40.0) and boxes up to 1 px past the border are accepted;
    1.5 px past it is refused, naming the annotation and its image."""
    data = _broken(lambda d: d["images"][0].update(height=40.0, width=50.0))
    data["annotations"][0]["bbox"] = [-1.0, 0.0, 51.0, 41.0]  # x -1 .. 50, y 0 .. 41
    assert len(load_lvis_format_json(write(tmp_path, data), "/imgs/")) == 2
    data["annotations"][0]["bbox"] = [0.0, 0.0, 51.5, 10.0]
    with pytest.raises(DatasetFormatError, match=r"1 annotation with a bbox outside its image "
                       r"\(by more than 1 px\): annotation 1 \(image 5, 50.0x40.0, "):
        load_lvis_format_json(write(tmp_path, data), "/imgs/")


def test_builtin_holdout_split_loads_from_its_own_folder(tmp_path, monkeypatch):
    from seesaw_ecm.data.datasets import _load_synthetic

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    tiny = dict(num_classes=6, train_images=40, val_images=8, image_size=64, seed=0)
    val = _load_synthetic("val", "t_tiny_val", "tiny", tiny)
    holdout = _load_synthetic("holdout", "t_tiny_holdout", "tiny", tiny)
    assert len(holdout) == len(val) == 8
    assert all(r["file_name"].startswith(str(tmp_path / "tiny_holdout" / "holdout")) and
               os.path.isfile(r["file_name"]) for r in holdout)
    assert not {r["image_id"] for r in holdout} & {r["image_id"] for r in val}
    assert MetadataCatalog.get("t_tiny_holdout").thing_classes == \
        MetadataCatalog.get("t_tiny_val").thing_classes
