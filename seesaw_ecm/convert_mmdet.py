"""Official mmdetection Seesaw / ECM checkpoints -> this project's model-zoo folders.

:func:`convert_state_dict` maps an mmdetection state dict (2.x and 3.x name these the same)
onto the state dict of the Detectron2 model that a project config builds; every source key is
used or deliberately dropped, and a key without a place, or a model key without a source, is
one :class:`SeesawEcmError` naming it. :func:`convert_checkpoint` reads the file (its sha256
checked against the ``-<first 8 hex digits>`` in an official file name), converts, checks that
the model loads the result strictly, and writes the model-zoo files of
:mod:`seesaw_ecm.model_zoo` (weights named by their hash, the resolved config, a metrics JSON
naming the source file, its sha256 and the published AP). What a converted model must reproduce
and how that is checked: docs/MODEL_ZOO.md, tests/test_convert_mmdet.py.
"""
import json
import os
import re
from typing import NamedTuple, Optional

import torch
from detectron2.data.datasets.lvis import get_lvis_instances_meta
from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES
from detectron2.modeling import build_model

from .errors import SeesawEcmError
from .fileio import write_atomic
from .losses.ecm import effective_class_margins
from .model_zoo import (_check_name, _load_state, _sha256_file, check_sha256, load_config,
                        save_weights)

__all__ = ["OFFICIAL_MODELS", "convert_checkpoint", "convert_state_dict", "model_kind"]

SEESAW_URL = "https://download.openmmlab.com/mmdetection/v2.0/seesaw_loss/{name}-{sha}.pth"
ECM_URL = "https://github.com/janghyuncho/ECM-Loss (README: Google Drive link of {config})"
# official file names end in -<first 8 hex digits of the file's sha256>.pth
HASH_IN_NAME_RE = re.compile(r"^(?P<name>.+)-(?P<sha>[0-9a-f]{8})\.pth$")
# mmdetection's LVIS v1 class names that differ from the annotation file's (a spelling fix)
LVIS_V1_RENAMED = {"speaker_(stereo_equipment)": "speaker_(stero_equipment)"}
# top-level entries of an mmdetection checkpoint that hold no model tensor
DROPPED_TOP_LEVEL = ("meta", "optimizer", "message_hub", "param_schedulers")


class OfficialModel(NamedTuple):
    config: str  # this project's config, relative to the repository root
    depth: int  # ResNet depth
    loss: str  # MODEL.LONG_TAIL.LOSS
    cascade: bool  # Cascade Mask R-CNN (else Mask R-CNN)
    normed_mask: bool  # NormedConv2d mask predictor
    box_ap: Optional[float]  # published LVIS v1 val AP, percent
    mask_ap: Optional[float]
    sha: Optional[str]  # first 8 hex digits of the file's sha256 (in its official name)
    source: str  # where the file is published


def _seesaw(name, sha, box_ap, mask_ap):
    depth = 101 if "r101" in name else 50
    return name, OfficialModel(f"configs/LVISv1/mmdet/{name}.yaml", depth, "seesaw",
                               name.startswith("cascade"), "normed_mask" in name, box_ap,
                               mask_ap, sha, SEESAW_URL.format(name=name, sha=sha))


def _ecm(name, depth, cascade, box_ap, mask_ap):
    config = name.replace("_lvis_v1", "") + ".py"
    return name, OfficialModel(f"configs/LVISv1/mmdet/{name}.yaml", depth, "ecm", cascade, True,
                               box_ap, mask_ap, None, ECM_URL.format(config=config))


# The sixteen published models (mmdetection configs/seesaw_loss/README.md; ECM-Loss README and
# config headers), LVIS v1 val box / mask AP.
OFFICIAL_MODELS = dict([
    _seesaw("mask_rcnn_r50_fpn_random_seesaw_loss_mstrain_2x_lvis_v1", "a698dd3d", 25.6, 25.0),
    _seesaw("mask_rcnn_r50_fpn_random_seesaw_loss_normed_mask_mstrain_2x_lvis_v1", "a1c11314",
            25.6, 25.4),
    _seesaw("mask_rcnn_r101_fpn_random_seesaw_loss_mstrain_2x_lvis_v1", "8e6e6dd5", 27.4, 26.7),
    _seesaw("mask_rcnn_r101_fpn_random_seesaw_loss_normed_mask_mstrain_2x_lvis_v1", "a0b59c42",
            27.2, 27.3),
    _seesaw("mask_rcnn_r50_fpn_sample1e-3_seesaw_loss_mstrain_2x_lvis_v1", "392a804b", 27.6,
            26.4),
    _seesaw("mask_rcnn_r50_fpn_sample1e-3_seesaw_loss_normed_mask_mstrain_2x_lvis_v1",
            "cd0f6a12", 27.6, 26.8),
    _seesaw("mask_rcnn_r101_fpn_sample1e-3_seesaw_loss_mstrain_2x_lvis_v1", "e68eb464", 28.9,
            27.6),
    _seesaw("mask_rcnn_r101_fpn_sample1e-3_seesaw_loss_normed_mask_mstrain_2x_lvis_v1",
            "1d817139", 28.9, 28.2),
    _seesaw("cascade_mask_rcnn_r101_fpn_random_seesaw_loss_mstrain_2x_lvis_v1", "71e2215e", 33.1,
            29.2),
    _seesaw("cascade_mask_rcnn_r101_fpn_random_seesaw_loss_normed_mask_mstrain_2x_lvis_v1",
            "8b5a6745", 33.0, 30.0),
    _seesaw("cascade_mask_rcnn_r101_fpn_sample1e-3_seesaw_loss_mstrain_2x_lvis_v1", "5d8ca2a4",
            30.0, 29.3),
    _seesaw("cascade_mask_rcnn_r101_fpn_sample1e-3_seesaw_loss_normed_mask_mstrain_2x_lvis_v1",
            "c8551505", 32.8, 30.1),
    _ecm("r50_ecm_1x_lvis_v1", 50, False, 26.9, 26.4),
    _ecm("r50_ecm_2x_lvis_v1", 50, False, 27.9, 27.5),
    _ecm("r101_ecm_2x_lvis_v1", 101, False, 29.4, 28.7),
    _ecm("c101_ecm_2x_lvis_v1", 101, True, 33.4, 30.6),
])


def model_kind(cfg):
    """(depth, loss, cascade, normed mask) of a config: what must agree with an official
    checkpoint beyond tensor shapes (a NormedConv2d has the shapes of a Conv2d)."""
    return (cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.LONG_TAIL.LOSS,
            cfg.MODEL.ROI_HEADS.NAME == "LongTailCascadeROIHeads",
            cfg.MODEL.ROI_MASK_HEAD.NAME == "NormedMaskRCNNConvUpsampleHead")


# --- the key map -------------------------------------------------------------------------------

def _res(m, part):
    return f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.{part}"


def _stage(m):
    """'' (Mask R-CNN) or '.k' (cascade stage k) of a head key."""
    return m["stage"] or ""


_STAGE = r"(?P<stage>\.\d)?"
# (source-key regular expression, target key from the match); None drops the key
_RULES = [
    (r".*\.num_batches_tracked", None),  # BatchNorm's counter: FrozenBN has none
    (r"backbone\.conv1\.weight", lambda m: "backbone.bottom_up.stem.conv1.weight"),
    (r"backbone\.bn1\.(\w+)", lambda m: f"backbone.bottom_up.stem.conv1.norm.{m[1]}"),
    (r"backbone\.layer(\d)\.(\d+)\.conv(\d)\.weight", lambda m: _res(m, f"conv{m[3]}.weight")),
    (r"backbone\.layer(\d)\.(\d+)\.bn(\d)\.(\w+)", lambda m: _res(m, f"conv{m[3]}.norm.{m[4]}")),
    (r"backbone\.layer(\d)\.(\d+)\.downsample\.0\.weight", lambda m: _res(m, "shortcut.weight")),
    (r"backbone\.layer(\d)\.(\d+)\.downsample\.1\.(\w+)",
     lambda m: _res(m, f"shortcut.norm.{m[3]}")),
    # FPN: mmdetection's level i reads ResNet stage i + 2 (C2..C5)
    (r"neck\.lateral_convs\.(\d)\.conv\.(\w+)",
     lambda m: f"backbone.fpn_lateral{int(m[1]) + 2}.{m[2]}"),
    (r"neck\.fpn_convs\.(\d)\.conv\.(\w+)", lambda m: f"backbone.fpn_output{int(m[1]) + 2}.{m[2]}"),
    (r"rpn_head\.rpn_conv\.(\w+)", lambda m: f"proposal_generator.rpn_head.conv.{m[1]}"),
    (r"rpn_head\.rpn_cls\.(\w+)",
     lambda m: f"proposal_generator.rpn_head.objectness_logits.{m[1]}"),
    (r"rpn_head\.rpn_reg\.(\w+)", lambda m: f"proposal_generator.rpn_head.anchor_deltas.{m[1]}"),
    (rf"roi_head\.bbox_head{_STAGE}\.shared_fcs\.(?P<i>\d)\.(?P<p>\w+)",
     lambda m: f"roi_heads.box_head{_stage(m)}.fc{int(m['i']) + 1}.{m['p']}"),
    (rf"roi_head\.bbox_head{_STAGE}\.fc_reg\.(?P<p>\w+)",
     lambda m: f"roi_heads.box_predictor{_stage(m)}.bbox_pred.{m['p']}"),
    # C class rows, then (Seesaw) the 2 objectness rows: split in _split_classifier
    (rf"roi_head\.bbox_head{_STAGE}\.fc_cls\.(?P<p>\w+)",
     lambda m: f"roi_heads.box_predictor{_stage(m)}.cls_score.{m['p']}"),
    (rf"roi_head\.bbox_head{_STAGE}\.loss_cls\.cum_samples",
     lambda m: f"roi_heads.box_predictor{_stage(m)}.cls_loss.cum_samples"),
    (rf"roi_head\.bbox_head{_STAGE}\.loss_cls\.sample_n",
     lambda m: f"roi_heads.box_predictor{_stage(m)}.cls_loss.sample_counts"),
    (rf"roi_head\.bbox_head{_STAGE}\.loss_cls\.detection_cls_weight",
     lambda m: f"roi_heads.box_predictor{_stage(m)}.cls_loss.weight"),
    (rf"roi_head\.mask_head{_STAGE}\.convs\.(?P<i>\d)\.conv\.(?P<p>\w+)",
     lambda m: f"roi_heads.mask_head{_stage(m)}.mask_fcn{int(m['i']) + 1}.{m['p']}"),
    (rf"roi_head\.mask_head{_STAGE}\.upsample\.(?P<p>\w+)",
     lambda m: f"roi_heads.mask_head{_stage(m)}.deconv.{m['p']}"),
    (rf"roi_head\.mask_head{_STAGE}\.conv_logits\.(?P<p>\w+)",
     lambda m: f"roi_heads.mask_head{_stage(m)}.predictor.{m['p']}"),
]
_RULES = [(re.compile(pattern), target) for pattern, target in _RULES]


def target_key(source_key):
    """The model key of an mmdetection key: (matched, target or None when dropped)."""
    for pattern, target in _RULES:
        m = pattern.fullmatch(source_key)
        if m:
            return True, (target(m) if target else None)
    return False, None


def _split_classifier(key, value, model_state, num_classes):
    """fc_cls rows -> {cls_score: C (+1 background) rows, objectness: the last 2 (Seesaw)}."""
    objectness = key.replace(".cls_score.", ".objectness.")
    if objectness not in model_state:
        return {key: value}
    return {key: value[:num_classes], objectness: value[num_classes:]}


def _loss_statistics(source_key, key, value, num_classes, dropped):
    """Loss buffers in the project's layout: Seesaw counts of the C classes (mmdetection also
    counts the background, which its loss never reads), ECM statistics in float64."""
    if key.endswith(".cum_samples"):
        if value.numel() == num_classes + 1:
            dropped.append(f"{source_key}[{num_classes}] (background count, unused by Seesaw)")
            value = value[:num_classes]
        return {key: value.float()}
    if key.endswith(".sample_counts"):  # ECM: n_c of C classes + the background count
        counts = value.double().flatten()
        ratio = (counts[-1] / counts[:-1].sum()).item()
        prefix = key[: -len("sample_counts")]
        return {key: counts, prefix + "margin":
                effective_class_margins(counts[:-1], ratio)["margin"]}
    if key.endswith(".cls_loss.weight"):  # ECM: the float32 weights the official loss used
        return {key: value.double().flatten()}
    return {key: value}


def _place(source_key, value, model_state, num_classes, dropped):
    """{target key: tensor} of one source tensor ({} when dropped), or None (no rule)."""
    matched, key = target_key(source_key)
    if not matched:
        return None
    if key is None:
        dropped.append(source_key)
        return {}
    if ".cls_score." in key:
        return _split_classifier(key, value, model_state, num_classes)
    if ".cls_loss." in key:
        return _loss_statistics(source_key, key, value, num_classes, dropped)
    return {key: value}


def _listing(keys, n=8):
    keys = sorted(keys)
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return f"{keys[:n]}{more}"


def convert_state_dict(source, model_state, cfg):
    """Map an mmdetection state dict onto a Detectron2 model's.

    Args:
        source: {mmdetection key: tensor} (``checkpoint["state_dict"]``).
        model_state: the target model's ``state_dict()`` (keys, shapes, dtypes).
        cfg: the project config of that model (its class count).
    Returns:
        (state dict with exactly the keys of `model_state`, in their dtypes; the list of
        deliberately dropped source keys).
    Raises:
        SeesawEcmError naming the source keys without a place in the model, the model keys
        without a source, or a shape that differs.
    """
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    out, dropped, unused, bad_shapes = {}, [], [], []
    for src_key, value in source.items():
        placed = _place(src_key, value, model_state, num_classes, dropped)
        if placed is None or any(k not in model_state for k in placed):
            unused.append(src_key)
            continue
        for key, tensor in placed.items():
            if tuple(tensor.shape) != tuple(model_state[key].shape):
                bad_shapes.append(f"{src_key} -> {key}: {tuple(tensor.shape)} in the "
                                  f"checkpoint, {tuple(model_state[key].shape)} in the model")
            out[key] = tensor.to(model_state[key].dtype)
    missing = [k for k in model_state if k not in out]
    fix = "Convert with the project config of this checkpoint (configs/LVISv1/mmdet/)."
    if unused:
        raise SeesawEcmError(f"{len(unused)} checkpoint keys have no place in the model of the "
                             f"config and no rule that drops them: {_listing(unused)}. {fix}")
    if missing:
        raise SeesawEcmError(f"The model of the config needs {len(missing)} keys that the "
                             f"checkpoint does not provide: {_listing(missing)}. {fix}")
    if bad_shapes:
        raise SeesawEcmError(f"Shapes differ: {bad_shapes[:4]}. {fix}")
    return out, dropped


# --- files -------------------------------------------------------------------------------------

def _check_file(path):
    """(full sha256, the official name or None) of a checkpoint file; SeesawEcmError when the
    file is missing or its sha256 does not start with the 8 hex digits of its name."""
    if not os.path.isfile(path):
        raise SeesawEcmError(f"Checkpoint {path} does not exist.")
    sha = _sha256_file(path)
    m = HASH_IN_NAME_RE.match(os.path.basename(path))
    if m:
        check_sha256(path, m["sha"], sha, "its name", "download it again.")
    return sha, (m["name"] if m else None)


def read_mmdet_checkpoint(path, trust_pickle=False):
    """(state dict, meta dict, the other top-level entries dropped) of an mmdetection checkpoint
    (``state_dict`` inside, or bare).

    Read with ``torch.load(weights_only=True)`` unless `trust_pickle` (needed for mmdetection
    3.x training checkpoints, whose ``message_hub`` pickles mmengine objects)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:
        raise SeesawEcmError(
            f"{path} cannot be read with torch.load(weights_only=True) ({str(e)[:200]}). If "
            "you trust the file, pass --trust-pickle (it runs the pickled code).") from None
    if not isinstance(ckpt, dict):
        raise SeesawEcmError(f"{path} holds a {type(ckpt).__name__}, not a state dict.")
    if "state_dict" not in ckpt:
        return ckpt, {}, []
    unknown = [k for k in ckpt if k != "state_dict" and k not in DROPPED_TOP_LEVEL]
    if unknown:
        raise SeesawEcmError(f"{path} has top-level entries {unknown} beside state_dict that "
                             f"the converter does not know (it drops {DROPPED_TOP_LEVEL}).")
    return ckpt["state_dict"], ckpt.get("meta") or {}, [k for k in ckpt if k != "state_dict"]


def check_classes(meta, num_classes):
    """The class names a checkpoint's meta records (2.x ``CLASSES``, 3.x
    ``dataset_meta["classes"]``), if any, must be LVIS v1's categories sorted by id (the
    order of this project's models); SeesawEcmError naming the first that is not."""
    names = meta.get("CLASSES") or (meta.get("dataset_meta") or {}).get("classes")
    if not names:
        return
    expected = [c["name"] for c in sorted(LVIS_CATEGORIES, key=lambda c: c["id"])]
    names = [LVIS_V1_RENAMED.get(n, n) for n in names]
    if len(names) != num_classes or num_classes != len(expected):
        raise SeesawEcmError(f"The checkpoint was trained on {len(names)} classes, the config "
                             f"has {num_classes}: the converter maps LVIS v1 models (1203).")
    bad = next((i for i, (a, b) in enumerate(zip(names, expected)) if a != b), None)
    if bad is not None:
        raise SeesawEcmError(
            f"The checkpoint's class {bad} is {names[bad]!r}, LVIS v1's (categories sorted by "
            f"id) is {expected[bad]!r}: its class order is not LVIS v1's, so its classifier "
            "rows would name the wrong classes.")


def _official(name, cfg):
    """The OFFICIAL_MODELS row of `name` (None if not official), checked against the config."""
    row = OFFICIAL_MODELS.get(name)
    if row is None:
        return None
    expected = (row.depth, row.loss, row.cascade, row.normed_mask)
    if model_kind(cfg) != expected:
        raise SeesawEcmError(
            f"{name} is (depth, loss, cascade, normed mask) = {expected}, but the config builds "
            f"{model_kind(cfg)}: use {row.config}.")
    return row


def convert_checkpoint(checkpoint, config_file, output_dir, name=None, opts=(),
                       trust_pickle=False):
    """Convert an official mmdetection checkpoint into a model-zoo folder.

    Args:
        checkpoint: the .pth file (official name ``<name>-<sha8>.pth`` is hash-checked).
        config_file: the project config of the model (configs/LVISv1/mmdet/).
        output_dir: the model-zoo folder to write into.
        name: model name (default: the official name, else the file's stem); a name of
            :data:`OFFICIAL_MODELS` also gives the published AP.
        opts: config overrides.
        trust_pickle: read the file with ``weights_only=False``.
    Returns:
        the metrics-json dict written as ``NAME_metrics.json``.
    """
    sha, official_name = _check_file(checkpoint)
    name = name or official_name or os.path.splitext(os.path.basename(checkpoint))[0]
    _check_name(name)
    cfg = load_config(config_file, ["MODEL.DEVICE", "cpu", *opts])
    row = _official(name, cfg)
    source, meta, dropped_entries = read_mmdet_checkpoint(checkpoint, trust_pickle)
    check_classes(meta, cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    model = build_model(cfg)
    state, dropped = convert_state_dict(source, model.state_dict(), cfg)
    _load_state(model, state, checkpoint)  # strict: the converted file fits the model
    files = save_weights(state, output_dir, name)
    cfg.MODEL.WEIGHTS = os.path.basename(files["pth"])
    cfg.OUTPUT_DIR = os.path.join("output", name)
    write_atomic(os.path.join(output_dir, f"{name}.yaml"), cfg.dump())
    published = {} if row is None else {"bbox": {"AP": row.box_ap}, "segm": {"AP": row.mask_ap}}
    info = {
        "name": name,
        "config": f"{name}.yaml",
        "files": {fmt: {"name": os.path.basename(p), "sha256": _sha256_file(p)}
                  for fmt, p in files.items()},
        "metrics": published,
        "metrics_source": "published (LVIS v1 val), not evaluated by the conversion",
        "converted_from": {"file": os.path.basename(checkpoint), "sha256": sha,
                           "url": row.source if row else None,
                           "mmdet_version": meta.get("mmdet_version"),
                           "dropped_entries": dropped_entries,  # meta, optimizer state
                           "dropped_keys": sorted(dropped)},
        "dataset": {"train": list(cfg.DATASETS.TRAIN),
                    "test": cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None},
        "classes": _classes(cfg),
    }
    write_atomic(os.path.join(output_dir, f"{name}_metrics.json"),
                 json.dumps(info, indent=1) + "\n")
    return info


def _classes(cfg):
    """LVIS v1 class names, in mmdetection's order (category ids sorted) for 1,203 classes."""
    meta = get_lvis_instances_meta("lvis_v1_val")
    classes = meta["thing_classes"]
    return list(classes) if len(classes) == cfg.MODEL.ROI_HEADS.NUM_CLASSES else None
