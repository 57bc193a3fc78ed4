"""Config keys, renamed keys, the "full_model" gradient clip and every shipped config."""
import ast
import copy
import glob
import os

import pytest
import torch
import yaml
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import seesaw_ecm.config
from seesaw_ecm import add_seesaw_ecm_config
from seesaw_ecm.config import RENAMED_KEYS, merge_config
from seesaw_ecm.errors import SeesawEcmError
from seesaw_ecm.solver import build_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.relpath(p, ROOT)
                 for p in glob.glob(os.path.join(ROOT, "configs/**/*.yaml"), recursive=True))


def _flat_keys(node, prefix=""):
    keys = set()
    for k, v in node.items():
        keys |= _flat_keys(v, f"{prefix}{k}.") if isinstance(v, CfgNode) else {prefix + k}
    return keys


def _commented_assignments(path):
    """{dotted key: has a comment on its line or the line above} of every `cfg.X... = value`."""
    source = open(path).read()
    lines = source.splitlines()
    found = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute):
            key = ast.unparse(node.targets[0])
            if key.startswith("cfg."):
                line = lines[node.lineno - 1]
                found[key[4:]] = "#" in line or lines[node.lineno - 2].strip().startswith("#")
    return found


def test_every_added_key_is_assigned_with_a_comment():
    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    added = _flat_keys(cfg) - _flat_keys(get_cfg())
    assigned = _commented_assignments(seesaw_ecm.config.__file__)
    assert added and added <= set(assigned), added - set(assigned)
    assert [k for k in added if not assigned[k]] == []


def test_detectron2_rejects_the_keys_until_they_are_added():
    with pytest.raises(AssertionError, match="Non-existent key: MODEL.LONG_TAIL.LOSS"):
        get_cfg().merge_from_list(["MODEL.LONG_TAIL.LOSS", "seesaw"])
    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    cfg.merge_from_list(["MODEL.LONG_TAIL.LOSS", "seesaw"])
    assert cfg.MODEL.LONG_TAIL.LOSS == "seesaw"


def test_renamed_keys_point_at_added_or_detectron2_keys():
    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    for old, (new, _) in RENAMED_KEYS.items():
        assert old not in _flat_keys(cfg)
        node = cfg
        for part in new.split("."):
            node = node[part]  # KeyError if the new key does not exist


def _yaml_setting(key, value):
    """{"A": {"B": value}} for key "A.B"."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


@pytest.mark.parametrize("old", sorted(RENAMED_KEYS))
def test_renamed_key_in_a_yaml_file_names_the_new_key(old, tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"_BASE_": os.path.join(ROOT, "configs/Demo/Base-Demo.yaml"),
                                    **_yaml_setting(old, 1.0)}))
    new = RENAMED_KEYS[old][0]
    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    with pytest.raises(KeyError, match=f"Key {old} was renamed to {new};"):
        cfg.clone().merge_from_file(str(path))  # detectron2's own merge, on a clone too
    with pytest.raises(SeesawEcmError, match=f"Key {old} was renamed to {new};") as e:
        merge_config(cfg, str(path))
    assert "\n" not in str(e.value)  # one message


def test_a_run_config_written_before_the_rename_fails_to_load_naming_the_new_key(tmp_path):
    """detectron2 dumps every key into OUTPUT_DIR/config.yaml, so an older run's file holds the
    old keys even at their defaults; loading it for a model-zoo predictor says what to edit."""
    from seesaw_ecm.model_zoo import load_config

    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    add_seesaw_ecm_config(cfg)  # adding the keys twice is harmless
    old = yaml.safe_load(cfg.dump())
    old["SOLVER"]["CLIP_GRADIENTS_GLOBAL_NORM"] = 0.0
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    with pytest.raises(SeesawEcmError, match="SOLVER.CLIP_GRADIENTS_GLOBAL_NORM was renamed to "
                       "SOLVER.CLIP_GRADIENTS;"):
        load_config(str(path))
    del old["SOLVER"]["CLIP_GRADIENTS_GLOBAL_NORM"]
    path.write_text(yaml.safe_dump(old))
    assert load_config(str(path)).SOLVER.CLIP_GRADIENTS == cfg.SOLVER.CLIP_GRADIENTS


@pytest.mark.parametrize("old", sorted(RENAMED_KEYS))
def test_renamed_key_in_opts_names_the_new_key(old):
    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    new = RENAMED_KEYS[old][0]
    with pytest.raises(SeesawEcmError, match=f"Key {old} was renamed to {new};"):
        merge_config(cfg, os.path.join(ROOT, "configs/Demo/Base-Demo.yaml"), [old, "1.0"])
    with pytest.raises(SeesawEcmError, match="Unknown config key MODEL.NO_SUCH_KEY in the "
                       "command line's KEY VALUE pairs: Check its spelling"):
        merge_config(cfg, None, ["MODEL.NO_SUCH_KEY", "1"])


def test_train_net_stops_at_a_renamed_key_before_anything_runs(tmp_path):
    import train_net

    args = train_net.build_parser().parse_args(
        ["--config-file", os.path.join(ROOT, "configs/Demo/mask_rcnn_R18_FPN_ecm.yaml"),
         "SOLVER.CLIP_GRADIENTS_GLOBAL_NORM", "5.0", "OUTPUT_DIR", str(tmp_path / "out")])
    with pytest.raises(SeesawEcmError, match="SOLVER.CLIP_GRADIENTS_GLOBAL_NORM was renamed to "
                       "SOLVER.CLIP_GRADIENTS;.*CLIP_TYPE \"full_model\""):
        train_net.setup(args)
    assert not (tmp_path / "out").exists()


def _solver_cfg(clip_type=None, value=0.5):
    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    cfg.SOLVER.BASE_LR, cfg.SOLVER.MOMENTUM, cfg.SOLVER.WEIGHT_DECAY = 1.0, 0.0, 0.0
    if clip_type:
        cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
        cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = clip_type
        cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = value
    return cfg


def _step(cfg, model, clip_by_hand=None):
    """One optimizer step of `model` on a fixed batch; returns its parameters after it."""
    torch.manual_seed(1)
    x = torch.randn(8, 5)
    model.zero_grad()
    model(x).square().sum().backward()
    optimizer = build_optimizer(cfg, model)
    if clip_by_hand is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_by_hand)
    optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def test_full_model_clip_is_clip_grad_norm_over_all_parameters():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    with EventStorage() as storage:
        clipped = _step(_solver_cfg("full_model", 0.5), copy.deepcopy(model))
        norm = storage.history("grad_norm").latest()
    by_hand = _step(_solver_cfg(), copy.deepcopy(model), clip_by_hand=0.5)
    for a, b in zip(clipped, by_hand):
        torch.testing.assert_close(a, b)
    assert norm > 0.5  # the clip was active, and the logged norm is the one before clipping
    model.zero_grad()
    torch.manual_seed(1)
    model(torch.randn(8, 5)).square().sum().backward()
    assert norm == pytest.approx(torch.nn.utils.get_total_norm(
        [p.grad for p in model.parameters()]).item(), rel=1e-6)
    # the switch matters: no clip, and detectron2's per-parameter norm clip, step elsewhere
    for other in (_step(_solver_cfg(), copy.deepcopy(model)),
                  _step(_solver_cfg("norm", 0.5), copy.deepcopy(model))):
        assert not all(torch.allclose(a, b) for a, b in zip(clipped, other))


@pytest.mark.parametrize("path", CONFIGS)
def test_shipped_config_loads_and_builds(path):
    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    merge_config(cfg, os.path.join(ROOT, path))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.LONG_TAIL.STATISTICS_FROM = "checkpoint"  # no LVIS on this machine
    cfg.MODEL.RESNEST.WEIGHTS = ""  # nor ImageNet weights (random initialisation)
    if "LVISv1" in path:
        assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 1203 and cfg.SOLVER.IMS_PER_BATCH == 16
        assert cfg.DATASETS.TRAIN == ("lvis_v1_train",) and cfg.TEST.DETECTIONS_PER_IMAGE == 300
        if "_rfs" in path:
            assert cfg.DATALOADER.SAMPLER_TRAIN == "RepeatFactorTrainingSampler"
            assert cfg.DATALOADER.REPEAT_THRESHOLD == 0.001
            assert cfg.DATALOADER.REPEAT_ROUNDING == "ceil"
        # the schedule is in epochs (MAX_ITER derived at start) and the file itself states it
        assert cfg.SOLVER.EPOCHS in (6, 12, 24) and len(cfg.SOLVER.EPOCH_STEPS) == 2
        text = " ".join(open(os.path.join(ROOT, path)).read().replace("#", " ").split())
        steps = cfg.SOLVER.EPOCH_STEPS
        assert f"{cfg.SOLVER.EPOCHS} epochs, lr steps at epochs {steps[0]} and {steps[1]}" in text
    if "cascade" in path:
        assert cfg.MODEL.ROI_HEADS.NAME == "LongTailCascadeROIHeads"
        assert cfg.MODEL.ROI_BOX_CASCADE_HEAD.IOUS == (0.5, 0.6, 0.7)
        mmdet = "LVISv1" in path or "_mmdet" in path  # mmdetection's cascade (MODEL.CASCADE)
        assert cfg.MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS == (
            (10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0),
            (1 / 0.033, 1 / 0.033, 1 / 0.067, 1 / 0.067) if mmdet else (30.0, 30.0, 15.0, 15.0))
        assert cfg.MODEL.CASCADE.STAGE_LOSS_WEIGHTS == ([1.0, 0.5, 0.25] if mmdet else [])
        assert cfg.MODEL.CASCADE.MASK_PER_STAGE == mmdet
        if "LVISv1" in path:
            assert cfg.MODEL.RESNETS.DEPTH == 101 and cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN == 2000
    if "htc_lite" in path:
        assert cfg.MODEL.META_ARCHITECTURE == "HTCLiteRCNN"
        assert cfg.MODEL.ROI_HEADS.NAME == "HTCLiteROIHeads"
        assert cfg.MODEL.HTC_LITE.CONTEXT and cfg.MODEL.HTC_LITE.INTERLEAVED
        assert not cfg.MODEL.CASCADE.MASK_PER_STAGE  # HTC-Lite has one mask head
        if "LVISv1" in path:  # box stages as mmdetection's cascade
            assert cfg.MODEL.CASCADE.STAGE_LOSS_WEIGHTS == [1.0, 0.5, 0.25]
            assert cfg.MODEL.CASCADE.RESAMPLE_PER_STAGE and cfg.MODEL.CASCADE.TEST_SCORE == "logits"
        assert cfg.MODEL.ROI_BOX_CASCADE_HEAD.IOUS == (0.5, 0.6, 0.7)
        if "LVISv1" in path:
            resnest = "resnest" in cfg.MODEL.BACKBONE.NAME or "resnest" in cfg.MODEL.FPG.BOTTOM_UP
            assert (f"ResNeSt_{cfg.MODEL.RESNEST.DEPTH}_" if resnest
                    else f"R_{cfg.MODEL.RESNETS.DEPTH}_") in path
    for loss in ("federated", "cosine_ce"):
        if loss in path:
            assert cfg.MODEL.LONG_TAIL.LOSS == loss
    clip = cfg.SOLVER.CLIP_GRADIENTS
    # ECM: the official clip 5, the main job's cascade 35 (its config: why); GOL's demo and
    # synthetic configs clip as ECM's (without it, it diverged at their learning rate)
    if "ecm" in path or path in ("configs/Demo/mask_rcnn_R18_FPN_gol.yaml",
                                 "configs/Synthetic/mask_rcnn_R18_FPN_gol.yaml"):
        value = 35.0 if path == "configs/Demo/cascade_mask_rcnn_R18_FPN_ecm.yaml" else 5.0
        assert cfg.MODEL.LONG_TAIL.LOSS in ("ecm", "gol") and clip.ENABLED
        assert (clip.CLIP_TYPE, clip.CLIP_VALUE) == ("full_model", value)
    else:
        assert not clip.ENABLED
    if "seesaw" in path:
        assert cfg.MODEL.LONG_TAIL.LOSS == "seesaw" and cfg.MODEL.LONG_TAIL.OBJECTNESS
    model = build_model(cfg)
    assert model.roi_heads.num_classes == cfg.MODEL.ROI_HEADS.NUM_CLASSES
    if "cascade" in path or "htc_lite" in path:
        assert len(model.roi_heads.box_predictor) == 3
