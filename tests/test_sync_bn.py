"""Synchronized BatchNorm (NORM "SyncBN" in the LVIS 2020 entry's configs): every normalized
part of the model uses it, one process falls back to BatchNorm, and two CPU processes (GLOO)
normalize with the statistics of their batches together."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.config import get_cfg
from detectron2.layers import NaiveSyncBatchNorm, get_norm
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from torch import nn

from seesaw_ecm import add_seesaw_ecm_config
from seesaw_ecm.distributed import NORM_KEYS, sync_bn_on_cpu
from test_cascade import small_cfg
from test_htc_lite import batch
from test_recipes import lookup, resolve

SYNC_BN_RECIPE = "configs/LVISv1/htc_lite_R_50_FPN_2x_seesaw_normed_mask_syncbn_rfs.yaml"
HTC = "configs/Synthetic/htc_lite_R18_FPN_seesaw.yaml"


# the keys of detectron2's ResNet, FPN and heads (the others: ResNeSt and FPG, the entry's)
D2_NORM_KEYS = [k for k in NORM_KEYS if not k.startswith(("MODEL.RESNEST.", "MODEL.FPG."))]


def recipe_norms():
    """The NORM keys of the SyncBN recipe, as config overrides."""
    cfg = resolve(SYNC_BN_RECIPE)
    return [item for key in D2_NORM_KEYS for item in (key, lookup(cfg, key))]


def test_recipe_puts_every_normalized_part_on_sync_bn_and_one_process_trains():
    """The recipe's norms on the small HTC-Lite: the backbone's, FPN's and mask head's norms are
    SyncBatchNorm (the box head has FCs only), and without a process group the model trains
    (torch's SyncBatchNorm is BatchNorm there)."""
    norms = recipe_norms()
    assert norms[1::2] == ["SyncBN"] * len(D2_NORM_KEYS)
    # FREEZE_AT 0 as the synthetic configs (the recipe freezes the stem and res2: FrozenBN)
    torch.manual_seed(0)
    model = build_model(small_cfg(HTC, *norms))
    parts = {"backbone.bottom_up": model.backbone.bottom_up, "backbone.fpn_lateral2":
             model.backbone.fpn_lateral2, "roi_heads.mask_head": model.roi_heads.mask_head}
    for name, part in parts.items():
        assert any(isinstance(m, nn.SyncBatchNorm) for m in part.modules()), name
    assert not dist.is_initialized() and sync_bn_on_cpu(small_cfg(HTC, *norms)) == []
    model.train()
    with EventStorage():
        losses = model(batch())
    sum(losses.values()).backward()
    assert model.backbone.fpn_lateral2.norm.weight.grad is not None
    assert all(torch.isfinite(v) for v in losses.values())


def test_one_process_sync_bn_is_batch_norm():
    x = torch.randn(4, 3, 5, 5)
    sync, plain = nn.SyncBatchNorm(3), nn.BatchNorm2d(3)
    torch.testing.assert_close(sync(x), plain(x))
    torch.testing.assert_close(sync.running_var, plain.running_var)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _halves():
    """A batch of 5 whose two parts (3 and 2 images) have other statistics."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g) * 3 + 2]


def _layer(norm):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    bn = get_norm(norm, 4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return conv, bn


def _sync_bn_worker(rank, port, out_dir, norm):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        cfg = get_cfg()
        add_seesaw_ecm_config(cfg)
        cfg.MODEL.DEVICE = "cpu"
        cfg.merge_from_list([item for key in NORM_KEYS for item in (key, norm)])
        changed = sync_bn_on_cpu(cfg)
        conv, bn = _layer(cfg.MODEL.FPN.NORM)
        x = _halves()[rank].requires_grad_()
        y = bn(conv(x))
        (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
        torch.save({"changed": changed, "type": type(bn).__name__, "y": y.detach(),
                    "x_grad": x.grad, "running_mean": bn.running_mean},
                   os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["SyncBN", "BN"])
def test_two_cpu_processes_normalize_with_the_statistics_of_both_batches(tmp_path, norm):
    """Two GLOO processes with a 3- and a 2-image batch: with "SyncBN" each output, input
    gradient and running mean equals BatchNorm's over the 5 images together (computed here in
    one process); with "BN" (the switch off) they do not."""
    mp.spawn(_sync_bn_worker, args=(_free_port(), str(tmp_path), norm), nprocs=2)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    conv, bn = _layer("BN")
    x = torch.cat(_halves()).requires_grad_()
    y = bn(conv(x))
    (torch.cat([(part * torch.arange(part.numel()).view_as(part).sin())
                for part in y.split([3, 2])]).sum()).backward()
    outputs, grads = y.detach().split([3, 2]), x.grad.split([3, 2])
    if norm == "BN":
        assert ranks[0]["changed"] == [] and ranks[0]["type"] == "BatchNorm2d"
        assert not torch.allclose(ranks[1]["y"], outputs[1], atol=1e-3)
        return
    assert ranks[0]["changed"] == list(NORM_KEYS)
    assert ranks[0]["type"] == NaiveSyncBatchNorm.__name__
    for rank, r in enumerate(ranks):
        torch.testing.assert_close(r["y"], outputs[rank], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(r["x_grad"], grads[rank], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(r["running_mean"], bn.running_mean)


def test_the_entry_recipe_is_sync_bn_everywhere_sync_bn_on_cpu_converts():
    """The full LVIS 2020 entry recipe normalizes ResNeSt, FPG and the heads with SyncBN: every
    key sync_bn_on_cpu converts for a CPU process group."""
    cfg = resolve("configs/LVISv1/htc_lite_ResNeSt_200_FPG_2x_seesaw_normed_mask_"
                  "lvis2020_entry_rfs.yaml")
    assert [lookup(cfg, key) for key in NORM_KEYS] == ["SyncBN"] * len(NORM_KEYS)
