"""Small random LVIS problems (ground truth + results) and the official `lvis` numbers for them,
shared by the tests of seesaw_ecm.evaluation."""
import copy
import json
import logging
import os
import tempfile
from collections import defaultdict

import numpy as np
import pycocotools.mask as mask_utils


def random_problem(seed, max_images=8, max_cats=7, max_gt=6, max_dets=40):
    """A random LVIS-format problem with the edge cases LVIS evaluation must get right.

    Returns (dataset dict, results list). Results carry "bbox" and an RLE "segmentation" (as
    detectron2 writes them). Scores are rounded to 0.1 so that ties are common; some images
    have no annotations, some masks are empty, some annotations have area 0, categories may have
    no detections, images have random negative and not-exhaustive category lists, and with
    probability 1/4 one image has more than 300 detections.
    """
    rng = np.random.default_rng(seed)
    num_images = int(rng.integers(1, max_images + 1))
    num_cats = int(rng.integers(1, max_cats + 1))
    cat_ids = sorted(rng.choice(np.arange(1, 3 * max_cats), num_cats, replace=False).tolist())
    cats = [{"id": c, "name": f"c{c}", "frequency": str(rng.choice(["r", "c", "f"]))}
            for c in cat_ids]
    images, anns, results = [], [], []
    img_ids = sorted(rng.choice(np.arange(1, 100), num_images, replace=False).tolist())
    many = int(rng.integers(num_images)) if rng.random() < 0.25 else -1
    # half of the problems: the last category gets no detections (possibly ground truth)
    undetected = cat_ids[-1] if num_cats > 1 and rng.random() < 0.5 else None
    for n, iid in enumerate(img_ids):
        h, w = (int(v) for v in rng.integers(24, 320, 2))
        neg = [c for c in cat_ids if rng.random() < 0.3]
        images.append({"id": iid, "height": h, "width": w, "neg_category_ids": neg,
                       "not_exhaustive_category_ids": [c for c in cat_ids
                                                       if c not in neg and rng.random() < 0.3]})
        boxes = []
        for _ in range(int(rng.integers(0, max_gt + 1)) if rng.random() > 0.2 else 0):
            x, y = rng.uniform(0, w - 4), rng.uniform(0, h - 4)
            bw, bh = rng.uniform(1, w - x), rng.uniform(1, h - y)
            poly = [[x, y, x + bw, y, x + bw * rng.uniform(0.5, 1), y + bh, x, y + bh]]
            if rng.random() < 0.3:  # a second part
                poly.append([x, y, x + bw / 2, y + bh, x, y + bh / 2])
            rle = mask_utils.merge(mask_utils.frPyObjects(poly, h, w))
            area = float(mask_utils.area(rle)) if rng.random() > 0.1 else 0.0
            cid = int(rng.choice(cat_ids))
            anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": cid,
                         "bbox": [x, y, bw, bh], "area": area, "segmentation": poly})
            boxes.append((cid, x, y, bw, bh))
        tie_dets = []
        if rng.random() < 0.4 and w > 40 and h > 40:
            # two ground truths 2 px apart and a detection exactly between them: equal IoUs
            cid, bw, bh = int(rng.choice(cat_ids)), int(rng.integers(10, w // 2)), int(
                rng.integers(10, h // 2))
            x, y = int(rng.integers(0, w - bw - 3)), int(rng.integers(0, h - bh))
            for dx in (0, 2):
                poly = [x + dx, y, x + dx + bw, y, x + dx + bw, y + bh, x + dx, y + bh]
                anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": cid,
                             "bbox": [x + dx, y, bw, bh], "area": float(bw * bh),
                             "segmentation": [poly], "ignore": int(rng.random() < 0.2)})
            for dx in (1, 2, 0):
                tie_dets.append((cid, x + dx, y, bw, bh))
        count = 310 if n == many else int(rng.integers(0, max_dets + 1))
        count += len(tie_dets)
        for _ in range(count):
            if tie_dets:
                cid, x, y, bw, bh = tie_dets.pop()
            elif boxes and rng.random() < 0.6:  # near a ground truth box
                cid, x, y, bw, bh = boxes[int(rng.integers(len(boxes)))]
                if rng.random() < 0.2:
                    cid = int(rng.choice(cat_ids))
                x, y = x + rng.normal(0, 0.1 * bw), y + rng.normal(0, 0.1 * bh)
                bw, bh = bw * rng.uniform(0.7, 1.3), bh * rng.uniform(0.7, 1.3)
            else:
                cid = int(rng.choice(cat_ids))
                x, y = rng.uniform(0, w - 2), rng.uniform(0, h - 2)
                bw, bh = rng.uniform(0.5, w / 2), rng.uniform(0.5, h / 2)
            x0, y0 = int(np.clip(x, 0, w)), int(np.clip(y, 0, h))
            x1, y1 = int(np.clip(x + bw, 0, w)), int(np.clip(y + bh, 0, h))
            mask = np.zeros((h, w), np.uint8, order="F")
            if rng.random() > 0.1:  # else an empty mask
                mask[y0:y1, x0:x1] = 1
            rle = mask_utils.encode(mask)
            rle["counts"] = rle["counts"].decode()
            results.append({"image_id": iid,
                            "category_id": cat_ids[0] if cid == undetected else cid,
                            "score": float(np.round(rng.random(), 1)),
                            "bbox": [float(x), float(y), float(bw), float(bh)],
                            "segmentation": rle})
    rng.shuffle(results)
    return {"images": images, "annotations": anns, "categories": cats}, results


def results_for(results, iou_type):
    """Results as detectron2's LVISEvaluator gives them to lvis: no "bbox" for segm."""
    results = copy.deepcopy(results)
    if iou_type == "segm":
        for r in results:
            r.pop("bbox", None)
    return results


def official_lvis(dataset, results, iou_type, max_dets=300, eval_cls=None, eval_max_dets=None):
    """lvis.LVISEval (or eval_cls, a subclass) run on (dataset, results); returns it after
    run(). eval_max_dets: its params.max_dets (what names its AR keys), if not 300."""
    from lvis import LVIS, LVISEval, LVISResults

    for name in ("lvis", "lvis.results", "lvis.eval", "lvis.lvis"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "gt.json")
        with open(path, "w") as f:
            json.dump(dataset, f)
        gt = LVIS(path)
    dt = LVISResults(gt, results_for(results, iou_type), max_dets=max_dets)
    ev = (eval_cls or LVISEval)(gt, dt, iou_type)
    if eval_max_dets is not None:
        ev.params.max_dets = eval_max_dets
    ev.run()
    return ev


def reference_ap_fixed(dataset, results, iou_type, k):
    """large-vocab-devil's scripts/evaluate_ap_fixed.py: the first K of each category's
    results sorted by score (stable), then LVISResults(max_dets=-1) and LVISEval with
    params.max_dets = -1."""
    per_cat = defaultdict(list)
    for r in results:
        per_cat[r["category_id"]].append(r)
    top = []
    for anns in per_cat.values():
        top.extend(sorted(anns, key=lambda r: r["score"], reverse=True)[:k])
    return official_lvis(dataset, top, iou_type, max_dets=-1, eval_max_dets=-1)
