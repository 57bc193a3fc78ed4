"""seesaw_ecm.evaluation.lvis_bootstrap: a resampled test set evaluated from one matching gives
what the official `lvis` API gives on the dataset with the drawn images duplicated."""
import numpy as np
import pytest

from lvis_problems import official_lvis, random_problem, results_for
from seesaw_ecm.evaluation import lvis_bootstrap, lvis_fast


def duplicated(dataset, results, sel):
    """The dataset of the images at ranks `sel` (repeats allowed), written out: image k gets id
    k + 1 and copies of the annotations and detections of its source image."""
    images = sorted(dataset["images"], key=lambda im: im["id"])
    out = {"categories": dataset["categories"], "images": [], "annotations": []}
    out_results = []
    for k, rank in enumerate(sel):
        src = images[rank]["id"]
        out["images"].append(dict(images[rank], id=k + 1))
        out["annotations"] += [dict(a, id=len(out["annotations"]) + j + 1, image_id=k + 1)
                               for j, a in enumerate(a for a in dataset["annotations"]
                                                     if a["image_id"] == src)]
        out_results += [dict(r, image_id=k + 1) for r in results if r["image_id"] == src]
    return out, out_results


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_resampled_set_equals_lvis_on_the_duplicated_dataset(iou_type):
    checked = repeats = 0
    for seed in range(40):
        dataset, results = random_problem(seed)
        num_images = len(dataset["images"])
        if not results or num_images < 2:
            continue
        max_dets = 10 if seed % 4 == 3 else 300
        full = lvis_fast.evaluate(dataset, results_for(results, iou_type), iou_type, max_dets)
        gt = lvis_fast.LvisGroundTruth(dataset)
        for sel in lvis_bootstrap.draws(num_images, 2, seed=seed):
            dup, dup_results = duplicated(dataset, results, sel.tolist())
            if not dup_results:
                continue
            ev = official_lvis(dup, dup_results, iou_type, max_dets)
            sub_gt, sub_records = lvis_bootstrap.resample(gt, full.records, sel)
            ours = lvis_fast.summarize(sub_gt, *lvis_fast.accumulate(sub_gt, sub_records))
            for key, value in ev.results.items():
                assert ours[key] == pytest.approx(value, abs=1e-9), (seed, sel, key)
            checked += 1
            repeats += len(np.unique(sel)) < len(sel)
    assert checked >= 40 and repeats >= 30  # most draws repeat an image


def test_bootstrap_draws_are_shared_and_spread():
    dataset, results = random_problem(5)  # 6 images, 168 detections
    gt = lvis_fast.LvisGroundTruth(dataset)
    full = lvis_fast.evaluate(gt, results_for(results, "bbox"), "bbox")
    a = lvis_bootstrap.bootstrap(gt, full.records, 20)
    b = lvis_bootstrap.bootstrap(gt, full.records, 20)
    c = lvis_bootstrap.bootstrap(gt, full.records, 20, seed=1)
    assert list(a) == list(full.metrics) and a["AP"].shape == (20,)
    np.testing.assert_array_equal(a["AP"], b["AP"])  # same draws: pairs across runs
    assert not np.array_equal(a["AP"], c["AP"])  # another seed, other draws
    assert a["AP"].std() > 0  # the test set's size does move AP
    # the identity draw is the full evaluation
    sub_gt, sub_records = lvis_bootstrap.resample(gt, full.records, np.arange(len(gt.img_ids)))
    np.testing.assert_array_equal(sub_gt.num_gt, gt.num_gt)
    assert lvis_fast.summarize(sub_gt, *lvis_fast.accumulate(sub_gt, sub_records)) == full.metrics
