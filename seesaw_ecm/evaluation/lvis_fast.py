"""Fast, lean LVIS evaluation (bbox and segm) that gives the numbers of `lvis.LVISEval`.

Why hand-written: the official `lvis` API keeps a Python dict per detection, a deep copy of the
ground truth, an IoU matrix and an evaluation dict per (image, category), and loops over
detections in Python; at LVIS v1 val size that is minutes per task and more than 20 GiB.
LVIS matching is local to one (image, category) pair, so this module splits the work in two:

1. `LvisMatcher.add` (per process, any number of calls, each with complete images): caps each
   image at its top `max_dets` detections, drops zero-area ones and those of categories the
   image is not annotated for, computes IoUs only inside (image, category) pairs that have both
   ground truth and detections (pycocotools' RLE IoU for masks, an equal vectorised formula for
   boxes), runs LVIS' greedy matching vectorised over pairs, area ranges and IoU thresholds,
   and keeps per detection only its score, category, image, position and two 10-bit masks
   (true positive, false positive) per area range: `MatchRecords`.
2. `accumulate` (one process): merges the records of all processes / chunks in the order
   `lvis` sorts them (score descending; ties by image id, then by the detection's position in
   its image's results) and builds the same precision / recall arrays; `summarize` then gives
   the same metrics with the same code as `LVISEval.summarize`.

The rules reproduced from lvis 0.5.3 (`lvis/results.py`, `lvis/eval.py`):
- at most `max_dets` detections per image, the highest scores, ties kept in input order;
  the cap counts every detection of the image (any category, zero area included);
- detection area = w * h of its box when the first result has a "bbox", else its mask area;
  ground-truth area = its "area" field; both must be > 0 (others are dropped);
- a detection is evaluated only if its category is annotated in the image (some ground truth)
  or listed in the image's `neg_category_ids`; otherwise it is ignored entirely;
- an unmatched detection is ignored if it is outside the area range or its category is in the
  image's `not_exhaustive_category_ids`; a detection matched to an ignored ground truth
  (outside the area range, or with a true "ignore" field) is ignored;
- area ranges all / small / medium / large with inclusive bounds, 10 IoU thresholds
  0.50:0.95, 101 recall thresholds; -1 for (category, area) without ground truth, and mean
  over the entries > -1 (or -1) in the summary.
Unsupported, as they are in practice: duplicate image or annotation ids in the ground truth,
results that mix entries with and without "bbox".

Beyond lvis 0.5.3 (facts and sources: docs of the project, "LVIS metrics"):
- AP-fixed (Dave et al. 2021, large-vocab-devil `scripts/evaluate_ap_fixed.py`): the top
  `topk_per_class` detections of each category over the whole set, no per-image cap, then
  LVISResults(max_dets=-1) + LVISEval. `TopKPerClass` finds them across chunks and processes.
  Every detection is matched once; dropping a category's lowest-ranked detections (or an
  image's, for the 300 cap) never changes how the kept ones match, since they come last in
  their (image, category) pair. So one set of records gives standard AP (records flagged
  `in_cap`) and AP-fixed (records in the top K). Ties at a category's K-th score are broken by
  (image id, position in the image's results); the reference keeps the results file's order,
  the same when the file is grouped by image in id order (as FastLVISEvaluator writes it).
- AP-pool (same paper, `LVISPooledEval`): the same matching, one precision / recall curve per
  pool of categories (all, r, c, f; area "all"), all detections of the pool ranked together.
- Boundary AP (Cheng et al. 2021, boundary-iou-api): iou_type "boundary", IoU = min(mask IoU,
  boundary IoU), boundary = mask minus its erosion by round(0.02 x image diagonal) pixels
  (at least 1) with the image border counting as background. LVIS has no crowd annotations
  (crowd ones would keep mask IoU in the reference).

This module imports no detectron2: it needs numpy and pycocotools (and OpenCV, a dependency of
lvis, for boundary AP).
"""
import json
import math
from collections import OrderedDict

import numpy as np
import pycocotools.mask as mask_utils

from ..errors import SeesawEcmError

# lvis.eval.Params, built with the same expressions so that the floats are identical.
IOU_THRS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
REC_THRS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
AREA_RNGS = np.array([[0 ** 2, 1e5 ** 2], [0 ** 2, 32 ** 2], [32 ** 2, 96 ** 2],
                      [96 ** 2, 1e5 ** 2]], dtype=np.float64)
AREA_LABELS = ("all", "small", "medium", "large")
FREQ_LABELS = ("r", "c", "f")
IOU_TYPES = ("bbox", "segm", "boundary")
POOLS = ("all",) + FREQ_LABELS
# boundary-iou-api's dilation_ratio: erosion depth as a fraction of the image diagonal
BOUNDARY_DILATION_RATIO = 0.02
# lvis compares an IoU with min(threshold, 1 - 1e-10)
_EFF_THRS = np.minimum(IOU_THRS, 1 - 1e-10)
_T, _A = len(IOU_THRS), len(AREA_RNGS)
_BITS = (1 << np.arange(_T)).astype(np.uint16)
# AP-fixed: entries / records buffered before a TopKPerClass merge or a matcher's prune
_MIN_BUFFER = 1 << 16


def _lookup(sorted_ids, query, what):
    """Positions of `query` (N,) in the sorted unique array `sorted_ids`; -1 where absent
    (what=None) or a SeesawEcmError naming the first unknown id."""
    idx = np.searchsorted(sorted_ids, query)
    idx = np.minimum(idx, len(sorted_ids) - 1) if len(sorted_ids) else np.zeros_like(idx)
    found = (sorted_ids[idx] == query) if len(sorted_ids) else np.zeros(len(query), bool)
    if what is not None and not found.all():
        bad = query[~found][0]
        raise SeesawEcmError(f"Result refers to {what} {bad}, which is not in the ground truth; "
                             "evaluate results against the annotation file they were made for.")
    return np.where(found, idx, -1)


def _to_rle(segm, height, width):
    """lvis.LVIS.ann_to_rle: polygons -> merged RLE, uncompressed RLE -> RLE, RLE as is."""
    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    if isinstance(segm["counts"], list):
        return mask_utils.frPyObjects(segm, height, width)
    return segm


def _polygons_to_rles(segms, height, width):
    """[_to_rle(s) for s in segms] with one pycocotools call for all polygons (per-call
    overhead dominates for small polygons). Merging a single part returns it unchanged
    (pycocotools' rleMerge copies it for n == 1), so only multi-part ones are merged."""
    if not all(isinstance(s, list) for s in segms):
        return [_to_rle(s, height, width) for s in segms]
    parts = mask_utils.frPyObjects([p for s in segms for p in s], height, width)
    out, start = [], 0
    for s in segms:
        out.append(parts[start] if len(s) == 1 else mask_utils.merge(parts[start:start + len(s)]))
        start += len(s)
    return out


def _mask_area(rles):
    """(N,) float64 pixel counts of RLEs. pycocotools 2.0.x builds its output with
    np.array((n,), dtype=np.uint8), which overflows under numpy 2 for n > 255: 255 at a time."""
    parts = [mask_utils.area(rles[i:i + 255]) for i in range(0, len(rles), 255)]
    return np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)


def boundary_rles(rles, height, width, ratio=BOUNDARY_DILATION_RATIO):
    """RLEs of the boundaries of masks (RLEs of one height x width image), as boundary-iou-api's
    `mask_to_boundary`: mask minus its erosion by d = max(1, round(ratio x diagonal)) 3 x 3
    steps, pixels beyond the image counting as background.

    d erosions by a 3 x 3 square are one erosion by a (2d + 1) square, and a mask's erosion
    lies inside its bounding box, so each mask is eroded once, on its box only (OpenCV).
    """
    import cv2

    if not rles:
        return []
    d = max(1, int(round(ratio * math.sqrt(height ** 2 + width ** 2))))
    kernel = np.ones((2 * d + 1, 2 * d + 1), np.uint8)
    masks = mask_utils.decode(rles)  # (H, W, N) Fortran order
    for i, (x, y, w, h) in enumerate(mask_utils.toBbox(rles).astype(np.int64).tolist()):
        if w and h:
            crop = np.ascontiguousarray(masks[y:y + h, x:x + w, i])
            masks[y:y + h, x:x + w, i] = crop - cv2.erode(
                crop, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return mask_utils.encode(masks)


def box_iou(dt, gt):
    """IoU of boxes [x, y, w, h]: dt (..., 4) against gt (..., 4), broadcast -> (...).

    The operations of pycocotools' C `bbIou` (iscrowd 0) in the same order, so the float64
    results are bit-identical to `pycocotools.mask.iou`.
    """
    dx, dy, dw, dh = np.moveaxis(dt, -1, 0)
    gx, gy, gw, gh = np.moveaxis(gt, -1, 0)
    w = np.minimum(dw + dx, gw + gx) - np.maximum(dx, gx)
    h = np.minimum(dh + dy, gh + gy) - np.maximum(dy, gy)
    inter = w * h
    union = dw * dh + gw * gh - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
    return np.where((w > 0) & (h > 0), iou, 0.0)


class LvisGroundTruth:
    """The ground truth of an LVIS-format dataset, as flat arrays (no per-annotation objects
    beyond the references to the polygons of the parsed file).

    Images are numbered by rank in sorted id order, categories likewise (`img_ids` (I,),
    `cat_ids` (K,)). Annotations kept (the ones `lvis` evaluates: known image and category,
    0 < area < inf) are in lvis' order (image rank, then file order): `gt_img`, `gt_cat`
    (N,) int64 ranks, `gt_area` (N,) float64, `gt_ignore` (N,) bool, `gt_id` (N,) int64,
    `gt_box` (N, 4) float64, `gt_segm` list of N polygons / RLEs.
    A (image, category) pair is keyed `img_rank * K + cat_rank`.
    """

    def __init__(self, dataset):
        """dataset: the parsed LVIS json (dict with images, annotations, categories) or a path."""
        if isinstance(dataset, str):
            with open(dataset) as f:
                dataset = json.load(f)
        imgs = {im["id"]: im for im in dataset["images"]}
        cats = {c["id"]: c for c in dataset["categories"]}
        self.img_ids = np.array(sorted(imgs), dtype=np.int64)
        self.cat_ids = np.array(sorted(cats), dtype=np.int64)
        num_cats = len(self.cat_ids)
        self.heights = np.array([imgs[i]["height"] for i in self.img_ids.tolist()], np.int64)
        self.widths = np.array([imgs[i]["width"] for i in self.img_ids.tolist()], np.int64)

        # no category with a frequency (a COCO-format set): empty groups, APr / APc / APf -1
        self.freq_groups = [[] for _ in FREQ_LABELS]
        has_freq = any("frequency" in c for c in cats.values())
        for k, cid in enumerate(self.cat_ids.tolist()):
            freq = cats[cid].get("frequency")
            if has_freq and freq not in FREQ_LABELS:
                raise SeesawEcmError(
                    f"Category {cid} has frequency {freq!r}; LVIS evaluation needs 'r', 'c' or "
                    "'f' for every category (the 'frequency' field of the annotation file), or "
                    "no frequency at all (APr / APc / APf then unavailable).")
            if has_freq:
                self.freq_groups[FREQ_LABELS.index(freq)].append(k)

        def pair_keys(field):
            rows, cols = [], []
            for r, iid in enumerate(self.img_ids.tolist()):
                ids = imgs[iid].get(field, [])
                rows.extend([r] * len(ids))
                cols.extend(ids)
            ks = _lookup(self.cat_ids, np.array(cols, np.int64), None)
            rows = np.array(rows, np.int64)
            return np.unique(rows[ks >= 0] * num_cats + ks[ks >= 0])

        self.neg_keys = pair_keys("neg_category_ids")
        self.not_exhaustive_keys = pair_keys("not_exhaustive_category_ids")

        anns = dataset["annotations"]
        img = _lookup(self.img_ids, np.array([a["image_id"] for a in anns], np.int64), None)
        cat = _lookup(self.cat_ids, np.array([a["category_id"] for a in anns], np.int64), None)
        area = np.array([a["area"] for a in anns], np.float64)
        keep = (img >= 0) & (cat >= 0) & (area > 0) & (area < np.inf)
        order = np.flatnonzero(keep)[np.argsort(img[keep], kind="stable")]
        self.gt_img, self.gt_cat, self.gt_area = img[order], cat[order], area[order]
        self.gt_ignore = np.array([bool(anns[i].get("ignore", 0)) for i in order.tolist()], bool)
        self.gt_id = np.array([anns[i]["id"] for i in order.tolist()], np.int64)
        self.gt_box = np.array([anns[i]["bbox"] for i in order.tolist()], np.float64).reshape(-1, 4)
        self.gt_segm = [anns[i]["segmentation"] for i in order.tolist()]
        key = self.gt_img * num_cats + self.gt_cat
        # annotations grouped by pair (stable: file order inside a pair, as lvis keeps them)
        self._by_key = np.argsort(key, kind="stable")
        self._keys_sorted = key[self._by_key]
        self.pos_keys = np.unique(key)
        # (N, A): the annotation does not count in area range a
        self.gt_ig = self.gt_ignore[:, None] | (self.gt_area[:, None] < AREA_RNGS[:, 0]) | (
            self.gt_area[:, None] > AREA_RNGS[:, 1])
        # (K, A) non-ignored ground truth per category and area range
        self.num_gt = np.stack([np.bincount(self.gt_cat[~self.gt_ig[:, a]], minlength=num_cats)
                                for a in range(_A)], axis=1)

    @property
    def num_categories(self):
        return len(self.cat_ids)

    def pair_gt(self, keys):
        """For pair keys (P,): start (P,) into `gt_rows_by_pair` and count (P,) of annotations."""
        start = np.searchsorted(self._keys_sorted, keys, side="left")
        end = np.searchsorted(self._keys_sorted, keys, side="right")
        return start, end - start

    @property
    def gt_rows_by_pair(self):
        """(N,) annotation rows grouped by pair key, file order inside a pair."""
        return self._by_key


class MatchRecords:
    """Compact per-detection matching results; all arrays have N rows.

    cat (N,) int32 category rank; score (N,) float64; img (N,) int32 image rank; pos (N,) int32
    position of the detection among its image's results (ties in score are broken by (img, pos)
    as in lvis); tp, fp (N, 4) uint16: bit t set if the detection is a true / false positive at
    IoU threshold t in area range a; in_cap (N,) bool: the detection is among its image's top
    max_dets (always, when the matcher applied the cap itself). Detections that are ignored at
    every threshold and area are not kept (they change no precision or recall value).
    images: the image ranks covered.
    """

    FIELDS = ("cat", "score", "img", "pos", "tp", "fp", "in_cap", "images")

    def __init__(self, cat, score, img, pos, tp, fp, in_cap, images):
        self.cat, self.score, self.img, self.pos = cat, score, img, pos
        self.tp, self.fp, self.in_cap, self.images = tp, fp, in_cap, images

    def __len__(self):
        return len(self.cat)

    @classmethod
    def empty(cls):
        return cls(np.zeros(0, np.int32), np.zeros(0), np.zeros(0, np.int32),
                   np.zeros(0, np.int32), np.zeros((0, _A), np.uint16),
                   np.zeros((0, _A), np.uint16), np.zeros(0, bool), np.zeros(0, np.int32))

    def subset(self, keep):
        """The records where keep (N,) bool is True (same images covered)."""
        return MatchRecords(*(getattr(self, f)[keep] for f in self.FIELDS[:-1]), self.images)

    @classmethod
    def concatenate(cls, parts):
        """One MatchRecords of several (chunks, processes). Raises SeesawEcmError if an image
        occurs in two parts (its detections must be capped and matched together)."""
        parts = list(parts) or [cls.empty()]
        merged = cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in cls.FIELDS))
        if len(np.unique(merged.images)) != len(merged.images):
            raise SeesawEcmError("The same image was evaluated in two parts (processes or add() "
                                 "calls); each image's results must be given together, once.")
        return merged

    def save(self, path):
        np.savez(path, **{f: getattr(self, f) for f in self.FIELDS})

    @classmethod
    def load(cls, path):
        with np.load(path) as data:
            return cls(*(data[f] for f in cls.FIELDS))


def _before(score, img, pos, th_score, th_img, th_pos):
    """(N,) bool: detection (score, img, pos) ranks at or before (th_score, th_img, th_pos) in
    lvis' order (score descending, then image rank, then position)."""
    return (score > th_score) | ((score == th_score) & (
        (img < th_img) | ((img == th_img) & (pos <= th_pos))))


class TopKPerClass:
    """The best `k` detections of each category among all those seen (any image, evaluated or
    not, as the reference selects them from the results file), in lvis' order: score
    descending, then image rank, then position in the image's results.

    Memory is at most k entries per category plus a pending buffer: new entries below a
    category's current k-th are dropped at once, and the buffer is merged (one sort) whenever
    it outgrows the kept entries. `add` skips images it has seen, so the matchers of several
    IoU types can share one. Per-process instances are merged with `merge`.
    """

    FIELDS = ("cat", "score", "img", "pos")

    def __init__(self, k, num_cats, num_imgs):
        if k <= 0:
            raise SeesawEcmError(f"Top-K per category needs K > 0, got {k}.")
        self.k = k
        self.seen = np.zeros(num_imgs, bool)
        self._kept = tuple(np.zeros(0, t) for t in (np.int32, np.float64, np.int32, np.int32))
        self._pending = []
        self._num_pending = 0
        # the k-th entry per category; (-inf, max, max) while a category has fewer than k
        self.th_score = np.full(num_cats, -np.inf)
        self.th_img = np.full(num_cats, np.iinfo(np.int32).max, np.int64)
        self.th_pos = np.full(num_cats, np.iinfo(np.int32).max, np.int64)

    def __len__(self):
        self._merge()
        return len(self._kept[0])

    def contains(self, cat, score, img, pos):
        """(N,) bool: the detections rank within their category's top k (of those merged so
        far: a superset of the final top k until every image has been added)."""
        return _before(score, img, pos, self.th_score[cat], self.th_img[cat], self.th_pos[cat])

    def add(self, cat, score, img, pos):
        """Detections (N,) of complete images (cat < 0: unknown category, skipped)."""
        new = ~self.seen[img]
        if not new.any():
            return
        self.seen[img[new]] = True
        keep = new & (cat >= 0)
        keep[keep] = self.contains(cat[keep], score[keep], img[keep], pos[keep])
        self._pending.append((cat[keep], score[keep], img[keep], pos[keep]))
        self._num_pending += int(keep.sum())
        if self._num_pending > max(len(self._kept[0]), _MIN_BUFFER):
            self._merge()

    def _merge(self):
        if not self._pending:
            return
        cat, score, img, pos = (np.concatenate([k] + [p[i] for p in self._pending])
                                for i, k in enumerate(self._kept))
        self._pending, self._num_pending = [], 0
        order = np.lexsort((pos, img, -score, cat))
        first = np.searchsorted(cat[order], cat[order], side="left")
        order = order[np.arange(len(order)) - first < self.k]
        self._kept = cat, score, img, pos = tuple(a[order] for a in (cat, score, img, pos))
        full = np.flatnonzero(np.bincount(cat, minlength=len(self.th_score)) >= self.k)
        last = np.searchsorted(cat, full, side="right") - 1
        self.th_score[full], self.th_img[full], self.th_pos[full] = (
            score[last], img[last], pos[last])

    @classmethod
    def merge(cls, parts):
        """One TopKPerClass of several processes' (disjoint images)."""
        parts = list(parts)
        out = cls(parts[0].k, len(parts[0].th_score), len(parts[0].seen))
        for p in parts:
            p._merge()
            if (out.seen & p.seen).any():
                raise SeesawEcmError("The same image was ranked in two processes; each image's "
                                     "results must be given to one process, once.")
            out.seen |= p.seen
            out._pending.append(p._kept)
        out._merge()
        return out


def _greedy_match(iou, row_start, nrows, gt_ig):
    """LVIS' greedy matching, vectorised over pairs, area ranges and IoU thresholds.

    iou (R, G) float64: IoU of each detection row with its pair's ground truth, columns
    >= the pair's count padded with -1; a pair's rows are contiguous, in lvis' detection order.
    row_start, nrows (P,): each pair's rows. gt_ig (P, A, G) bool: ground truth ignored in area
    range a (padding: anything). Returns found (R, A, T) bool and col (R, A, T) int64: the
    matched ground-truth column.

    lvis scans a detection's ground truth non-ignored first, skips matched ones, stops at the
    first ignored one once a non-ignored is matched, and keeps the last one with the highest
    IoU >= the threshold. So: the last maximum over unmatched non-ignored candidates, else
    over unmatched ignored ones. Detections are processed in order inside each pair; the loop
    runs over the rank d of a detection inside its pair, all pairs at once.
    """
    num_rows, num_cols = iou.shape
    found = np.zeros((num_rows, _A, _T), bool)
    col = np.zeros((num_rows, _A, _T), np.int64)
    # a detection with IoU < 0.5 with every ground truth matches nothing and changes nothing
    cand = iou.max(axis=1) >= _EFF_THRS[0] if num_cols else np.zeros(num_rows, bool)
    pair_of_row = np.repeat(np.arange(len(nrows)), nrows)
    rows = np.flatnonzero(cand)
    if len(rows) == 0:
        return found, col
    pairs, first, count = np.unique(pair_of_row[rows], return_index=True, return_counts=True)
    by_count = np.argsort(-count, kind="stable")  # active pairs form a prefix at each step
    pairs, first, count = pairs[by_count], first[by_count], count[by_count]
    gt_ig = gt_ig[pairs][:, :, None, :]  # (P', A, 1, G)
    matched = np.zeros((len(pairs), _A, _T, num_cols), bool)
    matched |= (iou[row_start[pairs]] < -0.5)[:, None, None, :]  # padding columns
    thr = _EFF_THRS[:, None]
    col_ids = np.arange(num_cols)
    for d in range(int(count[0])):
        na = int(np.searchsorted(-count, -d, side="left"))  # pairs with count > d
        r = rows[first[:na] + d]
        io = iou[r][:, None, None, :]  # (na, 1, 1, G)
        ok = (io >= thr) & ~matched[:na]  # (na, A, T, G)
        ok_reg = ok & ~gt_ig[:na]
        sel = np.where(ok_reg.any(axis=-1, keepdims=True), ok_reg, ok)
        val = np.where(sel, io, -np.inf)
        m = num_cols - 1 - np.argmax(val[..., ::-1], axis=-1)  # last maximum
        hit = sel.any(axis=-1)
        found[r], col[r] = hit, m
        matched[:na] |= hit[..., None] & (col_ids == m[..., None])
    return found, col


class LvisMatcher:
    """The per-process half of the evaluation: give it complete images' results (any number
    of `add` calls, each image once), then take `records()`."""

    def __init__(self, gt, iou_type, max_dets=300, box_area=None, ranking=None):
        """gt: LvisGroundTruth; iou_type: "bbox", "segm" or "boundary"; max_dets: detections
        kept per image (LVIS: 300; < 0 keeps all); box_area: detection area from the box (True)
        or the mask (False); None: as lvis decides, from whether the first result has a "bbox".
        ranking: a TopKPerClass (AP-fixed; may be shared by several matchers): every detection
        is matched, records flag the max_dets cap in `in_cap`, and those neither within the
        cap nor in the ranking's top K are dropped along the way."""
        if iou_type not in IOU_TYPES:
            raise SeesawEcmError(f"iou_type {iou_type!r} is not supported: use one of "
                                 f"{', '.join(repr(t) for t in IOU_TYPES)}.")
        self.gt, self.iou_type, self.max_dets = gt, iou_type, max_dets
        self.ranking = ranking
        self._box_area = box_area
        self._seen = np.zeros(len(gt.img_ids), bool)
        self._parts = []
        self._pruned_size = 0

    def records(self):
        self._prune()
        return MatchRecords.concatenate(self._parts)

    def _prune(self):
        """Drop records that are neither in their image's cap nor in the ranking's top K."""
        if self.ranking is None:
            return
        self.ranking._merge()
        for i, r in enumerate(self._parts):
            self._parts[i] = r.subset(r.in_cap | self.ranking.contains(r.cat, r.score, r.img,
                                                                       r.pos))
        self._pruned_size = sum(len(r) for r in self._parts)

    def add(self, results, in_cap=None):
        """results: list of LVIS result dicts (image_id, category_id, score, bbox [x, y, w, h]
        and / or segmentation RLE) holding ALL results of the images they mention. in_cap:
        (N,) bool, the results within their image's cap (given by the model with AP-fixed;
        per image a prefix of its results by score); None: each image's top max_dets by score."""
        if len(results) == 0:
            return
        gt, n = self.gt, len(results)
        img = _lookup(gt.img_ids, np.fromiter((r["image_id"] for r in results), np.int64, n),
                      "image_id")
        uniq = np.unique(img)
        if self._seen[uniq].any():
            raise SeesawEcmError("LvisMatcher.add got results of an image it already has; give "
                                 "all results of an image in one call.")
        self._seen[uniq] = True
        score = np.fromiter((r["score"] for r in results), np.float64, n)
        if in_cap is not None:
            in_cap = np.asarray(in_cap, bool)
            if in_cap.shape != (n,):
                raise SeesawEcmError(f"LvisMatcher.add: in_cap has shape {in_cap.shape}, the "
                                     f"results are {n}.")
        elif self.max_dets < 0:
            in_cap = np.ones(n, bool)
        else:  # top max_dets per image by score, ties in input order (lvis' stable sort)
            order = np.lexsort((-score, img))
            in_cap = np.zeros(n, bool)
            starts = np.searchsorted(img[order], img[order], side="left")
            in_cap[order] = np.arange(n) - starts < self.max_dets
        keep = np.flatnonzero(in_cap) if self.ranking is None else np.arange(n)
        if self._box_area is None:
            self._box_area = "bbox" in results[0]
        cat = _lookup(gt.cat_ids, np.fromiter((results[i]["category_id"] for i in keep.tolist()),
                                              np.int64, len(keep)), None)
        if self.ranking is not None:  # every result of the category counts in its top K
            self.ranking.add(cat, score, img, keep)
        key = img[keep] * gt.num_categories + cat
        # evaluated: known category, annotated in the image or negative for it (checked before
        # the areas, which need the masks decoded)
        annotated = (_lookup(gt.pos_keys, key, None) >= 0) | (_lookup(gt.neg_keys, key, None) >= 0)
        ev = np.flatnonzero((cat >= 0) & annotated)
        keep, cat, key = keep[ev], cat[ev], key[ev]
        if self.ranking is not None:  # those already out of both selections are not matched
            sel = in_cap[keep] | self.ranking.contains(cat, score[keep], img[keep], keep)
            keep, cat, key = keep[sel], cat[sel], key[sel]
        img, score, pos, in_cap = img[keep], score[keep], keep, in_cap[keep]
        geom, area = self._geometry([results[i] for i in keep.tolist()], img)
        ok = np.flatnonzero((area > 0) & (area < np.inf))
        # group by pair; inside a pair score descending, ties by position (lvis' mergesort)
        ok = ok[np.lexsort((-score[ok], key[ok]))]
        self._parts.append(self._match(key[ok], cat[ok], score[ok], img[ok], pos[ok],
                                       area[ok], [geom[i] for i in ok.tolist()]
                                       if self.iou_type != "bbox" else geom[ok], in_cap[ok],
                                       uniq))
        if sum(len(r) for r in self._parts) > 2 * max(self._pruned_size, _MIN_BUFFER):
            self._prune()

    def _geometry(self, kept, img):
        """Per kept result: (boxes (N, 4) or RLEs for segm, area (N,)) as LVISResults makes."""
        if self._box_area:
            box = np.array([r["bbox"] for r in kept], np.float64).reshape(-1, 4)
            area = box[:, 2] * box[:, 3]
            if self.iou_type == "bbox":
                return box, area
            # LVISResults' box polygon where a result has no mask (made into an RLE, like
            # every segmentation, only if the detection meets ground truth: _pair_ious)
            segm = [r.get("segmentation", [[x1, y1, x1, y1 + h, x1 + w, y1 + h, x1 + w, y1]])
                    for r, (x1, y1, w, h) in zip(kept, box.tolist())]
            return segm, area
        segm = [r["segmentation"] for r in kept]
        area = _mask_area(segm)
        if self.iou_type == "bbox":
            return (mask_utils.toBbox(segm) if segm else np.zeros((0, 4))), area
        return segm, area

    def _match(self, key, cat, score, img, pos, area, geom, in_cap, images):
        """Detections (N,) grouped by pair key, lvis' order inside a pair -> MatchRecords."""
        gt, n = self.gt, len(key)
        pair_keys, pair_first, nd = np.unique(key, return_index=True, return_counts=True)
        gstart, ng = gt.pair_gt(pair_keys)
        found = np.zeros((n, _A, _T), bool)
        m_ig = np.zeros((n, _A, _T), bool)  # the matched ground truth is ignored
        m_id0 = np.zeros((n, _A, _T), bool)  # ... or has id 0 (lvis then counts no match)
        # pairs of similar ground-truth counts share a padded width (powers of two)
        width = np.where(ng > 0, 1 << np.ceil(np.log2(np.maximum(ng, 1))).astype(int), 0)
        for w in np.unique(width[width > 0]).tolist():
            p = np.flatnonzero(width == w)
            rows = np.concatenate([np.arange(s, s + c) for s, c in zip(pair_first[p], nd[p])])
            local_start = np.concatenate([[0], np.cumsum(nd[p])[:-1]])
            gt_rows = np.full((len(p), w), -1, np.int64)
            valid = np.arange(w) < ng[p][:, None]
            gt_rows[valid] = gt.gt_rows_by_pair[(gstart[p][:, None] + np.arange(w))[valid]]
            iou = self._pair_ious(geom, rows, p, nd, local_start, gt_rows, ng, img)
            pair_ig = np.where(valid[:, None, :], gt.gt_ig[gt_rows].transpose(0, 2, 1), True)
            f, c = _greedy_match(iou, local_start, nd[p], pair_ig)
            g = gt_rows[np.repeat(np.arange(len(p)), nd[p])[:, None, None], c]  # (R, A, T)
            found[rows] = f
            m_ig[rows] = f & gt.gt_ig[g, np.arange(_A)[None, :, None]]
            m_id0[rows] = f & (gt.gt_id[g] == 0)
        matched = found & ~m_id0
        # unmatched detections outside the area range or of a not-exhaustive category: ignored
        ig_mask = (area[:, None] < AREA_RNGS[:, 0]) | (area[:, None] > AREA_RNGS[:, 1])
        ig_mask |= (_lookup(gt.not_exhaustive_keys, key, None) >= 0)[:, None]
        ignored = m_ig | (~matched & ig_mask[:, :, None])
        tp = ((matched & ~ignored) * _BITS).sum(axis=-1, dtype=np.uint16)
        fp = ((~matched & ~ignored) * _BITS).sum(axis=-1, dtype=np.uint16)
        keep = np.flatnonzero((tp | fp).any(axis=1))
        return MatchRecords(cat[keep].astype(np.int32), score[keep], img[keep].astype(np.int32),
                            pos[keep].astype(np.int32), tp[keep], fp[keep], in_cap[keep],
                            images.astype(np.int32))

    def _pair_ious(self, geom, rows, pairs, nd, local_start, gt_rows, ng, img):
        """(R, G) IoU of detection rows with their pair's ground truth; padding -1."""
        gt = self.gt
        if self.iou_type == "bbox":
            pair_of_row = np.repeat(np.arange(len(pairs)), nd[pairs])
            g = gt_rows[pair_of_row]
            iou = box_iou(geom[rows][:, None, :], gt.gt_box[np.maximum(g, 0)])
            return np.where(g >= 0, iou, -1.0)
        # masks: pycocotools' RLE IoU (iscrowd 0), one call per pair (boundary: the minimum
        # with the IoU of the boundaries); ground truth polygons
        # are turned into RLEs here, only for pairs that have detections
        iou = np.full((len(rows), gt_rows.shape[1]), -1.0)
        for j, p in enumerate(pairs.tolist()):
            g = gt_rows[j, :ng[p]].tolist()
            i = int(img[rows[local_start[j]]])
            h, w = int(gt.heights[i]), int(gt.widths[i])
            gt_rles = _polygons_to_rles([gt.gt_segm[k] for k in g], h, w)
            dt = [_to_rle(geom[k], h, w)
                  for k in rows[local_start[j]:local_start[j] + nd[p]].tolist()]
            pair_iou = mask_utils.iou(dt, gt_rles, [0] * len(g))
            if self.iou_type == "boundary":
                # min(mask IoU, boundary IoU) only where the mask IoU reaches the lowest
                # threshold: elsewhere the minimum is below every threshold too, and matching
                # only compares IoUs with thresholds (boundaries cost a decode and an encode)
                close = pair_iou >= _EFF_THRS[0]
                di, gi = np.flatnonzero(close.any(axis=1)), np.flatnonzero(close.any(axis=0))
                if len(di):
                    sub = np.ix_(di, gi)
                    pair_iou[sub] = np.minimum(pair_iou[sub], mask_utils.iou(
                        boundary_rles([dt[k] for k in di.tolist()], h, w),
                        boundary_rles([gt_rles[k] for k in gi.tolist()], h, w), [0] * len(gi)))
            iou[local_start[j]:local_start[j] + nd[p], :len(g)] = pair_iou
        return iou


def _curves(tp, fp, num_gt):
    """lvis' precision / recall of one ranked list of detections.

    tp, fp (n, A') uint16 bit flags in rank order; num_gt (A',) > 0 non-ignored ground truth.
    Returns precision (T, R, A') at the recall thresholds and recall (T, A'); zeros if n = 0.
    """
    num_areas, n = len(num_gt), len(tp)
    precision = np.zeros((_T, len(REC_THRS), num_areas))
    if n == 0:
        return precision, np.zeros((_T, num_areas))
    shifts = np.arange(_T, dtype=np.uint16)[None, :, None]
    # (A', T, n) flags in rank order
    tp_sum = np.cumsum((tp.T[:, None, :] >> shifts) & 1, axis=2, dtype=np.int64).astype(np.float64)
    fp_sum = np.cumsum((fp.T[:, None, :] >> shifts) & 1, axis=2, dtype=np.int64).astype(np.float64)
    rc = tp_sum / num_gt.astype(np.float64)[:, None, None]
    pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
    # precision made non-increasing from the right (lvis' backwards loop)
    pr = np.maximum.accumulate(pr[:, :, ::-1], axis=2)[:, :, ::-1]
    for a in range(num_areas):
        for t in range(_T):
            idx = np.searchsorted(rc[a, t], REC_THRS, side="left")
            inside = idx < n
            precision[t, inside, a] = pr[a, t, idx[inside]]
    return precision, rc[:, :, -1].T


def accumulate(gt, records):
    """lvis' LVISEval.accumulate on merged records.

    Returns precision (T=10, R=101, K, A=4) and recall (T, K, A) float64, -1 where a
    (category, area range) has no non-ignored ground truth.
    """
    num_cats = gt.num_categories
    precision = -np.ones((_T, len(REC_THRS), num_cats, _A))
    recall = -np.ones((_T, num_cats, _A))
    # lvis concatenates per-image results in image order and mergesorts by -score
    order = np.lexsort((records.pos, records.img, -records.score, records.cat))
    bounds = np.searchsorted(records.cat[order], np.arange(num_cats + 1))
    for k in np.flatnonzero(gt.num_gt.any(axis=1)).tolist():
        sel = order[bounds[k]:bounds[k + 1]]
        areas = np.flatnonzero(gt.num_gt[k] > 0)
        precision[:, :, k, areas], recall[:, k, areas] = _curves(
            records.tp[sel][:, areas], records.fp[sel][:, areas], gt.num_gt[k, areas])
    return precision, recall


def pooled_ap(gt, records):
    """AP-pool, large-vocab-devil's LVISPooledEval: per pool of categories (all, r, c, f), one
    precision curve over all its detections ranked together (score descending; ties by image
    rank, category rank, position, the order in which it concatenates them), area "all".
    Returns OrderedDict AP-pooled-{all,r,c,f}: mean precision over IoU and recall thresholds,
    -1 for a pool without ground truth."""
    out = OrderedDict()
    for pool in POOLS:
        cats = (np.arange(gt.num_categories) if pool == "all"
                else np.array(gt.freq_groups[FREQ_LABELS.index(pool)], np.int64))
        num_gt = gt.num_gt[cats, 0].sum()
        if num_gt == 0:
            out[f"AP-pooled-{pool}"] = -1
            continue
        sel = np.flatnonzero(np.isin(records.cat, cats))
        sel = sel[np.lexsort((records.pos[sel], records.cat[sel], records.img[sel],
                              -records.score[sel]))]
        precision, _ = _curves(records.tp[sel][:, :1], records.fp[sel][:, :1], np.array([num_gt]))
        out[f"AP-pooled-{pool}"] = float(np.mean(precision))
    return out


def _summarize(precision, recall, freq_groups, kind, iou_thr=None, area="all", group=None):
    """lvis' LVISEval._summarize, the same indexing and mean."""
    aidx = [AREA_LABELS.index(area)]
    if kind == "ap":
        s = precision
        if iou_thr is not None:
            s = s[np.where(iou_thr == IOU_THRS)[0]]
        s = s[:, :, freq_groups[group], aidx] if group is not None else s[:, :, :, aidx]
    else:
        s = recall
        if iou_thr is not None:
            s = s[np.where(iou_thr == IOU_THRS)[0]]
        s = s[:, :, aidx]
    return -1 if len(s[s > -1]) == 0 else np.mean(s[s > -1])


def summarize(gt, precision, recall, max_dets=300):
    """The metrics of LVISEval.summarize, same keys and order: AP, AP50, AP75, APs, APm, APl,
    APr, APc, APf, AR@300, ARs@300, ARm@300, ARl@300 (fractions; -1 where undefined).
    lvis names the AR keys with its own max_dets (300), whatever cap the results had."""
    fg = gt.freq_groups
    out = OrderedDict()
    out["AP"] = _summarize(precision, recall, fg, "ap")
    out["AP50"] = _summarize(precision, recall, fg, "ap", iou_thr=0.50)
    out["AP75"] = _summarize(precision, recall, fg, "ap", iou_thr=0.75)
    for area in AREA_LABELS[1:]:
        out["AP" + area[0]] = _summarize(precision, recall, fg, "ap", area=area)
    for g, label in enumerate(FREQ_LABELS):
        out["AP" + label] = _summarize(precision, recall, fg, "ap", group=g)
    out[f"AR@{max_dets}"] = _summarize(precision, recall, fg, "ar")
    for area in AREA_LABELS[1:]:
        out[f"AR{area[0]}@{max_dets}"] = _summarize(precision, recall, fg, "ar", area=area)
    return out


def per_category_ap(precision):
    """(K,) AP of each category over IoU 0.50:0.95, area all; NaN without ground truth."""
    p = precision[:, :, :, 0]
    valid = p > -1
    with np.errstate(invalid="ignore"):
        return np.where(valid.any(axis=(0, 1)),
                        np.where(valid, p, 0).sum(axis=(0, 1)) / valid.sum(axis=(0, 1)), np.nan)


class LvisEvalResult:
    """metrics (OrderedDict, LVISEval.results), precision (T, R, K, A), recall (T, K, A),
    per_category_ap (K,), cat_ids (K,), records (the MatchRecords it was computed from, e.g. for
    `lvis_bootstrap`); `pooled` (OrderedDict of pooled_ap) if asked for.
    max_dets names the AR keys, as lvis does with its params.max_dets (-1 for AP-fixed)."""

    def __init__(self, gt, records, max_dets=300, pooled=False):
        self.precision, self.recall = accumulate(gt, records)
        self.metrics = summarize(gt, self.precision, self.recall, max_dets)
        self.per_category_ap = per_category_ap(self.precision)
        self.cat_ids = gt.cat_ids
        self.records = records
        self.pooled = pooled_ap(gt, records) if pooled else None


def standard_result(gt, records):
    """LVIS AP (each image's top max_dets detections) from records of any matcher."""
    return LvisEvalResult(gt, records.subset(records.in_cap))


def fixed_result(gt, records, ranking, pooled=True):
    """AP-fixed (and AP-pool) from the merged records and TopKPerClass of every process."""
    ranking._merge()
    keep = ranking.contains(records.cat, records.score, records.img, records.pos)
    return LvisEvalResult(gt, records.subset(keep), max_dets=-1, pooled=pooled)


def evaluate(gt, results, iou_type, max_dets=300, chunk_images=1000, topk_per_class=0):
    """Evaluate a list of LVIS result dicts in one process, `chunk_images` images at a time
    (bounds the temporary memory). gt: LvisGroundTruth, parsed json dict or path.
    topk_per_class > 0: AP-fixed with that K (no per-image cap; max_dets unused), with AP-pool
    in `.pooled`; else standard LVIS AP."""
    if not isinstance(gt, LvisGroundTruth):
        gt = LvisGroundTruth(gt)
    ranking = (TopKPerClass(topk_per_class, gt.num_categories, len(gt.img_ids))
               if topk_per_class > 0 else None)
    matcher = LvisMatcher(gt, iou_type, max_dets if ranking is None else -1,
                          box_area=("bbox" in results[0]) if len(results) else None,
                          ranking=ranking)
    if len(results):
        img = np.fromiter((r["image_id"] for r in results), np.int64, len(results))
        order = np.argsort(img, kind="stable")
        bounds = np.flatnonzero(np.diff(img[order])) + 1
        cuts = bounds[chunk_images - 1::chunk_images].tolist()
        for part in np.split(order, cuts):
            matcher.add([results[i] for i in part.tolist()])
    if ranking is None:
        return LvisEvalResult(gt, matcher.records())
    return fixed_result(gt, matcher.records(), ranking)
