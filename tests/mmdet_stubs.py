"""The real mmdetection 3.3.0 model on CPU, for the converter's parity tests.

mmcv-lite (the pure-Python mmcv that mmdetection 3.3.0 accepts) has no compiled ops, so
``mmcv.ops`` is replaced, before ``mmdet.models`` is imported, by a stand-in whose inference ops
(``RoIAlign``, ``roi_align``, ``nms``, ``batched_nms``) are torchvision's with mmcv's call and
return conventions; every other name of ``mmcv.ops`` is a class that raises when used. This
lives in the tests only: the library never imports mmdetection.

``mmdet_model`` builds an official config of the wheel (``configs/seesaw_loss/``) with random
weights and randomised BatchNorm statistics (seeded), and ``mmdet_checkpoint`` saves its state
dict as an mmdetection checkpoint (``{"meta": ..., "state_dict": ...}``).
"""
import importlib.abc
import importlib.machinery
import os
import sys
import types

import torch
import torchvision
from torch import nn
from torch.nn.modules.utils import _pair

# weight scale of the output layers: box deltas of a few percent, logits of a few units
OUTPUT_LAYERS = {"rpn_reg": 0.05, "rpn_cls": 0.02, "fc_reg": 0.05}


class _Unavailable:
    """An mmcv op that inference of the Seesaw / ECM models never calls."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError(f"mmcv.ops.{type(self).__name__} has no stand-in (tests only "
                                  "provide RoIAlign, roi_align, nms and batched_nms)")


class RoIAlign(nn.Module):
    """mmcv.ops.RoIAlign (avg pooling) as torchvision.ops.roi_align."""

    def __init__(self, output_size, spatial_scale=1.0, sampling_ratio=0, pool_mode="avg",
                 aligned=True, use_torchvision=False):
        super().__init__()
        assert pool_mode == "avg"
        self.output_size = _pair(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = aligned

    def forward(self, input, rois):
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio,
                         "avg", self.aligned)


def roi_align(input, rois, output_size, spatial_scale=1.0, sampling_ratio=0, pool_mode="avg",
              aligned=True):
    return torchvision.ops.roi_align(input, rois.to(input.dtype), output_size, spatial_scale,
                                     sampling_ratio, aligned)


def nms(boxes, scores, iou_threshold, offset=0, score_threshold=0, max_num=-1):
    """mmcv.ops.nms: (dets (K, 5) = boxes and score, keep (K,)), by decreasing score."""
    assert offset == 0 and score_threshold == 0
    keep = torchvision.ops.nms(boxes, scores, float(iou_threshold))
    if max_num > 0:
        keep = keep[:max_num]
    return torch.cat([boxes[keep], scores[keep, None]], dim=1), keep


def batched_nms(boxes, scores, idxs, nms_cfg, class_agnostic=False):
    """mmcv.ops.batched_nms: NMS within each idx (one per class), results by decreasing score:
    (dets (K, 5), keep (K,))."""
    if nms_cfg is None:
        scores, inds = scores.sort(descending=True)
        return torch.cat([boxes[inds], scores[:, None]], -1), inds
    cfg = dict(nms_cfg)
    class_agnostic = cfg.pop("class_agnostic", class_agnostic)
    assert cfg.pop("type", "nms") == "nms"
    cfg.pop("split_thr", None)
    max_num = cfg.pop("max_num", -1)
    iou = float(cfg.pop("iou_threshold"))
    assert not cfg, cfg
    if class_agnostic:
        keep = torchvision.ops.nms(boxes, scores, iou)
    else:
        keep = torchvision.ops.batched_nms(boxes, scores, idxs, iou)
    if max_num > 0:
        keep = keep[:max_num]
    return torch.cat([boxes[keep], scores[keep, None]], -1), keep


class _OpsModule(types.ModuleType):
    """mmcv.ops and its submodules: the stand-ins above, any other name a raising class."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        cls = type(name, (_Unavailable,), {})
        setattr(self, name, cls)
        return cls


class _OpsFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "mmcv.ops" or fullname.startswith("mmcv.ops."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _OpsModule(spec.name)
        module.__path__ = []
        for f in (RoIAlign, roi_align, nms, batched_nms):
            setattr(module, f.__name__, f)
        return module

    def exec_module(self, module):
        pass


def install_mmcv_ops():
    """Register the mmcv.ops stand-in (idempotent); then import mmdet."""
    if not any(isinstance(f, _OpsFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _OpsFinder())
    import mmcv
    import mmcv.ops
    mmcv.ops = sys.modules["mmcv.ops"]


def wheel_config(name):
    """An mmengine Config of a file in mmdetection's wheel, e.g.
    ``configs/seesaw_loss/mask-rcnn_r50_fpn_seesaw-loss_random-ms-2x_lvis-v1.py``."""
    import mmdet
    from mmengine import Config
    return Config.fromfile(os.path.join(os.path.dirname(mmdet.__file__), ".mim", name))


def randomize_(model, seed, image=None):
    """Random weights, biases and BatchNorm statistics, seeded. BN statistics are first those
    of a forward pass on `image` (so that a deep random network keeps sane activations), then
    every BN affine parameter and statistic is perturbed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            if any(part in name for part in OUTPUT_LAYERS):  # spread, not saturated outputs
                p.mul_(OUTPUT_LAYERS[next(part for part in OUTPUT_LAYERS if part in name)])
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        for m in bns:
            m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
        if image is not None:
            for m in bns:
                m.reset_running_stats()
                m.momentum = None
                m.train()
            model.backbone(image)
        for m in bns:
            m.eval()
            m.running_mean.add_(0.05 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.mul_(1 + 0.2 * torch.rand(m.running_var.shape, generator=g))
            m.num_batches_tracked.fill_(1000)
    return model


def mmdet_model(config_name, seed=0, image=None, rpn_proposals=1000, detections=300,
                bbox_head=None, options=None):
    """The mmdetection model of an official config file, random weights (seeded), eval mode.

    Args:
        config_name: path inside the wheel's .mim folder.
        image: (1, 3, H, W) normalized image whose forward pass sets the BN statistics.
        rpn_proposals, detections: test_cfg rpn nms_pre / max_per_img and rcnn max_per_img.
        bbox_head: dict merged into every box head's config (e.g. another loss_cls).
        options: {dotted config key: value} merged last (mmengine's merge_from_dict).
    """
    install_mmcv_ops()
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    cfg = wheel_config(config_name)
    cfg.model.backbone.init_cfg = None
    cfg.model.test_cfg.rpn.nms_pre = rpn_proposals
    cfg.model.test_cfg.rpn.max_per_img = rpn_proposals
    cfg.model.test_cfg.rcnn.max_per_img = detections
    if bbox_head:
        heads = cfg.model.roi_head.bbox_head
        for head in heads if isinstance(heads, list) else [heads]:
            head.update(bbox_head)
    if options:
        cfg.merge_from_dict(options)
    torch.manual_seed(seed)
    model = MODELS.build(cfg.model)  # randomize_ sets every weight: no init_weights()
    return randomize_(model, seed, image).eval()


def mmdet_checkpoint(model, path, version="3.3.0"):
    """Save `model` as mmdetection saves a checkpoint: {"meta": ..., "state_dict": ...}."""
    torch.save({"meta": {"mmdet_version": version, "epoch": 24, "iter": 1},
                "state_dict": model.state_dict()}, path)
    return path
