"""Per-class training statistics (instance or image counts) of the datasets in DATASETS.TRAIN.

Computed once per job on the main process, shared with every rank, logged as a short summary
and saved to OUTPUT_DIR/class_statistics.json. The losses that need them (ECM, Federated) keep them
as buffers, so checkpoints carry them and evaluation needs no dataset.
"""
import json
import logging
import os

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils import comm

from ..distributed import on_main_process
from ..errors import SeesawEcmError
from ..fileio import write_atomic

logger = logging.getLogger(__name__)

STATISTICS = ("instance_count", "image_count")


def count_classes(dataset_dicts, num_classes, statistic="instance_count"):
    """Per-class counts over detectron2 dataset dicts.

    Args:
        dataset_dicts: list of records with "annotations" (each a dict with "category_id" in
            [0, num_classes) and optional "iscrowd").
        statistic: "instance_count" (non-crowd instances) or "image_count" (images that contain
            the class).
    Returns:
        (num_classes,) int64 array.
    """
    if statistic not in STATISTICS:
        raise SeesawEcmError(f"Unknown class statistic {statistic!r}; valid choices: {STATISTICS}")
    counts = np.zeros(num_classes, dtype=np.int64)
    for record in dataset_dicts:
        ids = np.asarray(
            [a["category_id"] for a in record["annotations"] if not a.get("iscrowd", 0)],
            dtype=np.int64,
        )
        if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
            raise SeesawEcmError(
                f"Image {record.get('file_name')} has category id {ids.max()} outside "
                f"[0, {num_classes}): the dataset has more classes than "
                "MODEL.ROI_HEADS.NUM_CLASSES."
            )
        if statistic == "image_count":
            ids = np.unique(ids)
        counts += np.bincount(ids, minlength=num_classes)
    return counts


def dataset_class_counts(dataset_names, num_classes, statistic="instance_count"):
    """(num_classes,) int64 counts of `statistic` summed over registered datasets, after
    checking that each has `num_classes` classes. The one place, with :func:`count_classes`,
    that counts training classes: losses, the gradient-balance diagnostic and the benchmark
    harness all use it."""
    total = np.zeros(num_classes, dtype=np.int64)
    for name in dataset_names:
        dicts = DatasetCatalog.get(name)  # also sets thing_classes for LVIS-format datasets
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is not None and len(classes) != num_classes:
            raise SeesawEcmError(
                f"Dataset {name!r} has {len(classes)} classes but MODEL.ROI_HEADS.NUM_CLASSES is "
                f"{num_classes}. Set MODEL.ROI_HEADS.NUM_CLASSES {len(classes)}."
            )
        total += count_classes(dicts, num_classes, statistic)
    return total


def json_class_counts(json_file, statistic="instance_count"):
    """{category id: count of `statistic`} of an LVIS-format annotation file (for readers of a
    finished run that have its files but no registered dataset), through :func:`count_classes`."""
    with open(json_file) as f:
        data = json.load(f)
    cat_ids = sorted(c["id"] for c in data["categories"])
    index = {c: i for i, c in enumerate(cat_ids)}
    per_image = {}
    for a in data["annotations"]:
        per_image.setdefault(a["image_id"], []).append(
            {"category_id": index[a["category_id"]], "iscrowd": a.get("iscrowd", 0)})
    records = [{"annotations": anns} for anns in per_image.values()]
    return dict(zip(cat_ids, count_classes(records, len(cat_ids), statistic).tolist()))


def class_statistics(cfg, statistic):
    """(NUM_CLASSES,) int64 counts of `statistic` ("instance_count" or "image_count") over
    cfg.DATASETS.TRAIN.

    Computed on the main process and broadcast, so all ranks hold the same numbers; written to
    OUTPUT_DIR/class_statistics.json (atomically) and summarized in the log.
    """
    names = list(cfg.DATASETS.TRAIN)
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    if not names:
        raise SeesawEcmError(
            "The loss needs per-class statistics but DATASETS.TRAIN is empty. Give the training "
            "datasets, or set MODEL.LONG_TAIL.STATISTICS_FROM checkpoint to take them from "
            "MODEL.WEIGHTS."
        )
    counts = on_main_process(dataset_class_counts, names, num_classes, statistic)

    num_zero = int((counts == 0).sum())
    logger.info(
        f"Class statistics ({statistic} over {', '.join(names)}): {num_classes} classes, "
        f"total {int(counts.sum())}, min {int(counts.min())}, median {int(np.median(counts))}, "
        f"max {int(counts.max())}, classes with 0: {num_zero}"
    )
    if comm.is_main_process() and cfg.OUTPUT_DIR:
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        write_atomic(
            os.path.join(cfg.OUTPUT_DIR, "class_statistics.json"),
            json.dumps({"datasets": names, "statistic": statistic, "counts": counts.tolist()}),
        )
    return counts
