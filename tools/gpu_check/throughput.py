"""GPU check, throughput section: seconds per training iteration and peak GPU memory of Mask
R-CNN and Cascade Mask R-CNN with each long-tail loss against stock detectron2, with and
without mixed precision, at LVIS scale, through benchmarks.train_speed's machinery (same
process, round-robin, ratio = median over rounds of model time / stock time in that round,
learning rate 0 so that every model does the same work).

LVIS scale: configs/Base-LongTail-RCNN-FPN.yaml (R50-FPN, 1,203 classes, 512 RoIs per image,
FrozenBN as with ImageNet weights, here randomly initialized), 2 images per GPU (the LVIS
recipes' 16 images on 8 GPUs), synthetic images of 800 x 1000-1333 px (one landscape, one
portrait) with LVIS-like instance counts: the (i + 0.5) / n quantiles of a geometric
distribution with LVIS v1 train's mean of 12.7 instances per image, boxes of 16 px up to 60%
of the short side, 12-vertex polygon masks, classes drawn by a long-tailed count vector that
also gives ECM and Federated their statistics. --tiny runs the same code with the synthetic
R18 config and small images. AMP rows need CUDA. Beside each time, the number of operations of
one more training step that make the host wait for the device (tools/sync_counter.py: item,
nonzero, boolean masks, ...), the model's and its stock's.
"""
import math
import time

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage

from benchmarks import train_speed as ts
from seesaw_ecm import deferred_scalars
from tools.sync_counter import SyncCounter

ARCHS = ("mask_rcnn", "cascade")
LVIS_INSTANCES_PER_IMAGE = 12.7  # LVIS v1 train: 1,270,141 instances in 100,170 images
DATASET = "gpu_check_lvis_scale"
SCALES = {
    "lvis": dict(base="configs/Base-LongTail-RCNN-FPN.yaml", num_classes=1203, short=800,
                 long=(1000, 1333), warmup=3, repeats=20),
    "tiny": dict(base="configs/Synthetic/Base-Synthetic-R18-FPN.yaml", num_classes=20, short=128,
                 long=(128, 170), warmup=1, repeats=2),
}
IMAGES_PER_GPU = 2
TARGETS = {"time": 1.03, "memory": 1.05}  # the issue's: within 3% / 5% of stock


def class_counts(num_classes):
    """Long-tailed training instance counts by class (1,000 down to 1, log-spaced)."""
    return np.round(np.geomspace(1000, 1, num_classes)).astype(np.int64)


def register_statistics(num_classes):
    """Register DATASET: records holding only annotations with class_counts(num_classes)
    instances per class, for the losses' class statistics (no images are ever read)."""
    if DATASET in DatasetCatalog.list():
        DatasetCatalog.remove(DATASET)
        MetadataCatalog.remove(DATASET)
    ids = np.random.default_rng(0).permutation(np.repeat(np.arange(num_classes),
                                                         class_counts(num_classes)))
    chunks = np.array_split(ids, max(1, len(ids) // 13))
    DatasetCatalog.register(DATASET, lambda: [
        {"annotations": [{"category_id": int(k)} for k in chunk]} for chunk in chunks])
    MetadataCatalog.get(DATASET).set(thing_classes=[f"class{k}" for k in range(num_classes)])
    return {"num_classes": num_classes, "dataset": DATASET}


def instances_per_image(n_images, mean=LVIS_INSTANCES_PER_IMAGE):
    """The (i + 0.5) / n quantiles of a geometric distribution (support 1, 2, ...) with `mean`."""
    return [max(1, math.ceil(math.log1p(-(i + 0.5) / n_images) / math.log1p(-1 / mean)))
            for i in range(n_images)]


def synthetic_batch(n_images, num_classes, short, long, seed=0):
    """Training inputs as DatasetMapper makes them: uint8 (3, H, W) "image" and "instances"
    (gt_boxes, gt_classes, polygon gt_masks); see the module docstring."""
    rng = np.random.default_rng(seed)
    weights = class_counts(num_classes) / class_counts(num_classes).sum()
    batch = []
    for i, n in enumerate(instances_per_image(n_images)):
        h, w = short, int(rng.integers(long[0], long[1], endpoint=True))
        if i % 2:
            h, w = w, h
        size = np.exp(rng.uniform(math.log(short / 50), math.log(0.6 * short), (n, 2)))
        x0 = rng.uniform(0, w - size[:, 0])
        y0 = rng.uniform(0, h - size[:, 1])
        angles = np.linspace(0, 2 * math.pi, 12, endpoint=False)
        polygons = []
        for j in range(n):
            radius = 0.5 * rng.uniform(0.7, 1.0, 12)
            xs = x0[j] + size[j, 0] * (0.5 + radius * np.cos(angles))
            ys = y0[j] + size[j, 1] * (0.5 + radius * np.sin(angles))
            polygons.append([np.stack([xs, ys], 1).ravel()])
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor(np.stack([x0, y0, x0 + size[:, 0], y0 + size[:, 1]], 1),
                                           dtype=torch.float32))
        inst.gt_classes = torch.tensor(rng.choice(num_classes, n, p=weights), dtype=torch.long)
        inst.gt_masks = PolygonMasks(polygons)
        image = torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))
        batch.append({"image": image, "instances": inst, "height": h, "width": w})
    return batch


def count_syncs(cases, deadline):
    """{case name: operations that sync the host in one more training step of it}
    (tools/sync_counter.py), or None for the cases left when `deadline` has passed."""
    out = {}
    for case in cases:
        if time.monotonic() > deadline:
            out[case.name] = None
            continue
        cpu = case.device.type == "cpu"  # the rehearsal: count as on the GPU
        with SyncCounter(backward_origins=False, cpu_is_device=cpu) as syncs, \
                deferred_scalars.defer_cpu_tensors():
            case.step()
        out[case.name] = syncs.total
    return out


def run(device, tiny, deadline):
    """The section: {"settings", "rows", "targets"}; rows: one per (arch, loss, amp). AMP rows
    only on CUDA: CPU autocast (bfloat16) ran ~8x slower than float32 here."""
    scale = SCALES["tiny" if tiny else "lvis"]
    losses = list(ts.LOSSES)
    opts = ["SOLVER.IMS_PER_BATCH", str(IMAGES_PER_GPU)]
    data = register_statistics(scale["num_classes"])
    cfg0 = ts.make_cfg("mask_rcnn", None, device.type, data, scale["base"], opts)
    batch = synthetic_batch(IMAGES_PER_GPU, scale["num_classes"], scale["short"], scale["long"])
    batch = ts.batch_to(batch, device)
    specs = []  # (name, arch, loss, amp)
    for amp in (False, True) if device.type == "cuda" else (False,):
        for name, arch, loss, _ in ts.case_specs(ARCHS, losses, False):
            specs.append((name + (" amp" if amp else ""), arch, loss, amp))
    stock_of = {name: f"{arch} stock" + (" amp" if amp else "") for name, arch, _, amp in specs}
    with EventStorage():
        cases = [ts.Case(name, ts.make_cfg(arch, loss, device.type, data, scale["base"], opts),
                         batch, amp=amp) for name, arch, loss, amp in specs]
        timed = ts.time_cases(cases, scale["warmup"], scale["repeats"], stock_of, deadline)
        syncs = count_syncs(cases, deadline)
    peaks = {c.name: c.peak_mib for c in cases}
    rows = []
    for name, arch, loss, amp in specs:
        seconds, ratio = timed[name]
        peak, stock_peak = peaks[name], peaks[stock_of[name]]
        rows.append(dict(name=name, arch=arch, loss=loss or "stock", amp=amp, s_per_iter=seconds,
                         x_stock=ratio, peak_mib=peak,
                         x_stock_memory=peak / stock_peak if peak is not None else None,
                         syncs=syncs[name], stock_syncs=syncs[stock_of[name]]))
    return {
        "settings": dict(
            base_config=scale["base"], classes=scale["num_classes"], images_per_gpu=IMAGES_PER_GPU,
            image_sizes=[list(d["image"].shape[1:]) for d in batch],
            instances_per_image=[len(d["instances"]) for d in batch],
            rois_per_image=cfg0.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE,
            amp_dtype=str(cases[-1].amp_dtype).split(".")[-1] if cases[-1].amp else None,
            warmup=scale["warmup"],
            rounds_timed=cases[0].iter - scale["warmup"]),
        "targets": TARGETS,
        "rows": rows,
    }
