"""Gradient-balance diagnostic: accumulated values against hand computations, checkpoints, the
trainer hook (absent when off), and the plotting tool."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import nn

from seesaw_ecm import add_seesaw_ecm_config
from seesaw_ecm.data.datasets import register_lvis_format
from seesaw_ecm.engine import Trainer
from seesaw_ecm.errors import SeesawEcmError
from seesaw_ecm.gradient_balance import (
    GradientBalance, GradientBalanceHook, attach, box_predictors, detach, frequency_groups,
    summary_scalars,
)
from seesaw_ecm.losses import CrossEntropyLoss, SeesawLoss
from seesaw_ecm.modeling import LongTailOutputLayers

from tools.plot_gradient_balance import load_run, plot_ratios

C = 3
LABELS = [0, 0, 1, 3, 3, 2, 3]  # C = 3 is background


def proposals(labels):
    inst = Instances((32, 32))
    boxes = torch.tensor([[2.0, 2.0, 20.0, 20.0]]).repeat(len(labels), 1)
    inst.proposal_boxes = Boxes(boxes)
    inst.gt_boxes = Boxes(boxes + 1)
    inst.gt_classes = torch.tensor(labels)
    return [inst]


def stock_predictor():
    return FastRCNNOutputLayers(ShapeSpec(channels=8), box2box_transform=Box2BoxTransform(
        (10.0, 10.0, 5.0, 5.0)), num_classes=C)


def long_tail_predictor(loss):
    return LongTailOutputLayers(
        ShapeSpec(channels=8), cls_loss=loss, cosine=False, box2box_transform=Box2BoxTransform(
            (10.0, 10.0, 5.0, 5.0)), num_classes=C)


def hand_sums(grad, labels):
    """positive[c], negative[c] by explicit loops over RoIs and classes."""
    pos, neg = [0.0] * C, [0.0] * C
    for r, y in enumerate(labels):
        for c in range(C):
            if y == c:
                pos[c] += abs(float(grad[r][c]))
            else:
                neg[c] += abs(float(grad[r][c]))
    return pos, neg


def train_step(predictor, labels, balance, seed=0):
    """One forward / backward of the predictor's losses with `balance` attached; returns the
    scores' values (R, K) and their gradient."""
    torch.manual_seed(seed)
    attach([predictor], balance)
    x = torch.randn(len(labels), 8) * 3
    scores, deltas = predictor(x)
    scores.retain_grad()
    with EventStorage():
        losses = predictor.losses((scores, deltas), proposals(labels))
    sum(losses.values()).backward()
    detach([predictor])
    return scores.detach(), scores.grad


@pytest.mark.parametrize("make", [stock_predictor, lambda: long_tail_predictor(
    CrossEntropyLoss(C))], ids=["stock_fast_rcnn", "long_tail_ce"])
def test_softmax_ce_against_closed_form(make):
    """For softmax CE averaged over N RoIs, dL/dz_rc = (softmax(z_r)_c - [y_r == c]) / N."""
    balance = GradientBalance(C)
    scores, _ = train_step(make(), LABELS, balance)
    balance.sync()
    n = len(LABELS)
    pos, neg = [0.0] * C, [0.0] * C
    for r, y in enumerate(LABELS):
        exps = [math.exp(float(v)) for v in scores[r]]
        for c in range(C):
            g = (exps[c] / sum(exps) - (1.0 if y == c else 0.0)) / n
            if y == c:
                pos[c] += abs(g)
            else:
                neg[c] += abs(g)
    state = balance.state_dict()
    assert torch.allclose(state["positive"][0], torch.tensor(pos, dtype=torch.float64), atol=1e-7)
    assert torch.allclose(state["negative"][0], torch.tensor(neg, dtype=torch.float64), atol=1e-7)
    assert state["samples"][0].tolist() == [2, 1, 1]
    assert (state["positive"] > 0).all() and (state["negative"] > 0).all()


def test_seesaw_layout_uses_the_class_columns_only_and_accumulates():
    """C + 2 layout: objectness columns are ignored; two steps add up; background RoIs give no
    class-column gradient (Seesaw's class term is on foreground RoIs only)."""
    predictor = long_tail_predictor(SeesawLoss(C))
    balance = GradientBalance(C)
    pos, neg = np.zeros(C), np.zeros(C)
    for seed in (0, 1):
        scores, grad = train_step(predictor, LABELS, balance, seed=seed)
        assert grad.shape == (len(LABELS), C + 2) and grad[:, C:].abs().sum() > 0
        assert grad[[i for i, y in enumerate(LABELS) if y == C], :C].abs().sum() == 0
        p, n = hand_sums(grad, LABELS)
        pos += p
        neg += n
    balance.sync()
    assert np.allclose(balance.total[0, 0].numpy(), pos) and np.allclose(balance.total[1, 0], neg)
    assert balance.total[2, 0].tolist() == [4, 2, 2]
    ratio = balance.ratio()[0].numpy()
    assert np.allclose(ratio, pos / neg)


@pytest.mark.parametrize("loss", [CrossEntropyLoss, SeesawLoss], ids=["ce", "seesaw"])
def test_recording_leaves_the_gradients_unchanged(loss):
    """The recorder only reads dL/dz: every parameter gradient is bit-identical to a run
    without it (an in-place op on the hooked gradient would change them)."""
    torch.manual_seed(0)
    predictor = long_tail_predictor(loss(C))
    state = {k: v.clone() for k, v in predictor.state_dict().items()}
    grads = []
    for balance in (None, GradientBalance(C)):
        predictor.load_state_dict(state)
        predictor.zero_grad()
        torch.manual_seed(1)
        x = torch.randn(len(LABELS), 8) * 3
        if balance is not None:
            attach([predictor], balance)
        with EventStorage():
            losses = predictor.losses(predictor(x), proposals(LABELS))
        sum(losses.values()).backward()
        detach([predictor])
        grads.append([p.grad.clone() for p in predictor.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert balance.step is not None and balance.step.abs().sum() > 0


def test_nothing_recorded_without_backward_or_grad():
    balance = GradientBalance(C)
    predictor = stock_predictor()
    attach([predictor], balance)
    with torch.no_grad(), EventStorage():
        predictor.losses(predictor(torch.randn(4, 8)), proposals([0, 1, 3, 3]))
    detach([predictor])
    assert "losses" not in predictor.__dict__
    balance.sync()
    assert balance.total.abs().sum() == 0


def test_checkpoint_round_trip(tmp_path):
    balance = GradientBalance(C, num_stages=2)
    balance.total = torch.rand(3, 2, C, dtype=torch.float64)
    balance.iterations = 7
    DetectionCheckpointer(nn.Linear(1, 1), save_dir=str(tmp_path),
                          gradient_balance=balance).save("ckpt")
    again = GradientBalance(C, num_stages=2)
    DetectionCheckpointer(nn.Linear(1, 1), gradient_balance=again).load(str(tmp_path / "ckpt.pth"))
    assert torch.equal(again.total, balance.total) and again.iterations == 7
    with pytest.raises(SeesawEcmError, match="shape"):
        GradientBalance(C + 1, num_stages=2).load_state_dict(balance.state_dict())
    run = load_run(str(tmp_path / "ckpt.pth"))  # the plotting tool reads checkpoints too
    assert np.allclose(run["positive"], balance.total[0].numpy()) and run["num_stages"] == 2


def test_groups_and_summary_scalars():
    counts = [50, 1, 7, 300, 2, 20]
    groups = frequency_groups(counts)
    assert [sorted(groups[g].tolist()) for g in "rcf"] == [[1, 4], [2, 5], [0, 3]]
    by_letter = frequency_groups(counts, ["f", "r", "c", "f", "r", "c"])
    assert [sorted(by_letter[g].tolist()) for g in "rcf"] == [[1, 4], [2, 5], [0, 3]]
    ratio = np.array([[1.0, 0.1, 0.5, 3.0, np.nan, 0.7], [2.0, 0.2, 1.0, 6.0, 0.4, 1.4]])
    out = summary_scalars(ratio, groups)
    assert out["gradient_balance/pos_neg_ratio_r_stage0"] == pytest.approx(0.1)  # nan skipped
    assert out["gradient_balance/pos_neg_ratio_f_stage1"] == pytest.approx(4.0)
    assert out["gradient_balance/pos_neg_ratio_c_stage0"] == pytest.approx(0.6)


def test_cascade_has_one_accumulator_row_per_stage():
    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    cfg.merge_from_file("configs/Synthetic/cascade_mask_rcnn_R18_FPN_seesaw.yaml")
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    hook = GradientBalanceHook(model, period=20, checkpoint_period=0)
    assert len(hook.predictors) == 3 and hook.balance.total.shape == (3, 3, 60)
    hook.before_train()
    assert all("losses" in p.__dict__ for p in box_predictors(model))
    hook.after_train()
    assert not any("losses" in p.__dict__ for p in box_predictors(model))


def trainer_cfg(data, out, enabled, max_iter=3):
    for split in ("train", "val"):
        if f"gb_{split}" not in DatasetCatalog.list():
            register_lvis_format(f"gb_{split}", data[f"{split}_json"], data["image_root"])
    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    cfg.merge_from_file("configs/Synthetic/mask_rcnn_R18_FPN_seesaw.yaml")
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.NUM_CLASSES", "12", "DATASETS.TRAIN",
        "('gb_train',)", "DATASETS.TEST", "()", "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", str(max_iter), "SOLVER.CHECKPOINT_PERIOD", "2",
        "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(out),
        "MODEL.LONG_TAIL.GRADIENT_BALANCE.ENABLED", str(enabled),
        "MODEL.LONG_TAIL.GRADIENT_BALANCE.PERIOD", "1",
    ])
    return cfg


def test_trainer_hook_off_installs_nothing(small_synthetic, tmp_path):
    trainer = Trainer(trainer_cfg(small_synthetic, tmp_path, False))
    assert not any(isinstance(h, GradientBalanceHook) for h in trainer._hooks)
    assert "gradient_balance" not in trainer.checkpointer.checkpointables
    assert "losses" not in trainer.model.roi_heads.box_predictor.__dict__


def test_trainer_hook_saves_logs_and_resumes(small_synthetic, tmp_path):
    trainer = Trainer(trainer_cfg(small_synthetic, tmp_path, True))
    names = [type(h).__name__ for h in trainer._hooks]
    assert names.index("GradientBalanceHook") < names.index("PeriodicCheckpointer")
    trainer.resume_or_load(resume=False)
    trainer.train()
    predictor = trainer.model.roi_heads.box_predictor
    assert "losses" not in predictor.__dict__  # detached after training

    state = torch.load(tmp_path / "model_final.pth", weights_only=True)["gradient_balance"]
    assert state["iterations"] == 3 and state["samples"].sum() > 0
    assert (state["positive"] >= 0).all() and state["negative"].sum() > 0
    # every foreground RoI of the 3 iterations counted once (detectron2 logs the mean per image)
    fg_per_image = [v for v, _ in trainer.storage.history("roi_head/num_fg_samples").values()]
    assert len(fg_per_image) == 3 and state["samples"].sum() == pytest.approx(2 * sum(fg_per_image))
    saved = json.loads((tmp_path / "gradient_balance.json").read_text())
    assert saved["positive"] == state["positive"].tolist() and saved["iterations"] == 3
    train = json.loads(open(small_synthetic["train_json"]).read())
    cat_ids = sorted(c["id"] for c in train["categories"])
    expected = [sum(a["category_id"] == i for a in train["annotations"]) for i in cat_ids]
    assert saved["class_counts"] == expected
    rows = [json.loads(line) for line in open(tmp_path / "metrics.json")]
    # the small set has LVIS frequency letters r and c only (no class above 100 images)
    assert any({"gradient_balance/pos_neg_ratio_r", "gradient_balance/pos_neg_ratio_c"} <= set(r)
               for r in rows)

    # --resume continues the sums from the checkpoint
    resumed = Trainer(trainer_cfg(small_synthetic, tmp_path, True, max_iter=4))
    resumed.resume_or_load(resume=True)
    hook = next(h for h in resumed._hooks if isinstance(h, GradientBalanceHook))
    assert torch.equal(hook.balance.total[0], state["positive"].to(torch.float64))


def fake_run(num_classes=6, stages=1, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "positive": rng.uniform(1, 2, (stages, num_classes)).tolist(),
        "negative": rng.uniform(1, 50, (stages, num_classes)).tolist(),
        "class_counts": rng.integers(1, 500, num_classes).tolist(),
    }


def assert_png(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    image = plt.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_plot_ratios_writes_png(tmp_path):
    out = tmp_path / "sub" / "ratios.png"
    plot_ratios([fake_run(), fake_run(stages=3, seed=1)], str(out), labels=["a", "b"])
    assert_png(out)


def test_plot_tool_from_saved_runs(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "gradient_balance.json").write_text(json.dumps(fake_run()))
    torch.save({"gradient_balance": {
        "positive": torch.rand(3, 6, dtype=torch.float64),
        "negative": torch.rand(3, 6, dtype=torch.float64) + 1,
        "samples": torch.ones(3, 6, dtype=torch.float64), "iterations": 5}},
        tmp_path / "cascade.pth")
    out = tmp_path / "plot.png"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.plot_gradient_balance", str(run_dir),
         str(tmp_path / "cascade.pth"), "--labels", "json", "ckpt", "--output", str(out)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert_png(out)
    bad = subprocess.run([sys.executable, "-m", "tools.plot_gradient_balance",
                          str(tmp_path / "no")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no such file" in bad.stderr
