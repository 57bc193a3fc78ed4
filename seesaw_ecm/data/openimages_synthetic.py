"""The built-in synthetic Open Images set: the scenes of `synthetic` in the challenge formats.

Leaf classes are the (colour, texture, shape) classes of the built-in LVIS-format set, with its
long tail in training (same plans and renderer); above them a class hierarchy: each shape is a
parent class of its leaves (circle, ...), and the shapes are grouped under "round shape" and
"angular shape" (3 levels below the Entity root, as in the challenge hierarchy). Boxes exist
for leaves only, so parent classes are learnt through the hierarchy. CROWD_PROB of the images
get 2-3 extra instances of one of their classes; where a leaf has several instances in an
image, they are annotated with probability GROUP_OF_PROB as one group-of box around all of
them. Image labels: every present leaf verified positive; absent leaves verified negative with
NEG_PROB of the split, absent shapes with SHAPE_NEG_PROB (negative for all their leaves once
expanded); the other classes are unverified (ignored by the metric).

Layout under `out_dir`: classes-description.csv (MID,name; no header), label-hierarchy.json,
{train,validation}-detection-bbox.csv, {train,validation}-detection-human-imagelabels.csv,
{train,validation}-image-sizes.csv, {train,validation}/<ImageID>.jpg, params.json (last).
"""
import csv
import json
import os

import cv2
import numpy as np

from .synthetic_lt import JPEG_QUALITY, _scene_plans, build_cached, class_attributes, render_scene

GENERATOR_VERSION = 2
DEFAULTS = dict(num_leaves=40, train_images=1500, val_images=250, image_size=160, seed=0)
ROOT_MID = "/m/0bl9f"  # Entity, the root of the challenge hierarchy (not a class)
GROUPS = {"round": ("circle", "hexagon", "crescent"),
          "angular": ("square", "triangle", "star", "cross", "arrow")}
GROUP_OF_PROB = 0.5
CROWD_PROB = 0.3  # per image: 2-3 more instances of one of its classes (group-of candidates)
NEG_PROB = {"train": 0.2, "validation": 0.5}
SHAPE_NEG_PROB = 0.3
SPLITS = (("train", "train"), ("val", "validation"))  # (key, file prefix)
BOX_HEADER = ("ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,"
              "IsGroupOf,IsDepiction,IsInside")


def _mid(name):
    return f"/m/syn_{name}"


def class_list(num_leaves):
    """(mids, names, hierarchy tree, leaf attributes): leaves first, then shapes, then groups."""
    attrs = class_attributes(num_leaves)
    shapes = sorted({s for _, _, s in attrs})
    leaves = [f"{c}_{t}_{s}" for c, t, s in attrs]
    groups = [g for g in GROUPS if set(GROUPS[g]) & set(shapes)]
    names = leaves + shapes + [f"{g} shape" for g in groups]
    mids = [_mid(n.replace(" ", "_")) for n in names]

    def node(mid, children=()):
        return {"LabelName": mid, **({"Subcategory": list(children)} if children else {})}

    shape_nodes = {s: node(_mid(s), [node(_mid(leaf)) for leaf, a in zip(leaves, attrs)
                                     if a[2] == s]) for s in shapes}
    group_nodes = [node(_mid(f"{g}_shape"), [shape_nodes[s] for s in GROUPS[g] if s in shapes])
                   for g in groups]
    tree = node(ROOT_MID, group_nodes)
    return mids, names, tree, attrs


def _write_split(root, prefix, plans, first_id, params, rng_key, mids, attrs):
    size, seed = params["image_size"], params["seed"]
    shapes = sorted({s for _, _, s in attrs})
    shape_mid = {s: _mid(s) for s in shapes}
    os.makedirs(os.path.join(root, prefix))
    boxes, labels, sizes = [BOX_HEADER], ["ImageID,Source,LabelName,Confidence"], [
        "ImageID,Width,Height"]
    for i, plan in enumerate(plans):
        rng = np.random.default_rng([seed, rng_key, i])
        img, anns = render_scene(plan, attrs, size, rng)
        image_id = f"{seed:04x}{first_id + i:012x}"
        cv2.imwrite(os.path.join(root, prefix, f"{image_id}.jpg"), img[:, :, ::-1],
                    [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        sizes.append(f"{image_id},{size},{size}")
        by_class = {}
        for a in anns:
            by_class.setdefault(a["category_id"] - 1, []).append(a["bbox"])
        for k, bbs in sorted(by_class.items()):
            xywh = np.array(bbs, np.float64)
            xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1) / size
            group = len(bbs) > 1 and rng.random() < GROUP_OF_PROB
            if group:
                xyxy = np.concatenate([xyxy[:, :2].min(0), xyxy[:, 2:].max(0)])[None]
            for x0, y0, x1, y1 in xyxy.tolist():
                boxes.append(f"{image_id},synthetic,{mids[k]},1,{x0:.6f},{x1:.6f},{y0:.6f},"
                             f"{y1:.6f},0,0,{int(group)},0,0")
            labels.append(f"{image_id},verification,{mids[k]},1")
        present_shapes = {attrs[k][2] for k in by_class}
        for k in range(len(attrs)):
            if k not in by_class and rng.random() < NEG_PROB[prefix]:
                labels.append(f"{image_id},verification,{mids[k]},0")
        for s in shapes:
            if s not in present_shapes and rng.random() < SHAPE_NEG_PROB:
                labels.append(f"{image_id},verification,{shape_mid[s]},0")
    for kind, rows in (("detection-bbox", boxes), ("detection-human-imagelabels", labels),
                       ("image-sizes", sizes)):
        with open(os.path.join(root, f"{prefix}-{kind}.csv"), "w") as f:
            f.write("\n".join(rows) + "\n")


def _with_crowd(plan, rng):
    """The plan, with probability CROWD_PROB plus 2-3 instances of one of its classes (the
    balanced validation plans have one instance per class otherwise)."""
    if rng.random() >= CROWD_PROB:
        return plan
    return np.concatenate([plan, np.full(rng.integers(2, 4), rng.choice(plan))])


def _build(root, params):
    num_leaves, seed = params["num_leaves"], params["seed"]
    mids, names, tree, attrs = class_list(num_leaves)
    os.makedirs(root)
    with open(os.path.join(root, "classes-description.csv"), "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(zip(mids, names))
    with open(os.path.join(root, "label-hierarchy.json"), "w") as f:
        json.dump(tree, f, indent=1)
    first_id = 1
    for key, ((split, prefix), n) in enumerate(zip(SPLITS, (params["train_images"],
                                                            params["val_images"]))):
        rng = np.random.default_rng([seed, 21, key])
        plans = [_with_crowd(plan, rng) for plan in _scene_plans(split, num_leaves, n, seed)]
        _write_split(root, prefix, plans, first_id, params, 13 + key, mids, attrs)
        first_id += n


def _files(root):
    """{"train": files, "val": files} as openimages.parse_spec gives them."""
    common = dict(classes=os.path.join(root, "classes-description.csv"),
                  hierarchy=os.path.join(root, "label-hierarchy.json"))
    return {key: dict(boxes=os.path.join(root, f"{prefix}-detection-bbox.csv"),
                      labels=os.path.join(root, f"{prefix}-detection-human-imagelabels.csv"),
                      image_root=os.path.join(root, prefix),
                      sizes=os.path.join(root, f"{prefix}-image-sizes.csv"), **common)
            for key, prefix in SPLITS}


def generate(out_dir, force=False, **params):
    """Generate (or reuse the cached) set with DEFAULTS updated by `params`; returns
    {"train": files, "val": files} (paths as in a DATASETS.OPENIMAGES spec)."""
    unknown = set(params) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown parameters {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    params = dict(DEFAULTS, **params, version=GENERATOR_VERSION)
    return _files(build_cached(out_dir, params, _build, force))


def ensure_generated(out_dir, **params):
    """generate(out_dir, **params) without force."""
    return generate(out_dir, **params)
