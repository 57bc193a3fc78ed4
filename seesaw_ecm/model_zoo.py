"""Model zoo: the files of an exported model, loaded back verified, and a predictor from them.

A model-zoo folder holds, for each model NAME (written by :func:`seesaw_ecm.export.export_model`,
usually through ``tools/export_model.py``):

- ``NAME_<h>.pth`` and ``NAME_<h>.safetensors``: the model's state_dict alone (no optimizer or
  scheduler state; the loss buffers such as Seesaw's ``cum_samples`` and ECM's margins included),
  a flat {name: tensor} that loads with ``torch.load(..., weights_only=True)``. ``<h>`` is the
  first 8 hex digits of the file's own sha256, which :func:`load_weights` checks;
- ``NAME.yaml``: the fully resolved config (``MODEL.LONG_TAIL.STATISTICS_FROM: checkpoint``,
  ``MODEL.WEIGHTS``: the .pth file name), for ``train_net.py --eval-only`` and
  :func:`get_predictor`;
- ``NAME_<h>.ts`` (optional): a TorchScript module for deployment
  (:func:`seesaw_ecm.export.trace_model`);
- ``NAME_metrics.json``: box / mask AP, AP50, APr, APc, APf, dataset, schedule, date, class
  names and the files with their full sha256. It is written last: a model is listed by
  :func:`list_models` only once its export is complete;

and the Markdown table (docs/MODEL_ZOO.md by default) gets one row per model. Loading lives here,
exporting in :mod:`seesaw_ecm.export` (as detectron2 keeps ``model_zoo/`` apart from ``export/``).
"""
import hashlib
import io
import json
import os
import re

import detectron2.data.transforms as T
import torch
from detectron2.config import get_cfg
from detectron2.data.catalog import Metadata
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from safetensors.torch import load as deserialize_safetensors
from safetensors.torch import save as serialize_safetensors

from .config import add_seesaw_ecm_config, merge_config
from .data.datasets import register_from_cfg
from .errors import SeesawEcmError
from .fileio import write_atomic

__all__ = ["ZooPredictor", "get_predictor", "list_models", "load_config", "load_weights",
           "save_weights", "verify_file"]

WEIGHT_FORMATS = ("pth", "safetensors")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]*(?:_[A-Za-z0-9.-]+)*$")
# NAME_<first 8 hex digits of the file's sha256>.<ext>
HASHED_FILE_RE = re.compile(r"^(?P<name>.+)_(?P<sha>[0-9a-f]{8})\.(?P<ext>pth|safetensors|ts)$")


# --- files -------------------------------------------------------------------------------------

def _read_text(path):
    with open(path) as f:
        return f.read()


def _read_json(path):
    return json.loads(_read_text(path))


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_name(name):
    if not NAME_RE.match(name or ""):
        raise SeesawEcmError(
            f"Model name {name!r} is not valid: use letters, digits, '.', '-' and single '_' "
            "between them (e.g. mask_rcnn_R18_FPN_seesaw_synthetic)."
        )


def _serialize(state_dict, fmt):
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if fmt == "safetensors":
        return serialize_safetensors(tensors)
    buf = io.BytesIO()  # in memory: torch.save names the archive after the file (not reproducible)
    torch.save(tensors, buf)
    return buf.getvalue()


def save_weights(state_dict, folder, name):
    """Write a state_dict as ``NAME_<sha8>.pth`` and ``NAME_<sha8>.safetensors`` in `folder`
    (atomically; the same tensors always give the same bytes, hence the same names).

    Args:
        state_dict: {name: tensor}, e.g. ``model.state_dict()``.
    Returns:
        {"pth": path, "safetensors": path}
    """
    _check_name(name)
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise SeesawEcmError(f"Weights of {name!r} hold non-tensor values ({bad[:3]}): give a "
                             "model state_dict.")
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for fmt in WEIGHT_FORMATS:
        data = _serialize(state_dict, fmt)
        paths[fmt] = os.path.join(folder, f"{name}_{_sha256(data)[:8]}.{fmt}")
        write_atomic(paths[fmt], data)
    return paths


def _parse_name(path):
    m = HASHED_FILE_RE.match(os.path.basename(path))
    if not m:
        raise SeesawEcmError(
            f"{path}: not a model-zoo file name. Expected NAME_<first 8 hex digits of its "
            "sha256>.pth / .safetensors / .ts, as written by tools/export_model.py."
        )
    if not os.path.isfile(path):
        raise SeesawEcmError(f"{path} does not exist. Check the path, or re-export the model "
                             "with tools/export_model.py.")
    return m


def check_sha256(path, expected, actual, recorded_in, fix):
    """Raise SeesawEcmError naming both hashes unless `actual` (the file's full sha256) starts
    with `expected` (8 hex digits or the full 64) that `recorded_in` holds; `fix`: the sentence
    saying what to do."""
    if not actual.startswith(expected):
        what = "sha256" if len(expected) == 64 else "a sha256 starting with"
        raise SeesawEcmError(
            f"{path} is corrupted: {recorded_in} expects {what} {expected}, but the file's "
            f"sha256 is {actual} ({os.path.getsize(path)} bytes). The file was truncated or "
            f"modified; {fix}"
        )


def _check_hash(path, m, actual):
    check_sha256(path, m["sha"], actual, "its name", "download / copy it again, or re-export "
                 "it with tools/export_model.py.")


def verify_file(path):
    """Check that the sha256 of a model-zoo file starts with the 8 hex digits in its name.

    Returns:
        (name, ext, full sha256). Raises SeesawEcmError for a file that is missing, badly named,
        truncated, corrupted or modified.
    """
    m = _parse_name(path)
    actual = _sha256_file(path)
    _check_hash(path, m, actual)
    return m["name"], m["ext"], actual


def load_weights(path):
    """Load model-zoo weights (.pth or .safetensors) after checking the sha256 in the file name.

    The file is read once: its bytes are hashed, then deserialized. No pickled code is
    executed: .pth files are read with ``torch.load(weights_only=True)``.

    Returns:
        dict {parameter / buffer name: tensor} on the CPU.
    """
    m = _parse_name(path)
    if m["ext"] == "ts":
        raise SeesawEcmError(f"{path}: a TorchScript file holds a whole program, not weights; "
                             "load it with torch.jit.load, or give the .pth / .safetensors file.")
    with open(path, "rb") as f:
        data = f.read()
    _check_hash(path, m, _sha256(data))
    if m["ext"] == "safetensors":
        return deserialize_safetensors(data)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def list_models(zoo_dir):
    """The completely exported models of a model-zoo folder, sorted by name.

    Returns:
        list of dicts, each the content of a ``NAME_metrics.json`` (keys: name, config, files,
        metrics, dataset, schedule, date, classes).
    """
    if not os.path.isdir(zoo_dir):
        return []
    return [_read_json(os.path.join(zoo_dir, f)) for f in sorted(os.listdir(zoo_dir))
            if f.endswith("_metrics.json")]


# --- loading a model ---------------------------------------------------------------------------

def load_config(config_file, opts=()):
    """detectron2 config with seesaw_ecm's keys from `config_file` + `opts`, class statistics
    taken from the weights (``STATISTICS_FROM: checkpoint``), LVIS-format datasets registered."""
    if not os.path.isfile(config_file):
        raise SeesawEcmError(f"Config file {config_file} does not exist.")
    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    merge_config(cfg, config_file, opts)
    cfg.MODEL.LONG_TAIL.STATISTICS_FROM = "checkpoint"
    register_from_cfg(cfg)
    return cfg


def _load_state(model, state_dict, source):
    """load_state_dict, strict, with a clear error when the weights do not fit the model."""
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise SeesawEcmError(f"Weights {source} do not fit the model of the config: {e}. Use "
                             "the config the weights were trained / exported with.") from None
    if result.missing_keys or result.unexpected_keys:
        raise SeesawEcmError(
            f"Weights {source} do not fit the model of the config: missing "
            f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}. Use the config "
            "the weights were trained / exported with."
        )


class ZooPredictor(DefaultPredictor):
    """detectron2's DefaultPredictor for a model-zoo model: the same ``__call__`` (an (H, W, 3)
    BGR uint8 image -> {"instances": Instances in the image's coordinates}) and attributes
    (cfg, model, metadata, aug, input_format), but the weights come from a hash-verified
    state_dict instead of ``DetectionCheckpointer(cfg.MODEL.WEIGHTS)``.
    """

    def __init__(self, cfg, state_dict, source="weights", classes=None):
        """
        Args:
            cfg: config of the model (STATISTICS_FROM "checkpoint" for ECM).
            state_dict: {name: tensor}, e.g. from :func:`load_weights`; loaded strictly.
            source: how to name the weights in errors.
            classes: class names, set as ``metadata.thing_classes``.
        """
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg)
        self.model.eval()
        _load_state(self.model, state_dict, source)
        self.metadata = Metadata(name=os.path.basename(source))
        if classes:
            self.metadata.set(thing_classes=list(classes))
        self.aug = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
        )
        self.input_format = cfg.INPUT.FORMAT

    def preprocess(self, original_image):
        """(H, W, 3) BGR uint8 image -> (3, h, w) float32 tensor in cfg.INPUT.FORMAT, resized
        as ``__call__`` does: the input of the model and of its TorchScript export."""
        if self.input_format == "RGB":
            original_image = original_image[:, :, ::-1]
        image = self.aug.get_transform(original_image).apply_image(original_image)
        return torch.as_tensor(image.astype("float32").transpose(2, 0, 1))


def _find_weights(name_or_path, zoo_dir):
    """(weights path, its folder, its metrics-json dict) of a model name or weights file; the
    dict is {"name": NAME} for a file without a NAME_metrics.json beside it."""
    if os.path.isfile(name_or_path) or os.sep in name_or_path:
        name, _, _ = verify_file(name_or_path)
        folder = os.path.dirname(name_or_path)
        info_path = os.path.join(folder, f"{name}_metrics.json")
        info = _read_json(info_path) if os.path.isfile(info_path) else {"name": name}
        return name_or_path, folder, info
    if zoo_dir is None:
        raise SeesawEcmError(f"{name_or_path!r} is not a file: give the weights file, or the "
                             "model name and zoo_dir.")
    info_path = os.path.join(zoo_dir, f"{name_or_path}_metrics.json")
    if not os.path.isfile(info_path):
        names = [m["name"] for m in list_models(zoo_dir)]
        raise SeesawEcmError(f"No model {name_or_path!r} in {zoo_dir} (models: {names}). Export "
                             "it with tools/export_model.py, or check the name.")
    info = _read_json(info_path)
    return os.path.join(zoo_dir, info["files"]["pth"]["name"]), zoo_dir, info


def get_predictor(name_or_path, zoo_dir=None, device="cpu", opts=()):
    """A :class:`ZooPredictor` for a model-zoo model.

    Args:
        name_or_path: a model name in `zoo_dir`, or a ``NAME_<sha8>.pth`` / ``.safetensors``
            file with ``NAME.yaml`` beside it.
        zoo_dir: the model-zoo folder (for a name).
        device: "cpu", "cuda", ...
        opts: extra config overrides, e.g. ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.5"].
    """
    weights, folder, info = _find_weights(name_or_path, zoo_dir)
    cfg = load_config(os.path.join(folder, f"{info['name']}.yaml"),
                      ["MODEL.DEVICE", device, "MODEL.WEIGHTS", weights, *opts])
    cfg.freeze()
    return ZooPredictor(cfg, load_weights(weights), source=weights, classes=info.get("classes"))
