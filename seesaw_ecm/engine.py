"""Trainer: detectron2's DefaultTrainer with the evaluator chosen by the dataset's type."""
import os

import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer, hooks
from detectron2.evaluation import COCOEvaluator, LVISEvaluator
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.utils import comm

from .errors import SeesawEcmError
from .evaluation.evaluator import FastLVISEvaluator
from .gradient_balance import CHECKPOINT_KEY, GradientBalanceHook, training_class_info
from .modeling.topk_inference import TopKPerClassHeads

# TEST.LVIS_EVAL_BACKEND -> evaluator class (same arguments, same result keys and numbers)
LVIS_EVALUATORS = {"fast": FastLVISEvaluator, "lvis": LVISEvaluator}

# The metrics printed at the end of a run, for each task, in this order; then those of the
# optional LVIS metrics (TEST.AP_FIXED, TEST.AP_POOL) that the results have.
SUMMARY_METRICS = ("AP", "AP50", "APr", "APc", "APf")
OPTIONAL_SUMMARY_METRICS = ("AP-fixed", "APr-fixed", "APc-fixed", "APf-fixed",
                            "AP-pool", "APr-pool", "APc-pool", "APf-pool")


def check_lvis_metrics_config(cfg):
    """Raise SeesawEcmError for TEST.AP_FIXED / AP_POOL / BOUNDARY_AP settings that cannot
    work (called before training, and when the evaluator is built)."""
    wanted = [k for k, on in (("TEST.AP_FIXED.ENABLED", cfg.TEST.AP_FIXED.ENABLED),
                              ("TEST.AP_POOL", cfg.TEST.AP_POOL),
                              ("TEST.BOUNDARY_AP", cfg.TEST.BOUNDARY_AP)) if on]
    if wanted and cfg.TEST.LVIS_EVAL_BACKEND != "fast":
        raise SeesawEcmError(f"{', '.join(wanted)} need TEST.LVIS_EVAL_BACKEND 'fast' (the "
                             f"official lvis API has none of them), not "
                             f"{cfg.TEST.LVIS_EVAL_BACKEND!r}.")
    if cfg.TEST.AP_POOL and not cfg.TEST.AP_FIXED.ENABLED:
        raise SeesawEcmError("TEST.AP_POOL is computed on the top-K-per-class detections: set "
                             "TEST.AP_FIXED.ENABLED True as well.")
    if cfg.TEST.AP_FIXED.ENABLED and cfg.TEST.AP_FIXED.TOPK_PER_CLASS <= 0:
        raise SeesawEcmError(f"TEST.AP_FIXED.TOPK_PER_CLASS must be > 0 (LVIS: 10000), got "
                             f"{cfg.TEST.AP_FIXED.TOPK_PER_CLASS}.")
    if cfg.TEST.AP_FIXED.ENABLED and not issubclass(
            ROI_HEADS_REGISTRY.get(cfg.MODEL.ROI_HEADS.NAME), TopKPerClassHeads):
        raise SeesawEcmError(
            f"TEST.AP_FIXED needs ROI heads with top-K-per-class inference (LongTailROIHeads, "
            f"LongTailCascadeROIHeads, HTCLiteROIHeads), not {cfg.MODEL.ROI_HEADS.NAME!r}. For "
            "detectron2's StandardROIHeads with softmax CE, add MODEL.ROI_HEADS.NAME "
            "LongTailROIHeads (MODEL.LONG_TAIL.LOSS 'ce': the same weights and scores).")
    if cfg.TEST.BOUNDARY_AP and not cfg.MODEL.MASK_ON:
        raise SeesawEcmError("TEST.BOUNDARY_AP needs masks: set MODEL.MASK_ON True or turn "
                             "TEST.BOUNDARY_AP off.")


class Trainer(DefaultTrainer):
    """DefaultTrainer (hooks, checkpointing, EventStorage metrics, metrics.json, TensorBoard,
    progress with ETA) whose evaluator for LVIS-format datasets is chosen by
    TEST.LVIS_EVAL_BACKEND (FastLVISEvaluator or detectron2's LVISEvaluator), with the optional
    gradient-balance hook (MODEL.LONG_TAIL.GRADIENT_BALANCE)."""

    def train(self):
        """Train; return the final evaluation results (DefaultTrainer returns them only when
        TEST.EXPECTED_RESULTS is set; its EvalHook keeps them in `_last_eval_results`)."""
        super().train()
        return getattr(self, "_last_eval_results", None)

    def build_hooks(self):
        """detectron2's hooks; with MODEL.LONG_TAIL.GRADIENT_BALANCE.ENABLED also the
        gradient-balance hook (before the checkpointer, whose checkpoints then hold its sums)."""
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
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
        if evaluator_type == "lvis":
            backend = cfg.TEST.LVIS_EVAL_BACKEND
            if backend not in LVIS_EVALUATORS:
                raise SeesawEcmError(
                    f"TEST.LVIS_EVAL_BACKEND {backend!r} is unknown; choose one of "
                    f"{', '.join(repr(k) for k in LVIS_EVALUATORS)}.")
            check_lvis_metrics_config(cfg)
            extra = {}
            if backend == "fast":
                ap_fixed = cfg.TEST.AP_FIXED
                extra = dict(topk_per_class=ap_fixed.TOPK_PER_CLASS if ap_fixed.ENABLED else 0,
                             pooled=cfg.TEST.AP_POOL, boundary=cfg.TEST.BOUNDARY_AP)
            return LVIS_EVALUATORS[backend](
                dataset_name, output_dir=output_folder,
                max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE, **extra,
            )
        # detectron2's C++ COCO evaluator is not built by tools/install (no compiled ops).
        return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=False)


def _fmt(value):
    # LVISEval / detectron2 report -1 / -100 for a frequency group with no category
    return f"{value:10.2f}" if value >= 0 else f"{'n/a':>10}"


def format_summary(results):
    """Results of `Trainer.test` ({dataset: {task: {metric: value}}}) as a small text table:
    SUMMARY_METRICS, then the OPTIONAL_SUMMARY_METRICS present; rows bbox, segm, boundary."""
    lines = []
    for dataset, per_task in results.items():
        present = {m for task in per_task.values() for m in task}
        metrics = SUMMARY_METRICS + tuple(m for m in OPTIONAL_SUMMARY_METRICS if m in present)
        header = f"{dataset:<24}{'task':<9}" + "".join(f"{m:>10}" for m in metrics)
        lines.append(header)
        for task in ("bbox", "segm", "boundary"):
            if task in per_task:
                vals = "".join(_fmt(per_task[task].get(m, -1)) for m in metrics)
                lines.append(f"{'':<24}{task:<9}" + vals)
    return "\n".join(lines)
