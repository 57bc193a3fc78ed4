"""Trainer: detectron2's DefaultTrainer with the evaluator chosen by the dataset's type."""
import functools
import itertools
import logging
import os
import time

import torch
from detectron2.data import (
    MetadataCatalog, build_detection_test_loader, build_detection_train_loader,
)
from detectron2.data.common import ToIterableDataset
from detectron2.engine import AMPTrainer, DefaultTrainer, hooks
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm

from .checkpoint import AtomicCheckpointer
from .data.mapper import CheckedDatasetMapper
from .data.samplers import CeilRepeatSampler
from .deferred_scalars import FlushScalarsHook, flush
from .epochs import EpochProgressHook, plan_training
from .errors import SeesawEcmError
from .evaluation.evaluator import lvis_evaluator_class
from .evaluation.openimages_evaluator import OpenImagesEvaluator
from .gradient_balance import CHECKPOINT_KEY, GradientBalanceHook, training_class_info
from .loce_init import loce_init_hooks
from .modeling.decoupled import freeze_all_but
from .modeling.tta import LongTailRCNNWithTTA
from .rng import kept_rng, rng_states, set_rng_states
from .roi_align import use_vectorized_roi_align_backward
from .solver import build_optimizer
from .validation import check_lvis_metrics_config

# The metrics printed at the end of a run, for each task, in this order; then those of the
# optional LVIS metrics (TEST.AP_FIXED, TEST.AP_POOL) that the results have.
SUMMARY_METRICS = ("AP", "AP50", "APr", "APc", "APf")
OPTIONAL_SUMMARY_METRICS = ("AP-fixed", "APr-fixed", "APc-fixed", "APf-fixed",
                            "AP-pool", "APr-pool", "APc-pool", "APf-pool")
# Open Images: mAP and AP1..AP5 (classes by training count, rarest first)
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


class CheckpointFlushingWriter(hooks.PeriodicWriter):
    """detectron2's PeriodicWriter (metrics.json, the log line, TensorBoard every `period`
    iterations and at the end) that also writes at every checkpoint iteration, after that
    iteration's checkpoint and evaluation: a run killed later finds its metrics.json complete
    up to its last checkpoint (with `period` alone it loses up to `period` - 1 iterations)."""

    def __init__(self, writers, period, checkpoint_period):
        super().__init__(writers, period)
        self._checkpoint_period = checkpoint_period

    def after_step(self):
        super().after_step()
        done = self.trainer.iter + 1
        if done % self._checkpoint_period == 0 and done % self._period and \
                done != self.trainer.max_iter:
            flush(self.trainer.storage)  # the metrics the heads keep on the device, as at a period
            for writer in self._writers:
                writer.write()


class Trainer(DefaultTrainer):
    """DefaultTrainer (hooks, checkpointing, EventStorage metrics, metrics.json, TensorBoard,
    progress with ETA) whose evaluator for LVIS-format datasets is chosen by
    TEST.LVIS_EVAL_BACKEND (FastLVISEvaluator or detectron2's LVISEvaluator), with the optional
    gradient-balance hook (MODEL.LONG_TAIL.GRADIENT_BALANCE), data loaders that report an
    image they cannot read by its file name (CheckedDatasetMapper), schedules in epochs
    (SOLVER.EPOCHS: MAX_ITER and STEPS derived before anything is built) and mmdetection's
    repeat-factor sampling (DATALOADER.REPEAT_ROUNDING "ceil", resumed where it stopped). With
    SOLVER.AMP.ENABLED on a CPU model (MODEL.DEVICE cpu) it trains in bfloat16 autocast
    (CPUAMPTrainer); on CUDA with detectron2's AMPTrainer (float16 autocast + GradScaler).
    Its checkpoints resume exactly (:meth:`state_dict`: optimizer, grad scaler, scheduler,
    iteration, random number generators, sampler position; the loss buffers are in the model),
    except LOCE's feature memory, which is refilled, and, with DATALOADER.NUM_WORKERS > 0, the
    augmentations drawn in the loader workers."""

    def __init__(self, cfg):
        plan = plan_training(cfg)  # DATASETS.TRAIN read once: schedule and sampler
        self.epoch_schedule = plan.schedule
        # DefaultTrainer.__init__ builds the loader through self.build_train_loader(cfg)
        self.build_train_loader = functools.partial(self.build_train_loader, plan=plan)
        super().__init__(plan.cfg)
        if cfg.SOLVER.AMP.ENABLED and torch.device(cfg.MODEL.DEVICE).type == "cpu":
            amp = self._trainer  # detectron2's (CUDA-only) AMPTrainer: same model, loader, opt.
            self._trainer = CPUAMPTrainer(amp.model, amp.data_loader, amp.optimizer)
            logging.getLogger(__name__).info("SOLVER.AMP.ENABLED on CPU: bfloat16 autocast")

    @classmethod
    def build_train_loader(cls, cfg, plan=None):
        """detectron2's train loader, with an image that cannot be read reported by name; with
        "ceil" repeat-factor rounding its sampler is a CeilRepeatSampler whose epochs are
        padded to the schedule's epoch size. `plan`: cfg's TrainPlan when already made."""
        mapper = CheckedDatasetMapper(cfg, True)
        ceil = (plan or plan_training(cfg)).ceil
        if ceil is None:
            return build_detection_train_loader(cfg, mapper=mapper)
        dicts, sampler = ceil
        return build_detection_train_loader(cfg, dataset=dicts, sampler=sampler, mapper=mapper)

    def resume_or_load(self, resume=True):
        """DefaultTrainer's; on resume at iteration k the train sampler continues its index
        stream at global position k x IMS_PER_BATCH (detectron2's samplers would restart from
        their seed, i.e. replay the first images; a CeilRepeatSampler is told its `start`)."""
        super().resume_or_load(resume=resume)
        if self.start_iter == 0:
            return
        position = self.start_iter * self.cfg.SOLVER.IMS_PER_BATCH
        sampler = _sampler_of(self._trainer.data_loader)
        if not _continue_stream(sampler, position):
            logging.getLogger(__name__).warning(
                f"{type(sampler).__name__} restarts its index stream on resume.")
            return
        # torch's DataLoader draws its workers' base seed from torch's generator when its
        # iterator starts: for the resumed loader that is at its first batch, after
        # before_train restored the generators; a private generator leaves them untouched
        loader = _torch_loader_of(self._trainer.data_loader)
        if loader is not None:
            loader.generator = torch.Generator().manual_seed(position)
        self._trainer._data_loader_iter = iter(self._trainer.data_loader)

    def state_dict(self):
        """DefaultTrainer's (iteration; hook states: LR scheduler, gradient-balance sums), plus
        what the next iterations depend on: under "_trainer" (detectron2's later key) the inner
        trainer's state (optimizer; with AMP the grad scaler), under "rng" the random number
        generators (seesaw_ecm/rng.py), under "sampler_seed" the train sampler's seed."""
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        ret["rng"] = rng_states()
        seed = getattr(_sampler_of(self._trainer.data_loader), "_seed", None)
        if seed is not None:
            ret["sampler_seed"] = seed
        return ret

    def load_state_dict(self, state_dict):
        """Restore :meth:`state_dict`; the generators are set in :meth:`before_train` (after the
        hooks' before_train, e.g. LOCE's initialisation pass, which draws random numbers)."""
        super().load_state_dict(state_dict)
        inner = state_dict.get("_trainer")
        if inner is None:
            logging.getLogger(__name__).warning(
                "The checkpoint holds no optimizer state (written by an older version): the "
                "optimizer restarts (SGD momentum 0); the run differs from an uninterrupted one.")
        else:
            if isinstance(self._trainer, AMPTrainer) and not inner.get("grad_scaler"):
                # saved without AMP (or by the disabled CPU scaler): keep this run's scaler
                inner = {**inner, "grad_scaler": self._trainer.grad_scaler.state_dict()}
            self._trainer.load_state_dict(inner)
        sampler = _sampler_of(self._trainer.data_loader)
        if "sampler_seed" in state_dict and hasattr(sampler, "_seed"):
            sampler._seed = int(state_dict["sampler_seed"])
        # the main process's generators (it writes the checkpoints); the other ranks keep
        # theirs, seeded with SEED + rank: restoring rank 0's there would make them draw alike
        self._resumed_rng = state_dict.get("rng") if comm.is_main_process() else None

    def before_train(self):
        """The hooks' before_train; then, on resume, the generators as the checkpoint saved
        them: the draws continue those of the uninterrupted run."""
        super().before_train()
        states, self._resumed_rng = getattr(self, "_resumed_rng", None), None
        if states is not None:
            set_rng_states(states)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """DefaultTrainer.test, with the random number generators left as it found them: an
        evaluation during training does not change the training that follows (a run resumed
        from the checkpoint written just before it continues as the uninterrupted run)."""
        with kept_rng():
            return super().test(cfg, model, evaluators)

    def train(self):
        """Train; return the final evaluation results (DefaultTrainer returns them only when
        TEST.EXPECTED_RESULTS is set; its EvalHook keeps them in `_last_eval_results`), per
        dataset, with those of test-time augmentation (TEST.AUG.ENABLED) as "<dataset>_TTA"."""
        super().train()
        results = getattr(self, "_last_eval_results", None)
        tta = getattr(self, "_last_tta_results", None)
        return {**per_dataset(self.cfg, results or {}), **tta} if tta else results

    def _test_with_tta_and_keep_results(self):
        self._last_tta_results = self.test_with_TTA(self.cfg, self.model)
        return self._last_tta_results

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """Evaluate `model` with test-time augmentation (TEST.AUG), as detectron2's
        tools/train_net.py: results {"<dataset>_TTA": {task: metrics}}, files under
        OUTPUT_DIR/inference_TTA."""
        logging.getLogger(__name__).info("Running inference with test-time augmentation ...")
        out = os.path.join(cfg.OUTPUT_DIR, "inference_TTA")
        evaluators = [cls.build_evaluator(cfg, name, os.path.join(out, name))
                      for name in cfg.DATASETS.TEST]
        results = per_dataset(cfg, cls.test(cfg, LongTailRCNNWithTTA(cfg, model), evaluators))
        return {f"{name}_TTA": per_task for name, per_task in results.items()}

    @classmethod
    def build_model(cls, cfg):
        """detectron2's model; with MODEL.LONG_TAIL.TRAINABLE all of it frozen but the
        parameters it names (decoupled training from MODEL.WEIGHTS); with
        MODEL.ROI_ALIGN.VECTORIZED_BACKWARD its RoIAlign layers take the vectorized CPU
        backward (seesaw_ecm/roi_align.py)."""
        patterns = cfg.MODEL.LONG_TAIL.TRAINABLE
        if patterns and not cfg.MODEL.WEIGHTS:
            raise SeesawEcmError(
                "MODEL.LONG_TAIL.TRAINABLE trains parts of a trained model: set MODEL.WEIGHTS to "
                "its checkpoint (e.g. the first stage's model_final.pth).")
        model = super().build_model(cfg)
        if cfg.MODEL.ROI_ALIGN.VECTORIZED_BACKWARD:
            use_vectorized_roi_align_backward(model)
        if patterns:
            trainable = freeze_all_but(model, patterns)
            logging.getLogger(__name__).info(f"Trainable parameters only: {trainable}")
        return model

    def build_hooks(self):
        """detectron2's hooks, with a checkpointer that writes atomically (a job killed while
        saving leaves the previous checkpoint as the last one) and writers that also write at
        every checkpoint (CheckpointFlushingWriter); with
        MODEL.LONG_TAIL.GRADIENT_BALANCE.ENABLED also the gradient-balance hook (before the
        checkpointer, whose checkpoints then hold its sums); the flush of the scalars the model
        keeps on the device (deferred_scalars) before the writers; for LOCE with
        MODEL.LONG_TAIL.LOCE.INIT_PASS.ENABLED its initialisation pass (seesaw_ecm/loce_init.py)."""
        old = self.checkpointer  # DefaultTrainer.__init__ builds it just before build_hooks()
        self.checkpointer = AtomicCheckpointer(old.model, old.save_dir,
                                               save_to_disk=old.save_to_disk,
                                               **old.checkpointables)
        ret = super().build_hooks()
        ret = [CheckpointFlushingWriter(h._writers, h._period, self.cfg.SOLVER.CHECKPOINT_PERIOD)
               if type(h) is hooks.PeriodicWriter else h for h in ret]
        if self.cfg.TEST.AUG.ENABLED:  # after the plain evaluation, as detectron2's train_net.py
            at = next(i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook)) + 1
            ret.insert(at, hooks.EvalHook(0, self._test_with_tta_and_keep_results))
        schedule = self.epoch_schedule
        ret.insert(0, EpochProgressHook(self.cfg.SOLVER.IMS_PER_BATCH,
                                        schedule.epoch_size if schedule else None))
        ret[:0] = loce_init_hooks(self.cfg)  # LOCE's initialisation pass: first in before_train
        # the metrics the heads keep on the device, read just before detectron2's writers
        writer = [i for i, h in enumerate(ret) if isinstance(h, hooks.PeriodicWriter)]
        ret.insert(writer[0] if writer else len(ret),
                   FlushScalarsHook(ret[writer[0]]._period if writer else 20))
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
        """detectron2's optimizer, with the "full_model" SOLVER.CLIP_GRADIENTS.CLIP_TYPE
        (seesaw_ecm/solver.py: the norm over all parameters, logged as `grad_norm`)."""
        return build_optimizer(cfg, model)

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
            check_lvis_metrics_config(cfg)
            extra = {}
            if cfg.TEST.LVIS_EVAL_BACKEND == "fast":
                ap_fixed = cfg.TEST.AP_FIXED
                extra = dict(topk_per_class=ap_fixed.TOPK_PER_CLASS if ap_fixed.ENABLED else 0,
                             pooled=cfg.TEST.AP_POOL, boundary=cfg.TEST.BOUNDARY_AP)
            return lvis_evaluator_class(cfg.TEST.LVIS_EVAL_BACKEND)(
                dataset_name, output_dir=output_folder,
                max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE, **extra,
            )
        if evaluator_type == "openimages":
            return OpenImagesEvaluator(
                dataset_name, output_dir=output_folder,
                train_counts=(lambda: training_class_info(cfg)[1]) if cfg.DATASETS.TRAIN else None)
        # detectron2's C++ COCO evaluator is not built by tools/install (no compiled ops).
        return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=False)


def per_dataset(cfg, results):
    """Results of DefaultTrainer.test as {dataset: {task: metrics}} (detectron2 unwraps a
    single test dataset's results to {task: metrics})."""
    if results and len(cfg.DATASETS.TEST) == 1 and cfg.DATASETS.TEST[0] not in results:
        return {cfg.DATASETS.TEST[0]: results}
    return results


def _sampler_of(data_loader):
    """The index sampler inside a detectron2 train loader (AspectRatioGroupedDataset / DataLoader
    over a ToIterableDataset), or None."""
    while data_loader is not None:
        if isinstance(data_loader, ToIterableDataset):
            return data_loader.sampler
        data_loader = getattr(data_loader, "dataset", None)
    return None


def _torch_loader_of(data_loader):
    """The torch DataLoader inside a detectron2 train loader (itself, or inside an
    AspectRatioGroupedDataset), or None."""
    while data_loader is not None and not isinstance(data_loader, torch.utils.data.DataLoader):
        data_loader = getattr(data_loader, "dataset", None)
    return data_loader


def _continue_stream(sampler, position):
    """Make a train sampler yield its global index stream from `position` on: a
    CeilRepeatSampler's `start`; detectron2's TrainingSampler / RepeatFactorTrainingSampler (a
    seeded `_infinite_indices` that every rank shards) skip its first `position` indices.
    Returns False for a sampler of neither kind."""
    if isinstance(sampler, CeilRepeatSampler):
        sampler.start = position
        return True
    infinite = getattr(sampler, "_infinite_indices", None)
    if infinite is None:
        return False
    sampler._infinite_indices = lambda: itertools.islice(infinite(), position, None)
    return True


def _fmt(value):
    # LVISEval / detectron2 report -1 / -100 for a frequency group with no category
    return f"{value:10.2f}" if value >= 0 else f"{'n/a':>10}"


def format_summary(results):
    """Results of `Trainer.test` ({dataset: {task: {metric: value}}}) as a small text table:
    SUMMARY_METRICS, then the OPTIONAL_SUMMARY_METRICS present; rows bbox, segm, boundary."""
    lines = []
    for dataset, per_task in results.items():
        present = {m for task in per_task.values() for m in task}
        if "AP1" in present:  # Open Images
            metrics = OPENIMAGES_SUMMARY_METRICS
        else:
            metrics = SUMMARY_METRICS + tuple(m for m in OPTIONAL_SUMMARY_METRICS if m in present)
        header = f"{dataset:<24}{'task':<9}" + "".join(f"{m:>10}" for m in metrics)
        lines.append(header)
        for task in ("bbox", "segm", "boundary"):
            if task in per_task:
                vals = "".join(_fmt(per_task[task].get(m, -1)) for m in metrics)
                lines.append(f"{'':<24}{task:<9}" + vals)
    return "\n".join(lines)
