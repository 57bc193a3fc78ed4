"""Export of a trained model into a model-zoo folder (the files :mod:`seesaw_ecm.model_zoo`
describes and loads), verified by a parity check, and TorchScript for deployment."""
import datetime
import io
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog, detection_utils
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.export import TracingAdapter
from detectron2.export.torchscript_patch import patch_builtin_len

from .checkpoint import verify_checkpoint
from .engine import SUMMARY_METRICS, Trainer
from .errors import SeesawEcmError
from .fileio import write_atomic
from .model_zoo import (
    HASHED_FILE_RE, WEIGHT_FORMATS, ZooPredictor, _check_name, _read_text, _sha256,
    _sha256_file, get_predictor, load_config, load_weights, save_weights,
)
from .modeling.predictor import LongTailOutputLayers

logger = logging.getLogger(__name__)

__all__ = ["export_model", "trace_model", "update_table"]

DEFAULT_TABLE = os.path.join("docs", "MODEL_ZOO.md")
TABLE_HEADER = ("| name | config | schedule | box AP | box APr | mask AP | mask APr | files |\n"
                "|---|---|---|---|---|---|---|---|\n")
TABLE_TEMPLATE = """# Model zoo

Models exported with `tools/export_model.py` (see docs/DEPLOYMENT.md). Each
weights file is named `<name>_<first 8 hex digits of its sha256>`; `seesaw_ecm.model_zoo`
checks that hash before loading. AP values are percentages on the dataset of the model's
`<name>_metrics.json`; schedule = iterations x images per batch.

""" + TABLE_HEADER
# Name, inside a TorchScript file, of the JSON that describes its inputs and outputs.
TORCHSCRIPT_INFO = "seesaw_ecm.json"


# --- TorchScript -------------------------------------------------------------------------------

def _output_fields(model):
    return ("pred_boxes", "scores", "pred_classes") + (
        ("pred_masks",) if getattr(model.roi_heads, "mask_on", False) else ())


def _raw_inference(model, image):
    """Eager inference on one preprocessed (3, h, w) image, before postprocessing: boxes (R, 4)
    XYXY in the input's pixels, scores (R,), classes (R,) int64 and, with masks, (R, M, M)
    mask probabilities on each box's M x M grid."""
    instances = model.inference([{"image": image}], do_postprocess=False)[0]
    fields = _output_fields(model)
    out = [instances.pred_boxes.tensor, instances.scores, instances.pred_classes]
    if "pred_masks" in fields:
        out.append(instances.pred_masks[:, 0])
    return tuple(out)


def _differences(expected, actual, fields, tol=None):
    """The fields whose tensors differ in shape, dtype or values (float values within
    rtol = atol = `tol` count as equal; tol None: exactly equal), each as "name (how)"."""
    bad = []
    for field, e, a in zip(fields, expected, actual):
        if e.shape != a.shape or e.dtype != a.dtype:
            bad.append(f"{field} ({e.dtype} {tuple(e.shape)} vs {a.dtype} {tuple(a.shape)})")
        elif not (torch.equal(e, a) or (
                tol is not None and e.is_floating_point() and torch.allclose(e, a, tol, tol))):
            diff = (e.double() - a.double()).abs().max().item()  # same shape, not empty
            bad.append(f"{field} (largest difference {diff:.3g})")
    return bad


def _trace(adapter, image):
    """torch.jit.trace in a new thread. The tracer stores the Python call stack of every
    operation in the file (debug info); in a new thread that stack does not depend on the
    caller (tools/export_model.py, a notebook, a test), so the same model gives the same bytes.
    """
    result = {}

    def run():
        try:  # our predictor splits scores with len(proposals): make that len() traceable too
            with torch.no_grad(), patch_builtin_len([LongTailOutputLayers.__module__]):
                result["traced"] = torch.jit.trace(adapter, (image,), check_trace=False)
        except BaseException as e:  # re-raised in the caller's thread
            result["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["traced"]


def trace_model(predictor, images):
    """TorchScript of a predictor's model through detectron2's TracingAdapter + torch.jit.trace,
    checked against eager inference on every image.

    The traced module takes one (3, h, w) float32 image as :meth:`ZooPredictor.preprocess`
    makes it (resized, in cfg.INPUT.FORMAT; normalization and padding are inside) and returns
    the tuple of :func:`_raw_inference` (before pasting masks / rescaling to the original
    size). It needs torch and torchvision (for nms / roi_align) only, not detectron2 or
    seesaw_ecm. A JSON extra file (:data:`TORCHSCRIPT_INFO`) describes inputs and outputs.
    The bytes hold the tracer's debug info (source paths of this installation) and are the
    same for the same model when traced once per process, as tools/export_model.py does (a
    second trace in one process renames TorchScript's types, which changes them).

    Args:
        images: list of (3, h, w) float32 tensors; the first is traced, all are checked.
    Returns:
        the bytes of ``torch.jit.save``.
    """
    model = predictor.model
    fields = _output_fields(model)
    with warnings.catch_warnings(), torch.no_grad():
        # The tracer warns of every Python value it freezes; the check below is what counts.
        # torch 2.15 warns that torch.jit is deprecated (FutureWarning); trace / save / load work.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", r".*torch\.jit.* is deprecated", FutureWarning)
        traced = _trace(TracingAdapter(model, (images[0],), _raw_inference), images[0])
        cfg = predictor.cfg
        info = {
            "input": "(3, h, w) float32 image, channels in input_format, resized so that the "
                     "short side is min_size_test and the long side <= max_size_test",
            "input_format": cfg.INPUT.FORMAT,
            "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
            "max_size_test": cfg.INPUT.MAX_SIZE_TEST,
            "outputs": {
                "pred_boxes": "(R, 4) float32 XYXY in the input's pixels",
                "scores": "(R,) float32",
                "pred_classes": "(R,) int64 index into classes",
                "pred_masks": "(R, M, M) float32 mask probabilities on each box's grid",
            },
            "output_order": list(fields),
            "classes": predictor.metadata.get("thing_classes", None),
        }
        buf = io.BytesIO()
        torch.jit.save(traced, buf, _extra_files={TORCHSCRIPT_INFO: json.dumps(info, indent=1)})
        data = buf.getvalue()
        loaded = torch.jit.load(io.BytesIO(data))
        # The check is of the traced graph, so it runs unfused: on CUDA TorchScript's
        # profiling executor fuses elementwise ops from a graph's second call on, into kernels
        # that round in their own way (first GPU run, 2026-12-04: image 0 matched, image 1's
        # mask probabilities did not, within 1e-4). A deployed graph still fuses.
        with torch.jit.fuser("none"):
            for i, image in enumerate(images):
                bad = _differences(_raw_inference(model, image), loaded(image), fields, tol=1e-4)
                if bad:
                    raise SeesawEcmError(
                        f"TorchScript export differs from eager inference on sample image {i} "
                        f"({tuple(image.shape)}) in {bad}: the traced graph does not generalize "
                        "to this input. Trace on a more typical image (--images), or skip "
                        "--torchscript.")
    return data


# --- export ------------------------------------------------------------------------------------

def _read_checkpoint(path):
    """(state_dict, iteration or None) of a training checkpoint or a bare state_dict file,
    checked against its sha256 record (checkpoint.verify_checkpoint), read with
    ``torch.load(weights_only=True)``."""
    if not os.path.isfile(path):
        raise SeesawEcmError(f"Weights file {path} does not exist.")
    verify_checkpoint(path, "the export's weights")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SeesawEcmError(
            f"{path} cannot be read as a PyTorch checkpoint with weights_only=True ({e}). Give a "
            "checkpoint written by train_net.py, or re-save the model state: "
            "torch.save({'model': model.state_dict()}, path)."
        ) from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        return ckpt["model"], ckpt.get("iteration")
    return ckpt, None


def _metrics(flat, cfg):
    """{task: {metric: value or None}} of the first test dataset from flat results
    ("bbox/AP" or, with several test datasets, "<dataset>/bbox/AP"); None for n/a (< 0)."""
    prefix = f"{cfg.DATASETS.TEST[0]}/" if len(cfg.DATASETS.TEST) > 1 else ""
    out = {}
    for task in ("bbox", "segm"):
        values = {m: flat.get(f"{prefix}{task}/{m}") for m in SUMMARY_METRICS}
        if values["AP"] is not None:
            out[task] = {m: (v if v is not None and v >= 0 else None) for m, v in values.items()}
    return out


def _metrics_from_run(metrics_file, iteration, cfg):
    """The evaluation of the checkpoint at `iteration` in a run's metrics.json: a row of that
    iteration (periodic evaluation), or of MAX_ITER for the final checkpoint (final evaluation).
    """
    if iteration is None:
        raise SeesawEcmError("The weights do not say at which iteration they were saved, so "
                             "the run's metrics.json cannot be matched: add --evaluate.")
    if not os.path.isfile(metrics_file):
        raise SeesawEcmError(f"No {metrics_file} to take the metrics from: add --evaluate.")
    wanted = {iteration} | ({iteration + 1} if iteration + 1 == cfg.SOLVER.MAX_ITER else set())
    found = None
    with open(metrics_file) as f:
        for line in f:
            row = json.loads(line)
            if row.get("iteration") in wanted and _metrics(row, cfg):
                found = row
    if found is None:
        raise SeesawEcmError(f"{metrics_file} has no evaluation of the checkpoint of iteration "
                             f"{iteration}: add --evaluate.")
    return _metrics(found, cfg)


def _evaluate(cfg, model):
    """Evaluate `model` on cfg.DATASETS.TEST (LVISEvaluator / COCOEvaluator as in training)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = cfg.clone()
        cfg.defrost()
        cfg.OUTPUT_DIR = tmp  # the evaluator's prediction files are not part of the export
        results = Trainer.test(cfg, model)
    return _metrics(flatten_results_dict(results), cfg)


def _sample_images(cfg, images, num_images):
    """(H, W, 3) BGR uint8 arrays: `images` (files), else the first of DATASETS.TEST."""
    if not images:
        if not cfg.DATASETS.TEST:
            raise SeesawEcmError("The parity check needs sample images: pass --images, or set "
                                 "DATASETS.TEST.")
        name = cfg.DATASETS.TEST[0]
        if name not in DatasetCatalog.list():
            raise SeesawEcmError(f"Test dataset {name!r} is not registered, so the parity check "
                                 "has no sample images: pass --images, or --dataset / "
                                 "DATASETS.LVIS_FORMAT to register it.")
        images = [d["file_name"] for d in DatasetCatalog.get(name)[:num_images]]
    for f in images:
        if not os.path.isfile(f):
            raise SeesawEcmError(f"Sample image {f} does not exist.")
    return [detection_utils.read_image(f, format="BGR") for f in images]


def _class_names(cfg):
    """Class names of the model: thing_classes of the first dataset of DATASETS.TEST, else of
    DATASETS.TRAIN, that has them (LVIS-format datasets set them when loaded, so they are
    loaded here if needed). SeesawEcmError when none has them (the export would say
    ``classes: null`` and a deployed model could not name its detections)."""
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    registered = DatasetCatalog.list()
    for name in [*cfg.DATASETS.TEST, *cfg.DATASETS.TRAIN]:
        meta = MetadataCatalog.get(name)
        if not meta.get("thing_classes") and name in registered:
            DatasetCatalog.get(name)
        classes = meta.get("thing_classes")
        if classes and len(classes) == num_classes:
            return list(classes)
    raise SeesawEcmError(
        "The export needs the class names, but no dataset of DATASETS.TEST / DATASETS.TRAIN "
        f"({[*cfg.DATASETS.TEST, *cfg.DATASETS.TRAIN]}) is registered with {num_classes} "
        "classes. Register the model's dataset (DATASETS.LVIS_FORMAT NAME=JSON:IMAGE_ROOT as a "
        "config override) so its class names go into the export.")


def _check_parity(reference, predictor, images, weights_files):
    """Predictions of the exported model == those of the training checkpoint, and the .pth and
    .safetensors files hold the same tensors; SeesawEcmError otherwise."""
    pth, st = (load_weights(weights_files[fmt]) for fmt in WEIGHT_FORMATS)
    if pth.keys() != st.keys() or any(not torch.equal(pth[k], st[k]) or pth[k].dtype != st[k].dtype
                                      for k in pth):
        raise SeesawEcmError("The exported .pth and .safetensors weights differ. Re-run the "
                             "export; if it persists, report a bug.")
    fields = _output_fields(reference.model)
    detections = 0
    for i, image in enumerate(images):
        expected, actual = (
            [getattr(v, "tensor", v) for v in (p(image)["instances"].get(f) for f in fields)]
            for p in (reference, predictor))
        detections += len(expected[0])
        bad = _differences(expected, actual, fields)
        if bad:
            raise SeesawEcmError(
                f"Parity check failed: on sample image {i}, {bad} of the exported model differ "
                "from those of the training checkpoint. The export was not written. Check "
                "that the weights are those of the config (and the config overrides given)."
            )
    if not detections:
        logger.warning("The model detects nothing on the sample images, so the parity check "
                       "compared empty predictions; pass --images with objects in them.")


def _table_row(info):
    def ap(task, metric):
        value = info["metrics"].get(task, {}).get(metric)
        return "n/a" if value is None else f"{value:.2f}"

    s = info["schedule"]
    files = ", ".join(f"`{f['name']}`" for f in info["files"].values())
    return (f"| {info['name']} | `{info['config']}` | {s['iterations']} x {s['batch_size']} "
            f"({s['images_seen']} images) | {ap('bbox', 'AP')} | {ap('bbox', 'APr')} | "
            f"{ap('segm', 'AP')} | {ap('segm', 'APr')} | {files} |")


def update_table(table, info):
    """Add the row of a model (a metrics-json dict) to the Markdown table file `table`, or
    replace the row of the same name; creates the file from a template when absent."""
    text = _read_text(table) if os.path.isfile(table) else TABLE_TEMPLATE
    lines = text.splitlines()
    header = TABLE_HEADER.splitlines()[0]
    if header not in lines:
        raise SeesawEcmError(f"{table} has no model table (the header line {header!r}). Restore "
                             "it, or give another file with --table.")
    start = lines.index(header) + 2
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    row = _table_row(info)
    rows = lines[start:end]
    names = [r.split("|")[1].strip() for r in rows]
    if info["name"] in names:
        rows[names.index(info["name"])] = row
    else:
        rows.append(row)
    os.makedirs(os.path.dirname(os.path.abspath(table)), exist_ok=True)
    write_atomic(table, "\n".join(lines[:start] + rows + lines[end:]) + "\n")


def _remove_stale(zoo_dir, name, keep):
    """Delete NAME_<sha8>.<ext> files of earlier exports of `name` that are not in `keep`."""
    for f in os.listdir(zoo_dir):
        m = HASHED_FILE_RE.match(f)
        if m and m["name"] == name and f not in keep:
            logger.info(f"Removing {f} of an earlier export of {name}")
            os.unlink(os.path.join(zoo_dir, f))


def export_model(name, zoo_dir, *, output_dir=None, config_file=None, weights=None, opts=(),
                 table=DEFAULT_TABLE, evaluate=False, images=None, num_images=3,
                 torchscript=False, device="cpu"):
    """Export a trained model into a model-zoo folder (see the module docstring), verified.

    Steps: read the checkpoint (weights_only), load it strictly into the config's model, write
    the weights (.pth, .safetensors) and the resolved config into a staging folder, check that
    the exported model predicts exactly what the training checkpoint predicts on sample images
    (and trace + check TorchScript), then move the files into `zoo_dir`, write
    ``NAME_metrics.json`` and the table row. A failed check leaves `zoo_dir` and `table` as
    they were. Re-running with the same inputs gives the same files and the same table row.

    Args:
        name: model name (letters, digits, '.', '-', '_').
        zoo_dir: the model-zoo folder.
        output_dir: a train_net.py OUTPUT_DIR: its config.yaml, the checkpoint named by its
            last_checkpoint and the evaluation of that checkpoint in its metrics.json.
        config_file, weights: instead of (or to override parts of) `output_dir`.
        opts: config overrides ["KEY", "VALUE", ...].
        table: the Markdown table to update (docs/MODEL_ZOO.md by default).
        evaluate: evaluate the exported model on DATASETS.TEST instead of reading metrics.json.
        images: image files for the parity check (default: the first `num_images` of
            DATASETS.TEST).
        torchscript: also write ``NAME_<sha8>.ts`` (:func:`trace_model`).
        device: where to run the checks (and to trace for).
    Returns:
        the metrics-json dict.
    """
    _check_name(name)
    if output_dir:
        config_file = config_file or os.path.join(output_dir, "config.yaml")
        if not weights:
            last = os.path.join(output_dir, "last_checkpoint")
            if not os.path.isfile(last):
                raise SeesawEcmError(f"{output_dir} has no last_checkpoint: is it a train_net.py "
                                     "OUTPUT_DIR? Or give --weights.")
            weights = os.path.join(output_dir, _read_text(last).strip())
    if not (config_file and weights):
        raise SeesawEcmError("Give the training OUTPUT_DIR (--output-dir), or a config file and "
                             "a weights file (--config-file, --weights).")
    cfg = load_config(config_file, opts)
    state, iteration = _read_checkpoint(weights)
    run_cfg = cfg.clone()
    run_cfg.merge_from_list(["MODEL.DEVICE", device, "MODEL.WEIGHTS", weights])
    # the training checkpoint in its config; strict: it must hold every parameter and buffer
    reference = ZooPredictor(run_cfg, state, source=weights)

    os.makedirs(zoo_dir, exist_ok=True)
    staging = tempfile.mkdtemp(dir=zoo_dir, prefix=".export-")
    try:
        files = save_weights(state, staging, name)
        cfg.MODEL.WEIGHTS = os.path.basename(files["pth"])
        cfg.OUTPUT_DIR = os.path.join("output", name)
        config_path = os.path.join(staging, f"{name}.yaml")
        write_atomic(config_path, cfg.dump())
        predictor = get_predictor(files["pth"], device=device)
        samples = _sample_images(cfg, images, num_images)
        _check_parity(reference, predictor, samples, files)
        logger.info(f"Parity check passed on {len(samples)} images")
        if evaluate:
            metrics, source = _evaluate(predictor.cfg, predictor.model), "evaluation"
        else:
            source = os.path.join(output_dir or os.path.dirname(weights), "metrics.json")
            metrics = _metrics_from_run(source, iteration, cfg)
        test_name = cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None
        classes = _class_names(cfg)
        predictor.metadata.set(thing_classes=classes)
        if torchscript:
            data = trace_model(predictor, [predictor.preprocess(im) for im in samples])
            files["ts"] = os.path.join(staging, f"{name}_{_sha256(data)[:8]}.ts")
            write_atomic(files["ts"], data)
            logger.info(f"TorchScript export matches eager inference on {len(samples)} images")
        hashes = {fmt: _sha256_file(path) for fmt, path in files.items()}
        for path in [*files.values(), config_path]:
            os.replace(path, os.path.join(zoo_dir, os.path.basename(path)))
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    info = {
        "name": name,
        "config": f"{name}.yaml",
        "files": {fmt: {"name": os.path.basename(path), "sha256": hashes[fmt]}
                  for fmt, path in files.items()},
        "metrics": metrics,
        "metrics_source": "evaluation" if evaluate else "metrics.json",
        "dataset": {"train": list(cfg.DATASETS.TRAIN), "test": test_name},
        "schedule": {
            "iterations": iteration + 1 if iteration is not None else cfg.SOLVER.MAX_ITER,
            "batch_size": cfg.SOLVER.IMS_PER_BATCH,
        },
        # the day the weights were written (not of the export, so that re-exports are identical)
        "date": datetime.datetime.fromtimestamp(os.path.getmtime(weights),
                                                datetime.timezone.utc).date().isoformat(),
        "classes": classes,
    }
    info["schedule"]["images_seen"] = info["schedule"]["iterations"] * cfg.SOLVER.IMS_PER_BATCH
    write_atomic(os.path.join(zoo_dir, f"{name}_metrics.json"), json.dumps(info, indent=1) + "\n")
    update_table(table, info)
    _remove_stale(zoo_dir, name, {f["name"] for f in info["files"].values()})
    logger.info(f"Exported {name} to {zoo_dir} (metrics from {source})")
    return info
