"""tools/gpu_check: the GPU check's CPU rehearsal end to end (so that it cannot rot between GPU
draws), its section guard, its comparisons and synthetic LVIS-scale batch, and the lock filter
that the wheelhouse shares with install.sh."""
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from benchmarks.harness import LOSSES
from tools.gpu_check import correctness, throughput
from tools.gpu_check import run as gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK = os.path.join(ROOT, "tools", "install", "requirements.lock")


def filter_lock(*args):
    return subprocess.run([sys.executable, "tools/install/filter_lock.py", LOCK, *args],
                          capture_output=True, text=True, cwd=ROOT)


def test_filter_lock_keeps_entries_with_their_hashes_and_drops_by_name():
    kept = filter_lock("--keep", "YACS", "hydra_core")
    assert kept.returncode == 0
    names = [line.split("==")[0] for line in kept.stdout.splitlines() if "==" in line]
    assert names == ["hydra-core", "yacs"]
    assert kept.stdout.count("--hash=sha256:") >= 2
    dropped = filter_lock("--drop", "torch|nvidia-[a-z0-9-]+").stdout
    assert "\ntorch==" not in dropped and "nvidia-" not in dropped
    assert "\ntorchvision==" in dropped and "\nyacs==" in dropped
    missing = filter_lock("--keep", "yacs", "no-such-package")
    assert missing.returncode != 0 and "no-such-package" in missing.stderr


def test_section_guard_records_errors_and_timeouts_and_goes_on(tmp_path):
    report = gpu_check.Report(str(tmp_path / "r.json"), {"sections": {}})

    def boom(deadline):
        raise ValueError("bad input")

    def slow(deadline):
        time.sleep(5)

    assert report.section("a", 10, boom)["status"] == "error"
    start = time.monotonic()
    assert report.section("b", 1, slow)["status"] == "timeout"
    assert time.monotonic() - start < 4
    assert report.section("c", 10, lambda deadline: {"passed": False})["status"] == "failed"
    assert report.section("d", 10, lambda deadline: {"x": 1})["status"] == "ok"
    doc = json.loads((tmp_path / "r.json").read_text())
    assert "ValueError: bad input" in doc["sections"]["a"]["error"]
    assert [s["status"] for s in doc["sections"].values()] == ["error", "timeout", "failed", "ok"]


def test_comparison_fails_beyond_tolerance_or_when_not_finite():
    ref = {"x": torch.tensor([1.0, -2.0, 4.0])}
    checks = correctness.Checks()
    checks.compare("within", "float32", {"x": ref["x"] * (1 + 5e-5)}, ref)
    checks.compare("beyond", "float32", {"x": ref["x"] + torch.tensor([0.0, 0.0, 1e-3])}, ref)
    checks.compare("nan", "float16", {"x": torch.tensor([1.0, float("nan"), 4.0])}, ref)
    assert [c["passed"] for c in checks.rows] == [True, False, False]
    assert checks.rows[1]["err"] == pytest.approx(1e-3 / 4, rel=1e-3)


def test_float16_backward_is_scaled_as_amp_training_scales_it():
    """A float16 gradient of 1e-8 underflows to 0 unscaled (the stock mask head's deconv on
    the first GPU run); scaled by 2**16 it survives and divides back. A gradient that the
    first scale overflows is retried at half the scale, as GradScaler backs off."""
    x = torch.ones(4, dtype=torch.float16, requires_grad=True)  # a float16 activation
    tiny = lambda: (x.float() * 1e-8).sum()  # noqa: E731  the loss: float32, as under autocast
    assert correctness.backward(tiny(), [x], None) == 1.0
    assert bool((x.grad == 0).all())
    scale = correctness.backward(tiny(), [x], torch.float16)
    assert scale == 2.0 ** 16
    assert torch.allclose(x.grad.float() / scale, torch.full((4,), 1e-8), rtol=1e-2)
    # 2 x 2**16 and 2 x 2**15 overflow float16 (largest 65504): backed off to 2**14
    scale = correctness.backward((x.float() * 2).sum(), [x], torch.float16)
    assert scale == 2.0 ** 14 and bool((x.grad.float() / scale == 2).all())
    assert correctness.backward(tiny(), [x], torch.bfloat16) == 1.0  # bfloat16: unscaled


def test_lvis_scale_batch_has_lvis_like_instance_counts():
    counts = throughput.instances_per_image(20000)
    assert sum(counts) / len(counts) == pytest.approx(throughput.LVIS_INSTANCES_PER_IMAGE, rel=0.02)
    batch = throughput.synthetic_batch(2, 1203, 800, (1000, 1333))
    (h0, w0), (h1, w1) = [d["image"].shape[1:] for d in batch]
    assert h0 == 800 and 1000 <= w0 <= 1333 and w1 == 800 and 1000 <= h1 <= 1333
    for d in batch:
        inst = d["instances"]
        boxes = inst.gt_boxes.tensor
        assert len(inst) >= 1 and len(inst.gt_masks) == len(inst)
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= d["width"]).all()
        assert (boxes[:, 3] <= d["height"]).all() and inst.gt_classes.max() < 1203
    assert [len(d["instances"]) for d in batch] == throughput.instances_per_image(2)
    assert math.isclose(throughput.class_counts(1203)[0], 1000)


@pytest.mark.extra  # about a minute: CI runs it after the suite (bash tools/run_tests.sh -m extra)
def test_cpu_rehearsal_runs_every_section_and_passes(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "tools.gpu_check.run", "--tiny", "--out",
                           str(out), "--work", str(tmp_path / "work")], cwd=ROOT,
                          capture_output=True, text=True, timeout=1500)
    doc = json.loads((out / "gpu_check.json").read_text())
    sections = doc["sections"]
    assert proc.returncode == 0, json.dumps(sections, indent=1)[-6000:]
    assert doc["passed"] and doc["device"] == "cpu" and doc["tiny"]
    # the command as given, not the restart's (which adds absolute paths of the machine)
    assert doc["command"] == ["python", "-m", "tools.gpu_check.run", "--tiny", "--out", str(out),
                              "--work", str(tmp_path / "work")]
    assert sections["install"].get("target") in (None, "site")
    assert len(doc["source_sha256"]) == 64 and doc["started"] <= doc["finished"]
    assert list(sections) == ["install", "environment", "correctness", "throughput", "training",
                              "converted"]
    assert all(s["status"] == "ok" and s["seconds"] <= s["budget_s"] for s in sections.values())
    assert sections["install"]["installed"] is False  # the stack already imports here

    checks = sections["correctness"]["checks"]
    names = " | ".join(c["name"] for c in checks)
    for loss in ("ce", "federated", "seesaw", "ecm"):
        assert f"loss {loss} step 1: cpu = cpu" in names
        assert f"loss {loss} step 1: autocast = float32" in names
    for loss in ("ce", "cosine_ce", "federated", "seesaw", "ecm"):
        assert f"predictor {loss}: autocast = float32" in names
    assert "mask head NormedMaskRCNNConvUpsampleHead" in names and "all-reduced" in names
    assert all(c["passed"] for c in checks) and sections["correctness"]["passed"]
    assert all(c["err"] <= c["tol"] for c in checks if "err" in c)

    rows = {r["name"]: r for r in sections["throughput"]["rows"]}
    # every loss on both archs, but LOCE (its heads are Mask R-CNN's only)
    assert set(rows) == {f"{arch} {loss}" for arch in ("mask_rcnn", "cascade")
                         for loss in ("stock",) + LOSSES
                         if (arch, loss) != ("cascade", "loce")}
    assert rows["cascade stock"]["x_stock"] == 1.0
    assert all(r["s_per_iter"] > 0 and r["x_stock"] > 0 for r in rows.values())
    assert sections["throughput"]["settings"]["rounds_timed"] >= 1
    # the syncs per step beside the times: Seesaw's classification metrics stay on the device
    assert all(r["syncs"] > 0 and r["stock_syncs"] > 0 for r in rows.values())
    assert rows["mask_rcnn seesaw"]["syncs"] <= rows["mask_rcnn seesaw"]["stock_syncs"]
    assert "syncs/iter" in (out / "gpu_check.log").read_text()

    training = sections["training"]
    assert training["iterations"] == 6 and {"bbox/AP", "segm/APf"} <= set(training["evaluation"])
    assert "model_final.pth" in training["checkpoints"]
    assert set(training["export"]) == {"pth", "safetensors", "ts"}
    assert "summary:" in (out / "gpu_check.log").read_text()
