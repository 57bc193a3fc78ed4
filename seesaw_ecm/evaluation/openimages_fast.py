"""The official Open Images Challenge detection metric, exact, streamed and fast (numpy only).

The metric is the TF Object Detection API's `OpenImagesDetectionChallengeEvaluator` (what
`metrics/oid_challenge_evaluation.py` runs; docs/EVALUATION.md). That code needs
TensorFlow's protobuf I/O and keeps every image's ground truth and per-class score lists in
Python objects; its matching is a Python loop per (image, class). Matching is local to one
(image, class) pair, so, as `lvis_fast` does for LVIS, the work is split in two:

1. `OpenImagesMatcher.add_arrays` / `add` (per process, complete images per call): keeps the
   detections of classes evaluatable in their image, matches them all at once (no Python loop
   over images, classes or detections) and keeps per output entry only its class, score, TP
   flag, image and position: `OpenImagesRecords`.
2. `OpenImagesEvalResult` (one process): merges the records of all processes in the order the
   official script concatenates them, and computes per-class VOC AP, mAP and AP1..AP5.

The rules (utils/per_image_evaluation.py, utils/object_detection_evaluation.py,
utils/metrics.py), with group-of weight 1 as in the challenge evaluator:
- the ground truth is already expanded to parent classes (`openimages_hierarchy`);
- a detection is evaluated only if its class is evaluatable in its image: a verified image
  label (positive or negative) or the class of one of its boxes; others are ignored, as are
  detections of images without ground truth and boxes with x0 >= x1 or y0 >= y1;
- per (image, class), detections in score order (descending; equal scores: later input first,
  the project's rule, a stable ascending sort reversed). The official code ranks with
  `np.argsort(scores)[::-1]`, numpy's default sort, which is not stable (numpy 2 on an AVX-512
  CPU reorders equal scores even among 4 detections), so its order of equal scores depends on
  the numpy build and the CPU; without equal scores the two orders are the same. Each takes
  the non-group-of box of highest IoU (first one on ties), whether already matched or not:
  IoU >= 0.5 and box unmatched -> TP (box matched); otherwise FP;
- every detection that is not a TP then takes the group-of box of highest IoA (intersection
  over the detection's area; first on ties): IoA >= 0.5 -> the detection is removed, and each
  group-of box hit this way adds one TP with the highest score of its detections (if > 0);
- num_gt of a class = its non-group-of + group-of boxes over all ground-truth images;
  AP = VOC all-point interpolated area (`compute_average_precision`), NaN for classes without
  ground truth; mAP = nan-mean over classes. No cap on detections per image.
- per class, entries are ranked by score over images in sorted image-id order (the order of
  the official script's `groupby('ImageID')`), each image's valid detections in their order,
  then its group-of TPs in box order; equal scores as above (later entry first: the project's
  rule, where the official order depends on numpy's unstable sort).

AP1..AP5 (EQLv2's protocol): the classes sorted by training instance count (ties by class
index) and cut into 5 groups of (almost) equal size, AP1 the rarest; each the mean AP of its
classes with ground truth.
"""
from collections import OrderedDict

import numpy as np

from ..errors import SeesawEcmError
from .lvis_fast import MatchRecords

IOU_THRESHOLD = 0.5  # matching threshold for IoU (non-group-of) and IoA (group-of)
NUM_GROUPS = 5  # AP1..AP5
XYXY_ABS, XYWH_ABS = 0, 1  # detectron2 BoxMode values (this module imports no detectron2)


def _segments(start, count):
    """Flatten ranges [start_i, start_i + count_i): (row (M,), flat index (M,), offset inside
    its range (M,), first position of each non-empty range in the flat arrays)."""
    rows = np.flatnonzero(count > 0)
    rep = count[rows]
    first = np.cumsum(rep) - rep
    offset = np.arange(int(rep.sum())) - np.repeat(first, rep)
    return rows, np.repeat(start[rows], rep) + offset, offset, first


def _first_argmax(values, offset, first):
    """Per segment of `values`: (max, offset of its first occurrence)."""
    best = np.maximum.reduceat(values, first)
    at = np.where(values == np.repeat(best, np.diff(np.append(first, len(values)))),
                  offset, np.iinfo(np.int64).max)
    return best, np.minimum.reduceat(at, first)


def _intersection(dt, gt):
    """Intersection area of boxes [x0, y0, x1, y1] (M, 4) x (M, 4), as np_box_ops computes it
    (height x width, clipped at 0)."""
    h = np.maximum(np.minimum(dt[:, 3], gt[:, 3]) - np.maximum(dt[:, 1], gt[:, 1]), 0.0)
    w = np.maximum(np.minimum(dt[:, 2], gt[:, 2]) - np.maximum(dt[:, 0], gt[:, 0]), 0.0)
    return h * w


def _area(box):
    return (box[:, 3] - box[:, 1]) * (box[:, 2] - box[:, 0])


class OpenImagesGroundTruth:
    """Expanded ground truth of an Open Images dataset as flat arrays.

    records: detectron2 dataset dicts as `seesaw_ecm.data.openimages` makes them, already
    expanded to parent classes: image_id, annotations (bbox, bbox_mode XYXY_ABS or XYWH_ABS,
    category_id in [0, C), optional is_group_of), pos_category_ids / neg_category_ids (verified
    image labels, contiguous ids). Images are ranked in sorted image-id order; a (image, class)
    pair is keyed img * C + cls.
    """

    def __init__(self, records, num_classes):
        ids = [r["image_id"] for r in records]
        order = sorted(range(len(ids)), key=ids.__getitem__)
        self.image_ids = [ids[i] for i in order]
        self._rank = {image_id: r for r, image_id in enumerate(self.image_ids)}
        if len(self._rank) != len(ids):
            raise SeesawEcmError("The ground truth lists an image_id twice; each image must be "
                                 "one record.")
        self.num_classes = C = int(num_classes)
        keys, cls, boxes, group, label_keys = [], [], [], [], []
        for rank, i in enumerate(order):
            rec = records[i]
            for a in rec["annotations"]:
                mode = a.get("bbox_mode", XYXY_ABS)
                if mode not in (XYXY_ABS, XYWH_ABS):
                    raise SeesawEcmError(f"Image {ids[i]}: box mode {mode} is not XYXY_ABS or "
                                         "XYWH_ABS.")
                x0, y0, x1, y1 = a["bbox"]
                if mode == XYWH_ABS:
                    x1, y1 = x0 + x1, y0 + y1
                boxes.append((x0, y0, x1, y1))
                keys.append(rank * C + a["category_id"])
                cls.append(a["category_id"])
                group.append(bool(a.get("is_group_of", False)))
            labels = [*rec.get("pos_category_ids", ()), *rec.get("neg_category_ids", ())]
            if any(not 0 <= k < C for k in labels):
                raise SeesawEcmError(f"Image {ids[i]}: an image label is outside [0, {C}).")
            label_keys.extend(rank * C + k for k in labels)
        cls = np.array(cls, np.int64)
        if len(cls) and (cls.min() < 0 or cls.max() >= C):
            raise SeesawEcmError(f"A ground-truth box has a category_id outside [0, {C}).")
        keys = np.array(keys, np.int64)
        boxes = np.array(boxes, np.float64).reshape(-1, 4)
        group = np.array(group, bool)
        # (C,) boxes per class, group-of boxes counting once each
        self.num_gt = np.bincount(cls, minlength=C).astype(np.float64)
        self.eval_keys = np.unique(np.concatenate([keys, np.array(label_keys, np.int64)]))
        # boxes of each kind grouped by pair, file order inside a pair (stable sort)
        self.boxes = {}
        for kind, sel in (("single", ~group), ("group", group)):
            idx = np.flatnonzero(sel)
            idx = idx[np.argsort(keys[idx], kind="stable")]
            self.boxes[kind] = (keys[idx], boxes[idx])

    def ranks(self, image_ids):
        """(N,) int64 rank of each image id; -1 for images without ground truth."""
        get = self._rank.get
        return np.fromiter((get(i, -1) for i in image_ids), np.int64, len(image_ids))

    def pair_boxes(self, kind, keys):
        """For pair keys (N,): start (N,) and count (N,) of their `kind` ("single" or "group")
        boxes in self.boxes[kind]."""
        sorted_keys = self.boxes[kind][0]
        start = np.searchsorted(sorted_keys, keys, side="left")
        return start, np.searchsorted(sorted_keys, keys, side="right") - start


class OpenImagesRecords(MatchRecords):
    """Per output entry of the official per-image evaluation: cls (N,) int32, score (N,)
    float64, tp (N,) bool, img (N,) int32 image rank, slot (N,) int32 position among its
    (image, class) entries; images: the image ranks covered."""

    FIELDS = ("cls", "score", "tp", "img", "slot", "images")

    def __init__(self, cls, score, tp, img, slot, images):
        self.cls, self.score, self.tp, self.img, self.slot = cls, score, tp, img, slot
        self.images = images

    @classmethod
    def empty(cls):
        i32 = np.zeros(0, np.int32)
        return cls(i32, np.zeros(0), np.zeros(0, bool), i32, i32, i32)


class OpenImagesMatcher:
    """The per-process half: give it complete images (any number of calls, each image once),
    then take `records()`."""

    def __init__(self, gt):
        self.gt = gt
        self._seen = np.zeros(len(gt.image_ids), bool)
        self._parts = []

    def records(self):
        return OpenImagesRecords.concatenate(self._parts)

    def add(self, results):
        """results: dicts with image_id, category_id (contiguous, [0, C)), score and bbox
        [x, y, w, h] absolute (detectron2's instances_to_coco_json), holding ALL results of
        the images they mention."""
        n = len(results)
        box = np.array([r["bbox"] for r in results], np.float64).reshape(-1, 4)
        box[:, 2:] += box[:, :2]
        img = self.gt.ranks([r["image_id"] for r in results])
        self.add_arrays(img, box, np.fromiter((r["score"] for r in results), np.float64, n),
                        np.fromiter((r["category_id"] for r in results), np.int64, n))

    def add_arrays(self, img, boxes, scores, classes):
        """img (N,) image ranks (`gt.ranks`; -1 = no ground truth, ignored), boxes (N, 4)
        [x0, y0, x1, y1] absolute, scores (N,), classes (N,) in [0, C): all detections of the
        images they mention, each image's in its output order."""
        gt, C, n = self.gt, self.gt.num_classes, len(img)
        img, classes = np.asarray(img, np.int64), np.asarray(classes, np.int64)
        boxes, scores = np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(scores, float)
        if n and (classes.min() < 0 or classes.max() >= C):
            raise SeesawEcmError(f"A detection has category_id outside [0, {C}): results must "
                                 "use the dataset's contiguous class ids.")
        images = np.unique(img[img >= 0])
        if self._seen[images].any():
            raise SeesawEcmError("OpenImagesMatcher got detections of an image it already has; "
                                 "give all detections of an image in one call.")
        self._seen[images] = True
        # position of each detection among its image's detections (input order)
        by_img = np.argsort(img, kind="stable")
        pos = np.empty(n, np.int64)
        pos[by_img] = np.arange(n) - np.searchsorted(img[by_img], img[by_img])
        key = img * C + classes
        at = np.minimum(np.searchsorted(gt.eval_keys, key), max(len(gt.eval_keys) - 1, 0))
        ok = (img >= 0) & (boxes[:, 0] < boxes[:, 2]) & (boxes[:, 1] < boxes[:, 3])
        ok &= (gt.eval_keys[at] == key) if len(gt.eval_keys) else False
        idx = np.flatnonzero(ok)
        # grouped by pair; inside a pair score descending, equal scores later input first
        idx = idx[np.lexsort((-pos[idx], -scores[idx], key[idx]))]
        self._parts.append(self._match(key[idx], boxes[idx], scores[idx], images))

    def _match(self, key, box, score, images):
        """Evaluated detections (N,) grouped by pair, the official order inside a pair ->
        OpenImagesRecords (vectorised over all pairs: no loop over images or detections)."""
        gt, n = self.gt, len(key)
        tp = np.zeros(n, bool)
        # 1. the non-group-of box of highest IoU; the first detection on an unmatched box wins
        start, count = gt.pair_boxes("single", key)
        rows, flat, offset, first = _segments(start, count)
        if len(rows):
            g = gt.boxes["single"][1][flat]
            d = box[np.repeat(rows, count[rows])]
            inter = _intersection(d, g)
            iou = inter / (_area(d) + _area(g) - inter)
            best, arg = _first_argmax(iou, offset, first)
            hit = best >= IOU_THRESHOLD
            _, winners = np.unique(start[rows[hit]] + arg[hit], return_index=True)
            tp[rows[hit][winners]] = True
        # 2. detections that are not TP: the group-of box of highest IoA
        grouped = np.zeros(n, bool)
        start, count = gt.pair_boxes("group", key)
        count = np.where(tp, 0, count)
        rows, flat, offset, first = _segments(start, count)
        group_det = np.zeros(0, np.int64)
        if len(rows):
            d = box[np.repeat(rows, count[rows])]
            ioa = _intersection(d, gt.boxes["group"][1][flat]) / _area(d)
            best, arg = _first_argmax(ioa, offset, first)
            hit = best >= IOU_THRESHOLD
            grouped[rows[hit]] = True
            # rows are in score order inside a pair: a box's first detection has its top score
            _, first_det = np.unique(start[rows[hit]] + arg[hit], return_index=True)
            group_det = rows[hit][first_det]  # in box order
            group_det = group_det[score[group_det] > 0]
        # output order per pair: its valid detections, then its group-of TPs in box order
        out = np.concatenate([np.flatnonzero(~grouped), group_det])
        out_key, out_score = key[out], score[out]
        out_tp = np.concatenate([tp[~grouped], np.ones(len(group_det), bool)])
        order = np.argsort(out_key, kind="stable")
        slot = np.empty(len(order), np.int64)
        slot[order] = np.arange(len(order)) - np.searchsorted(out_key[order], out_key[order])
        C = gt.num_classes
        return OpenImagesRecords((out_key % C).astype(np.int32), out_score, out_tp,
                                 (out_key // C).astype(np.int32), slot.astype(np.int32),
                                 images.astype(np.int32))


def voc_average_precision(tp, num_gt):
    """VOC all-point AP of TP flags (N,) in rank order with `num_gt` ground truth: the
    operations of the official `compute_precision_recall` + `compute_average_precision`."""
    tp = np.asarray(tp, np.float64)
    if tp.size == 0:
        return 0.0
    cum_tp = np.cumsum(tp)
    cum_fp = np.cumsum((tp <= 0).astype(np.float64))
    precision = np.concatenate([[0], cum_tp / (cum_tp + cum_fp), [0]])
    recall = np.concatenate([[0], cum_tp / num_gt, [1]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    at = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[at] - recall[at - 1]) * precision[at]))


def frequency_groups(train_counts, num_groups=NUM_GROUPS):
    """Classes sorted by training instance count (ties by index), cut into `num_groups`
    groups of (almost) equal size, rarest first: list of class-index arrays."""
    order = np.argsort(np.asarray(train_counts), kind="stable")
    return np.array_split(order, num_groups)


class OpenImagesEvalResult:
    """metrics (OrderedDict: AP, AP1..AP5, fractions; NaN where undefined), per_class_ap (C,)
    (NaN without ground truth), groups (list of class-index arrays, AP1 first)."""

    def __init__(self, gt, records, train_counts=None):
        C = gt.num_classes
        self.per_class_ap = np.full(C, np.nan)
        # official order per class: (image rank, slot) concatenation, then argsort(score)[::-1]
        order = np.lexsort((-records.slot, -records.img, -records.score, records.cls))
        bounds = np.searchsorted(records.cls[order], np.arange(C + 1))
        for k in np.flatnonzero(gt.num_gt > 0).tolist():
            sel = order[bounds[k]:bounds[k + 1]]
            self.per_class_ap[k] = voc_average_precision(records.tp[sel], gt.num_gt[k])
        counts = gt.num_gt if train_counts is None else np.asarray(train_counts)
        if len(counts) != C:
            raise SeesawEcmError(f"train_counts has {len(counts)} classes, the ground truth {C}.")
        self.groups = frequency_groups(counts)
        self.metrics = OrderedDict(AP=_nanmean(self.per_class_ap))
        for g, members in enumerate(self.groups):
            self.metrics[f"AP{g + 1}"] = _nanmean(self.per_class_ap[members])


def _nanmean(values):
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else float("nan")


def evaluate(gt, results, num_classes=None, train_counts=None, chunk_images=1000):
    """Evaluate a list of result dicts (`OpenImagesMatcher.add`) in one process,
    `chunk_images` images at a time. gt: OpenImagesGroundTruth, or expanded records with
    `num_classes`. train_counts (C,): training instance counts for AP1..AP5 (default: the
    ground truth's own box counts). Returns OpenImagesEvalResult."""
    if not isinstance(gt, OpenImagesGroundTruth):
        if num_classes is None:
            raise SeesawEcmError("evaluate(records, results) needs num_classes.")
        gt = OpenImagesGroundTruth(gt, num_classes)
    matcher = OpenImagesMatcher(gt)
    img = gt.ranks([r["image_id"] for r in results])
    order = np.argsort(img, kind="stable")
    cuts = np.flatnonzero(np.diff(img[order])) + 1
    for part in np.split(order, cuts[chunk_images - 1::chunk_images].tolist()):
        matcher.add([results[i] for i in part.tolist()])
    return OpenImagesEvalResult(gt, matcher.records(), train_counts)
