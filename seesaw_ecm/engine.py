"""Trainer: detectron2's DefaultTrainer with the evaluator chosen by the dataset's type."""
import logging
import os
import time

import torch
from detectron2.data import (
    MetadataCatalog, build_detection_test_loader, build_detection_train_loader,
)
from detectron2.engine import AMPTrainer, DefaultTrainer, hooks
from detectron2.evaluation import COCOEvaluator, LVISEvaluator
from detectron2.utils import comm

from .checkpoint import AtomicCheckpointer
from .data.mapper import CheckedDatasetMapper
from .errors import SeesawEcmError
from .evaluation.evaluator import FastLVISEvaluator
from .evaluation.openimages_evaluator import OpenImagesEvaluator
from .gradient_balance import CHECKPOINT_KEY, GradientBalanceHook, training_class_info

# TEST.LVIS_EVAL_BACKEND -> evaluator class (same arguments, same result keys and numbers)
LVIS_EVALUATORS = {"fast": FastLVISEvaluator, "lvis": LVISEvaluator}

# The metrics printed at the end of a run, for each task, in this order.
SUMMARY_METRICS = ("AP", "AP50", "APr", "APc", "APf")
OPENIMAGES_SUMMARY_METRICS = ("AP", "AP1", "AP2", "AP3", "AP4", "AP5")


class CPUAMPTrainer(AMPTrainer):
    """Mixed-precision training on CPU: bfloat16 autocast. detectron2 0.6's AMPTrainer needs
    CUDA (torch.cuda.amp); its float16 GradScaler is not needed here: bfloat16 has float32's
    exponent range, so the scaler is disabled (scale 1, every step taken)."""

    def __init__(self, model, data_loader, optimizer):
        super().__init__(model, data_loader, optimizer,
                         grad_scaler=torch.amp.GradScaler("cpu", enabled=False))

    def run_step(self):
        """AMPTrainer.run_step with CPU autocast: forward and loss sum in bfloat16 autocast,
        backward outside it."""
        assert self.model.training, "[CPUAMPTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_dict = self.model(data)
            losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        self.grad_scaler.scale(losses).backward()
        self._write_metrics(loss_dict, data_time)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()


class Trainer(DefaultTrainer):
    """DefaultTrainer (hooks, checkpointing, EventStorage metrics, metrics.json, TensorBoard,
    progress with ETA) whose evaluator for LVIS-format datasets is chosen by
    TEST.LVIS_EVAL_BACKEND (FastLVISEvaluator or detectron2's LVISEvaluator), with the optional
    gradient-balance hook (MODEL.LONG_TAIL.GRADIENT_BALANCE), and data loaders that report an
    image they cannot read by its file name (CheckedDatasetMapper). With SOLVER.AMP.ENABLED on a
    CPU model (MODEL.DEVICE cpu) it trains in bfloat16 autocast (CPUAMPTrainer); on CUDA with
    detectron2's AMPTrainer (float16 autocast + GradScaler)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.SOLVER.AMP.ENABLED and torch.device(cfg.MODEL.DEVICE).type == "cpu":
            amp = self._trainer  # detectron2's (CUDA-only) AMPTrainer: same model, loader, opt.
            self._trainer = CPUAMPTrainer(amp.model, amp.data_loader, amp.optimizer)
            logging.getLogger(__name__).info("SOLVER.AMP.ENABLED on CPU: bfloat16 autocast")

    def train(self):
        """Train; return the final evaluation results (DefaultTrainer returns them only when
        TEST.EXPECTED_RESULTS is set; its EvalHook keeps them in `_last_eval_results`)."""
        super().train()
        return getattr(self, "_last_eval_results", None)

    def build_hooks(self):
        """detectron2's hooks, with a checkpointer that writes atomically (a job killed while
        saving leaves the previous checkpoint as the last one); with
        MODEL.LONG_TAIL.GRADIENT_BALANCE.ENABLED also the gradient-balance hook (before the
        checkpointer, whose checkpoints then hold its sums)."""
        old = self.checkpointer  # DefaultTrainer.__init__ builds it just before build_hooks()
        self.checkpointer = AtomicCheckpointer(old.model, old.save_dir,
                                               save_to_disk=old.save_to_disk,
                                               **old.checkpointables)
        ret = super().build_hooks()
        gb = self.cfg.MODEL.LONG_TAIL.GRADIENT_BALANCE
        if not gb.ENABLED:
            return ret
        hook = GradientBalanceHook(
            self.model, gb.PERIOD, self.cfg.SOLVER.CHECKPOINT_PERIOD, self.cfg.OUTPUT_DIR,
            class_info=training_class_info(self.cfg) if comm.is_main_process() else None,
        )
        self.checkpointer.checkpointables[CHECKPOINT_KEY] = hook.balance
        at = next(i for i, h in enumerate(ret)
                  if isinstance(h, (hooks.PeriodicCheckpointer, hooks.EvalHook)))
        ret.insert(at, hook)
        return ret

    @classmethod
    def build_optimizer(cls, cfg, model):
        """detectron2's optimizer; with SOLVER.CLIP_GRADIENTS_GLOBAL_NORM > 0 its step first
        clips the gradient norm over all parameters together (detectron2 0.6 only clips per
        parameter)."""
        optimizer = super().build_optimizer(cfg, model)
        max_norm = cfg.SOLVER.CLIP_GRADIENTS_GLOBAL_NORM
        if max_norm <= 0:
            return optimizer
        base = type(optimizer)

        class GlobalNormClipped(base):
            def step(self, closure=None):
                params = [p for group in self.param_groups for p in group["params"]]
                torch.nn.utils.clip_grad_norm_(params, max_norm)
                return super().step(closure)

        optimizer.__class__ = GlobalNormClipped
        return optimizer

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's train loader, with an image that cannot be read reported by name."""
        return build_detection_train_loader(cfg, mapper=CheckedDatasetMapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """detectron2's test loader, with an image that cannot be read reported by name."""
        return build_detection_test_loader(
            cfg, dataset_name, mapper=CheckedDatasetMapper(cfg, False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
        if evaluator_type == "lvis":
            return lvis_evaluator_class(cfg.TEST.LVIS_EVAL_BACKEND)(
                dataset_name, output_dir=output_folder,
                max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
            )
        if evaluator_type == "openimages":
            return OpenImagesEvaluator(
                dataset_name, output_dir=output_folder,
                train_counts=(lambda: training_class_info(cfg)[1]) if cfg.DATASETS.TRAIN else None)
        # detectron2's C++ COCO evaluator is not built by tools/install (no compiled ops).
        return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=False)


def lvis_evaluator_class(backend):
    """The evaluator class of TEST.LVIS_EVAL_BACKEND `backend` (SeesawEcmError if unknown)."""
    if backend not in LVIS_EVALUATORS:
        raise SeesawEcmError(
            f"TEST.LVIS_EVAL_BACKEND {backend!r} is unknown; choose one of "
            f"{', '.join(repr(k) for k in LVIS_EVALUATORS)}.")
    return LVIS_EVALUATORS[backend]


def _fmt(value):
    # LVISEval / detectron2 report -1 / -100 for a frequency group with no category
    return f"{value:8.2f}" if value >= 0 else f"{'n/a':>8}"


def format_summary(results):
    """Results of `Trainer.test` ({dataset: {task: {metric: value}}}) as a small text table."""
    lines = []
    for dataset, per_task in results.items():
        names = OPENIMAGES_SUMMARY_METRICS if "AP1" in per_task.get("bbox", {}) else \
            SUMMARY_METRICS
        header = f"{dataset:<24}{'task':<6}" + "".join(f"{m:>8}" for m in names)
        lines.append(header)
        for task in ("bbox", "segm"):
            if task in per_task:
                vals = "".join(_fmt(per_task[task].get(m, -1)) for m in names)
                lines.append(f"{'':<24}{task:<6}" + vals)
    return "\n".join(lines)
