"""Time and peak memory of the Open Images challenge metric (seesaw_ecm.evaluation.openimages_fast)
at Open Images validation scale, on synthetic data.

Synthetic problem shaped like the challenge 2019 validation set: --images images (default
41,620), 500 classes in a 3-level hierarchy (420 leaves under 70 parents under 10 roots), ~4
leaf boxes per image of ~2.5 leaf classes (a steep long tail; 10% group-of), expanded to their
ancestors as the official tool does, ~8 verified image labels (positive and negative), and
--dets detections per image (default 300): a few near each box (mostly the right class), the
rest anywhere, half of them in a class evaluatable in the image. Detections are made per chunk
of 200 images and handed to the matcher as arrays, as OpenImagesEvaluator streams them, so
the process holds the ground truth, one chunk and the compact records (what one process of a
distributed evaluation holds); its peak resident memory (VmHWM) is reported, torch and
detectron2 not loaded.

Baseline, in the same process: the literal loop re-implementation of the official per-image
rules (benchmarks/openimages_reference.py, which has the official code's structure: a loop over all
classes per image and over detections per class) on the first --reference-images images,
against openimages_fast on the same images, in CPU seconds (equal per-class AP is checked).

    python -m benchmarks.openimages_eval [--images 41620] [--dets 300] [--reference-images 400]
"""
import argparse
import json
import time

import numpy as np

from benchmarks.memory import bare_library, peak_rss_gib
from benchmarks.openimages_reference import reference_ap

# the modules used need numpy (+ pycocotools) only: imported without seesaw_ecm/__init__.py,
# which loads torch and detectron2 (~0.6 GiB) into the measured memory
bare_library()
from seesaw_ecm.data.openimages_hierarchy import LabelHierarchy  # noqa: E402
from seesaw_ecm.evaluation.openimages_fast import (OpenImagesEvalResult,  # noqa: E402
                                                   OpenImagesGroundTruth, OpenImagesMatcher,
                                                   evaluate)

NUM_CLASSES, LEAVES, PARENTS, ROOTS = 500, 420, 70, 10
CHUNK = 200
OI_VAL_IMAGES = 41620


def hierarchy():
    """Leaves 0..419 under parents 420..489 (6 each) under roots 490..499 (7 parents each)."""
    mids = [f"/m/{k}" for k in range(NUM_CLASSES)]

    def node(k, sub=()):
        return {"LabelName": mids[k], **({"Subcategory": list(sub)} if sub else {})}

    parents = [node(LEAVES + p, [node(p * 6 + i) for i in range(6)]) for p in range(PARENTS)]
    roots = [node(LEAVES + PARENTS + r, parents[r * 7:(r + 1) * 7]) for r in range(ROOTS)]
    return LabelHierarchy({"LabelName": "/m/0bl9f", "Subcategory": roots}, mids)


def ground_truth(num_images, h, seed=0):
    """Expanded records (image ids as 16-hex strings, boxes in 1024 x 768 images)."""
    rng = np.random.default_rng(seed)
    prior = 1.0 / np.arange(1, LEAVES + 1) ** 1.2
    prior = rng.permutation(prior / prior.sum())
    records = []
    for i in range(num_images):
        classes = rng.choice(LEAVES, 1 + rng.poisson(1.5), p=prior)
        anns = []
        for k in classes.tolist():
            for _ in range(1 + rng.poisson(0.6)):
                x0, y0 = rng.uniform(0, 900), rng.uniform(0, 650)
                w, h_ = rng.uniform(8, 1024 - x0), rng.uniform(8, 768 - y0)
                anns.append({"bbox": [x0, y0, x0 + w, y0 + h_], "bbox_mode": 0,
                             "category_id": k, "is_group_of": bool(rng.random() < 0.1)})
        present = sorted(set(classes.tolist()))
        neg = rng.choice(NUM_CLASSES, rng.poisson(5), replace=False).tolist()
        records.append(h.expand_record({
            "image_id": f"{rng.integers(1 << 62):016x}", "annotations": anns,
            "pos_category_ids": present, "neg_category_ids": [k for k in neg
                                                              if k not in present]}))
    return records


def detections(record, gt_classes, num_dets, rng):
    """(boxes (D, 4) xyxy, scores (D,), classes (D,)) of one image."""
    anns = record["annotations"]
    near = min(len(anns) * 3, num_dets // 3)
    src = rng.integers(0, len(anns), near) if anns else np.zeros(0, int)
    box = np.array([a["bbox"] for a in anns]).reshape(-1, 4)[src]
    size = box[:, 2:] - box[:, :2]
    box = box + rng.normal(0, 0.1, (near, 4)) * np.tile(size, 2)
    cls = np.array([a["category_id"] for a in anns], np.int64)[src]
    cls = np.where(rng.random(near) < 0.7, cls, rng.integers(0, NUM_CLASSES, near))
    n = num_dets - near
    xy = rng.uniform(0, [900, 650], (n, 2))
    wh = rng.uniform(8, 300, (n, 2))
    evaluatable = np.array(sorted(gt_classes), np.int64)
    rand_cls = np.where((rng.random(n) < 0.5) & (len(evaluatable) > 0),
                        evaluatable[rng.integers(0, max(len(evaluatable), 1), n)]
                        if len(evaluatable) else 0, rng.integers(0, NUM_CLASSES, n))
    scores = np.concatenate([rng.beta(4, 2, near), rng.beta(1, 6, n)])
    return (np.concatenate([box, np.concatenate([xy, xy + wh], 1)]), scores,
            np.concatenate([cls, rand_cls]))


def evaluatable(record):
    return ({a["category_id"] for a in record["annotations"]}
            | set(record["pos_category_ids"]) | set(record["neg_category_ids"]))


def run_fast(records, num_dets, seed=1):
    """Stream the detections chunk by chunk through the matcher; returns (result, timings).
    Times are wall seconds, and CPU seconds of this process (`*_cpu_s`: the machine is
    shared)."""
    t0, c0 = time.perf_counter(), time.process_time()
    gt = OpenImagesGroundTruth(records, NUM_CLASSES)
    t_gt, c_gt = time.perf_counter() - t0, time.process_time() - c0
    c_match = 0.0
    matcher = OpenImagesMatcher(gt)
    rng = np.random.default_rng(seed)
    t_det = t_match = 0.0
    for start in range(0, len(records), CHUNK):
        t = time.perf_counter()
        part = [detections(r, evaluatable(r), num_dets, rng) for r in records[start:start + CHUNK]]
        img = np.concatenate([np.repeat(gt.ranks([r["image_id"]]), len(p[1]))
                              for r, p in zip(records[start:start + CHUNK], part)])
        arrays = [np.concatenate(a) for a in zip(*part)]
        t_det += time.perf_counter() - t
        t, c = time.perf_counter(), time.process_time()
        matcher.add_arrays(img, *arrays)
        t_match += time.perf_counter() - t
        c_match += time.process_time() - c
    t, c = time.perf_counter(), time.process_time()
    records_ = matcher.records()
    result = OpenImagesEvalResult(gt, records_)
    t_acc, c_acc = time.perf_counter() - t, time.process_time() - c
    timings = {"ground_truth_s": t_gt, "match_s": t_match, "accumulate_s": t_acc,
               "evaluation_s": t_gt + t_match + t_acc, "ground_truth_cpu_s": c_gt,
               "match_cpu_s": c_match, "accumulate_cpu_s": c_acc,
               "evaluation_cpu_s": c_gt + c_match + c_acc, "making_detections_s": t_det,
               "records": len(records_.score),
               "records_mib": sum(getattr(records_, f).nbytes for f in records_.FIELDS) / 2**20}
    return result, timings


def compare_with_reference(records, num_images, num_dets):
    """Reference loop vs openimages_fast on the same first `num_images` images."""
    sub = records[:num_images]
    rng = np.random.default_rng(2)
    dets = {r["image_id"]: detections(r, evaluatable(r), num_dets, rng) for r in sub}
    images = {r["image_id"]: {"boxes": [(a["category_id"], a["bbox"], a["is_group_of"])
                                        for a in r["annotations"]],
                              "labels": sorted(set(r["pos_category_ids"])
                                               | set(r["neg_category_ids"]))} for r in sub}
    listed = {i: [(int(c), float(s), b.tolist()) for b, s, c in zip(*d)] for i, d in dets.items()}
    t = time.process_time()
    expected = reference_ap(images, listed, NUM_CLASSES)
    t_ref = time.process_time() - t
    results = [{"image_id": i, "category_id": c, "score": s,
                "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]}
               for i, d in listed.items() for c, s, b in d]
    t = time.process_time()
    got = evaluate(sub, results, num_classes=NUM_CLASSES).per_class_ap
    t_fast = time.process_time() - t
    same = bool(np.allclose(got, expected, rtol=0, atol=1e-12, equal_nan=True))
    return {"images": num_images, "reference_cpu_s": t_ref, "fast_cpu_s": t_fast,
            "speedup": t_ref / t_fast, "equal_per_class_ap": same}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=OI_VAL_IMAGES)
    parser.add_argument("--dets", type=int, default=300, help="detections per image")
    parser.add_argument("--reference-images", type=int, default=400)
    parser.add_argument("--out", help="write the report as JSON here")
    args = parser.parse_args()
    t = time.perf_counter()
    h = hierarchy()
    records = ground_truth(args.images, h)
    print(f"ground truth made in {time.perf_counter() - t:.1f} s: {args.images} images, "
          f"{sum(len(r['annotations']) for r in records)} expanded boxes", flush=True)
    report = {"images": args.images, "dets_per_image": args.dets, "classes": NUM_CLASSES}
    report["reference"] = compare_with_reference(records, args.reference_images, args.dets)
    print(json.dumps(report["reference"]), flush=True)
    result, timings = run_fast(records, args.dets)
    report.update(timings, peak_rss_gib=peak_rss_gib(),
                  metrics={k: round(v * 100, 3) for k, v in result.metrics.items()})
    print(json.dumps(report, indent=1))
    if args.out:
        from seesaw_ecm.fileio import write_atomic

        write_atomic(args.out, json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
