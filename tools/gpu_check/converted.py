"""GPU check, converted section: the official-checkpoint path at LVIS size on the device.

For each family of the official models (Seesaw Mask R-CNN R-50, Seesaw Cascade R-101, ECM Mask
R-CNN R-50; configs/LVISv1/mmdet/) a random-weight model is written in mmdetection's checkpoint
layout (every tensor under its mmdetection name, Seesaw's background count and ECM's sample_n /
detection_cls_weight included), converted by seesaw_ecm.convert_mmdet, checked to round-trip
exactly, and run through the model zoo's predictor on an LVIS-size image (1,203 classes, short
side 800): seconds per image and peak GPU memory. The random weights are calibrated (FrozenBN
statistics from a forward pass) so that activations stay finite, but their scores are nearly
uniform: 95 % of the proposal x class scores pass the 1e-4 threshold (R-50, measured on the CPU),
so the class-wise NMS works on about 1.1 million boxes, more than a trained model gives (a worst
case for the NMS).
--tiny: the same on the CPU at 160 px with 50 proposals and 20 detections.
"""
import os
import re
import time

import torch

from seesaw_ecm import convert_mmdet, model_zoo

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAMILIES = {
    "seesaw_mask_rcnn_r50":
        "mask_rcnn_r50_fpn_sample1e-3_seesaw_loss_normed_mask_mstrain_2x_lvis_v1",
    "seesaw_cascade_r101":
        "cascade_mask_rcnn_r101_fpn_random_seesaw_loss_normed_mask_mstrain_2x_lvis_v1",
    "ecm_mask_rcnn_r50": "r50_ecm_1x_lvis_v1",
}
SIZES = {  # image (h, w), RPN proposals kept, detections per image, timed repeats
    "full": dict(image=(800, 1216), proposals=1000, detections=300, repeats=3),
    "tiny": dict(image=(160, 224), proposals=50, detections=20, repeats=1),
}
# detectron2 name -> mmdetection name (the converter's map, inverted, for writing the layout)
_TO_MMDET = [
    (r"backbone\.bottom_up\.stem\.conv1\.weight", "backbone.conv1.weight"),
    (r"backbone\.bottom_up\.stem\.conv1\.norm\.(\w+)", r"backbone.bn1.\1"),
    (r"backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.weight",
     lambda m: f"backbone.layer{int(m[1]) - 1}.{m[2]}.conv{m[3]}.weight"),
    (r"backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.norm\.(\w+)",
     lambda m: f"backbone.layer{int(m[1]) - 1}.{m[2]}.bn{m[3]}.{m[4]}"),
    (r"backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.weight",
     lambda m: f"backbone.layer{int(m[1]) - 1}.{m[2]}.downsample.0.weight"),
    (r"backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.norm\.(\w+)",
     lambda m: f"backbone.layer{int(m[1]) - 1}.{m[2]}.downsample.1.{m[3]}"),
    (r"backbone\.fpn_lateral(\d)\.(\w+)",
     lambda m: f"neck.lateral_convs.{int(m[1]) - 2}.conv.{m[2]}"),
    (r"backbone\.fpn_output(\d)\.(\w+)", lambda m: f"neck.fpn_convs.{int(m[1]) - 2}.conv.{m[2]}"),
    (r"proposal_generator\.rpn_head\.conv\.", "rpn_head.rpn_conv."),
    (r"proposal_generator\.rpn_head\.objectness_logits\.", "rpn_head.rpn_cls."),
    (r"proposal_generator\.rpn_head\.anchor_deltas\.", "rpn_head.rpn_reg."),
    (r"roi_heads\.box_head(\.\d)?\.fc(\d)\.(\w+)",
     lambda m: f"roi_head.bbox_head{m[1] or ''}.shared_fcs.{int(m[2]) - 1}.{m[3]}"),
    (r"roi_heads\.box_predictor(\.\d)?\.bbox_pred\.", r"roi_head.bbox_head\1.fc_reg."),
    (r"roi_heads\.box_predictor(\.\d)?\.cls_score\.", r"roi_head.bbox_head\1.fc_cls."),
    (r"roi_heads\.box_predictor(\.\d)?\.cls_loss\.", r"roi_head.bbox_head\1.loss_cls."),
    (r"roi_heads\.mask_head(\.\d)?\.mask_fcn(\d)\.(\w+)",
     lambda m: f"roi_head.mask_head{m[1] or ''}.convs.{int(m[2]) - 1}.conv.{m[3]}"),
    (r"roi_heads\.mask_head(\.\d)?\.deconv\.", r"roi_head.mask_head\1.upsample."),
    (r"roi_heads\.mask_head(\.\d)?\.predictor\.", r"roi_head.mask_head\1.conv_logits."),
]


def mmdet_layout(state):
    """A detectron2 state dict of a converted architecture in mmdetection's checkpoint layout."""
    out = {}
    for key, value in state.items():
        if ".objectness." in key or key.endswith(".cls_loss.margin"):
            continue  # objectness rows go into fc_cls; ECM's margins are derived from sample_n
        for pattern, repl in _TO_MMDET:
            new, n = re.subn(f"^{pattern}", repl, key)
            if n:
                break
        else:
            raise KeyError(f"no mmdetection name for {key}")
        objectness = key.replace(".cls_score.", ".objectness.")
        if objectness != key and objectness in state:  # Seesaw: C + 2 rows
            value = torch.cat([value, state[objectness]])
        elif new.endswith("cum_samples"):  # mmdetection also counts the background
            value = torch.cat([value, value.new_tensor([value.sum() * 3])])
        elif new.endswith("loss_cls.sample_counts"):
            new = new.replace("sample_counts", "sample_n")
        elif new.endswith("loss_cls.weight"):
            new, value = new.replace("loss_cls.weight", "loss_cls.detection_cls_weight"), \
                value.float()[None]
        out[new] = value.float() if value.is_floating_point() else value
        if new.endswith(".running_var"):
            out[new.replace("running_var", "num_batches_tracked")] = torch.tensor(1000)
    return out


def calibrate(model, image):
    """FrozenBN statistics set, layer by layer, from one forward pass on `image` (random
    weights keep finite activations through a ResNet-101), then random loss statistics."""
    from detectron2.layers import FrozenBatchNorm2d

    def set_stats(module, inputs):
        x = inputs[0].transpose(0, 1).flatten(1)
        module.running_mean.copy_(x.mean(1))
        module.running_var.copy_(x.var(1) + 1e-3)

    hooks = [m.register_forward_pre_hook(set_stats) for m in model.modules()
             if isinstance(m, FrozenBatchNorm2d)]
    with torch.no_grad():
        model.backbone(model.preprocess_image([{"image": image}]).tensor)
    for h in hooks:
        h.remove()
    g = torch.Generator().manual_seed(0)
    for name, buf in model.named_buffers():
        if name.endswith("cum_samples"):
            buf.copy_(torch.randint(1, 10000, buf.shape, generator=g).float())
        elif name.endswith("cls_loss.sample_counts"):
            counts = torch.randint(1, 10000, (len(buf) - 1,), generator=g).double()
            buf.copy_(torch.cat([counts, counts.sum()[None] * 6.3313]))
            a = (buf.sum() - buf) / buf
            prefix = name[: -len("sample_counts")]
            dict(model.named_buffers())[prefix + "weight"].copy_(a * torch.log1p(1 / a))
            dict(model.named_buffers())[prefix + "margin"].copy_(-0.25 * torch.log(a))


def _one_family(name, device, size, work):
    from detectron2.modeling import build_model
    config = os.path.join(ROOT, convert_mmdet.OFFICIAL_MODELS[name].config)
    h, w = size["image"]
    opts = ["MODEL.RPN.POST_NMS_TOPK_TEST", str(size["proposals"]),
            "MODEL.RPN.PRE_NMS_TOPK_TEST", str(size["proposals"]),
            "INPUT.MIN_SIZE_TEST", str(h), "INPUT.MAX_SIZE_TEST", str(max(h, w)),
            "TEST.DETECTIONS_PER_IMAGE", str(size["detections"])]
    cfg = model_zoo.load_config(config, ["MODEL.DEVICE", "cpu", *opts])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image = torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(1)).float()
    calibrate(model, image)
    state = model.state_dict()
    checkpoint = os.path.join(work, f"{name}_mmdet.pth")
    source = mmdet_layout(state)
    torch.save({"meta": {"mmdet_version": "2.x layout"}, "state_dict": source}, checkpoint)
    start = time.monotonic()
    info = convert_mmdet.convert_checkpoint(checkpoint, config, os.path.join(work, "zoo"),
                                            name=name)
    convert_s = time.monotonic() - start
    weights = os.path.join(work, "zoo", info["files"]["pth"]["name"])
    converted = model_zoo.load_weights(weights)
    exact = converted.keys() == state.keys() and all(
        torch.allclose(converted[k].double(), v.double(), rtol=1e-6, atol=0)
        for k, v in state.items())
    predictor = model_zoo.get_predictor(weights, device=str(device), opts=opts)
    bgr = image.permute(1, 2, 0).flip(-1).to(torch.uint8).numpy()
    times, detections = [], 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(size["repeats"] + 1):  # the first is warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.monotonic()
        detections = len(predictor(bgr)["instances"])
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.monotonic() - start)
    return dict(family=name, image=[h, w], classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES,
                proposals=size["proposals"], source_keys=len(source),
                convert_s=round(convert_s, 2), round_trip_exact=exact,
                s_per_image=round(min(times), 4), detections=detections,
                peak_mib=(torch.cuda.max_memory_allocated() / 2**20
                          if device.type == "cuda" else None))


def run(device, tiny, work, deadline):
    """The section: {"rows": one per family, "passed"}; families that do not fit before
    `deadline` are listed as skipped."""
    size = SIZES["tiny" if tiny else "full"]
    rows, skipped = [], []
    for family, name in FAMILIES.items():
        if rows and time.monotonic() + 2 * max(r["convert_s"] for r in rows) > deadline:
            skipped.append(family)
            continue
        rows.append(_one_family(name, device, size, work))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"rows": rows, "skipped": skipped,
            "passed": bool(rows) and all(r["round_trip_exact"] and r["detections"] > 0
                                         for r in rows)}
