"""OpenImagesEvaluator: the official Open Images challenge metric for detectron2 models.

Chosen by Trainer.build_evaluator for datasets with evaluator_type "openimages"
(`seesaw_ecm.data.openimages`). Each process matches its images' detections every
`chunk_images` images (`openimages_fast.OpenImagesMatcher`) and keeps only compact records;
`evaluate` gathers the records on the main process. The ground truth is the dataset expanded to
parent classes as the official tool does; with DATASETS.OPENIMAGES_PARENT_CLASSES
"copy_detections" each detection is first copied to every ancestor of its class.

Returns {"bbox": {"AP", "AP1", ..., "AP5"}} in percent (AP: the challenge mAP at IoU 0.5;
AP1..AP5: classes in 5 groups by training instance count, rarest first) and writes per-class AP
to openimages_eval.json in the output folder.
"""
import json
import logging
import os

import numpy as np
import detectron2.utils.comm as comm
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils.logger import create_small_table

from ..fileio import write_atomic
from .openimages_fast import (OpenImagesEvalResult, OpenImagesGroundTruth, OpenImagesMatcher,
                              OpenImagesRecords)

REPORT_FILE = "openimages_eval.json"


class OpenImagesEvaluator(DatasetEvaluator):
    def __init__(self, dataset_name, distributed=True, output_dir=None, *, train_counts=None,
                 chunk_images=200):
        """train_counts: (C,) training instance counts for AP1..AP5, or a function returning
        them (called once, on the main process, at evaluate), or None: the evaluated set's own
        box counts (logged as such)."""
        self._logger = logging.getLogger(__name__)
        self._meta = MetadataCatalog.get(dataset_name)
        records = DatasetCatalog.get(dataset_name)
        hierarchy = self._meta.hierarchy
        if not self._meta.hierarchy_expanded:  # the metric's ground truth is always expanded
            records = [hierarchy.expand_record(r) for r in records]
        self._gt = OpenImagesGroundTruth(records, len(self._meta.thing_classes))
        self._hierarchy = hierarchy if self._meta.parent_classes == "copy_detections" else None
        self._distributed, self._output_dir = distributed, output_dir
        self._train_counts, self._chunk_images = train_counts, chunk_images

    def reset(self):
        self._matcher = OpenImagesMatcher(self._gt)
        self._buffer = []

    def process(self, inputs, outputs):
        for input, output in zip(inputs, outputs):
            instances = output["instances"].to("cpu")
            boxes = instances.pred_boxes.tensor.numpy().astype(np.float64)
            scores = instances.scores.numpy().astype(np.float64)
            classes = instances.pred_classes.numpy().astype(np.int64)
            if self._hierarchy is not None:
                source, parents = self._hierarchy.copy_detections(classes)
                boxes = np.concatenate([boxes, boxes[source]])
                scores = np.concatenate([scores, scores[source]])
                classes = np.concatenate([classes, parents])
            rank = self._gt.ranks([input["image_id"]])
            self._buffer.append((np.repeat(rank, len(scores)), boxes, scores, classes))
        if len(self._buffer) >= self._chunk_images:
            self._flush()

    def _flush(self):
        if self._buffer:
            self._matcher.add_arrays(*(np.concatenate(a) for a in zip(*self._buffer)))
        self._buffer = []

    def evaluate(self):
        self._flush()
        records = self._matcher.records()
        if self._distributed:
            comm.synchronize()
            parts = comm.gather(records, dst=0)
            if not comm.is_main_process():
                return None
            records = OpenImagesRecords.concatenate(parts)
        counts = self._train_counts() if callable(self._train_counts) else self._train_counts
        if counts is None:
            self._logger.info("AP1..AP5 group classes by the evaluated set's box counts (no "
                              "training set given).")
        result = OpenImagesEvalResult(self._gt, records, counts)
        metrics = {k: v * 100 for k, v in result.metrics.items()}
        self._logger.info("Open Images challenge metric (mAP at IoU 0.5; AP1..AP5 by training "
                          "instance count, rarest first):\n" + create_small_table(metrics))
        if self._output_dir:
            names = self._meta.thing_classes
            per_class = [{"id": k, "mid": self._meta.class_mids[k], "name": names[k],
                          "AP": None if np.isnan(ap) else float(ap * 100)}
                         for k, ap in enumerate(result.per_class_ap)]
            report = {"metrics": metrics, "groups": [g.tolist() for g in result.groups],
                      "per_class_ap": per_class}
            os.makedirs(self._output_dir, exist_ok=True)
            write_atomic(os.path.join(self._output_dir, REPORT_FILE),
                         json.dumps(report, indent=1) + "\n")
        return {"bbox": metrics}
