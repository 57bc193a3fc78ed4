"""Exact resume: a run stopped after a checkpoint and resumed by a fresh Trainer from its folder
(--resume) ends with the same weights and loss buffers as the uninterrupted run, because the
checkpoint holds the optimizer (SGD momentum), the scheduler, the iteration, the random number
generators, the sampler's position and every loss buffer."""
import json

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.engine import HookBase
from detectron2.utils.env import seed_all_rng

from seesaw_ecm import add_seesaw_ecm_config
from seesaw_ecm.data.datasets import register_lvis_format
from seesaw_ecm.engine import Trainer

MAX_ITER, STOP = 6, 2  # checkpoints after iterations 2 and 5 (period 3): stopped after 2
SEED = 3
LOSS_BUFFERS = {"seesaw": ("cum_samples",), "eqlv2": ("pos_grad", "neg_grad")}


class _Killed(Exception):
    pass


class _KillAfter(HookBase):
    """Ends training with an exception after iteration `at`'s hooks (its checkpoint written)."""

    def __init__(self, at):
        self.at = at

    def after_step(self):
        if self.trainer.iter == self.at:
            raise _Killed


def _cfg(data, out, loss):
    if "resume_train" not in DatasetCatalog.list():
        register_lvis_format("resume_train", data["train_json"], data["image_root"])
    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    cfg.merge_from_file(f"configs/Synthetic/mask_rcnn_R18_FPN_{loss}.yaml")
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.NUM_CLASSES", "12",
        "DATASETS.TRAIN", "('resume_train',)", "DATASETS.TEST", "()",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.005", "SOLVER.WARMUP_ITERS", "2",
        "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.STEPS", "(4,)", "SOLVER.CHECKPOINT_PERIOD",
        "3", "DATALOADER.NUM_WORKERS", "0", "SEED", str(SEED), "OUTPUT_DIR", str(out)])
    return cfg


def _train(cfg, resume=False, stop=None):
    """A run as train_net.py makes it (seeded as default_setup does): the trained Trainer."""
    seed_all_rng(SEED)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=resume)
    if stop is not None:
        trainer.register_hooks([_KillAfter(stop)])
        with pytest.raises(_Killed):
            trainer.train()
    else:
        trainer.train()
    return trainer


def _state(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _max_difference(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())


@pytest.mark.parametrize("loss", ["seesaw", pytest.param("eqlv2", marks=pytest.mark.slow)])
def test_killed_and_resumed_run_ends_as_the_uninterrupted_one(small_synthetic, tmp_path, loss):
    whole = _state(_train(_cfg(small_synthetic, tmp_path / "whole", loss)))

    folder = tmp_path / "killed"
    _train(_cfg(small_synthetic, folder, loss), stop=STOP)
    assert (folder / "last_checkpoint").read_text() == f"model_{STOP:07d}.pth"
    ckpt = torch.load(folder / f"model_{STOP:07d}.pth", weights_only=True)
    saved = ckpt["trainer"]
    assert saved["iteration"] == STOP and saved["_trainer"]["optimizer"]["state"]  # momentum
    assert {"torch", "numpy", "random"} <= set(saved["rng"]) and "sampler_seed" in saved

    resumed = _train(_cfg(small_synthetic, folder, loss), resume=True)
    assert resumed.start_iter == STOP + 1 and resumed.iter == MAX_ITER
    state = _state(resumed)
    assert state.keys() == whole.keys()
    for name in LOSS_BUFFERS[loss]:
        key = f"roi_heads.box_predictor.cls_loss.{name}"
        assert whole[key].abs().sum() > 0
        torch.testing.assert_close(state[key], whole[key], rtol=1e-5, atol=1e-6)
    assert _max_difference(state, whole) < 1e-5

    # the switch: the same checkpoint without the optimizer state (SGD momentum restarts at 0)
    del saved["_trainer"]
    torch.save(ckpt, folder / f"model_{STOP:07d}.pth")
    (folder / f"model_{STOP:07d}.pth.sha256").unlink(missing_ok=True)
    (folder / "last_checkpoint").write_text(f"model_{STOP:07d}.pth")
    no_momentum = _state(_train(_cfg(small_synthetic, folder, loss), resume=True))
    assert _max_difference(no_momentum, whole) > 1e-3


class _ReadMetrics(HookBase):
    """After each iteration's hooks: the iterations metrics.json holds on disk."""

    def __init__(self, path):
        self.path, self.seen = path, {}

    def after_step(self):
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        self.seen[self.trainer.iter] = [json.loads(line)["iteration"] for line in lines]


def test_metrics_are_on_disk_at_every_checkpoint(small_synthetic, tmp_path):
    """The writers write every 20 iterations; at a checkpoint too, so a run killed after a
    checkpoint keeps the metrics up to it (the checkpoints here: after iterations 2 and 5)."""
    cfg = _cfg(small_synthetic, tmp_path, "seesaw")
    seed_all_rng(SEED)
    trainer = Trainer(cfg)
    reader = _ReadMetrics(tmp_path / "metrics.json")
    trainer.register_hooks([reader])
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert reader.seen[1] == [] and reader.seen[2] == [2] and reader.seen[4] == [2]
    assert reader.seen[5] == [2, 5]
    row = json.loads((tmp_path / "metrics.json").read_text().splitlines()[0])
    assert {"total_loss", "loss_cls", "lr"} <= set(row)


def test_amp_grad_scaler_is_saved_and_restored(small_synthetic, tmp_path):
    """The AMP trainers' grad scaler state (detectron2's AMPTrainer.state_dict) is in the
    checkpoint and comes back on resume; here an enabled CPU scaler stands in for CUDA's."""
    cfg = _cfg(small_synthetic, tmp_path, "seesaw")
    cfg.SOLVER.AMP.ENABLED = True
    trainer = Trainer(cfg)
    trainer._trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=1234.0,
                                                        growth_interval=7)
    trainer.iter = 2
    trainer.checkpointer.save("model_0000002")
    saved = torch.load(tmp_path / "model_0000002.pth", weights_only=True)["trainer"]["_trainer"]
    assert saved["grad_scaler"]["scale"] == 1234.0 and saved["grad_scaler"]["growth_interval"] == 7

    resumed = Trainer(cfg)
    resumed._trainer.grad_scaler = torch.amp.GradScaler("cpu")  # scale 65536, interval 2000
    resumed.resume_or_load(resume=True)
    assert resumed._trainer.grad_scaler.get_scale() == 1234.0
    assert resumed._trainer.grad_scaler.get_growth_interval() == 7
