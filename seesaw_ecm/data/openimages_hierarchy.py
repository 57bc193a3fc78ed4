"""The Open Images class hierarchy and the official ground-truth expansion.

The official tool (TF Object Detection API `dataset_tools/oid_hierarchical_labels_expansion.py`)
copies each box and each positive image label to every ancestor of its class and each negative
image label to every descendant; the challenge metric is computed on ground truth expanded this
way, while detections are not expanded (a detector must cover parent classes itself).

Multiplicity, as the current official tool has it: it collects each class' ancestors (and
descendants) in a set, so a box gets one copy per distinct ancestor even where a class is
reached through several paths (a class listed under several parents, or a class below one).
The tool's first version collected lists and copied a box once per path; the project follows
the current one. The root of the JSON (Entity) is not a class. Classes of the class list that
are absent from the tree have no ancestors (the official tool would stop with an assertion on
their boxes).
"""
import numpy as np

from ..errors import SeesawEcmError


class LabelHierarchy:
    """ancestors[k], descendants[k]: sorted class indices above / below class k, each once
    (over every place where k occurs in the tree)."""

    def __init__(self, tree, mids, source="hierarchy"):
        """tree: the parsed hierarchy JSON ({"LabelName", optional "Subcategory": [...]}, the
        root not a class); mids: class MIDs in contiguous-id order; source: named in errors."""
        index = {m: k for k, m in enumerate(mids)}
        ancestors = [set() for _ in mids]
        descendants = [set() for _ in mids]

        def visit(node, depth):
            """Class indices in the subtree below `node`; records ancestors / descendants."""
            if not isinstance(node, dict) or "LabelName" not in node:
                raise SeesawEcmError(f"{source}: node {node!r:.80} has no 'LabelName'. Give the "
                                     "challenge hierarchy JSON (LabelName / Subcategory tree).")
            children = node.get("Subcategory", [])
            if not isinstance(children, list):
                raise SeesawEcmError(f"{source}: 'Subcategory' of {node['LabelName']} is not a "
                                     "list.")
            below = set()
            for child in children:
                below |= visit(child, depth + 1)
            if depth > 0:
                k = index.get(node["LabelName"])
                if k is None:
                    raise SeesawEcmError(f"{source}: {node['LabelName']} is not in the class "
                                         "description file. Use the hierarchy that belongs to "
                                         "the class list.")
                for j in below:
                    ancestors[j].add(k)
                descendants[k] |= below
                below = below | {k}
            return below

        visit(tree, 0)
        self.num_classes = len(mids)
        self.ancestors = [sorted(a) for a in ancestors]
        self.descendants = [sorted(d) for d in descendants]
        counts = np.array([len(a) for a in self.ancestors], np.int64)
        self._ptr = np.concatenate([[0], np.cumsum(counts)])
        self._flat = np.array([k for a in self.ancestors for k in a], np.int64)

    def expand_record(self, record):
        """A dataset dict with the official expansion: after each box its copies for every
        ancestor (ascending class index); positive labels plus their ancestors, negative
        labels plus their descendants (sorted unique)."""
        anns = []
        for a in record["annotations"]:
            anns.append(a)
            anns.extend(dict(a, category_id=p) for p in self.ancestors[a["category_id"]])
        pos, neg = set(record.get("pos_category_ids", ())), set(record.get("neg_category_ids", ()))
        for k in list(pos):
            pos.update(self.ancestors[k])
        for k in list(neg):
            neg.update(self.descendants[k])
        return dict(record, annotations=anns, pos_category_ids=sorted(pos),
                    neg_category_ids=sorted(neg))

    def copy_detections(self, classes):
        """For detections of `classes` (N,): (source index (M,), ancestor class (M,)) of one
        copy per detection and ancestor of its class."""
        classes = np.asarray(classes, np.int64)
        start, count = self._ptr[classes], np.diff(self._ptr)[classes]
        source = np.repeat(np.arange(len(classes)), count)
        offset = np.arange(len(source)) - np.repeat(np.cumsum(count) - count, count)
        return source, self._flat[np.repeat(start, count) + offset]
