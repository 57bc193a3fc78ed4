"""Test-time calibration (seesaw_ecm/modeling/calibration.py): NorCal against a loop written from
the official code (tydpan/NorCal, CalibrationFastRCNNOutputLayers.predict_probs), logit
adjustment against its definition, both on every loss's head, bit-exact no-ops at 0, the
cascade's order (NorCal after the stages' mean), the counts each loss gives, and the errors."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator, inference_on_dataset
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.box_regression import Box2BoxTransform

from seesaw_ecm.data.datasets import register_from_cfg
from seesaw_ecm.engine import Trainer
from seesaw_ecm.errors import SeesawEcmError
from seesaw_ecm.losses import (BalancedGroupSoftmax, CrossEntropyLoss, DropLoss, ECMLoss,
                               EQLLoss, EQLv2Loss, EquilibriumLoss, FederatedLoss, SeesawLoss)
from seesaw_ecm.modeling.calibration import ScoreCalibration
from seesaw_ecm.modeling.cascade import LongTailCascadeROIHeads
from seesaw_ecm.modeling.predictor import LongTailOutputLayers
from seesaw_ecm.validation import config_problems
from tools import calibration_sweep
from tools.calibration_sweep import sweep

C = 4
COUNTS = [400.0, 60.0, 7.0, 1.0]
FREQ = [0.5, 0.1, 0.01, 0.002]


def official_norcal(logits, counts, gamma, renorm):
    """The official predict_probs (METHOD "gamma"), one proposal and one class at a time: WITH
    "exps" (its default) when renorm: exp(z) of every column, classes times 1 / n_c^gamma, the
    row divided by its sum; without renorm, WITH "probs": softmax, classes times 1 / n_c^gamma."""
    out = []
    for row in logits.tolist():
        if renorm:
            scores = [math.exp(z) for z in row]
        else:
            total = sum(math.exp(z) for z in row)
            scores = [math.exp(z) / total for z in row]
        for c in range(len(counts)):  # the background (last) is not scaled
            scores[c] *= 1 / counts[c] ** gamma
        if renorm:
            total = sum(scores)
            scores = [s / total for s in scores]
        out.append(scores)
    return torch.tensor(out, dtype=torch.float64)


def norcal_loop(probs, counts, gamma, renorm):
    """The official step on a head's (R, C + 1) probabilities, loop by loop."""
    out = []
    for row in probs.tolist():
        scores = [p / counts[c] ** gamma if c < len(counts) else p for c, p in enumerate(row)]
        if renorm:
            total = sum(scores)
            scores = [s / total for s in scores]
        out.append(scores)
    return torch.tensor(out, dtype=torch.float64)


def sigmoid(z):
    return 1 / (1 + math.exp(-z))


def logit_adjustment_loop(loss, logits, counts, tau):
    """Class logits minus tau log(prior), then the head's activation written out per entry."""
    total = sum(counts)
    rows = []
    for row in logits.tolist():
        z = [v - tau * math.log(counts[c] / total) if c < C else v for c, v in enumerate(row)]
        if isinstance(loss, CrossEntropyLoss):  # softmax over C + 1
            norm = sum(math.exp(v) for v in z)
            rows.append([math.exp(v) / norm for v in z])
        elif isinstance(loss, EQLLoss):  # sigmoid of C, background column 0
            rows.append([sigmoid(v) for v in z] + [0.0])
        elif isinstance(loss, FederatedLoss):  # sigmoid of every column
            rows.append([sigmoid(v) for v in z])
        else:  # ECM, EQLv2: sigmoid(z_c) (1 - sigmoid(z_bg)), sigmoid(z_bg)
            bg = sigmoid(z[C])
            rows.append([sigmoid(v) * (1 - bg) for v in z[:C]] + [bg])
    return torch.tensor(rows, dtype=torch.float64)


def seesaw_loss(cum_samples):
    loss = SeesawLoss(C)
    loss.cum_samples = torch.tensor(cum_samples)
    return loss


# every loss of the project, and the buffer of counts calibration reads from it (None: none,
# the training counts are given)
LOSSES = {
    "ce": (lambda: CrossEntropyLoss(C), None),
    "seesaw": (lambda: seesaw_loss(COUNTS), "cum_samples"),
    "ecm": (lambda: ECMLoss(COUNTS), "sample_counts"),
    "eql": (lambda: EQLLoss(FREQ), "image_frequency"),
    "droploss": (lambda: DropLoss(FREQ), "image_frequency"),
    "eqlv2": (lambda: EQLv2Loss(C), None),
    "federated": (lambda: FederatedLoss(COUNTS, num_sampled_classes=2), None),
    "bags": (lambda: BalancedGroupSoftmax(COUNTS, bin_split=(5, 100)), "class_counts"),
    "loce": (lambda: EquilibriumLoss(C), None),
}


def counts_of(loss, name):
    """The counts calibration should use for `loss` (its buffer, as stored, or COUNTS)."""
    buffer = LOSSES[name][1]
    return getattr(loss, buffer)[:C].tolist() if buffer else COUNTS


def predictor(cls_loss, calibration=None):
    return LongTailOutputLayers(
        ShapeSpec(channels=8), cls_loss=cls_loss, cosine=False, calibration=calibration,
        box2box_transform=Box2BoxTransform((10.0, 10.0, 5.0, 5.0)), num_classes=C).double()


def calibration(method, value, renormalize=True, counts=None):
    key = "gamma" if method == "norcal" else "tau"
    return ScoreCalibration(method, renormalize=renormalize, counts=counts, **{key: value})


def head_outputs(name, seed=0, n=7):
    """(loss, predictor-split class outputs) of random logits (float64), 3x the usual scale."""
    loss = LOSSES[name][0]().double()
    torch.manual_seed(seed)
    scores = predictor(loss)(torch.randn(n, 8, dtype=torch.float64))[0]
    return loss, predictor(loss)._split(torch.randn_like(scores) * 3)


@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("gamma", [0.5, 1.0, 1.7])
def test_norcal_equals_official_code_on_a_softmax_head(gamma, renorm):
    loss, (logits,) = head_outputs("ce")
    calib = calibration("norcal", gamma, renorm, counts=COUNTS)
    got = calib(loss, (logits,))
    torch.testing.assert_close(got, official_norcal(logits, COUNTS, gamma, renorm),
                               rtol=1e-12, atol=1e-15)
    assert not torch.allclose(got, loss.get_probs(logits))  # it does change the scores


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("renorm", [True, False])
def test_norcal_on_every_head_with_the_counts_it_keeps(name, renorm):
    """Each head's probabilities re-weighted by the loss's own counts (Seesaw's cum_samples,
    ECM's sample_counts without the background, EQL's image frequencies, BaGS' counts), or by
    the training counts given for a loss that keeps none."""
    loss, outputs = head_outputs(name)
    calib = calibration("norcal", 0.8, renorm, counts=None if LOSSES[name][1] else COUNTS)
    expected = norcal_loop(loss.get_probs(*outputs), counts_of(loss, name), 0.8, renorm)
    torch.testing.assert_close(calib(loss, outputs), expected, rtol=1e-12, atol=1e-15)


def test_norcal_treats_an_uncounted_class_as_the_rarest():
    loss, outputs = head_outputs("seesaw")
    loss.cum_samples = torch.tensor([400.0, 0.0, 7.0, 2.0], dtype=torch.float64)
    got = calibration("norcal", 1.0)(loss, outputs)
    expected = norcal_loop(loss.get_probs(*outputs), [400.0, 2.0, 7.0, 2.0], 1.0, True)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)
    loss.cum_samples.zero_()  # weights without counts: one clear error
    with pytest.raises(SeesawEcmError, match="COUNTS"):
        calibration("norcal", 1.0)(loss, outputs)


@pytest.mark.parametrize("name", ["ce", "eql", "ecm", "eqlv2", "federated"])
@pytest.mark.parametrize("tau", [0.5, 1.0])
def test_logit_adjustment_against_its_definition(name, tau):
    loss, outputs = head_outputs(name)
    given = None if LOSSES[name][1] else COUNTS
    got = calibration("logit_adjustment", tau, counts=given)(loss, outputs)
    expected = logit_adjustment_loop(loss, outputs[0], counts_of(loss, name), tau)
    torch.testing.assert_close(got, expected,
                               rtol=1e-12, atol=1e-15)


def test_logit_adjustment_of_a_softmax_head_is_norcal_with_renormalization():
    """softmax(z_c - tau log(n_c / N)) = e^z_c (n_c / N)^-tau / sum: NorCal at gamma = tau on
    the prior n_c / N (the background unscaled, the scale of the counts matters to NorCal)."""
    loss, outputs = head_outputs("ce")
    la = calibration("logit_adjustment", 0.7, counts=COUNTS)(loss, outputs)
    prior = [n / sum(COUNTS) for n in COUNTS]
    torch.testing.assert_close(la, calibration("norcal", 0.7, counts=prior)(loss, outputs),
                               rtol=1e-12, atol=1e-15)
    assert not torch.allclose(la, calibration("norcal", 0.7, counts=COUNTS)(loss, outputs))


def test_logit_adjustment_of_seesaw_adjusts_the_class_softmax_only():
    loss, (class_logits, objectness) = head_outputs("seesaw")
    got = calibration("logit_adjustment", 1.0)(loss, (class_logits, objectness))
    prior = torch.tensor(COUNTS, dtype=torch.float64) / sum(COUNTS)
    fg, bg = objectness.softmax(1).unbind(1)
    expected = torch.cat([(class_logits - prior.log()).softmax(1) * fg[:, None], bg[:, None]], 1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("method", ["norcal", "logit_adjustment"])
def test_zero_is_a_no_op_to_the_last_bit(name, method):
    loss = LOSSES[name][0]().float()
    plain = predictor(loss).float()
    calibrated = predictor(loss, calibration(method, 0.0, counts=COUNTS)).float()
    calibrated.load_state_dict(plain.state_dict())
    torch.manual_seed(1)
    predictions = plain(torch.randn(9, 8) * 5)
    proposals = [range(4), range(5)]
    for a, b in zip(plain.predict_probs(predictions, proposals),
                    calibrated.predict_probs(predictions, proposals)):
        assert torch.equal(a, b)
    assert set(calibrated.state_dict()) == set(plain.state_dict())  # checkpoints unchanged


@pytest.mark.parametrize("test_score", ["probs", "logits"])
def test_cascade_calibrates_the_mean_of_its_stages(test_score):
    """NorCal once on the stages' mean probabilities ("probs"), or on the activation of their
    mean logits ("logits"): not the mean of calibrated stages."""
    calib = calibration("norcal", 1.0, counts=COUNTS)
    stages = [predictor(CrossEntropyLoss(C), calib) for _ in range(3)]
    torch.manual_seed(2)
    outputs = [(p, (torch.randn(6, C + 1, dtype=torch.float64) * 3, None), [range(6)])
               for p in stages]
    heads = SimpleNamespace(num_cascade_stages=3, test_score=test_score)
    (got,) = LongTailCascadeROIHeads._cascade_scores(heads, outputs)
    if test_score == "probs":
        mean = sum(o[1][0].softmax(1) for o in outputs) / 3
        expected = norcal_loop(mean, COUNTS, 1.0, True)
        per_stage = sum(norcal_loop(o[1][0].softmax(1), COUNTS, 1.0, True) for o in outputs) / 3
        assert not torch.allclose(got, per_stage)
    else:
        expected = official_norcal(sum(o[1][0] for o in outputs) / 3, COUNTS, 1.0, True)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)


def test_logit_adjustment_refuses_the_group_layout():
    loss, outputs = head_outputs("bags")
    with pytest.raises(SeesawEcmError, match="norcal"):
        calibration("logit_adjustment", 1.0)(loss, outputs)


def register_tiny_train(name):
    """A registered 2-image training set with instance counts [3, 1, 0, 1] and image counts
    [2, 1, 0, 1]."""
    if name not in DatasetCatalog.list():
        anns = [[0, 0, 1, 3], [0]]
        DatasetCatalog.register(name, lambda: [
            {"file_name": f"{i}.jpg", "annotations": [{"category_id": c} for c in a]}
            for i, a in enumerate(anns)])
        MetadataCatalog.get(name).thing_classes = list("abcd")
    return name


@pytest.mark.parametrize("loss, counts, expected", [
    ("ce", "model", [3, 1, 0, 1]),  # CE keeps no counts: the training instances
    ("ce", "image_count", [2, 1, 0, 1]),
    ("ecm", "model", None),  # the loss's own, read when scoring
    ("ecm", "instance_count", [3, 1, 0, 1]),
])
def test_counts_from_config(make_cfg, loss, counts, expected):
    cfg = make_cfg(None, "MODEL.ROI_HEADS.NUM_CLASSES", C, "MODEL.ROI_HEADS.CALIBRATION.METHOD",
                   "norcal", "MODEL.ROI_HEADS.CALIBRATION.COUNTS", counts,
                   "DATASETS.TRAIN", (register_tiny_train("calibration_tiny_train"),),
                   "OUTPUT_DIR", "")
    cls_loss = ECMLoss(COUNTS) if loss == "ecm" else CrossEntropyLoss(C)
    calib = ScoreCalibration.from_config(cfg, cls_loss)
    if expected is None:
        assert calib.counts is None
        assert calib.class_counts(cls_loss).tolist() == COUNTS
    else:
        assert calib.counts.tolist() == expected


def test_training_counts_are_counted_once_per_registration(make_cfg):
    """The predictors of a model (cascade stages) share one count of DATASETS.TRAIN; a dataset
    registered again is counted again."""
    loads = []

    def register(anns):
        if "calibration_recount" in DatasetCatalog.list():
            DatasetCatalog.remove("calibration_recount")
        DatasetCatalog.register("calibration_recount", lambda: loads.append(1) or [
            {"file_name": "0.jpg", "annotations": [{"category_id": c} for c in anns]}])

    cfg = make_cfg(None, "MODEL.ROI_HEADS.NUM_CLASSES", C, "MODEL.ROI_HEADS.CALIBRATION.METHOD",
                   "norcal", "DATASETS.TRAIN", ("calibration_recount",), "OUTPUT_DIR", "")
    register([0, 1])
    counts = [ScoreCalibration.from_config(cfg, CrossEntropyLoss(C)).counts for _ in range(3)]
    assert len(loads) == 1 and all(c.tolist() == [1, 1, 0, 0] for c in counts)
    register([2])
    assert ScoreCalibration.from_config(cfg, CrossEntropyLoss(C)).counts.tolist() == [0, 0, 1, 0]
    assert len(loads) == 2


def test_config_errors(make_cfg):
    assert ScoreCalibration.from_config(make_cfg(), CrossEntropyLoss(C)) is None  # default off
    cfg = make_cfg(None, "MODEL.ROI_HEADS.CALIBRATION.METHOD", "norcall")
    with pytest.raises(SeesawEcmError, match="'norcal', 'logit_adjustment'"):
        ScoreCalibration.from_config(cfg, ECMLoss(COUNTS))
    cfg = make_cfg(None, "MODEL.ROI_HEADS.CALIBRATION.METHOD", "norcal",
                   "MODEL.ROI_HEADS.CALIBRATION.COUNTS", "images")
    with pytest.raises(SeesawEcmError, match="COUNTS 'images'"):
        ScoreCalibration.from_config(cfg, ECMLoss(COUNTS))
    cfg = make_cfg(None, "MODEL.ROI_HEADS.CALIBRATION.METHOD", "norcal", "DATASETS.TRAIN", ())
    with pytest.raises(SeesawEcmError, match="DATASETS.TRAIN, which is empty"):
        ScoreCalibration.from_config(cfg, CrossEntropyLoss(C))


def test_stock_heads_are_refused_and_their_ce_model_loads_into_the_long_tail_heads(make_cfg):
    """The plain CE configs use detectron2's StandardROIHeads, whose predictor has no
    calibration: validation names the fix, and the fix gives the same detections."""
    config = "configs/Synthetic/mask_rcnn_R18_FPN_ce.yaml"
    opts = ("MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.NUM_CLASSES", C, "DATASETS.TRAIN", (),
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0)
    problems = config_problems(make_cfg(config, *opts, "MODEL.ROI_HEADS.CALIBRATION.METHOD",
                                        "norcal"), eval_only=True)
    assert any("\"LongTailROIHeads\"" in p for p in problems)
    assert not config_problems(make_cfg(config, *opts), eval_only=True)
    stock = random_model(make_cfg(config, *opts))
    long_tail = build_model(make_cfg(config, *opts, "MODEL.ROI_HEADS.NAME", "LongTailROIHeads"))
    long_tail.load_state_dict(stock.state_dict())  # strict: the same parameters and buffers
    torch.manual_seed(3)
    images = [{"image": torch.randint(0, 255, (3, 64, 80)).float()} for _ in range(2)]
    with torch.no_grad():
        for a, b in zip(stock(images), long_tail.eval()(images)):
            a, b = a["instances"], b["instances"]
            assert len(a) > 0 and torch.equal(a.scores, b.scores)
            assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)


# ---- the sweep tool (tools/calibration_sweep.py) ----

class Recorder(DatasetEvaluator):
    """An evaluator that keeps every detection (exact comparisons, not only AP)."""

    def reset(self):
        self.seen = []

    def process(self, inputs, outputs):
        for x, out in zip(inputs, outputs):
            inst = out["instances"]
            self.seen.append((x["image_id"], inst.pred_boxes.tensor, inst.scores,
                              inst.pred_classes, getattr(inst, "in_image_cap", None)))

    def evaluate(self):
        return {"bbox": {"records": self.seen}}


def same_records(a, b):
    return len(a) == len(b) and all(
        x[0] == y[0] and all(torch.equal(u, v) if u is not None else v is None
                             for u, v in zip(x[1:], y[1:])) for x, y in zip(a, b))


SWEEP_OPTS = ("MODEL.ROI_HEADS.NUM_CLASSES", 12, "MODEL.DEVICE", "cpu",
              "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "TEST.DETECTIONS_PER_IMAGE", 20,
              "MODEL.RPN.POST_NMS_TOPK_TEST", 60, "DATALOADER.NUM_WORKERS", 0,
              "DATASETS.TRAIN", ("small_train",), "DATASETS.TEST", ("small_val",),
              "MODEL.LONG_TAIL.STATISTICS_FROM", "checkpoint", "MODEL.MASK_ON", False)


def small_datasets(data):
    return [f"small_train={data['train_json']}:{data['image_root']}",
            f"small_val={data['val_json']}:{data['image_root']}"]


def sweep_cfg(make_cfg, data, config, method, key, value, *opts):
    cfg = make_cfg(config, *SWEEP_OPTS, "DATASETS.LVIS_FORMAT", small_datasets(data),
                   "MODEL.ROI_HEADS.CALIBRATION.METHOD", method,
                   f"MODEL.ROI_HEADS.CALIBRATION.{key}", value, *opts)
    register_from_cfg(cfg)
    return cfg


def random_model(cfg, state=None):
    """A random-init model (seeded) in eval mode, or one with `state`."""
    torch.manual_seed(0)
    model = build_model(cfg)
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


@pytest.mark.parametrize("config, method, key, values, opts", [
    ("configs/Synthetic/mask_rcnn_R18_FPN_ce.yaml", "norcal", "GAMMA", [0.0, 1.0],
     ("MODEL.ROI_HEADS.NAME", "LongTailROIHeads")),
    ("configs/Synthetic/mask_rcnn_R18_FPN_ecm.yaml", "logit_adjustment", "TAU", [1.0, 0.0],
     ("MODEL.LONG_TAIL.STATISTICS_FROM", "train")),
    ("configs/Synthetic/cascade_mask_rcnn_R18_FPN_seesaw.yaml", "norcal", "GAMMA", [0.5, 2.0],
     ("TEST.AP_FIXED.ENABLED", True, "TEST.AP_FIXED.TOPK_PER_CLASS", 30)),
    pytest.param("configs/Synthetic/htc_lite_R18_FPN_seesaw_tsd.yaml", "logit_adjustment", "TAU",
                 [0.0, 2.0], ("MODEL.CASCADE.TEST_SCORE", "logits"), marks=pytest.mark.slow),
])
def test_sweep_equals_a_full_evaluation_per_value(make_cfg, small_synthetic, monkeypatch,
                                                  tmp_path, config, method, key, values, opts):
    """One forward per image; each value's detections (boxes, scores, classes, the AP-fixed
    filter's marks) equal those of a model built with the key at that value."""
    monkeypatch.setattr(Trainer, "build_evaluator", classmethod(lambda cls, *a: Recorder()))
    cfg = sweep_cfg(make_cfg, small_synthetic, config, method, key, values[0], *opts)
    model = random_model(cfg)
    for m in model.modules():  # Seesaw's counts, as a trained model has them
        if isinstance(m, SeesawLoss):
            m.cum_samples = torch.arange(12.0) ** 3
    forwards = []
    forward = model.forward
    model.forward = lambda inputs: forwards.append(len(inputs)) or forward(inputs)
    (per_value,) = sweep(cfg, model, values, str(tmp_path)).values()
    assert len(forwards) == len(DatasetCatalog.get("small_val")) == sum(forwards)
    records = [r["bbox"]["records"] for r in per_value]
    assert not same_records(*records)  # the values do change the detections
    for value, got in zip(values, records):
        cfg_v = sweep_cfg(make_cfg, small_synthetic, config, method, key, value, *opts)
        full = inference_on_dataset(random_model(cfg_v, model.state_dict()),
                                    Trainer.build_test_loader(cfg_v, "small_val"), Recorder())
        assert same_records(got, full["bbox"]["records"])
        if value == 0:  # and those of the model without calibration, to the last bit
            cfg_v = sweep_cfg(make_cfg, small_synthetic, config, "none", key, 0.0, *opts)
            plain = inference_on_dataset(random_model(cfg_v, model.state_dict()),
                                         Trainer.build_test_loader(cfg_v, "small_val"),
                                         Recorder())
            assert same_records(got, plain["bbox"]["records"])


def test_sweep_command(make_cfg, small_synthetic, tmp_path, capsys):
    """The command: its table and results.json hold each gamma's metrics, equal to an
    evaluation with MODEL.ROI_HEADS.CALIBRATION.GAMMA at that value; the plot is written."""
    config = "configs/Synthetic/mask_rcnn_R18_FPN_seesaw.yaml"
    cfg = sweep_cfg(make_cfg, small_synthetic, config, "none", "GAMMA", 0.0)
    model = random_model(cfg)
    for m in model.modules():
        if isinstance(m, SeesawLoss):
            m.cum_samples = torch.arange(12.0) ** 3
    weights = str(tmp_path / "model.pth")
    torch.save({"model": model.state_dict()}, weights)
    opts = [str(v) for v in SWEEP_OPTS[:-2]] + ["MODEL.WEIGHTS", weights]
    out = tmp_path / "sweep"
    code = calibration_sweep.main([
        "--config-file", config, "--output-dir", str(out),
        *[a for d in small_datasets(small_synthetic) for a in ("--dataset", d)],
        *opts, "--gammas", "0", "1.5"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "AP-pool" in printed and "gamma" in printed
    saved = json.loads((out / "results.json").read_text())
    assert saved["values"] == [0.0, 1.5] and (out / "small_val" / "calibration_sweep.png").is_file()
    for value, got in zip(saved["values"], saved["results"]["small_val"]):
        cfg_v = sweep_cfg(make_cfg, small_synthetic, config, "norcal", "GAMMA", value,
                          "TEST.AP_FIXED.ENABLED", True, "TEST.AP_POOL", True,
                          "OUTPUT_DIR", str(tmp_path / f"full{value}"))
        full = Trainer.test(cfg_v, random_model(cfg_v, model.state_dict()))
        assert got["bbox"] == pytest.approx(dict(full["bbox"]), nan_ok=True)
        assert f"{got['bbox']['AP']:.2f}" in printed
