"""AP-fixed, AP-pool and boundary AP of seesaw_ecm.evaluation.lvis_fast against the reference
procedures run with the official `lvis` API (and independent re-implementations written here)."""
import numpy as np
import pycocotools.mask as mask_utils
import pytest

from lvis_problems import official_lvis, random_problem, reference_ap_fixed, results_for
from seesaw_ecm.errors import SeesawEcmError
from seesaw_ecm.evaluation import lvis_fast

TOL = 1e-6
FIXED_KEYS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf",
              "AR@-1", "ARs@-1", "ARm@-1", "ARl@-1"]


def by_image(results):
    """Results grouped by image id, file order inside an image: the order in which the
    reference's tie-breaking at the K-th score equals lvis_fast's (image, position), and the
    order of FastLVISEvaluator's results file (test_lvis_eval.py checks the file)."""
    return sorted(results, key=lambda r: r["image_id"])


def reference_pooled(ev):
    """LVISPooledEval's accumulation, re-written as loops over lvis' per-(image, category)
    evaluations (area "all"): AP-pooled-{all,r,c,f}."""
    num_imgs, num_areas = len(ev.params.img_ids), len(ev.params.area_rng)
    pools = {"all": list(range(len(ev.params.cat_ids)))}
    for label in "rcf":
        pools[label] = ev.freq_groups[ev.params.img_count_lbl.index(label)]
    out = {}
    for name, cats in pools.items():
        entries = [ev.eval_imgs[c * num_areas * num_imgs + i]
                   for i in range(num_imgs) for c in cats]
        entries = [e for e in entries if e is not None]
        num_gt = sum(int(np.sum(np.asarray(e["gt_ignore"]) == 0)) for e in entries)
        if not entries or num_gt == 0:
            out[f"AP-pooled-{name}"] = -1
            continue
        scores = [s for e in entries for s in e["dt_scores"]]
        matched = [list(m) for e in entries for m in np.asarray(e["dt_matches"]).T]
        ignored = [list(g) for e in entries for g in np.asarray(e["dt_ignore"]).T]
        order = sorted(range(len(scores)), key=lambda j: -scores[j])  # stable, as mergesort
        total = 0.0
        for t in range(len(ev.params.iou_thrs)):
            tp = fp = 0
            rc, pr = [], []
            for j in order:
                if ignored[j][t]:
                    pass
                elif matched[j][t]:
                    tp += 1
                else:
                    fp += 1
                rc.append(tp / num_gt)
                pr.append(tp / (tp + fp + np.spacing(1)))
            for i in range(len(pr) - 1, 0, -1):
                pr[i - 1] = max(pr[i - 1], pr[i])
            for r in ev.params.rec_thrs:
                first = next((i for i, v in enumerate(rc) if v >= r), None)
                total += pr[first] if first is not None else 0.0
        out[f"AP-pooled-{name}"] = total / (len(ev.params.iou_thrs) * len(ev.params.rec_thrs))
    return out


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_ap_fixed_and_pool_equal_to_the_reference(iou_type, monkeypatch):
    """40 random problems, K from 2 to 40 per category (so categories lose detections), one
    image per add() and tiny buffers (every merge and prune path runs)."""
    monkeypatch.setattr(lvis_fast, "_MIN_BUFFER", 1)
    truncated = 0
    for seed in range(40):
        dataset, results = random_problem(300 + seed)
        if not results:
            continue
        results = by_image(results)
        k = (2, 5, 12, 40)[seed % 4]
        ev = reference_ap_fixed(dataset, results, iou_type, k)
        ours = lvis_fast.evaluate(dataset, results_for(results, iou_type), iou_type,
                                  chunk_images=1, topk_per_class=k)
        assert list(ev.results) == list(ours.metrics) == FIXED_KEYS
        for key in FIXED_KEYS:
            assert abs(ev.results[key] - ours.metrics[key]) <= TOL, (seed, key)
        np.testing.assert_allclose(ours.precision, ev.eval["precision"], rtol=0, atol=TOL)
        np.testing.assert_allclose(ours.recall, ev.eval["recall"], rtol=0, atol=TOL)
        expected = reference_pooled(ev)
        assert list(ours.pooled) == list(expected)
        for key, value in expected.items():
            assert abs(ours.pooled[key] - value) <= TOL, (seed, key, ours.pooled[key], value)
        counts = np.unique([r["category_id"] for r in results], return_counts=True)[1]
        truncated += counts.max() > k
    assert truncated >= 20


def test_one_pass_gives_standard_ap_and_ap_fixed():
    """A matcher with a ranking flags the per-image cap: standard AP from its records equals
    lvis with 300 per image; the AP-fixed selection differs from it (the switch matters)."""
    dataset, results = random_problem(10, max_images=8, max_dets=60)
    gt = lvis_fast.LvisGroundTruth(dataset)
    ranking = lvis_fast.TopKPerClass(3, gt.num_categories, len(gt.img_ids))
    matcher = lvis_fast.LvisMatcher(gt, "bbox", max_dets=20, ranking=ranking)
    matcher.add(by_image(results))
    records = matcher.records()
    standard = lvis_fast.standard_result(gt, records)
    ev = official_lvis(dataset, results, "bbox", max_dets=20)
    for key, value in ev.results.items():
        assert abs(standard.metrics[key] - value) <= TOL, key
    fixed = lvis_fast.fixed_result(gt, records, ranking)
    assert abs(fixed.metrics["AP"] - standard.metrics["AP"]) > 1e-3


def test_standard_ap_of_the_cap_the_model_flags():
    """in_cap given (the model's per-image top under AP-fixed, a prefix by score of what survived
    postprocessing): standard AP is lvis' on exactly those results, not on each image's top
    max_dets by score."""
    dataset, results = random_problem(10, max_images=8, max_dets=60)
    results = by_image(results)
    gt = lvis_fast.LvisGroundTruth(dataset)
    # per image a prefix of its results by score, shorter than max_dets (empty boxes dropped)
    rng = np.random.default_rng(0)
    img = np.array([r["image_id"] for r in results])
    score = np.array([r["score"] for r in results])
    rank = np.empty(len(results), int)
    order = np.lexsort((-score, img))
    rank[order] = np.arange(len(order)) - np.searchsorted(img[order], img[order])
    in_cap = rank < rng.integers(0, 20, img.max() + 1)[img]
    ranking = lvis_fast.TopKPerClass(3, gt.num_categories, len(gt.img_ids))
    matcher = lvis_fast.LvisMatcher(gt, "bbox", max_dets=20, ranking=ranking)
    matcher.add(results, in_cap=in_cap)
    standard = lvis_fast.standard_result(gt, matcher.records())
    ev = official_lvis(dataset, [r for r, c in zip(results, in_cap) if c], "bbox", max_dets=-1)
    for key, value in ev.results.items():
        assert abs(standard.metrics[key] - value) <= TOL, key
    by_score = lvis_fast.LvisMatcher(gt, "bbox", max_dets=20)
    by_score.add(results)
    assert abs(lvis_fast.standard_result(gt, by_score.records()).metrics["AP"]
               - standard.metrics["AP"]) > 1e-3
    with pytest.raises(SeesawEcmError, match="in_cap has shape"):
        lvis_fast.LvisMatcher(gt, "bbox").add(results, in_cap=in_cap[1:])


def test_top_k_merges_across_processes():
    """Per-process rankings and records merged give the single-process AP-fixed."""
    dataset, results = random_problem(5, max_images=8, max_dets=40)
    results = by_image(results)
    gt = lvis_fast.LvisGroundTruth(dataset)
    single = lvis_fast.evaluate(gt, results, "bbox", topk_per_class=4)
    images = sorted({r["image_id"] for r in results})
    rankings, records = [], []
    for part in (images[::2], images[1::2]):  # two "processes"
        ranking = lvis_fast.TopKPerClass(4, gt.num_categories, len(gt.img_ids))
        matcher = lvis_fast.LvisMatcher(gt, "bbox", max_dets=-1, ranking=ranking)
        for img in part:
            matcher.add([r for r in results if r["image_id"] == img])
        rankings.append(ranking)
        records.append(matcher.records())
    merged = lvis_fast.fixed_result(gt, lvis_fast.MatchRecords.concatenate(records),
                                    lvis_fast.TopKPerClass.merge(rankings))
    assert merged.metrics == single.metrics and merged.pooled == single.pooled
    assert len(lvis_fast.TopKPerClass.merge(rankings)) == sum(
        min(4, n) for n in np.unique([r["category_id"] for r in results],
                                     return_counts=True)[1])
    with pytest.raises(SeesawEcmError, match="two processes"):
        lvis_fast.TopKPerClass.merge([rankings[0], rankings[0]])


def test_pooled_ap_by_hand():
    """Two categories, one image, one ground truth each: pooled AP ranks the detections of
    both together, so a confident false positive of one category costs the other."""
    dataset = {"images": [{"id": 1, "height": 100, "width": 100, "neg_category_ids": [],
                           "not_exhaustive_category_ids": []}],
               "categories": [{"id": 1, "frequency": "r"}, {"id": 2, "frequency": "f"}],
               "annotations": [{"id": 1, "image_id": 1, "category_id": c, "area": 400.0,
                                "bbox": [x, 10, 20, 20], "segmentation": [[x, 10, x + 20, 10,
                                                                           x + 20, 30, x, 30]]}
                               for c, x in ((1, 10), (2, 50))]}
    det = [{"image_id": 1, "category_id": 1, "score": 0.9, "bbox": [10, 60, 20, 20]},  # fp
           {"image_id": 1, "category_id": 1, "score": 0.5, "bbox": [10, 10, 20, 20]},  # tp
           {"image_id": 1, "category_id": 2, "score": 0.7, "bbox": [50, 10, 20, 20]}]  # tp
    pooled = lvis_fast.evaluate(dataset, det, "bbox", topk_per_class=10).pooled
    # all: fp, tp (rec .5, prec 1/2), tp (rec 1, prec 2/3) -> interpolated 2/3 everywhere
    assert abs(pooled["AP-pooled-all"] - 2 / 3) < 1e-12
    # r: fp, tp -> precision 1/2 at every recall; f: a single tp -> 1
    assert abs(pooled["AP-pooled-r"] - 0.5) < 1e-12
    assert abs(pooled["AP-pooled-f"] - 1.0) < 1e-12
    assert pooled["AP-pooled-c"] == -1


# ---- boundary AP -------------------------------------------------------------------------

def direct_boundary(mask, ratio=0.02):
    """boundary-iou-api's definition with plain numpy: d = max(1, round(ratio x diagonal))
    erosions by a 3 x 3 square with a zero border; boundary = mask and not eroded."""
    h, w = mask.shape
    d = max(1, int(round(ratio * np.sqrt(h ** 2 + w ** 2))))
    eroded = mask.astype(bool)
    for _ in range(d):
        padded = np.pad(eroded, 1)
        eroded = np.ones_like(eroded)
        for dy in range(3):
            for dx in range(3):
                eroded &= padded[dy:dy + h, dx:dx + w]
    return mask.astype(bool) & ~eroded


def direct_iou(a, b):
    union = np.logical_or(a, b).sum()
    return np.logical_and(a, b).sum() / union if union else 0.0


def test_boundary_rles_equal_the_direct_erosion():
    rng = np.random.default_rng(0)
    for h, w in ((7, 9), (40, 31), (120, 200), (300, 300)):
        masks = []
        for _ in range(6):
            m = np.zeros((h, w), np.uint8, order="F")
            y0, x0 = rng.integers(0, h), rng.integers(0, w)
            m[y0:rng.integers(y0, h + 1), x0:rng.integers(x0, w + 1)] = 1  # may touch borders
            m[rng.random((h, w)) < 0.05] ^= 1  # holes and specks
            masks.append(m)
        masks.append(np.ones((h, w), np.uint8, order="F"))  # the whole image
        masks.append(np.zeros((h, w), np.uint8, order="F"))
        rles = mask_utils.encode(np.asfortranarray(np.stack(masks, axis=2)))
        out = mask_utils.decode(lvis_fast.boundary_rles(rles, h, w))
        for i, m in enumerate(masks):
            np.testing.assert_array_equal(out[:, :, i].astype(bool), direct_boundary(m))


def _boundary_eval_class():
    from lvis import LVISEval

    class DirectBoundaryEval(LVISEval):
        """LVISEval (segm) whose IoU is min(mask IoU, boundary IoU), both counted on decoded
        masks with direct_boundary: the definition, with none of lvis_fast's code."""

        def compute_iou(self, img_id, cat_id):
            gt, dt = self._get_gt_dt(img_id, cat_id)
            if len(gt) == 0 and len(dt) == 0:
                return []
            idx = np.argsort([-d["score"] for d in dt], kind="mergesort")
            dt = [mask_utils.decode(dt[i]["segmentation"]) for i in idx]
            gt = [mask_utils.decode(g["segmentation"]) for g in gt]
            ious = np.zeros((len(dt), len(gt)))
            for i, d in enumerate(dt):
                for j, g in enumerate(gt):
                    ious[i, j] = min(direct_iou(d, g),
                                     direct_iou(direct_boundary(d), direct_boundary(g)))
            return ious

    return DirectBoundaryEval


def test_boundary_ap_equal_to_a_direct_computation():
    """Boundary AP (standard and AP-fixed) on random problems against lvis with the IoU
    computed directly; and it differs from mask AP (the IoU type changes the result)."""
    eval_cls = _boundary_eval_class()
    differs = 0
    for seed in range(12):
        dataset, results = random_problem(500 + seed, max_images=5, max_dets=25)
        if not results:
            continue
        ev = official_lvis(dataset, results, "segm", eval_cls=eval_cls)
        ours = lvis_fast.evaluate(dataset, results_for(results, "segm"), "boundary")
        for key, value in ev.results.items():
            assert abs(ours.metrics[key] - value) <= TOL, (seed, key)
        np.testing.assert_allclose(ours.precision, ev.eval["precision"], rtol=0, atol=TOL)
        segm = lvis_fast.evaluate(dataset, results_for(results, "segm"), "segm")
        differs += abs(segm.metrics["AP"] - ours.metrics["AP"]) > 1e-3
    assert differs >= 3
