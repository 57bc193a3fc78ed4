"""A literal, loop-based re-implementation of the official Open Images challenge metric
(TF Object Detection API: per_image_evaluation.py, object_detection_evaluation.py, metrics.py,
and the current, set-based oid_hierarchical_labels_expansion.py), written from their rules for
checking seesaw_ecm.evaluation.openimages_fast (tests) and timing it
(benchmarks.openimages_eval). Ties in score are ordered as a stable ascending sort reversed (the
official code's unstable np.argsort has no fixed order for them)."""
import numpy as np


def official_expansion(tree):
    """The current official tool's maps: keyed_parent[label] = set of all labels below it,
    keyed_child[label] = set of all labels above it (each once, however many paths lead there;
    the root skipped), by one walk over every place of every label with its path."""
    keyed_parent, keyed_child = {}, {}
    stack = [(sub, ()) for sub in tree.get("Subcategory", [])]
    while stack:
        node, path = stack.pop()
        label = node["LabelName"]
        keyed_parent.setdefault(label, set())
        keyed_child.setdefault(label, set()).update(path)
        for above in path:
            keyed_parent[above].add(label)
        stack.extend((sub, path + (label,)) for sub in node.get("Subcategory", []))
    return keyed_parent, keyed_child


def _iou(d, g):
    h = max(min(d[3], g[3]) - max(d[1], g[1]), 0.0)
    w = max(min(d[2], g[2]) - max(d[0], g[0]), 0.0)
    inter = h * w
    return inter / ((d[3] - d[1]) * (d[2] - d[0]) + (g[3] - g[1]) * (g[2] - g[0]) - inter)


def _ioa(d, g):
    h = max(min(d[3], g[3]) - max(d[1], g[1]), 0.0)
    w = max(min(d[2], g[2]) - max(d[0], g[0]), 0.0)
    return h * w / ((d[3] - d[1]) * (d[2] - d[0]))


def reference_image(gt, dets, num_classes):
    """Per class (scores, tp labels) of one image by the official per-image rules."""
    evaluatable = set(gt["labels"]) | {c for c, _, _ in gt["boxes"]}
    out = []
    for c in range(num_classes):
        d = [(s, b) for k, s, b in dets if k == c and c in evaluatable
             and b[0] < b[2] and b[1] < b[3]]
        order = np.argsort(np.array([s for s, _ in d], float), kind="stable")[::-1]
        d = [d[i] for i in order]
        single = [b for k, b, grp in gt["boxes"] if k == c and not grp]
        groups = [b for k, b, grp in gt["boxes"] if k == c and grp]
        tp, in_group = [False] * len(d), [False] * len(d)
        detected = [False] * len(single)
        for i, (s, b) in enumerate(d):
            if single:
                ious = [_iou(b, g) for g in single]
                j = int(np.argmax(ious))
                if ious[j] >= 0.5 and not detected[j]:
                    tp[i], detected[j] = True, True
        group_score = [0.0] * len(groups)
        for i, (s, b) in enumerate(d):
            if groups and not tp[i]:
                ioas = [_ioa(b, g) for g in groups]
                j = int(np.argmax(ioas))
                if ioas[j] >= 0.5:
                    in_group[i] = True
                    group_score[j] = max(group_score[j], s)
        scores = [s for i, (s, _) in enumerate(d) if not in_group[i]]
        labels = [tp[i] for i in range(len(d)) if not in_group[i]]
        scores += [s for s in group_score if s > 0]
        labels += [True for s in group_score if s > 0]
        out.append((scores, labels))
    return out


def reference_ap(images, detections, num_classes):
    """images: {id: {"boxes": [(cls, box, group)], "labels": [cls]}} expanded; detections:
    {id: [(cls, score, box)]}. Per-class AP (NaN without ground truth)."""
    num_gt = np.zeros(num_classes)
    for gt in images.values():
        for c, _, _ in gt["boxes"]:
            num_gt[c] += 1
    scores, labels = [[] for _ in range(num_classes)], [[] for _ in range(num_classes)]
    for image_id in sorted(detections):
        if image_id not in images:
            continue
        for c, (s, t) in enumerate(reference_image(images[image_id], detections[image_id],
                                                   num_classes)):
            scores[c] += s
            labels[c] += t
    ap = np.full(num_classes, np.nan)
    for c in range(num_classes):
        if num_gt[c] == 0:
            continue
        order = np.argsort(np.array(scores[c], float), kind="stable")[::-1]
        t = np.array(labels[c], float)[order]
        if len(t) == 0:
            ap[c] = 0.0
            continue
        ctp, cfp = np.cumsum(t), np.cumsum((t <= 0).astype(float))
        precision = np.concatenate([[0], ctp / (ctp + cfp), [0]])
        recall = np.concatenate([[0], ctp / num_gt[c], [1]])
        for i in range(len(precision) - 2, -1, -1):
            precision[i] = max(precision[i], precision[i + 1])
        idx = [i for i in range(1, len(recall)) if recall[i] != recall[i - 1]]
        ap[c] = sum((recall[i] - recall[i - 1]) * precision[i] for i in idx)
    return ap
