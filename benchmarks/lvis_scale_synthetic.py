"""LVIS-scale synthetic ground truth and detections, to benchmark and test LVIS evaluation.

Statistics follow LVIS v1 val: 1,203 categories (337 rare, 461 common, 405 frequent), images
about 640 x 480, ~3.7 annotated categories and ~12 polygon instances per image (sizes from a
few pixels to most of the image, so all three area ranges are populated), ~8 negative
categories per image and some annotated categories marked not exhaustive. Each image gets
`dets_per_image` detections with an RLE mask and a box, as detectron2 writes them: a few per
ground-truth instance (jittered, mostly the right category, higher scores) and the rest
scattered over the image with categories drawn from all 1,203 (some from the image's
negative list), with scores rounded to 3 decimals so that ties occur; 1% of masks are empty.
No detectron2 import; numpy + pycocotools.
"""
import json
import os

import numpy as np
import pycocotools.mask as mask_utils

LVIS_V1_GROUPS = (("r", 337), ("c", 461), ("f", 405))


def _polygon(rng, x, y, w, h, n):
    """(n, 2k) float: one random star-convex polygon inside each box (x, y, w, h) (n,)."""
    k = 10
    ang = np.sort(rng.uniform(0, 2 * np.pi, (n, k)), axis=1)
    rad = rng.uniform(0.6, 1.0, (n, k))
    px = (x + w / 2)[:, None] + (w / 2)[:, None] * rad * np.cos(ang)
    py = (y + h / 2)[:, None] + (h / 2)[:, None] * rad * np.sin(ang)
    return np.stack([px, py], axis=2).reshape(n, 2 * k)


def _boxes(rng, n, width, height):
    """(n,) x, y, w, h: log-uniform sizes from 4 px to the image size, inside the image."""
    side = np.exp(rng.uniform(np.log(4), np.log(0.9 * min(width, height)), n))
    aspect = np.exp(rng.uniform(-0.7, 0.7, n))
    w = np.minimum(side * aspect, width - 1)
    h = np.minimum(side / aspect, height - 1)
    return rng.uniform(0, width - w), rng.uniform(0, height - h), w, h


def generate(num_images, dets_per_image=300, seed=0):
    """Returns (dataset dict in LVIS v1 format, list of result dicts with image_id,
    category_id, score, bbox [x, y, w, h] and segmentation {"size", "counts": str})."""
    rng = np.random.default_rng(seed)
    cats, freq = [], []
    for label, count in LVIS_V1_GROUPS:
        for _ in range(count):
            cats.append({"id": len(cats) + 1, "name": f"class_{len(cats) + 1}",
                         "frequency": label})
            freq.append({"r": 1.0, "c": 8.0, "f": 60.0}[label])
    num_cats = len(cats)
    prior = np.array(freq) / np.sum(freq)
    images, anns, results = [], [], []
    empty_rle = {}
    for img_id in range(1, num_images + 1):
        width, height = int(rng.choice([640, 480, 500, 612])), int(rng.choice([480, 427, 640]))
        pos = rng.choice(num_cats, 1 + rng.poisson(2.7), replace=False, p=prior) + 1
        others = np.setdiff1d(np.arange(1, num_cats + 1), pos)
        neg = rng.choice(others, rng.poisson(8), replace=False)
        images.append({"id": img_id, "width": width, "height": height,
                       "neg_category_ids": sorted(neg.tolist()),
                       "not_exhaustive_category_ids": sorted(
                           pos[rng.random(len(pos)) < 0.15].tolist())})
        # ground truth: 1 + geometric instances per annotated category
        gt_cat = np.repeat(pos, 1 + rng.geometric(0.3, len(pos)) - 1)
        x, y, w, h = _boxes(rng, len(gt_cat), width, height)
        polys = np.round(_polygon(rng, x, y, w, h, len(gt_cat)), 2)
        px, py = polys[:, 0::2], polys[:, 1::2]
        area = 0.5 * np.abs(np.sum(px * np.roll(py, -1, 1) - py * np.roll(px, -1, 1), axis=1))
        for i in range(len(gt_cat)):
            bx, by = px[i].min(), py[i].min()
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": int(gt_cat[i]),
                         "bbox": [float(bx), float(by), float(px[i].max() - bx),
                                  float(py[i].max() - by)],
                         "area": float(area[i]), "segmentation": [polys[i].tolist()]})
        # detections: ~3 per instance near it, the rest anywhere
        near = np.minimum(rng.poisson(3, len(gt_cat)), dets_per_image // max(len(gt_cat), 1))
        src = np.repeat(np.arange(len(gt_cat)), near)
        n_near, n = len(src), dets_per_image
        jit = rng.normal(0, 0.12, (n_near, 4))
        dx = x[src] + jit[:, 0] * w[src]
        dy = y[src] + jit[:, 1] * h[src]
        dw, dh = w[src] * np.exp(jit[:, 2]), h[src] * np.exp(jit[:, 3])
        rx, ry, rw, rh = _boxes(rng, n - n_near, width, height)
        bx, by = np.concatenate([dx, rx]), np.concatenate([dy, ry])
        bw, bh = np.concatenate([dw, rw]), np.concatenate([dh, rh])
        bx, by = np.clip(bx, 0, width - 1), np.clip(by, 0, height - 1)
        bw, bh = np.minimum(bw, width - bx), np.minimum(bh, height - by)
        right = rng.random(n_near) < 0.7
        cat = np.concatenate([np.where(right, gt_cat[src], rng.integers(1, num_cats + 1, n_near)),
                              np.where(rng.random(n - n_near) < 0.1,
                                       rng.choice(np.concatenate([pos, neg]), n - n_near),
                                       rng.integers(1, num_cats + 1, n - n_near))])
        score = np.concatenate([rng.beta(4, 2, n_near), rng.beta(1, 6, n - n_near)]).round(3)
        det_polys = _polygon(rng, bx, by, bw, bh, n)
        rles = mask_utils.frPyObjects(det_polys.tolist(), height, width)
        if (height, width) not in empty_rle:
            empty = mask_utils.encode(np.zeros((height, width), np.uint8, order="F"))
            empty_rle[height, width] = empty["counts"].decode()
        is_empty = rng.random(n) < 0.01
        order = rng.permutation(n)
        for j in order.tolist():
            counts = empty_rle[height, width] if is_empty[j] else rles[j]["counts"].decode()
            results.append({"image_id": img_id, "category_id": int(cat[j]),
                            "bbox": [float(bx[j]), float(by[j]), float(bw[j]), float(bh[j])],
                            "score": float(score[j]),
                            "segmentation": {"size": [height, width], "counts": counts}})
    return {"images": images, "annotations": anns, "categories": cats}, results


def write(out_dir, num_images, dets_per_image=300, seed=0):
    """Generate and write `gt.json` and `results.json` under out_dir (once; reused when a
    `done` stamp with the same parameters exists). Returns (gt path, results path)."""
    os.makedirs(out_dir, exist_ok=True)
    gt_path, res_path = os.path.join(out_dir, "gt.json"), os.path.join(out_dir, "results.json")
    stamp = os.path.join(out_dir, "done")
    params = json.dumps({"num_images": num_images, "dets_per_image": dets_per_image,
                         "seed": seed})
    if os.path.exists(stamp) and open(stamp).read() == params:
        return gt_path, res_path
    dataset, results = generate(num_images, dets_per_image, seed)
    with open(gt_path, "w") as f:
        json.dump(dataset, f)
    with open(res_path, "w") as f:
        json.dump(results, f)
    with open(stamp, "w") as f:
        f.write(params)
    return gt_path, res_path
