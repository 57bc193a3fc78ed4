"""Open Images: the official metric (against a loop re-implementation of the official rules),
the hierarchy expansion (against a re-implementation of the current official tool, on its own
test case and random DAG hierarchies), the loader, class statistics,
the synthetic set and the evaluator."""
import json
import os
import re

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances

from seesaw_ecm import add_seesaw_ecm_config
from seesaw_ecm.data import openimages
from seesaw_ecm.data.openimages_hierarchy import LabelHierarchy
from seesaw_ecm.data.statistics import count_classes
from seesaw_ecm.errors import SeesawEcmError
from seesaw_ecm.evaluation.openimages_fast import (OpenImagesEvalResult, OpenImagesGroundTruth,
                                                   OpenImagesMatcher, OpenImagesRecords,
                                                   evaluate)

from benchmarks.openimages_reference import official_expansion, reference_ap

# ---------------------------------------------------------------- random problems

NUM_CLASSES = 12
MIDS = [f"/m/c{k}" for k in range(NUM_CLASSES)]
# root -> 8 (-> 0, 1, 9 (-> 2, 3)), 10 (-> 4, 9 (-> 2, 3)), 11 (-> 5, 6); 7 not in the tree.
# Class 9 sits under 8 and 10: 2 and 3 reach 9 by two paths and get it once (the current
# official tool's ancestor sets).
TREE = {"LabelName": "/m/root", "Subcategory": [
    {"LabelName": "/m/c8", "Subcategory": [
        {"LabelName": "/m/c0"}, {"LabelName": "/m/c1"},
        {"LabelName": "/m/c9", "Subcategory": [{"LabelName": "/m/c2"}, {"LabelName": "/m/c3"}]}]},
    {"LabelName": "/m/c10", "Subcategory": [
        {"LabelName": "/m/c4"},
        {"LabelName": "/m/c9", "Subcategory": [{"LabelName": "/m/c2"}, {"LabelName": "/m/c3"}]}]},
    {"LabelName": "/m/c11", "Subcategory": [{"LabelName": "/m/c5"}, {"LabelName": "/m/c6"}]}]}


LEAVES = (0, 1, 2, 3, 4, 5, 7)  # class 6 has no ground truth: AP NaN


def _box(rng, size=100.0):
    x0, y0 = rng.uniform(0, size * 0.8, 2)
    w, h = rng.uniform(3, size * 0.5, 2)
    return [float(x0), float(y0), float(x0 + w), float(y0 + h)]


def random_problem(seed, num_images=30, ties=False, num_classes=NUM_CLASSES,
                   box_classes=LEAVES):
    """Ground truth of `box_classes` (some group-of, some duplicated boxes), verified labels,
    detections of all classes (near ground truth or anywhere, some degenerate). Returns
    (records (unexpanded), detections {image_id: [(cls, score, box)]})."""
    rng = np.random.default_rng(seed)
    records, detections = [], {}
    for i in range(num_images):
        image_id = f"{rng.integers(1 << 40):010x}"
        anns = []
        for _ in range(rng.integers(0, 6)):
            box = _box(rng)
            anns.append({"bbox": box, "bbox_mode": 0, "category_id": int(rng.choice(box_classes)),
                         "is_group_of": bool(rng.random() < 0.25)})
            if rng.random() < 0.1:  # an identical second box
                anns.append(dict(anns[-1]))
        present = {a["category_id"] for a in anns}
        pos = sorted(k for k in present if rng.random() < 0.7)
        neg = sorted(int(k) for k in rng.choice(num_classes, 3, replace=False)
                     if k not in present)
        records.append({"image_id": image_id, "annotations": anns, "pos_category_ids": pos,
                        "neg_category_ids": neg})
        dets = []
        for a in anns:
            for _ in range(rng.integers(0, 4)):
                x0, y0, x1, y1 = a["bbox"]
                j = rng.normal(0, 0.15, 4) * (x1 - x0)
                cls = a["category_id"] if rng.random() < 0.6 else int(rng.integers(num_classes))
                dets.append((cls, [x0 + j[0], y0 + j[1], x1 + j[2], y1 + j[3]]))
                if a["is_group_of"] and rng.random() < 0.5:  # a small box inside the group
                    cx, cy = rng.uniform(x0, x1), rng.uniform(y0, y1)
                    dets.append((cls, [cx - 2, cy - 2, cx + 2, cy + 2]))
        for _ in range(rng.integers(0, 8)):
            dets.append((int(rng.integers(num_classes)), _box(rng)))
        if dets and rng.random() < 0.3:  # degenerate box: ignored
            dets.append((dets[0][0], [5.0, 5.0, 5.0, 9.0]))
        scores = rng.random(len(dets))
        if ties:
            scores = np.round(scores, 1)
        if i % 7 == 3:
            scores[:1] = 0.0  # a zero score: a group-of box hit only by it adds no TP
        detections[image_id] = [(c, float(s), b) for (c, b), s in zip(dets, scores)]
    detections["unknown"] = [(0, 0.9, [1.0, 1.0, 20.0, 20.0])]  # no ground truth: ignored
    return records, detections


def reference_images(records, tree, mids=MIDS):
    """Expanded ground truth for the reference, by the official tool's maps."""
    keyed_parent, keyed_child = official_expansion(tree)
    index = {m: k for k, m in enumerate(mids)}
    images = {}
    for r in records:
        boxes, labels = [], set(r["neg_category_ids"])
        for a in r["annotations"]:
            boxes.append((a["category_id"], a["bbox"], a["is_group_of"]))
            for p in keyed_child.get(mids[a["category_id"]], []):
                boxes.append((index[p], a["bbox"], a["is_group_of"]))
        for k in r["pos_category_ids"]:
            labels |= {k} | {index[p] for p in keyed_child.get(mids[k], [])}
        for k in r["neg_category_ids"]:
            labels |= {index[c] for c in keyed_parent.get(mids[k], [])}
        images[r["image_id"]] = {"boxes": boxes, "labels": sorted(labels)}
    return images


def to_results(detections):
    return [{"image_id": i, "category_id": c, "score": s,
             "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]}
            for i, dets in detections.items() for c, s, b in dets]


def test_hierarchy_matches_the_official_tool():
    h = LabelHierarchy(TREE, MIDS)
    keyed_parent, keyed_child = official_expansion(TREE)
    for k, mid in enumerate(MIDS):
        assert sorted(h.ancestors[k]) == sorted(MIDS.index(p) for p in keyed_child.get(mid, []))
        assert h.descendants[k] == sorted({MIDS.index(c) for c in keyed_parent.get(mid, [])})
    assert h.ancestors[2] == [8, 9, 10] and h.ancestors[7] == []  # 9 once, by two paths
    source, parents = h.copy_detections(np.array([2, 7, 5]))
    assert source.tolist() == [0, 0, 0, 2] and parents.tolist() == [8, 9, 10, 11]
    with pytest.raises(SeesawEcmError, match="not in the class description"):
        LabelHierarchy({"LabelName": "r", "Subcategory": [{"LabelName": "/m/x"}]}, MIDS)


def test_expansion_is_the_current_tool_on_its_own_test_case():
    """The official tool's own test (oid_hierarchical_labels_expansion_test.py): 'f' sits under
    'c' and under the root, 'd' under 'c' and under both places of 'f'; a box of 'd' gets one
    copy for 'f' and one for 'c'."""
    leaf = [{"LabelName": "d"}]
    tree = {"LabelName": "a", "Subcategory": [
        {"LabelName": "b"},
        {"LabelName": "c", "Subcategory": [{"LabelName": "d"}, {"LabelName": "e"},
                                           {"LabelName": "f", "Subcategory": leaf}]},
        {"LabelName": "f", "Subcategory": leaf}]}
    mids = ["b", "c", "d", "e", "f"]
    b, c, d, e, f = range(5)
    box_b, box_d = [10.0, 10.0, 20.0, 20.0], [20.0, 10.0, 30.0, 20.0]
    records = [{"image_id": "123", "pos_category_ids": [], "neg_category_ids": [b, c],
                "annotations": [
                    {"bbox": box_b, "bbox_mode": 0, "category_id": b, "is_group_of": False},
                    {"bbox": box_d, "bbox_mode": 0, "category_id": d, "is_group_of": False}]},
               {"image_id": "124", "pos_category_ids": [d], "neg_category_ids": [],
                "annotations": []}]
    expected_boxes = sorted([(b, box_b), (d, box_d), (f, box_d), (c, box_d)])
    h = LabelHierarchy(tree, mids)
    first, second = (h.expand_record(r) for r in records)
    assert sorted((a["category_id"], a["bbox"]) for a in first["annotations"]) == expected_boxes
    assert first["neg_category_ids"] == [b, c, d, e, f]
    assert second["pos_category_ids"] == [c, d, f]
    reference = reference_images(records, tree, mids)
    assert sorted((k, box) for k, box, _ in reference["123"]["boxes"]) == expected_boxes
    assert reference["123"]["labels"] == [b, c, d, e, f]
    assert reference["124"]["labels"] == [c, d, f]


def random_dag_tree(rng, num_classes):
    """A hierarchy JSON unfolded from a random DAG over classes 0..num_classes-2 (the last one
    stays out of the tree): each class has 0, 1 or 2 parents among the classes before it in a
    random order, so a class with children can sit under two parents (its subtree repeated at
    both places, as in the challenge file). Returns (tree, mids, classes in the tree)."""
    mids = [f"/m/d{k}" for k in range(num_classes)]
    order = rng.permutation(num_classes - 1).tolist()
    parents = {}
    for i, k in enumerate(order):
        parents[k] = rng.choice(order[:i], min(i, int(rng.choice(3, p=[0.3, 0.4, 0.3]))),
                                replace=False).tolist() if i else []

    def node(k):
        sub = [node(j) for j in order if k in parents[j]]
        return {"LabelName": mids[k], **({"Subcategory": sub} if sub else {})}

    tree = {"LabelName": "/m/root", "Subcategory": [node(k) for k in order if not parents[k]]}
    return tree, mids, order


def paths_to_ancestors(tree):
    """{(label, ancestor): number of paths}: the copies the tool's first, list-based version
    made (more than one where an ancestor is reached by several paths)."""
    count = {}

    def walk(node, path):
        for above in path:
            count[node["LabelName"], above] = count.get((node["LabelName"], above), 0) + 1
        for sub in node.get("Subcategory", []):
            walk(sub, path + [node["LabelName"]])

    for sub in tree["Subcategory"]:
        walk(sub, [])
    return count


def test_expansion_on_random_dag_hierarchies_equals_the_reference():
    """60 random hierarchies with classes under two parents: ancestors, descendants and
    expanded records equal the reference's; in many of them an ancestor is reached by two
    paths (where the list-based tool made two copies)."""
    several_paths = 0
    for seed in range(60):
        rng = np.random.default_rng(seed)
        tree, mids, in_tree = random_dag_tree(rng, 10)
        h = LabelHierarchy(tree, mids)
        keyed_parent, keyed_child = official_expansion(tree)
        for k, mid in enumerate(mids):
            assert h.ancestors[k] == sorted(mids.index(p) for p in keyed_child.get(mid, ()))
            assert h.descendants[k] == sorted(mids.index(c) for c in keyed_parent.get(mid, ()))
        several_paths += max(paths_to_ancestors(tree).values(), default=0) > 1
        records, _ = random_problem(seed, num_images=10, num_classes=10, box_classes=in_tree)
        reference = reference_images(records, tree, mids)
        for r in records:
            mine = h.expand_record(r)
            assert sorted((a["category_id"], a["bbox"]) for a in mine["annotations"]) == sorted(
                (k, box) for k, box, _ in reference[r["image_id"]]["boxes"])
            assert sorted(set(mine["pos_category_ids"]) | set(mine["neg_category_ids"])) == (
                reference[r["image_id"]]["labels"])
    assert several_paths >= 40  # of 60


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metric_on_random_dag_hierarchies_equals_the_official_rules(seed):
    rng = np.random.default_rng(100 + seed)
    tree, mids, in_tree = random_dag_tree(rng, 10)
    assert max(paths_to_ancestors(tree).values()) > 1
    records, detections = random_problem(seed, ties=True, num_classes=10, box_classes=in_tree)
    expanded = [LabelHierarchy(tree, mids).expand_record(r) for r in records]
    expected = reference_ap(reference_images(records, tree, mids), detections, 10)
    result = evaluate(expanded, to_results(detections), num_classes=10, chunk_images=7)
    np.testing.assert_allclose(result.per_class_ap, expected, rtol=0, atol=1e-12)
    assert (expected[~np.isnan(expected)] > 0).any()


@pytest.mark.parametrize("seed,ties", [(0, False), (1, False), (2, True), (3, True)])
def test_metric_equals_the_official_rules(seed, ties):
    records, detections = random_problem(seed, ties=ties)
    h = LabelHierarchy(TREE, MIDS)
    expanded = [h.expand_record(r) for r in records]
    expected = reference_ap(reference_images(records, TREE), detections, NUM_CLASSES)
    result = evaluate(expanded, to_results(detections), num_classes=NUM_CLASSES, chunk_images=7)
    np.testing.assert_allclose(result.per_class_ap, expected, rtol=0, atol=1e-12)
    assert np.isnan(expected).any() and (expected[~np.isnan(expected)] > 0).any()
    assert result.metrics["AP"] == pytest.approx(np.nanmean(expected), abs=1e-12)


def test_records_merge_across_processes_and_groups():
    records, detections = random_problem(5)
    expanded = [LabelHierarchy(TREE, MIDS).expand_record(r) for r in records]
    gt = OpenImagesGroundTruth(expanded, NUM_CLASSES)
    results = to_results(detections)
    whole = evaluate(gt, results)
    ids = sorted(detections)
    parts = []
    for half in (ids[::2], ids[1::2]):  # two "processes", each with every other image
        matcher = OpenImagesMatcher(gt)
        matcher.add([r for r in results if r["image_id"] in half])
        parts.append(matcher.records())
    merged = OpenImagesEvalResult(gt, OpenImagesRecords.concatenate(parts))
    np.testing.assert_array_equal(merged.per_class_ap, whole.per_class_ap)
    with pytest.raises(SeesawEcmError, match="same image"):
        OpenImagesRecords.concatenate([parts[0], parts[0]])
    # AP1..AP5: 5 groups of classes by training count, rarest first, mean of their APs
    train_counts = np.arange(NUM_CLASSES)[::-1]
    result = OpenImagesEvalResult(gt, OpenImagesRecords.concatenate(parts), train_counts)
    assert [g.tolist() for g in result.groups][0] == [11, 10, 9]
    for g, members in enumerate(result.groups):
        ap = whole.per_class_ap[members]
        ap = ap[~np.isnan(ap)]
        expected = ap.mean() if len(ap) else np.nan
        assert result.metrics[f"AP{g + 1}"] == pytest.approx(expected, nan_ok=True)


def test_group_of_and_unverified_rules_by_hand():
    """One image, class 0: two normal boxes (one inside a group-of box) and the group-of box;
    class 1 unverified, class 2 verified absent."""
    records = [{"image_id": "a", "pos_category_ids": [], "neg_category_ids": [2],
                "annotations": [
                    {"bbox": [0, 0, 10, 10], "bbox_mode": 0, "category_id": 0},
                    {"bbox": [60, 60, 70, 70], "bbox_mode": 0, "category_id": 0},
                    {"bbox": [50, 50, 90, 90], "bbox_mode": 0, "category_id": 0,
                     "is_group_of": True}]}]
    dets = [(0, 0.9, [0, 0, 10, 10]),    # TP
            (0, 0.85, [60, 60, 70, 70]),  # TP, and stays one though inside the group-of box
            (0, 0.8, [0, 0, 10, 10]),    # its best box is matched already: FP
            (0, 0.7, [75, 75, 85, 85]),  # inside the group-of box
            (0, 0.6, [55, 55, 65, 65]),  # IoU 0.14 with the box at 60: also inside the group;
                                         # the group counts once, with score 0.7
            (1, 0.95, [0, 0, 10, 10]),   # class 1 neither labelled nor boxed: ignored
            (2, 0.5, [0, 0, 10, 10])]    # verified negative: FP (class 2 has no ground truth)
    result = evaluate(records, to_results({"a": dets}), num_classes=3)
    # ranked: 0.9 TP, 0.85 TP, 0.8 FP, 0.7 TP (group); num_gt 3
    assert result.per_class_ap[0] == pytest.approx(2 / 3 + 1 / 3 * 3 / 4)
    assert np.isnan(result.per_class_ap[1:]).all()
    # IoU and IoA of exactly 0.5 match
    records = [{"image_id": "b", "annotations": [
        {"bbox": [0, 0, 10, 10], "bbox_mode": 0, "category_id": 0},
        {"bbox": [20, 20, 40, 40], "bbox_mode": 0, "category_id": 0, "is_group_of": True}]}]
    dets = [(0, 0.5, [0, 0, 10, 5]), (0, 0.4, [30, 20, 50, 40])]
    assert evaluate(records, to_results({"b": dets}), num_classes=1).metrics["AP"] == 1.0


def test_ground_truth_rejects_ids_outside_the_classes():
    box = {"bbox": [0, 0, 5, 5], "bbox_mode": 0, "category_id": 3}
    with pytest.raises(SeesawEcmError, match="category_id outside"):
        OpenImagesGroundTruth([{"image_id": 1, "annotations": [box]}], 3)
    with pytest.raises(SeesawEcmError, match="image label is outside"):
        OpenImagesGroundTruth([{"image_id": 1, "annotations": [], "neg_category_ids": [3]}], 3)
    gt = OpenImagesGroundTruth([{"image_id": 1, "annotations": [dict(box, category_id=0)]}], 3)
    with pytest.raises(SeesawEcmError, match="contiguous class ids"):
        OpenImagesMatcher(gt).add([{"image_id": 1, "category_id": 3, "score": 1.0,
                                    "bbox": [0, 0, 5, 5]}])


# ---------------------------------------------------------------- loader


def write_files(folder, boxes_rows, label_rows, classes=None, tree=None):
    classes = classes or [(m, f"class {k}") for k, m in enumerate(MIDS)]
    names = (("boxes", "boxes.csv"), ("labels", "labels.csv"), ("classes", "classes.csv"),
             ("hierarchy", "h.json"))
    paths = {k: str(folder / f) for k, f in names}
    (folder / "boxes.csv").write_text(
        "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,"
        "IsGroupOf,IsDepiction,IsInside\n" + "".join(r + "\n" for r in boxes_rows))
    (folder / "labels.csv").write_text("ImageID,Source,LabelName,Confidence\n"
                                       + "".join(r + "\n" for r in label_rows))
    (folder / "classes.csv").write_text("".join(f"{m},{n}\n" for m, n in classes))
    (folder / "h.json").write_text(json.dumps(tree or TREE))
    images = folder / "images"
    images.mkdir(exist_ok=True)
    from PIL import Image

    for image_id, size in (("img1", (200, 100)), ("img2", (64, 48))):
        Image.new("RGB", size).save(images / f"{image_id}.jpg")
    paths["image_root"] = str(images)
    return paths


BOXES = ["img1,xclick,/m/c2,1,0.1,0.5,0.2,0.6,0,0,0,0,0",
         "img1,xclick,/m/c5,1,0.0,1.0,0.0,1.0,0,0,1,0,0"]
LABELS = ["img1,verification,/m/c2,1", "img2,verification,/m/c8,0"]


def test_loader_reads_official_files(tmp_path):
    files = write_files(tmp_path, BOXES, LABELS)
    mids, _ = openimages.read_classes(files["classes"])
    records = openimages.load_openimages(files, mids)
    assert [r["image_id"] for r in records] == ["img1", "img2"]
    r1, r2 = records
    assert (r1["width"], r1["height"], r2["width"], r2["height"]) == (200, 100, 64, 48)
    np.testing.assert_allclose(r1["annotations"][0]["bbox"], [20, 20, 100, 60])
    assert [a["is_group_of"] for a in r1["annotations"]] == [False, True]
    assert "iscrowd" not in r1["annotations"][1]
    assert (r1["pos_category_ids"], r2["neg_category_ids"], r2["annotations"]) == ([2], [8], [])
    assert open(os.path.join(files["image_root"], "image_sizes.csv")).read().count("\n") == 3
    expanded = openimages.load_openimages(files, mids, LabelHierarchy(TREE, mids))
    assert [a["category_id"] for a in expanded[0]["annotations"]] == [2, 8, 9, 10, 5, 11]
    assert expanded[1]["neg_category_ids"] == [0, 1, 2, 3, 8, 9]
    # class statistics through the project's path: group-of boxes are instances
    assert count_classes(expanded, NUM_CLASSES).tolist() == [0, 0, 1, 0, 0, 1, 0, 0, 1, 1, 1, 1]
    assert count_classes(expanded, NUM_CLASSES, "image_count")[9] == 1


@pytest.mark.parametrize("boxes,labels,match", [
    (["img1,x,/m/c2,1,0.1,0.5,0.2"], LABELS, "line 2 has 7 fields"),
    (["img1,x,/m/zz,1,0.1,0.5,0.2,0.6,0,0,0,0,0"], LABELS, "/m/zz is not in the class"),
    (["img1,x,/m/c2,1,0.6,0.5,0.2,0.6,0,0,0,0,0"], LABELS, "is not inside"),
    (["img1,x,/m/c2,1,a,0.5,0.2,0.6,0,0,0,0,0"], LABELS, "not a number"),
    (BOXES, ["img1,verification,/m/c2,0.5"], "Confidence '0.5'"),
])
def test_loader_rejects_malformed_files(tmp_path, boxes, labels, match):
    files = write_files(tmp_path, boxes, labels)
    with pytest.raises(SeesawEcmError, match=match):
        openimages.load_openimages(files, openimages.read_classes(files["classes"])[0])


def test_loader_rejects_malformed_class_and_hierarchy_files(tmp_path):
    files = write_files(tmp_path, BOXES, LABELS, classes=[("/m/c0", "a,b")])
    with pytest.raises(SeesawEcmError, match="line 1 is not 'MID,display name'"):
        openimages.read_classes(files["classes"])
    (tmp_path / "h.json").write_text("{oops")
    with pytest.raises(SeesawEcmError, match="h.json: not valid JSON"):
        openimages.read_hierarchy(files["hierarchy"], MIDS)
    (tmp_path / "h.json").write_text('{"LabelName": "r", "Subcategory": [{"Name": "x"}]}')
    with pytest.raises(SeesawEcmError, match="has no 'LabelName'"):
        openimages.read_hierarchy(files["hierarchy"], MIDS)


def test_loader_names_a_missing_column_and_a_bad_spec(tmp_path):
    files = write_files(tmp_path, BOXES, LABELS)
    (tmp_path / "labels.csv").write_text("ImageID,LabelName\nimg1,/m/c2\n")
    with pytest.raises(SeesawEcmError, match="lacks column.*Confidence"):
        openimages.load_openimages(files, MIDS)
    with pytest.raises(SeesawEcmError, match="expected NAME=BOXES_CSV"):
        openimages.parse_spec("oi=a.csv:b.csv")


# ---------------------------------------------------------------- synthetic set + evaluator


@pytest.fixture(scope="module")
def tiny_oi(tmp_path_factory):
    from seesaw_ecm.data.openimages_synthetic import generate

    return generate(str(tmp_path_factory.mktemp("oi") / "tiny"), num_leaves=12,
                    train_images=120, val_images=16, image_size=96)


def _register(tiny_oi, mode):
    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    cfg.DATASETS.OPENIMAGES = [f"tiny_oi_{s}=" + ":".join(tiny_oi[s][k]
                                                          for k in openimages.FILE_KEYS)
                               for s in ("train", "val")]
    cfg.DATASETS.OPENIMAGES_PARENT_CLASSES = mode
    openimages.register_openimages_from_cfg(cfg)
    return cfg


def test_synthetic_set_has_hierarchy_group_of_negatives_and_a_long_tail(tiny_oi):
    meta_cfg = _register(tiny_oi, "copy_detections")
    assert meta_cfg.DATASETS.OPENIMAGES_PARENT_CLASSES == "copy_detections"
    train = DatasetCatalog.get("tiny_oi_train")
    meta = MetadataCatalog.get("tiny_oi_train")
    num_classes = len(meta.thing_classes)
    leaves = 12
    assert num_classes > leaves and all(meta.hierarchy.ancestors[k]
                                        for k in range(leaves))
    anns = [a for r in train for a in r["annotations"]]
    assert max(a["category_id"] for a in anns) < leaves  # not expanded in this mode
    assert any(a["is_group_of"] for a in anns) and any(r["neg_category_ids"] for r in train)
    val = DatasetCatalog.get("tiny_oi_val")
    assert any(a["is_group_of"] for r in val for a in r["annotations"])
    counts = count_classes(train, num_classes)[:leaves]
    assert counts.max() > 5 * max(counts.min(), 1)
    _register(tiny_oi, "expand_boxes")
    expanded = DatasetCatalog.get("tiny_oi_train")
    assert max(a["category_id"] for r in expanded for a in r["annotations"]) >= leaves


@pytest.mark.parametrize("mode", ["expand_boxes", "copy_detections"])
def test_evaluator_on_ground_truth_detections(tiny_oi, mode):
    """Detections equal to the training view's boxes score AP 100 in both modes (in
    copy_detections mode the parents come from the copies)."""
    from seesaw_ecm.evaluation.openimages_evaluator import OpenImagesEvaluator

    _register(tiny_oi, mode)
    evaluator = OpenImagesEvaluator("tiny_oi_val", distributed=False)
    evaluator.reset()
    for r in DatasetCatalog.get("tiny_oi_val"):
        inst = Instances((r["height"], r["width"]))
        inst.pred_boxes = Boxes(torch.tensor([a["bbox"] for a in r["annotations"]],
                                             dtype=torch.float32).reshape(-1, 4))
        inst.scores = torch.linspace(1.0, 0.5, len(r["annotations"]))
        inst.pred_classes = torch.tensor([a["category_id"] for a in r["annotations"]],
                                         dtype=torch.int64)
        evaluator.process([{"image_id": r["image_id"]}], [{"instances": inst}])
    metrics = evaluator.evaluate()["bbox"]
    assert metrics["AP"] == pytest.approx(100.0)
    assert set(metrics) == {"AP", "AP1", "AP2", "AP3", "AP4", "AP5"}


def test_trainer_chooses_the_evaluator_and_summarizes_ap1_to_ap5(tiny_oi, tmp_path):
    from seesaw_ecm.engine import Trainer, format_summary
    from seesaw_ecm.evaluation.openimages_evaluator import OpenImagesEvaluator

    cfg = _register(tiny_oi, "expand_boxes")
    cfg.DATASETS.TRAIN = ("tiny_oi_train",)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(MetadataCatalog.get("tiny_oi_train").thing_classes)
    evaluator = Trainer.build_evaluator(cfg, "tiny_oi_val", str(tmp_path))
    assert isinstance(evaluator, OpenImagesEvaluator)
    counts = count_classes(DatasetCatalog.get("tiny_oi_train"), cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    np.testing.assert_array_equal(evaluator._train_counts(), counts)
    table = format_summary({"tiny_oi_val": {"bbox": {"AP": 50.0, "AP1": 10.0, "AP5": 90.0}}})
    assert table.splitlines()[0].split()[-6:] == ["AP", "AP1", "AP2", "AP3", "AP4", "AP5"]
    assert table.splitlines()[1].split()[1:] == ["50.00", "10.00", "n/a", "n/a", "n/a", "90.00"]


@pytest.mark.slow
def test_train_net_trains_and_evaluates_on_open_images_files(tiny_oi, tmp_path):
    import subprocess
    import sys

    specs = [f"tiny_{s}=" + ":".join(tiny_oi[s][k] for k in openimages.FILE_KEYS)
             for s in ("train", "val")]
    cmd = [sys.executable, "train_net.py", "--config-file",
           "configs/OpenImages/synthetic_faster_rcnn_R18_FPN_seesaw.yaml",
           "--openimages-dataset", specs[0], "--openimages-dataset", specs[1],
           "DATASETS.TRAIN", "('tiny_train',)", "DATASETS.TEST", "('tiny_val',)",
           "MODEL.ROI_HEADS.NUM_CLASSES", str(len(openimages.read_classes(
               tiny_oi["train"]["classes"])[0])),
           "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "10", "SOLVER.WARMUP_ITERS", "2",
           "DATALOADER.NUM_WORKERS", "0", "TEST.DETECTIONS_PER_IMAGE", "20",
           "MODEL.RPN.POST_NMS_TOPK_TEST", "100", "MODEL.DEVICE", "cpu", "OUTPUT_DIR",
           str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"AP\s+AP1\s+AP2\s+AP3\s+AP4\s+AP5\n", proc.stdout + proc.stderr)
    report = json.load(open(tmp_path / "inference" / "tiny_val" / "openimages_eval.json"))
    num_classes = len(report["per_class_ap"])
    assert sorted(k for g in report["groups"] for k in g) == list(range(num_classes))
    bad = [*cmd[:4], "--openimages-dataset", "x=a.csv:b.csv:missing-classes.csv:d.json:e",
           *cmd[8:]]
    proc = subprocess.run(bad, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "missing-classes.csv does not exist" in proc.stderr
