"""FastLVISEvaluator: detectron2's LVISEvaluator with the `lvis_fast` backend.

Same inputs (`process` converts instances with detectron2's `instances_to_coco_json`), same
returned keys ({"bbox": {"AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"},
"segm": {...}}, in percent) and the same numbers as LVISEvaluator with the official `lvis` API.
What differs is memory: every `chunk_images` images, each process matches its predictions
against the ground truth and keeps only compact `MatchRecords` (a few dozen bytes per evaluated
detection, no masks); `evaluate` gathers those records, not the predictions. The optional
`lvis_instances_results.json` dump is streamed: each process appends its results to a part file
as it goes, and the main process copies them out image by image in image-id order, each image's
results in the model's order (the bytes of detectron2's json.dumps of that list; detectron2
writes the processing order instead). That is AP-fixed's tie rule: a reader that keeps the
first K of each category's results sorted by score (stable), as large-vocab-devil's
evaluate_ap_fixed.py does, keeps exactly the detections this evaluator keeps, whatever the
number of processes or the order of the test images. detectron2's `instances_predictions.pth`
is not written (it would hold every prediction in memory at once).

Extra outputs: AR@300, ARs/ARm/ARl and per-category AP per task, logged as a table by frequency
group and written to `lvis_fast_eval.json` in the output folder.

Optional metrics (lvis_fast's docstring has the definitions): `topk_per_class` K > 0 adds
AP-fixed (keys AP-fixed, APr-fixed, APc-fixed, APf-fixed; the model must then give every
detection it keeps, no per-image cap: TEST.AP_FIXED), `pooled` adds AP-pool (AP-pool, APr-pool,
APc-pool, APf-pool) on the same detections, and `boundary` adds the task "boundary" (boundary
AP, same keys as segm). Standard AP stays the one of each image's `max_dets_per_image` best; with
AP-fixed, those the model flagged `in_image_cap` (its per-image top, as it would have returned
without AP-fixed, before detector_postprocess dropped empty boxes).
"""
import itertools
import json
import os
from collections import OrderedDict
from contextlib import ExitStack

import numpy as np
import detectron2.utils.comm as comm
from detectron2.evaluation import LVISEvaluator
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.utils.logger import create_small_table

from ..fileio import open_atomic, write_atomic
from ..errors import SeesawEcmError
from .lvis_fast import (FREQ_LABELS, POOLS, LvisGroundTruth, LvisMatcher, MatchRecords,
                        TopKPerClass, fixed_result, standard_result)

# the keys detectron2's LVISEvaluator returns per task
D2_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
# result keys of the optional metrics -> lvis_fast's keys
FIXED_METRICS = {"AP-fixed": "AP", "APr-fixed": "APr", "APc-fixed": "APc", "APf-fixed": "APf"}
POOL_METRICS = {("AP" if p == "all" else f"AP{p}") + "-pool": f"AP-pooled-{p}" for p in POOLS}
RESULTS_FILE = "lvis_instances_results.json"
REPORT_FILE = "lvis_fast_eval.json"


class FastLVISEvaluator(LVISEvaluator):
    """LVISEvaluator whose `evaluate` uses seesaw_ecm.evaluation.lvis_fast (equal numbers)."""

    def __init__(self, dataset_name, tasks=None, distributed=True, output_dir=None, *,
                 max_dets_per_image=None, chunk_images=200, dump_results=True,
                 topk_per_class=0, pooled=False, boundary=False):
        """Arguments of detectron2's LVISEvaluator, plus chunk_images (images buffered per
        process before they are matched), dump_results (write lvis_instances_results.json
        into output_dir, as LVISEvaluator does), topk_per_class (K of AP-fixed; 0 = off),
        pooled (AP-pool, needs topk_per_class) and boundary (the "boundary" task)."""
        super().__init__(dataset_name, tasks, distributed, output_dir,
                         max_dets_per_image=max_dets_per_image)
        if pooled and topk_per_class <= 0:
            raise SeesawEcmError("AP-pool is computed on the AP-fixed detections: enable "
                                 "TEST.AP_FIXED (topk_per_class > 0) to get TEST.AP_POOL.")
        self._topk, self._pooled, self._boundary = topk_per_class, pooled, boundary
        self._gt = LvisGroundTruth(self._lvis_api.dataset)
        self._chunk_images = chunk_images
        self._dump = bool(dump_results and output_dir)
        self._max_dets = 300 if max_dets_per_image is None else max_dets_per_image
        if hasattr(self._metadata, "thing_dataset_id_to_contiguous_id"):
            mapping = self._metadata.thing_dataset_id_to_contiguous_id
            self._to_dataset_id = {v: k for k, v in mapping.items()}
        else:  # detectron2: LVIS category ids are contiguous ids + 1
            self._to_dataset_id = None

    def reset(self):
        super().reset()
        self._buffer = []  # per image: its result dicts
        self._caps = []  # per image: (N,) bool, in the model's per-image top (TEST.AP_FIXED)
        self._num_images = 0
        self._num_results = 0
        self._dumped = []  # per image in this process' part: (image_id, byte offset, bytes)
        self._part_size = 0
        self._matchers = {}  # task -> LvisMatcher
        self._ranking = (TopKPerClass(self._topk, self._gt.num_categories, len(self._gt.img_ids))
                         if self._topk > 0 else None)
        if self._dump:
            os.makedirs(self._output_dir, exist_ok=True)
            self._part_path = os.path.join(
                self._output_dir, f".{RESULTS_FILE}.rank{comm.get_rank()}.part")
            open(self._part_path, "wb").close()

    def process(self, inputs, outputs):
        for input, output in zip(inputs, outputs):
            self._num_images += 1
            if "instances" in output:
                instances = output["instances"].to(self._cpu_device)
                results = instances_to_coco_json(instances, input["image_id"])
                if instances.has("in_image_cap"):  # TEST.AP_FIXED: the model's per-image top
                    self._caps.append(instances.in_image_cap.numpy().astype(bool))
                for r in results:
                    r["category_id"] = (r["category_id"] + 1 if self._to_dataset_id is None
                                        else self._to_dataset_id[r["category_id"]])
                self._buffer.append(results)
            if "proposals" in output:  # proposals are small: kept as detectron2 keeps them
                self._predictions.append({"image_id": input["image_id"],
                                          "proposals": output["proposals"].to(self._cpu_device)})
        if len(self._buffer) >= self._chunk_images:
            self._flush()

    def _flush(self):
        """Match the buffered images' results; append them to this process' dump part."""
        images = [r for r in self._buffer if r]
        results = list(itertools.chain(*images))
        in_cap = (np.concatenate(self._caps) if self._caps and len(self._caps) == len(self._buffer)
                  else None)
        self._buffer, self._caps = [], []
        if not results:
            return
        if self._dump:
            with open(self._part_path, "ab") as f:
                for image_results in images:
                    data = ", ".join(json.dumps(r) for r in image_results).encode()
                    f.write(data)
                    self._dumped.append((image_results[0]["image_id"], self._part_size,
                                         len(data)))
                    self._part_size += len(data)
        self._num_results += len(results)
        if not self._matchers:
            tasks = self._tasks or self._tasks_from_predictions(results)
            if self._boundary and "segm" in tasks:
                tasks = tuple(tasks) + ("boundary",)
            self._matchers = {t: LvisMatcher(self._gt, t, self._max_dets, box_area=(t == "bbox"),
                                             ranking=self._ranking) for t in tasks}
        for matcher in self._matchers.values():
            matcher.add(results, in_cap=in_cap)

    def evaluate(self):
        self._flush()
        own = {"images": self._num_images, "results": self._num_results,
               "records": {t: m.records() for t, m in self._matchers.items()},
               "ranking": self._ranking, "proposals": self._predictions,
               "dumped": (comm.get_rank(), self._dumped)}
        if self._distributed:
            comm.synchronize()
            parts = comm.gather(own, dst=0)
            if not comm.is_main_process():
                return None
        else:
            parts = [own]
        if sum(p["images"] for p in parts) == 0:
            self._logger.warning("[FastLVISEvaluator] Did not receive valid predictions.")
            return {}
        self._results = OrderedDict()
        proposals = list(itertools.chain(*(p["proposals"] for p in parts)))
        if proposals:
            self._eval_box_proposals(proposals)
        if self._dump:
            self._write_results(dict(p["dumped"] for p in parts))
        if not self._do_evaluation:
            self._logger.info("Annotations are not available for evaluation.")
            return self._results
        tasks = self._tasks or sorted({t for p in parts for t in p["records"]}) or ("bbox",)
        if self._boundary and "segm" in tasks and "boundary" not in tasks:
            tasks = tuple(tasks) + ("boundary",)
        ranking = TopKPerClass.merge(p["ranking"] for p in parts) if self._topk > 0 else None
        report = {}
        for task in sorted(tasks):
            if sum(p["results"] for p in parts) == 0:
                self._logger.warning("No predictions from the model!")
                self._results[task] = {m: float("nan") for m in self._metric_names()}
                continue
            records = MatchRecords.concatenate(p["records"][task] for p in parts
                                               if task in p["records"])
            result = standard_result(self._gt, records)
            self._results[task] = {m: float(result.metrics[m] * 100) for m in D2_METRICS}
            fixed = None
            if ranking is not None:
                fixed = fixed_result(self._gt, records, ranking, pooled=self._pooled)
                self._results[task].update(
                    {k: float(fixed.metrics[m] * 100) for k, m in FIXED_METRICS.items()})
                if self._pooled:
                    self._results[task].update(
                        {k: float(fixed.pooled[m] * 100) for k, m in POOL_METRICS.items()})
            report[task] = self._report(task, result, fixed)
        if report and self._output_dir:
            write_atomic(os.path.join(self._output_dir, REPORT_FILE),
                         json.dumps(report, indent=1) + "\n")
        return self._results

    def _metric_names(self):
        return D2_METRICS + (tuple(FIXED_METRICS) if self._topk > 0 else ()) + (
            tuple(POOL_METRICS) if self._pooled else ())

    def _report(self, task, result, fixed=None):
        """Log the metrics and per-group AP; return the task's entry of lvis_fast_eval.json
        (with AP-fixed: also its metrics, per-group and per-category values, and AP-pool)."""
        names = self._metadata.get("thing_classes")
        cat_ids = result.cat_ids.tolist()
        freq = {k: label for label, members in zip(FREQ_LABELS, self._gt.freq_groups)
                for k in members}
        entry = {}
        per_cat = [{"id": c, "name": names[k] if names and len(names) == len(cat_ids) else None,
                    "frequency": freq.get(k)} for k, c in enumerate(cat_ids)]
        for suffix, res, label in (("", result, f"max detections per image = {self._max_dets}"),
                                   ("_fixed", fixed, f"AP-fixed: top {self._topk} per category,"
                                                     " no per-image cap")):
            if res is None:
                continue
            metrics = {k: float(v * 100) for k, v in res.metrics.items()}
            self._logger.info(f"Evaluation results for {task} (lvis_fast, {label}): \n"
                              + create_small_table(metrics))
            ap = [None if np.isnan(a) else float(a * 100) for a in res.per_category_ap]
            groups = {}
            for g, members in zip(FREQ_LABELS, self._gt.freq_groups):
                values = [ap[k] for k in members if ap[k] is not None]
                groups[g] = {"categories": len(members), "with_ground_truth": len(values),
                             "AP": float(np.mean(values)) if values else None}
            self._logger.info(f"Per-group AP for {task} ({label}; mean of per-category AP over "
                              "categories with ground truth): \n" + create_small_table(
                                  {f"AP{g}": v["AP"] if v["AP"] is not None else float("nan")
                                   for g, v in groups.items()}))
            entry["metrics" + suffix], entry["groups" + suffix] = metrics, groups
            for c, value in zip(per_cat, ap):
                c["AP" + suffix] = value
        if fixed is not None and fixed.pooled is not None:
            entry["pooled"] = {k: float(v * 100) for k, v in fixed.pooled.items()}
            self._logger.info(f"AP-pool for {task} (top {self._topk} per category, no per-image "
                              "cap): \n" + create_small_table(entry["pooled"]))
        entry["per_category_ap"] = per_cat
        return entry

    def _write_results(self, dumped):
        """Write lvis_instances_results.json from the processes' parts, images in id order
        (streamed). dumped: {rank: [(image_id, byte offset, bytes) per image in its part]}."""
        ranks = sorted(dumped)
        parts = [os.path.join(self._output_dir, f".{RESULTS_FILE}.rank{r}.part") for r in ranks]
        missing = [p for p in parts if not os.path.exists(p)]
        if missing:
            self._logger.warning(f"Not writing {RESULTS_FILE}: {missing[0]} is not visible from "
                                 "the main process (output folder not shared); the parts stay.")
            return
        path = os.path.join(self._output_dir, RESULTS_FILE)
        self._logger.info(f"Saving results to {path}")
        images = sorted((image_id, i, offset, size)
                        for i, r in enumerate(ranks) for image_id, offset, size in dumped[r])
        with ExitStack() as stack, open_atomic(path) as out:
            files = [stack.enter_context(open(part, "rb")) for part in parts]
            out.write(b"[")
            for n, (_, i, offset, size) in enumerate(images):
                files[i].seek(offset)
                out.write((b", " if n else b"") + files[i].read(size))
            out.write(b"]")
        for part in parts:
            os.unlink(part)


# TEST.LVIS_EVAL_BACKEND -> evaluator class (same arguments, same result keys and numbers)
LVIS_EVALUATORS = {"fast": FastLVISEvaluator, "lvis": LVISEvaluator}


def lvis_evaluator_class(backend):
    """The evaluator class of TEST.LVIS_EVAL_BACKEND `backend` (SeesawEcmError if unknown)."""
    if backend not in LVIS_EVALUATORS:
        raise SeesawEcmError(
            f"TEST.LVIS_EVAL_BACKEND {backend!r} is unknown; choose one of "
            f"{', '.join(repr(k) for k in LVIS_EVALUATORS)}.")
    return LVIS_EVALUATORS[backend]
