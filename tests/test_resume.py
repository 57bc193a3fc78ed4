"""Crash and resume: a training run killed with SIGKILL after a checkpoint, or while writing
one, resumes with --resume from the last complete checkpoint, with every loss buffer (Seesaw
counts, ECM statistics) and the gradient-balance sums equal to that checkpoint's, and completes.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from detectron2.config import get_cfg
from e2e import run_train_net

from seesaw_ecm import add_seesaw_ecm_config
from seesaw_ecm.data.datasets import register_from_cfg
from seesaw_ecm.engine import Trainer
from seesaw_ecm.gradient_balance import CHECKPOINT_KEY

pytestmark = pytest.mark.slow
MAX_ITER = "16"


def crash(data, out, config, when, *opts):
    """train_net.py through tests/crashing_train_net.py, killed at model_0000007.pth."""
    env = dict(os.environ, CRASH=f"{when}:model_0000007.pth")
    cmd = [sys.executable, "tests/crashing_train_net.py", "--config-file", config]
    proc = subprocess.run(
        cmd + common_args(data, out, *opts), capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-3000:]  # SIGKILL


def common_args(data, out, *opts):
    return [
        "--dataset", f"small_train={data['train_json']}:{data['image_root']}",
        "--dataset", f"small_val={data['val_json']}:{data['image_root']}",
        "DATASETS.TRAIN", "('small_train',)", "DATASETS.TEST", "('small_val',)",
        "MODEL.ROI_HEADS.NUM_CLASSES", "12", "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", MAX_ITER, "SOLVER.WARMUP_ITERS", "2", "SOLVER.CHECKPOINT_PERIOD", "4",
        "DATALOADER.NUM_WORKERS", "0", "TEST.DETECTIONS_PER_IMAGE", "20", "MODEL.DEVICE", "cpu",
        "OUTPUT_DIR", str(out), *opts,
    ]


def resumed_trainer(out):
    """A Trainer built from the run's config.yaml and resumed, in this process."""
    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    cfg.merge_from_file(str(out / "config.yaml"))
    register_from_cfg(cfg)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    return trainer


def assert_state_equals_checkpoint(trainer, path):
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state = trainer.model.state_dict()
    assert state.keys() == ckpt["model"].keys()
    for k, v in ckpt["model"].items():
        assert torch.equal(state[k], torch.as_tensor(v)), k
    return ckpt


def check_resume(data, out, config, *opts):
    """Resume in-process (state == last complete checkpoint), then finish with --resume."""
    last = out / (out / "last_checkpoint").read_text()
    trainer = resumed_trainer(out)
    assert trainer.start_iter == int(last.stem.split("_")[1]) + 1
    ckpt = assert_state_equals_checkpoint(trainer, last)
    proc = run_train_net(data, out, config, "--resume", "SOLVER.MAX_ITER", MAX_ITER,
                         "SOLVER.WARMUP_ITERS", "2", "SOLVER.CHECKPOINT_PERIOD", "4",
                         "DATASETS.TEST", "()", *opts)  # no final evaluation: not tested here
    assert f"[Checkpointer] Loading from {last} ..." in proc.stdout + proc.stderr
    assert (out / "model_final.pth").is_file()
    rows = [json.loads(line) for line in open(out / "metrics.json")]
    iters = [r["iteration"] for r in rows if "total_loss" in r]
    assert iters[-1] == int(MAX_ITER) - 1  # completed
    return trainer, ckpt


def test_seesaw_run_killed_after_a_checkpoint_resumes_with_counts_and_sums(
        small_synthetic, tmp_path):
    config = "configs/Synthetic/mask_rcnn_R18_FPN_seesaw.yaml"
    opts = ("MODEL.LONG_TAIL.GRADIENT_BALANCE.ENABLED", "True",
            "MODEL.LONG_TAIL.GRADIENT_BALANCE.PERIOD", "2")
    crash(small_synthetic, tmp_path, config, "after", *opts)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000007.pth"
    assert not (tmp_path / "model_0000011.pth").exists()
    trainer, ckpt = check_resume(small_synthetic, tmp_path, config, *opts)
    counts = trainer.model.roi_heads.box_predictor.cls_loss.cum_samples
    assert counts.sum() > 0 and torch.equal(
        counts, ckpt["model"]["roi_heads.box_predictor.cls_loss.cum_samples"])
    sums = trainer.checkpointer.checkpointables[CHECKPOINT_KEY].state_dict()
    assert sums["iterations"] == 8 and ckpt[CHECKPOINT_KEY]["iterations"] == 8
    for k in ("positive", "negative", "samples"):
        assert sums[k].sum() > 0 and torch.equal(sums[k], ckpt[CHECKPOINT_KEY][k]), k


def test_ecm_run_killed_while_writing_a_checkpoint_resumes_from_the_previous(
        small_synthetic, tmp_path):
    config = "configs/Synthetic/mask_rcnn_R18_FPN_ecm.yaml"
    crash(small_synthetic, tmp_path, config, "during")
    # the half-written checkpoint never got its name; last_checkpoint names the previous one
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003.pth"
    assert not (tmp_path / "model_0000007.pth").exists()
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # the killed write
    trainer, ckpt = check_resume(small_synthetic, tmp_path, config)
    loss = trainer.model.roi_heads.box_predictor.cls_loss
    for name in ("sample_counts", "margin", "weight"):
        key = f"roi_heads.box_predictor.cls_loss.{name}"
        assert torch.equal(getattr(loss, name), ckpt["model"][key]), name
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # cleaned at restart
