"""The built-in synthetic long-tailed dataset: LVIS format, long tail, determinism, caching."""
import collections
import hashlib
import json
import os
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
from lvis import LVIS, LVISEval, LVISResults

from seesaw_ecm.data import synthetic_lt as synthetic
from seesaw_ecm.data.synthetic_lt import (
    ensure_generated,
    frequency_group,
    generate,
    generate_holdout,
    train_image_targets,
)

SMALL = dict(num_classes=10, train_images=200, val_images=40, image_size=96, seed=0)
TINY = dict(num_classes=6, train_images=40, val_images=8, image_size=64, seed=0)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth") / "small")
    paths = generate(out, **SMALL)
    return dict(paths, out=out, train=_load(paths["train_json"]), val=_load(paths["val_json"]))


def _load(path):
    with open(path) as f:
        return json.load(f)


def _present(dataset):
    present = collections.defaultdict(set)
    for a in dataset["annotations"]:
        present[a["image_id"]].add(a["category_id"])
    return present


def test_layout_and_lvis_api(small):
    assert small["image_root"] == os.path.realpath(small["out"]) + os.sep
    assert sorted(os.listdir(small["out"])) == ["annotations", "params.json", "train", "val"]
    for split in ("train", "val"):
        api = LVIS(small[f"{split}_json"])
        n = SMALL[f"{split}_images"]
        assert len(api.imgs) == n and len(os.listdir(os.path.join(small["out"], split))) == n
        assert set(api.img_ann_map) == set(api.imgs), "every image has an annotation"
        ann_ids = sorted(api.anns)
        assert ann_ids == list(range(1, len(ann_ids) + 1))
    assert not set(_present(small["train"])) & set(_present(small["val"])), "ids unique"
    cats = small["train"]["categories"]
    assert cats == small["val"]["categories"]
    assert [c["id"] for c in cats] == list(range(1, SMALL["num_classes"] + 1))
    assert len({c["name"] for c in cats}) == len(cats)
    assert all(c["synset"] == c["name"] + ".n.01" for c in cats)


def test_detectron2_loader_finds_every_image(small):
    from detectron2.data.datasets.lvis import load_lvis_json

    for split in ("train", "val"):
        records = load_lvis_json(small[f"{split}_json"], small["image_root"], None)
        assert len(records) == SMALL[f"{split}_images"]
        for r in records:
            name = f"{r['image_id']:012d}.jpg"
            assert r["file_name"] == os.path.join(small["image_root"], split, name)
            assert os.path.isfile(r["file_name"])
            assert all(0 <= o["category_id"] < SMALL["num_classes"] for o in r["annotations"])
        image = cv2.imread(records[0]["file_name"])
        assert image.shape == (SMALL["image_size"], SMALL["image_size"], 3)


def test_frequency_from_actual_train_counts(small):
    images = collections.defaultdict(set)
    instances = collections.Counter()
    for a in small["train"]["annotations"]:
        images[a["category_id"]].add(a["image_id"])
        instances[a["category_id"]] += 1
    for c in small["train"]["categories"]:
        assert c["image_count"] == len(images[c["id"]]) >= 1
        assert c["instance_count"] == instances[c["id"]] >= c["image_count"]
        n = c["image_count"]
        assert c["frequency"] == ("r" if n <= 10 else "c" if n <= 100 else "f")
    assert {c["frequency"] for c in small["train"]["categories"]} == {"r", "c", "f"}
    # the generator realizes its design exactly
    targets = train_image_targets(SMALL["num_classes"], SMALL["train_images"], SMALL["seed"])
    assert [c["image_count"] for c in small["train"]["categories"]] == targets.tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_design_populates_three_groups(seed):
    d = synthetic.DEFAULTS
    targets = train_image_targets(d["num_classes"], d["train_images"], seed)
    groups = collections.Counter(frequency_group(t) for t in targets)
    assert (groups["r"], groups["c"], groups["f"]) == (12, 23, 25)
    rare = targets[targets <= 10]
    assert rare.min() == 1 and rare.max() == 10 and len(set(rare.tolist())) >= 6, "spread over 1-10"
    assert 300 <= targets.max() <= d["train_images"]
    budget = synthetic.DISTINCT_CLASSES_PER_TRAIN_IMAGE * d["train_images"]
    assert targets.sum() == pytest.approx(budget, rel=0.01)
    # tail classes share every attribute with some head class
    attrs = synthetic.class_attributes(d["num_classes"])
    head = {v for k in np.flatnonzero(targets > 100) for v in attrs[k]}
    assert all(set(attrs[k]) <= head for k in np.flatnonzero(targets <= 10))


def test_classes_share_attributes():
    attrs = synthetic.class_attributes(60)
    assert len(set(attrs)) == 60
    for i, values in enumerate((synthetic.COLOURS, synthetic.TEXTURES, synthetic.SHAPES)):
        counts = collections.Counter(a[i] for a in attrs)
        assert set(counts) == set(values) and min(counts.values()) >= 60 // len(values) - 1


def test_polygons_boxes_areas_consistent(small):
    import pycocotools.mask as mask_util

    size = SMALL["image_size"]
    for split in ("train", "val"):
        for a in small[split]["annotations"]:
            assert a["area"] >= synthetic.MIN_VISIBLE_PX
            for poly in a["segmentation"]:
                pts = np.array(poly).reshape(-1, 2)
                assert len(poly) % 2 == 0 and len(pts) >= 3
                assert pts.min() >= 0 and pts.max() <= size
                x, y = pts[:, 0], pts[:, 1]
                assert abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) > 0
            rle = mask_util.merge(mask_util.frPyObjects(a["segmentation"], size, size))
            np.testing.assert_allclose(mask_util.toBbox(rle), a["bbox"], atol=1)
            assert 0.95 <= mask_util.area(rle) / a["area"] <= 1.25


def test_val_balanced_and_negatives(small):
    counts = collections.Counter(a["category_id"] for a in small["val"]["annotations"])
    assert len(counts) == SMALL["num_classes"]
    assert min(counts.values()) >= 15 and max(counts.values()) - min(counts.values()) <= 3
    assert any(im["not_exhaustive_category_ids"] for im in small["val"]["images"]), "for LVISEval"
    all_ids = set(range(1, SMALL["num_classes"] + 1))
    for split in ("train", "val"):
        present = _present(small[split])
        for im in small[split]["images"]:
            neg = set(im["neg_category_ids"])
            assert not neg & present[im["id"]]
            assert set(im["not_exhaustive_category_ids"]) <= present[im["id"]]
            if split == "val":
                assert neg | present[im["id"]] == all_ids


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_lvis_eval_of_ground_truth_is_perfect(small, iou_type):
    gt = LVIS(small["val_json"])
    dets = [
        {k: a[k] for k in ("image_id", "category_id", "bbox", "segmentation")} | {"score": 1.0}
        for a in gt.dataset["annotations"]
    ]
    evaluator = LVISEval(gt, LVISResults(gt, dets), iou_type)
    evaluator.run()
    for key in ("AP", "AP50", "APr", "APc", "APf"):
        assert evaluator.results[key] == pytest.approx(1.0, abs=1e-3), key
    # and a detector that always answers one fixed class does not score well
    wrong = [dict(d, category_id=1) for d in dets]
    evaluator = LVISEval(gt, LVISResults(gt, wrong), iou_type)
    evaluator.run()
    assert evaluator.results["AP"] < 0.5


def test_deterministic_per_seed(small, tmp_path):
    again = generate(str(tmp_path / "again"), **SMALL)
    for key in ("train_json", "val_json"):
        with open(small[key], "rb") as f1, open(again[key], "rb") as f2:
            assert f1.read() == f2.read()
    for split in ("train", "val"):
        names = sorted(os.listdir(os.path.join(small["out"], split)))
        for name in names[:: max(1, len(names) // 20)]:
            with open(os.path.join(small["out"], split, name), "rb") as f1, open(
                os.path.join(again["image_root"], split, name), "rb"
            ) as f2:
                assert f1.read() == f2.read(), name
    other = generate(str(tmp_path / "other"), **dict(SMALL, seed=1))
    assert _load(other["train_json"])["annotations"] != small["train"]["annotations"]


# sha256 of TINY's files as the generator wrote them before the holdout split existed: adding a
# split must leave train and val byte-identical (results on them stay comparable)
TINY_SHA256 = {
    "annotations/lvis_v1_train.json":
        "6186789570065bc5e94a9d1a60d8eea8da2e5dc4e1a36c32eb75d175457525a2",
    "annotations/lvis_v1_val.json":
        "2d8d3f350aef11901ea1078263d70ff9a453b8b813a9915e1f6295bc4f6625dd",
    "train/000000000001.jpg": "f60033a1d7580bbefee6a638a333b0e7c2658c3ca0b801c3ac5f2c9ecbb1457d",
    "val/000000000041.jpg": "3c4b6b9898fbbb764c27948bf2af3dfca0409301bedd02eaca645f0fa3acbaa9",
}


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_holdout_split_leaves_train_and_val_as_they_were(tmp_path):
    out = str(tmp_path / "set")
    paths = generate_holdout(out, **TINY)
    assert {name: _sha256(os.path.join(out, name)) for name in TINY_SHA256} == TINY_SHA256
    assert sorted(os.listdir(out)) == ["annotations", "params.json", "train", "val"]
    assert paths["image_root"] == os.path.realpath(out) + "_holdout" + os.sep
    assert _load(os.path.join(out, "params.json"))["val_images"] == TINY["val_images"]


def test_holdout_split_is_a_new_balanced_sample(small):
    paths = generate_holdout(small["out"], **SMALL)
    holdout = _load(paths["holdout_json"])
    ids = [im["id"] for im in holdout["images"]]
    n_before = SMALL["train_images"] + SMALL["val_images"]
    assert ids == list(range(n_before + 1, n_before + SMALL["val_images"] + 1))  # after val's
    assert holdout["categories"] == small["train"]["categories"]  # the train counts
    counts = collections.Counter(a["category_id"] for a in holdout["annotations"])
    assert len(counts) == SMALL["num_classes"]
    assert min(counts.values()) >= 15 and max(counts.values()) - min(counts.values()) <= 3
    present = _present(holdout)
    for im in holdout["images"]:  # every absent class verified absent, as in val
        assert set(im["neg_category_ids"]) | present[im["id"]] == set(
            range(1, SMALL["num_classes"] + 1))
    # its own scenes: neither val's annotations nor val's pixels
    shift = SMALL["val_images"]
    assert [dict(a, image_id=a["image_id"] - shift) for a in holdout["annotations"][:20]] != \
        small["val"]["annotations"][:20]
    first = f"{n_before + 1:012d}.jpg"
    assert os.path.isfile(os.path.join(paths["image_root"], "holdout", first))
    assert _sha256(os.path.join(paths["image_root"], "holdout", first)) != _sha256(
        os.path.join(small["out"], "val", f"{SMALL['train_images'] + 1:012d}.jpg"))
    # cached: a second call rebuilds nothing; another size rebuilds
    stamp = os.stat(paths["holdout_json"]).st_mtime_ns
    assert generate_holdout(small["out"], **SMALL) == paths
    assert os.stat(paths["holdout_json"]).st_mtime_ns == stamp
    fewer = generate_holdout(small["out"], holdout_images=5, **SMALL)
    assert len(_load(fewer["holdout_json"])["images"]) == 5


def test_cached_folder_is_reused(small):
    params = os.path.join(small["out"], "params.json")
    before = (os.stat(params).st_mtime_ns, os.stat(small["train_json"]).st_mtime_ns)
    start = time.perf_counter()
    paths = ensure_generated(small["out"], **SMALL)
    assert time.perf_counter() - start < 0.05
    assert paths == {k: small[k] for k in ("train_json", "val_json", "image_root")}
    assert (os.stat(params).st_mtime_ns, os.stat(small["train_json"]).st_mtime_ns) == before


def test_other_params_regenerate_atomically(tmp_path, monkeypatch):
    out = str(tmp_path / "set")
    generate(out, **TINY)
    assert _load(os.path.join(out, "params.json"))["seed"] == 0
    # a build that fails half way leaves the complete old folder untouched and no debris
    monkeypatch.setattr(synthetic, "_categories", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        ensure_generated(out, **dict(TINY, seed=1))
    assert _load(os.path.join(out, "params.json"))["seed"] == 0
    assert sorted(os.listdir(tmp_path)) == ["set", "set.lock"]
    monkeypatch.undo()
    ensure_generated(out, **dict(TINY, seed=1))
    assert _load(os.path.join(out, "params.json"))["seed"] == 1
    assert sorted(os.listdir(tmp_path)) == ["set", "set.lock"]
    with pytest.raises(TypeError):
        ensure_generated(out, force=True)


def test_failed_first_build_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "_categories", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        generate(str(tmp_path / "set"), **TINY)
    assert os.listdir(tmp_path) == ["set.lock"]


def test_foreign_folder_is_not_overwritten_but_an_empty_one_is_used(tmp_path):
    (tmp_path / "empty").mkdir()
    generate(str(tmp_path / "empty"), **TINY)
    assert os.path.isfile(tmp_path / "empty" / "params.json")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("data")
    with pytest.raises(FileExistsError):
        generate(str(tmp_path / "mine"), **TINY)
    assert (tmp_path / "mine" / "keep.txt").read_text() == "data"


_RACER = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("synthetic", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(json.dumps(module.ensure_generated(sys.argv[2], **json.loads(sys.argv[3]))))
"""


def test_concurrent_callers_share_one_complete_folder(tmp_path):
    """Two processes (like two DDP ranks) asking for the same set at once."""
    out = str(tmp_path / "set")
    args = [sys.executable, "-c", _RACER, synthetic.__file__, out, json.dumps(TINY)]
    racers = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    results = [r.communicate(timeout=120) for r in racers]
    assert [r.returncode for r in racers] == [0, 0], results
    assert json.loads(results[0][0]) == json.loads(results[1][0])
    assert sorted(os.listdir(tmp_path)) == ["set", "set.lock"]
    val = LVIS(os.path.join(out, "annotations", "lvis_v1_val.json"))
    assert len(val.imgs) == TINY["val_images"]


def test_command_line_entry(tmp_path):
    out = tmp_path / "cli"
    flags = ["--num-classes", "6", "--train-images", "40", "--val-images", "8",
             "--image-size", "64", "--seed", "3", "--out", str(out)]
    subprocess.run(
        [sys.executable, os.path.join(REPO, "datasets", "generate_synthetic.py"), *flags],
        check=True,
        capture_output=True,
        cwd=REPO,
    )
    assert _load(out / "params.json") == dict(TINY, seed=3, version=synthetic.GENERATOR_VERSION)


def test_demo_tail_design_and_its_generated_counts(tmp_path):
    d = synthetic.DEMO
    targets = train_image_targets(d["num_classes"], d["train_images"], d["seed"],
                                  rare_share=d["rare_share"], rare_images=d["rare_images"])
    rare = np.sort(targets[targets <= 10])[::-1]
    # 30 % of the 30 classes, log-spaced from 10 down to 8 training images
    assert rare.tolist() == [10, 10, 9, 9, 9, 9, 8, 8, 8]
    default = train_image_targets(d["num_classes"], d["train_images"], d["seed"])
    assert (default <= 10).sum() == 6 and default[default <= 10].min() == 1
    with pytest.raises(ValueError, match="rare_images"):
        train_image_targets(10, 200, 0, rare_images=(12, 5))
    # generated: the design is met, and only a non-default tail is written to params.json
    small = dict(SMALL, rare_share=0.3, rare_images=(10, 6))
    paths = generate(str(tmp_path / "demo"), **small)
    cats = _load(paths["train_json"])["categories"]
    assert [c["image_count"] for c in cats] == train_image_targets(
        10, 200, 0, rare_share=0.3, rare_images=(10, 6)).tolist()
    assert sorted(c["image_count"] for c in cats if c["frequency"] == "r") == [6, 8, 10]
    params = _load(os.path.join(tmp_path, "demo", "params.json"))
    assert params["rare_share"] == 0.3 and params["rare_images"] == [10, 6]
    plain = generate(str(tmp_path / "plain"), **TINY)
    assert "rare_share" not in _load(os.path.join(tmp_path, "plain", "params.json"))
    assert plain["image_root"].endswith("plain" + os.sep)
