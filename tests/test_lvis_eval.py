"""seesaw_ecm.evaluation: the fast LVIS backend against the official `lvis` API, and the
Detectron2 evaluator that uses it."""
import json
import os

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch

from lvis_problems import official_lvis, random_problem, reference_ap_fixed, results_for
from seesaw_ecm.errors import SeesawEcmError
from seesaw_ecm.evaluation import lvis_fast

from benchmarks import lvis_scale_synthetic as synthetic

TOL = 1e-6
METRIC_KEYS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf",
               "AR@300", "ARs@300", "ARm@300", "ARl@300"]


def assert_equal_to_lvis(ev, ours, where=""):
    """Every summary metric, every precision / recall entry and per-category AP within TOL."""
    assert list(ev.results) == list(ours.metrics) == METRIC_KEYS
    for k in METRIC_KEYS:
        assert abs(ev.results[k] - ours.metrics[k]) <= TOL, (
            where, k, ev.results[k], ours.metrics[k])
    np.testing.assert_allclose(ours.precision, ev.eval["precision"], rtol=0, atol=TOL,
                               err_msg=where)
    np.testing.assert_allclose(ours.recall, ev.eval["recall"], rtol=0, atol=TOL, err_msg=where)
    p = ev.eval["precision"][:, :, :, 0]
    for k in range(p.shape[2]):
        expected = np.mean(p[:, :, k][p[:, :, k] > -1]) if (p[:, :, k] > -1).any() else np.nan
        np.testing.assert_allclose(ours.per_category_ap[k], expected, rtol=0, atol=TOL)


def test_box_iou_is_pycocotools_bit_for_bit():
    rng = np.random.default_rng(0)
    dt = np.round(rng.uniform(0, 50, (300, 4)), 1)
    dt[::2] = rng.uniform(0, 50, (150, 4))
    gt = np.round(rng.uniform(0, 50, (40, 4)))
    dt[:20, 2] = 0  # zero-width boxes
    gt[:5] = dt[5:10]  # identical boxes
    expected = mask_utils.iou(dt.tolist(), gt.tolist(), [0] * len(gt))
    ours = lvis_fast.box_iou(dt[:, None, :], gt[None, :, :])
    assert (ours == expected).all() and (expected > 0.5).sum() > 5


SEEDS = range(120)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_equal_to_lvis_on_random_problems(iou_type):
    """120 random problems; every fourth caps detections at 10 per image instead of 300."""
    seen = dict.fromkeys(["image without annotations", "image over the cap", "empty mask",
                          "zero-area annotation", "ignore flag", "category without detections",
                          "negative category", "not-exhaustive category", "tied scores"], 0)
    for seed in SEEDS:
        dataset, results = random_problem(seed)
        if not results:  # lvis cannot take an empty result list
            continue
        max_dets = 10 if seed % 4 == 3 else 300
        ev = official_lvis(dataset, results, iou_type, max_dets)
        ours = lvis_fast.evaluate(dataset, results_for(results, iou_type), iou_type, max_dets,
                                  chunk_images=3)
        assert_equal_to_lvis(ev, ours, f"seed {seed}")
        # the edge cases this problem contained
        img_with_gt = {a["image_id"] for a in dataset["annotations"]}
        per_img = np.unique([r["image_id"] for r in results], return_counts=True)[1]
        cats_with_dt = {r["category_id"] for r in results}
        seen["image without annotations"] += len(dataset["images"]) > len(img_with_gt)
        seen["image over the cap"] += per_img.max() > max_dets
        seen["empty mask"] += any(mask_utils.area(r["segmentation"]) == 0 for r in results)
        seen["zero-area annotation"] += any(a["area"] == 0 for a in dataset["annotations"])
        seen["ignore flag"] += any(a.get("ignore") for a in dataset["annotations"])
        seen["category without detections"] += len(dataset["categories"]) > len(cats_with_dt)
        seen["negative category"] += any(im["neg_category_ids"] for im in dataset["images"])
        seen["not-exhaustive category"] += any(im["not_exhaustive_category_ids"]
                                               for im in dataset["images"])
        seen["tied scores"] += len(results) > len({r["score"] for r in results})
    assert min(seen.values()) >= 5, seen


def test_records_merge_in_any_order_and_round_trip(tmp_path):
    """Per-process records merged in another order give lvis' tie-breaking all the same."""
    for seed in range(8):
        dataset, results = random_problem(100 + seed, max_images=10)
        if not results:
            continue
        gt = lvis_fast.LvisGroundTruth(dataset)
        for iou_type in ("bbox", "segm"):
            res = results_for(results, iou_type)
            by_image = {}
            for r in res:
                by_image.setdefault(r["image_id"], []).append(r)
            parts = []
            for i, img in enumerate(sorted(by_image, reverse=True)):  # one "process" per image
                matcher = lvis_fast.LvisMatcher(gt, iou_type, box_area=iou_type == "bbox")
                matcher.add(by_image[img])
                path = tmp_path / f"{seed}_{iou_type}_{i}.npz"
                matcher.records().save(path)
                parts.append(lvis_fast.MatchRecords.load(path))
            ours = lvis_fast.LvisEvalResult(gt, lvis_fast.MatchRecords.concatenate(parts))
            assert_equal_to_lvis(official_lvis(dataset, results, iou_type), ours, f"seed {seed}")


def test_segm_with_box_area_and_box_polygons():
    """Results that keep "bbox" for segm: lvis takes the box area, and a box polygon as the mask
    of a result without segmentation."""
    for seed in range(10):
        dataset, results = random_problem(200 + seed)
        if not results:
            continue
        for r in results[::3]:
            del r["segmentation"]
        from lvis import LVISEval, LVISResults

        ev = official_lvis(dataset, results[:1], "bbox")  # for its LVIS ground truth
        dt = LVISResults(ev.lvis_gt, [dict(r) for r in results])
        ev = LVISEval(ev.lvis_gt, dt, "segm")
        ev.run()
        assert_equal_to_lvis(ev, lvis_fast.evaluate(dataset, results, "segm"), f"seed {seed}")


@pytest.mark.slow
def test_medium_synthetic_set_equal_to_lvis():
    """LVIS statistics (1,203 classes, 300 detections per image), 60 images."""
    dataset, results = synthetic.generate(60, seed=3)
    assert len(results) == 60 * 300 and len(dataset["categories"]) == 1203
    for iou_type in ("bbox", "segm"):
        ev = official_lvis(dataset, results, iou_type)
        ours = lvis_fast.evaluate(dataset, results_for(results, iou_type), iou_type)
        assert_equal_to_lvis(ev, ours, iou_type)
        assert ours.metrics["AP"] > 0.05 and ours.metrics["APl"] > 0


def test_bad_input_is_a_clear_error():
    dataset, results = random_problem(1)
    gt = lvis_fast.LvisGroundTruth(dataset)
    with pytest.raises(SeesawEcmError, match="image_id 12345"):
        lvis_fast.evaluate(gt, [dict(results[0], image_id=12345)], "bbox")
    matcher = lvis_fast.LvisMatcher(gt, "bbox")
    matcher.add(results[:1])
    with pytest.raises(SeesawEcmError, match="already has"):
        matcher.add(results[:1])
    with pytest.raises(SeesawEcmError, match="iou_type"):
        lvis_fast.LvisMatcher(gt, "keypoints")
    dataset["categories"][0]["frequency"] = "x"
    with pytest.raises(SeesawEcmError, match="frequency"):
        lvis_fast.LvisGroundTruth(dataset)


# ---- the Detectron2 evaluator ------------------------------------------------------------

def _instances(results, height, width, cat_ids):
    """detectron2 Instances holding the given result dicts of one image."""
    from detectron2.structures import Boxes, Instances

    inst = Instances((height, width))
    box = np.array([r["bbox"] for r in results], np.float32).reshape(-1, 4)
    box[:, 2:] += box[:, :2]
    inst.pred_boxes = Boxes(torch.from_numpy(box))
    inst.scores = torch.tensor([r["score"] for r in results], dtype=torch.float32)
    inst.pred_classes = torch.tensor([cat_ids.index(r["category_id"]) for r in results],
                                     dtype=torch.int64)
    masks = [mask_utils.decode(r["segmentation"]) for r in results]
    inst.pred_masks = torch.from_numpy(np.stack(masks).astype(bool) if masks
                                       else np.zeros((0, height, width), bool))
    return inst


def register_problem(name, dataset, results, root):
    """Register `dataset` as LVIS-format dataset `name` (json under `root`); the model inputs
    and outputs holding `results`, one per image in id order: (inputs, outputs)."""
    from detectron2.data import DatasetCatalog

    from seesaw_ecm.data.datasets import register_lvis_format

    for im in dataset["images"]:
        im["file_name"] = f"{im['id']}.jpg"
    json_file = str(root / f"{name}.json")
    with open(json_file, "w") as f:
        json.dump(dataset, f)
    register_lvis_format(name, json_file, str(root))
    # loading sets the metadata (category id mapping) as the test loader does before the
    # evaluator is built; without it ids would be taken as contiguous + 1, and AP would be 0
    DatasetCatalog.get(name)
    cat_ids = sorted(c["id"] for c in dataset["categories"])
    inputs, outputs = [], []
    for im in dataset["images"]:
        mine = [r for r in results if r["image_id"] == im["id"]]
        inputs.append({"image_id": im["id"], "height": im["height"], "width": im["width"]})
        outputs.append({"instances": _instances(mine, im["height"], im["width"], cat_ids)})
    return inputs, outputs


@pytest.fixture(scope="module")
def tiny_lvis(tmp_path_factory):
    """A registered LVIS-format dataset and model outputs for it: (name, inputs, outputs)."""
    dataset, results = random_problem(7, max_images=8)
    name = "tiny_lvis_eval_test"
    inputs, outputs = register_problem(name, dataset, results, tmp_path_factory.mktemp(name))
    return name, inputs, outputs, dataset


def _run(evaluator, inputs, outputs):
    evaluator.reset()
    for i in range(0, len(inputs), 3):
        evaluator.process(inputs[i:i + 3], outputs[i:i + 3])
    return evaluator.evaluate()


def _run_two_ranks(monkeypatch, make_evaluator, inputs, outputs, ranks):
    """Evaluators of make_evaluator() run as ranks 0 and 1 (comm faked in one process), rank r
    given the inputs at indices ranks[r]; returns (rank 0's result, the gathered dicts)."""
    from seesaw_ecm.evaluation import evaluator as module

    rank = {"now": 0}
    gathered = {}
    monkeypatch.setattr(module.comm, "get_rank", lambda: rank["now"])
    monkeypatch.setattr(module.comm, "is_main_process", lambda: rank["now"] == 0)
    monkeypatch.setattr(module.comm, "gather", lambda data, dst=0: (
        gathered.__setitem__(rank["now"], data) or ([gathered[r] for r in sorted(gathered)]
                                                    if rank["now"] == 0 else [])))
    evaluators = []
    for r, indices in enumerate(ranks):
        rank["now"] = r
        ev = make_evaluator()
        ev.reset()
        for i in range(0, len(indices), 3):
            ev.process([inputs[j] for j in indices[i:i + 3]],
                       [outputs[j] for j in indices[i:i + 3]])
        evaluators.append(ev)
    rank["now"] = 1
    assert evaluators[1].evaluate() is None
    rank["now"] = 0
    return evaluators[0].evaluate(), list(gathered.values())


def test_evaluator_matches_detectron2_lvis_evaluator(tiny_lvis, tmp_path):
    from detectron2.evaluation import LVISEvaluator

    from seesaw_ecm.evaluation.evaluator import FastLVISEvaluator

    name, inputs, outputs, dataset = tiny_lvis
    (tmp_path / "lvis").mkdir()
    (tmp_path / "fast").mkdir()
    official = _run(LVISEvaluator(name, output_dir=str(tmp_path / "lvis"),
                                  max_dets_per_image=300), inputs, outputs)
    fast = _run(FastLVISEvaluator(name, output_dir=str(tmp_path / "fast"), chunk_images=2,
                                  max_dets_per_image=300), inputs, outputs)
    assert list(fast) == list(official) == ["bbox", "segm"]
    assert fast["bbox"]["AP"] > 5 and fast["segm"]["AP"] > 5  # the ids were mapped back
    for task in ("bbox", "segm"):
        assert list(fast[task]) == list(official[task])
        for k, v in official[task].items():
            assert abs(fast[task][k] - v) <= 100 * TOL, (task, k, fast[task][k], v)
    # the dumped results are detectron2's, byte for byte; no part file is left behind
    name_json = "lvis_instances_results.json"
    assert (tmp_path / "fast" / name_json).read_bytes() == (
        tmp_path / "lvis" / name_json).read_bytes()
    assert not [p for p in os.listdir(tmp_path / "fast") if p.endswith(".part")]
    # per-group AP = mean of per-category AP; metrics include AR
    report = json.loads((tmp_path / "fast" / "lvis_fast_eval.json").read_text())
    for task in ("bbox", "segm"):
        per_cat = report[task]["per_category_ap"]
        assert [c["id"] for c in per_cat] == sorted(c["id"] for c in dataset["categories"])
        for label in "rcf":
            aps = [c["AP"] for c in per_cat if c["frequency"] == label and c["AP"] is not None]
            group = report[task]["groups"][label]
            assert group["with_ground_truth"] == len(aps)
            if aps:
                assert abs(group["AP"] - np.mean(aps)) < 1e-9
                assert abs(group["AP"] - fast[task]["AP" + label]) <= 100 * TOL
        assert set(report[task]["metrics"]) == set(METRIC_KEYS)


def test_trainer_picks_the_backend_from_the_config(tiny_lvis, tmp_path):
    from detectron2.config import get_cfg
    from detectron2.evaluation import LVISEvaluator

    from seesaw_ecm import add_seesaw_ecm_config
    from seesaw_ecm.engine import Trainer
    from seesaw_ecm.evaluation.evaluator import FastLVISEvaluator

    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    assert cfg.TEST.LVIS_EVAL_BACKEND == "fast"
    name = tiny_lvis[0]
    ev = Trainer.build_evaluator(cfg, name, str(tmp_path))
    assert type(ev) is FastLVISEvaluator and ev._max_dets_per_image == 100
    cfg.TEST.LVIS_EVAL_BACKEND = "lvis"
    assert type(Trainer.build_evaluator(cfg, name, str(tmp_path))) is LVISEvaluator
    cfg.TEST.LVIS_EVAL_BACKEND = "fastest"
    with pytest.raises(SeesawEcmError, match="'fast', 'lvis'"):
        Trainer.build_evaluator(cfg, name, str(tmp_path))


def test_evaluator_two_processes_gather_records_not_predictions(
        tiny_lvis, tmp_path, monkeypatch):
    """Two ranks (comm faked in one process): each matches its own images; rank 0 gathers
    MatchRecords only and gives the numbers of one process, and the results dump in image-id
    order (rank 0 holds the later images here), as one process evaluating in id order."""
    from detectron2.evaluation import LVISEvaluator

    from seesaw_ecm.evaluation import evaluator as module

    name, inputs, outputs, _ = tiny_lvis
    (tmp_path / "lvis").mkdir()
    official = _run(LVISEvaluator(name, output_dir=str(tmp_path / "lvis")), inputs, outputs)
    half = len(inputs) // 2
    fast, gathered = _run_two_ranks(
        monkeypatch, lambda: module.FastLVISEvaluator(name, output_dir=str(tmp_path / "fast"),
                                                      chunk_images=2),
        inputs, outputs, [range(half, len(inputs)), range(half)])
    assert all(set(p) == {"images", "results", "records", "ranking", "proposals", "dumped"}
               and p["ranking"] is None for p in gathered)
    assert all(isinstance(rec, module.MatchRecords)
               for p in gathered for rec in p["records"].values())
    for task in ("bbox", "segm"):
        for k, v in official[task].items():
            assert abs(fast[task][k] - v) <= 100 * TOL, (task, k)
    name_json = "lvis_instances_results.json"
    assert (tmp_path / "fast" / name_json).read_bytes() == (
        tmp_path / "lvis" / name_json).read_bytes()
    assert not [p for p in os.listdir(tmp_path / "fast") if p.endswith(".part")]


def test_results_file_gives_the_reference_ap_fixed(tmp_path, monkeypatch):
    """8 random problems whose scores take 3 values (ties straddle categories' K-th places),
    images spread over two ranks out of id order: large-vocab-devil's selection (first K per
    category of the file, stable by score; reference_ap_fixed) on the written results file gives
    the evaluator's AP-fixed, per category, to float rounding. On the same results in
    processing order (detectron2's file) it differs for some problems."""
    from seesaw_ecm.evaluation.evaluator import (FIXED_METRICS, REPORT_FILE, RESULTS_FILE,
                                                 FastLVISEvaluator)

    def ap_fixed(ev):
        """(AP-fixed metrics in percent, per-category AP in percent, NaN without gt)."""
        p = ev.eval["precision"][:, :, :, 0]
        with np.errstate(invalid="ignore"):
            per_cat = np.where((p > -1).any(axis=(0, 1)), np.where(p > -1, p, 0).sum(
                axis=(0, 1)) / (p > -1).sum(axis=(0, 1)), np.nan)
        return {k: ev.results[m] * 100 for k, m in FIXED_METRICS.items()}, per_cat * 100

    differs = 0
    for seed in range(8):
        rng = np.random.default_rng(seed)
        dataset, results = random_problem(900 + seed, max_images=8, max_dets=40)
        for r in results:
            r["score"] = (0.3, 0.6, 0.9)[int(r["score"] * 10) % 3]
        name = f"ap_fixed_file_{seed}"
        inputs, outputs = register_problem(name, dataset, results, tmp_path)
        order = rng.permutation(len(inputs)).tolist()  # not id order
        ranks = [order[:len(order) // 2], order[len(order) // 2:]]
        k = (2, 3, 5, 8)[seed % 4]
        folder = tmp_path / name
        fast, _ = _run_two_ranks(monkeypatch, lambda: FastLVISEvaluator(
            name, output_dir=str(folder), chunk_images=2, topk_per_class=k), inputs, outputs,
            ranks)
        written = json.loads((folder / RESULTS_FILE).read_text())
        report = json.loads((folder / REPORT_FILE).read_text())
        ids = [r["image_id"] for r in written]
        assert ids == sorted(ids)
        # detectron2's file: rank 0's images in its order, then rank 1's
        processed = [inputs[i]["image_id"] for i in order]
        as_processed = sorted(written, key=lambda r: processed.index(r["image_id"]))
        for task in ("bbox", "segm"):
            metrics, per_cat = ap_fixed(reference_ap_fixed(
                dataset, results_for(written, task), task, k))
            for key, value in metrics.items():
                assert abs(fast[task][key] - value) <= 1e-9, (seed, task, key)
            ours = np.array([np.nan if c["AP_fixed"] is None else c["AP_fixed"]
                             for c in report[task]["per_category_ap"]])
            np.testing.assert_allclose(ours, per_cat, rtol=0, atol=1e-9)
            other, _ = ap_fixed(reference_ap_fixed(dataset, results_for(as_processed, task),
                                                   task, k))
            differs += any(abs(fast[task][key] - v) > 1e-9 for key, v in other.items())
    assert differs >= 8  # of 16 (problem, task) pairs


def test_evaluator_optional_metrics(tiny_lvis, tmp_path):
    """AP-fixed, AP-pool and the boundary task through the Detectron2 evaluator: the numbers of
    lvis_fast on the results it dumped (tested against lvis in test_lvis_metrics.py), in the
    results, the per-category report and the summary table."""
    from seesaw_ecm.engine import format_summary
    from seesaw_ecm.evaluation.evaluator import FIXED_METRICS, POOL_METRICS, FastLVISEvaluator

    name, inputs, outputs, dataset = tiny_lvis
    fast = _run(FastLVISEvaluator(name, output_dir=str(tmp_path), chunk_images=2,
                                  max_dets_per_image=5, topk_per_class=4, pooled=True,
                                  boundary=True), inputs, outputs)
    assert list(fast) == ["bbox", "boundary", "segm"]
    dumped = json.loads((tmp_path / "lvis_instances_results.json").read_text())
    report = json.loads((tmp_path / "lvis_fast_eval.json").read_text())
    differ = []
    for task in fast:
        res = results_for(dumped, "segm" if task == "boundary" else task)
        standard = lvis_fast.evaluate(dataset, res, task, max_dets=5)
        fixed = lvis_fast.evaluate(dataset, res, task, topk_per_class=4)
        differ.append(abs(fixed.metrics["AP"] - standard.metrics["AP"]) > 1e-3)
        expected = {m: standard.metrics[m] * 100 for m in ("AP", "APr", "APc", "APf")}
        expected.update({k: fixed.metrics[m] * 100 for k, m in FIXED_METRICS.items()})
        expected.update({k: fixed.pooled[m] * 100 for k, m in POOL_METRICS.items()})
        for k, v in expected.items():
            assert abs(fast[task][k] - v) <= 1e-9, (task, k)
        per_cat = {c["id"]: c for c in report[task]["per_category_ap"]}
        for cid, ap in zip(fixed.cat_ids.tolist(), fixed.per_category_ap):
            assert (per_cat[cid]["AP_fixed"] is None) == bool(np.isnan(ap))
            if not np.isnan(ap):
                assert abs(per_cat[cid]["AP_fixed"] - ap * 100) < 1e-9
        assert report[task]["pooled"]["AP-pooled-all"] == fast[task]["AP-pool"]
    assert any(differ)  # AP-fixed is not the capped AP under another name
    table = format_summary({name: fast}).splitlines()
    assert table[0].split()[1:] == ["task", "AP", "AP50", "APr", "APc", "APf", *FIXED_METRICS,
                                    *POOL_METRICS]
    assert [row.split()[0] for row in table[1:]] == ["bbox", "segm", "boundary"]
    assert float(table[3].split()[6]) == round(fast["boundary"]["AP-fixed"], 2)


def test_trainer_passes_the_lvis_metric_keys_and_refuses_bad_ones(tiny_lvis, tmp_path):
    from detectron2.config import get_cfg

    from seesaw_ecm import add_seesaw_ecm_config
    from seesaw_ecm.engine import Trainer

    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    cfg.MODEL.ROI_HEADS.NAME = "LongTailROIHeads"
    cfg.MODEL.MASK_ON = True
    name = tiny_lvis[0]
    ev = Trainer.build_evaluator(cfg, name, str(tmp_path))
    assert (ev._topk, ev._pooled, ev._boundary) == (0, False, False)
    cfg.merge_from_list(["TEST.AP_FIXED.ENABLED", True, "TEST.AP_FIXED.TOPK_PER_CLASS", 7,
                         "TEST.AP_POOL", True, "TEST.BOUNDARY_AP", True])
    ev = Trainer.build_evaluator(cfg, name, str(tmp_path))
    assert (ev._topk, ev._pooled, ev._boundary) == (7, True, True)
    for opts, match in ((["TEST.AP_FIXED.ENABLED", False], "AP_FIXED.ENABLED True"),
                        (["TEST.LVIS_EVAL_BACKEND", "lvis"], "need TEST.LVIS_EVAL_BACKEND"),
                        (["MODEL.MASK_ON", False], "needs masks"),
                        (["MODEL.ROI_HEADS.NAME", "StandardROIHeads"], "top-K-per-class"),
                        (["TEST.AP_FIXED.TOPK_PER_CLASS", 0], "must be > 0")):
        bad = cfg.clone()
        bad.merge_from_list(opts)
        with pytest.raises(SeesawEcmError, match=match):
            Trainer.build_evaluator(bad, name, str(tmp_path))
