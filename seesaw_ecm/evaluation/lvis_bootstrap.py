"""Evaluation noise of LVIS metrics: the test images resampled with replacement (bootstrap).

How much of a metric's spread over training seeds comes from the test set's size? Evaluate the
same detections on test sets drawn from it with replacement: the spread of the metric over such
draws is the evaluation noise (what a larger test set of the same kind would shrink); what the
seed spread has beyond it comes from training. Paired differences (loss A against loss B on the
same draw) give the evaluation noise of a gap.

Why hand-written: neither `lvis` nor pycocotools resamples, and evaluating a duplicated dataset
per draw repeats the whole matching each time. LVIS matching is local to one (image, category)
pair, so one `lvis_fast.MatchRecords` serves every draw: a draw repeats each image's records
(as a new image, so ties in score keep lvis' order by image and position) and counts each
image's ground truth as often as the image was drawn; `lvis_fast.accumulate` and `summarize`
then give exactly what `lvis.LVISEval` gives on the duplicated dataset (tested).

No detectron2 import.
"""
import copy

import numpy as np

from .lvis_fast import MatchRecords, accumulate, summarize


def draws(num_images, samples, seed=0):
    """(samples, num_images) int64: image ranks drawn with replacement, the same for every run
    evaluated with the same (num_images, samples, seed), so that runs pair draw by draw."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, num_images, size=(samples, num_images))


def resample(gt, records, sel):
    """The ground truth and records of the test set made of images `sel`.

    Args:
        gt: lvis_fast.LvisGroundTruth of the full test set (I images, K categories).
        records: lvis_fast.MatchRecords of the full test set (N rows), e.g. a result's
            `records`.
        sel: (I',) int image ranks; image k of the new set is image sel[k] of the old one.
    Returns:
        (gt', records'): gt' a shallow copy of gt whose `num_gt` (K, A) counts each
        annotation as often as its image is drawn (all that `accumulate` and `summarize` read
        besides the categories); records' (N' rows) the records of each drawn image, with
        image rank k.
    """
    sel = np.asarray(sel, np.int64)
    num_images = len(gt.img_ids)
    weight = np.bincount(sel, minlength=num_images)
    out_gt = copy.copy(gt)
    out_gt.num_gt = np.stack([
        np.bincount(gt.gt_cat[keep], weights=weight[gt.gt_img[keep]],
                    minlength=gt.num_categories).astype(np.int64)
        for keep in (~gt.gt_ig).T], axis=1)

    order = np.argsort(records.img, kind="stable")
    count = np.bincount(records.img, minlength=num_images)
    start = np.cumsum(count) - count
    lens = count[sel]
    new_img = np.repeat(np.arange(len(sel)), lens)
    within = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
    rows = order[start[sel][new_img] + within]
    fields = {f: getattr(records, f)[rows] for f in MatchRecords.FIELDS[:-1] if f != "img"}
    return out_gt, MatchRecords(**fields, img=new_img.astype(records.img.dtype),
                                images=np.arange(len(sel), dtype=np.int32))


def bootstrap(gt, records, samples, seed=0, max_dets=300):
    """The LVIS metrics on `samples` resampled test sets.

    Args:
        gt: lvis_fast.LvisGroundTruth; records: lvis_fast.MatchRecords of one run on it
            (standard LVIS AP: every record within its image's cap).
        samples: number of draws (`draws(len(gt.img_ids), samples, seed)`).
    Returns:
        {metric: (samples,) float64}, the keys of `lvis_fast.summarize` (fractions; -1 where
        undefined in a draw, e.g. a frequency group without ground truth).
    """
    rows = []
    for sel in draws(len(gt.img_ids), samples, seed):
        sub_gt, sub_records = resample(gt, records, sel)
        rows.append(summarize(sub_gt, *accumulate(sub_gt, sub_records), max_dets))
    return {k: np.array([r[k] for r in rows], np.float64) for k in (rows[0] if rows else {})}
