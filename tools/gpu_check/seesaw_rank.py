"""One rank of the GPU check's Seesaw all-reduce check (correctness.py), in a module that
imports only torch and the framework-free loss file: the spawned ranks then start in seconds
instead of importing detectron2 (importing the seesaw_ecm package does)."""
import importlib.util
import os
import sys

import torch
from torch import distributed as dist

# the installed package's folder; finding it does not import (run) the package
LOSSES_DIR = os.path.join(importlib.util.find_spec("seesaw_ecm").submodule_search_locations[0],
                          "losses")
ROIS = 64


def labels_for(n, num_classes, generator):
    """(n,) labels: 25% foreground (as ROI_HEADS.POSITIVE_FRACTION), background = num_classes."""
    labels = torch.full((n,), num_classes, dtype=torch.long)
    fg = torch.randperm(n, generator=generator)[: n // 4]
    labels[fg] = torch.randint(num_classes, (fg.numel(),), generator=generator)
    return labels


def rank_labels(rank, num_classes):
    return labels_for(ROIS, num_classes, torch.Generator().manual_seed(rank))


def run_rank(rank, world, port, device, num_classes, out_dir):
    """Seesaw forward in training mode on this rank's labels; saves its cum_samples."""
    # the losses package alone (its modules import each other, never the rest of seesaw_ecm)
    spec = importlib.util.spec_from_file_location(
        "seesaw_ecm_losses", os.path.join(LOSSES_DIR, "__init__.py"),
        submodule_search_locations=[LOSSES_DIR])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        loss = module.SeesawLoss(num_classes).to(device).train()
        labels = rank_labels(rank, num_classes).to(device)
        terms = loss(torch.randn(ROIS, num_classes, device=device),
                     torch.randn(ROIS, 2, device=device), labels)
        torch.save({"cum_samples": loss.cum_samples.cpu(), "device": loss.cum_samples.device.type,
                    "finite": all(bool(torch.isfinite(v)) for v in terms.values())},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
