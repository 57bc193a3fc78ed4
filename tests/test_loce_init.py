"""LOCE's initialisation pass (seesaw_ecm/loce_init.py) against the official InitializerHook:
the class-balanced image choice against a loop re-implementation of the official
DistributedBalancedSampler, the pass filling exactly the memories and mean scores of the classes
it sees while leaving the model's parameters and statistics alone, the hook's switches; the end-
to-end run is tests/test_baselines.py's LOCE decoupled run."""
import os
import random
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch import multiprocessing as mp
from torch import nn

from seesaw_ecm.errors import SeesawEcmError
from seesaw_ecm.loce_init import (LOCEInitPassHook, balanced_image_indices, images_per_class,
                                  loce_init_hooks, run_init_pass)
from test_modeling import build_small_model, one_image_batch, small_cfg


def official_balanced_sampler(dicts, num_samples, rank, num_replicas):
    """fcjian/LOCE DistributedBalancedSampler, line by line: {class: the indices rank takes}
    (in the order of the official defaultdict). get_cat_ids reads the non-crowd annotations (the
    ground truth detectron2 forwards); images without any go to one extra key, as the official
    len(CLASSES)."""
    category_image_indices = defaultdict(list)
    for idx in range(len(dicts)):
        cat_ids = set(a["category_id"] for a in dicts[idx]["annotations"] if not a.get("iscrowd"))
        if len(cat_ids) == 0:
            cat_ids = set(["empty"])
        for cat_id in cat_ids:
            category_image_indices[cat_id].append(idx)
    total_size = num_samples * num_replicas
    out = {}
    for cat_id in category_image_indices:
        indices = category_image_indices[cat_id]
        indices = (indices * -(-total_size // len(indices)))[:total_size]
        assert len(indices) == total_size
        indices = indices[rank:total_size:num_replicas]
        assert len(indices) == num_samples
        out[cat_id] = indices
    return out


def random_dataset(seed, images=40, classes=9):
    """Dataset dicts with long-tailed classes (class c in about 1 / (c + 1) of the images),
    crowd annotations and images without annotations."""
    rng = random.Random(seed)
    dicts = []
    for _ in range(images):
        anns = [{"category_id": c, "iscrowd": int(rng.random() < 0.1)}
                for c in range(classes) for _ in range(rng.randint(1, 3))
                if rng.random() < 1 / (c + 1)]
        dicts.append({"annotations": anns})
    return dicts


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("per_class, world", [(5, 1), (5, 2), (1, 3), (3, 4)])
def test_balanced_images_are_the_official_sampler(seed, per_class, world):
    dicts = random_dataset(seed)
    images = [{a["category_id"] for a in d["annotations"] if not a["iscrowd"]} or {"empty"}
              for d in dicts]
    for rank in range(world):
        official = official_balanced_sampler(dicts, per_class, rank, world)
        ours = balanced_image_indices(dicts, per_class, rank, world)
        # classes in order of first appearance, those of one image by index (the official
        # defaultdict follows Python's set order there); the empty images' group where they
        # first appear
        order = sorted(official, key=lambda c: (min(i for i, s in enumerate(images) if c in s),
                                                str(c)))
        assert ours == [i for c in order for i in official[c]]
        assert len(ours) == per_class * len(official)  # class-balanced: per_class per class


def test_balanced_images_cycle_a_rare_class_and_split_ranks():
    dicts = [{"annotations": [{"category_id": 0}]}, {"annotations": [{"category_id": 1}]},
             {"annotations": [{"category_id": 0}, {"category_id": 1}]},
             {"annotations": [{"category_id": 0}]}, {"annotations": []}]
    assert balanced_image_indices(dicts, 2) == [0, 2, 1, 2, 4, 4]
    # 2 per class and rank: the first 4 of [0, 2, 3] cycled = [0, 2, 3, 0], rank 1 [2, 0]
    assert balanced_image_indices(dicts, 2, rank=1, world_size=2) == [2, 0, 2, 2, 4, 4]


def two_class_batches():
    """Batches of one image each: class 1, class 2, class 1 (C = 3: class 0 never seen)."""
    batches = []
    for label in (1, 2, 1):
        batch = one_image_batch()
        batch[0]["instances"].gt_classes = torch.tensor([label])
        batches.append(batch)
    return batches


def test_pass_fills_the_seen_classes_and_changes_nothing_else():
    model = build_small_model("loce", False, heads="LOCEROIHeads")
    model.train()
    model.backbone.eval()  # a mode to restore that differs from its parent's
    heads = model.roi_heads
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # statistics to keep
    torch.manual_seed(0)
    assert run_init_pass(model, two_class_batches()) == 3
    # each image's box: 16 jittered boxes -> class 1 has 2 x 16 entries, class 2 16
    assert heads.memory.filled.tolist() == [0, 32, 16]
    assert heads.memory.features[1, :32].abs().sum(dim=(1, 2, 3)).gt(0).all()
    score = heads.box_predictor.cls_loss.mean_score
    assert score[0] == 0.01 and score[3] == 0.01  # unseen class, background
    assert score[1] != 0.01 and score[2] != 0.01  # measured
    after = model.state_dict()
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert changed == ["roi_heads.box_predictor.cls_loss.mean_score"]  # BN statistics kept
    assert all(p.grad is None for p in model.parameters())
    assert model.training and not model.backbone.training and model.roi_heads.training


def test_hook_switches():
    cfg = small_cfg("loce", **{"MODEL.ROI_HEADS.NAME": "LOCEROIHeads"})
    assert images_per_class(cfg) == 5  # QUEUE_SIZE 80 // 16, the official
    cfg.MODEL.LONG_TAIL.LOCE.QUEUE_SIZE = 160
    assert images_per_class(cfg) == 10
    cfg.MODEL.LONG_TAIL.LOCE.INIT_PASS.IMAGES_PER_CLASS = 2
    assert images_per_class(cfg) == 2
    assert [type(h) for h in loce_init_hooks(cfg)] == [LOCEInitPassHook]
    cfg.MODEL.LONG_TAIL.LOCE.INIT_PASS.ENABLED = False
    assert loce_init_hooks(cfg) == []
    cfg.MODEL.LONG_TAIL.LOCE.INIT_PASS.ENABLED = True
    cfg.MODEL.ROI_HEADS.NAME = "LongTailROIHeads"
    assert loce_init_hooks(cfg) == []
    cfg.MODEL.LONG_TAIL.LOCE.INIT_PASS.IMAGES_PER_CLASS = -1
    with pytest.raises(SeesawEcmError, match="IMAGES_PER_CLASS"):
        images_per_class(cfg)


@pytest.fixture(scope="module")
def loce_trainer(small_synthetic):
    """A LOCE model of the small synthetic set's 12 classes, its cfg (DATASETS.TRAIN that set)
    and a stand-in trainer at iteration 0 (what the hook reads: iter, model)."""
    from detectron2.data import DatasetCatalog
    from detectron2.modeling import build_model

    from seesaw_ecm.data.datasets import register_lvis_format
    if "loce_init_train" not in DatasetCatalog.list():
        register_lvis_format("loce_init_train", small_synthetic["train_json"],
                             small_synthetic["image_root"])
    cfg = small_cfg("loce", **{"MODEL.ROI_HEADS.NAME": "LOCEROIHeads",
                               "MODEL.ROI_HEADS.NUM_CLASSES": 12, "SOLVER.IMS_PER_BATCH": 2,
                               "DATASETS.TRAIN": "('loce_init_train',)",
                               "DATALOADER.NUM_WORKERS": 0})
    return cfg, lambda: SimpleNamespace(iter=0, model=build_model(cfg))


def test_hook_fills_every_class_and_keeps_the_mean_scores_on_resume(loce_trainer):
    cfg, new_trainer = loce_trainer
    hook = LOCEInitPassHook(cfg)
    hook.trainer = new_trainer()
    heads = hook.trainer.model.roi_heads
    torch.manual_seed(0)
    hook.before_train()
    assert (heads.memory.filled > 0).all()  # all 12 classes of the set
    assert (heads.box_predictor.cls_loss.mean_score[:-1] != 0.01).all()
    resumed = new_trainer()
    resumed.iter = 7
    score = resumed.model.roi_heads.box_predictor.cls_loss.mean_score
    score[:-1] = torch.linspace(0.1, 0.9, 12)  # as loaded from a checkpoint
    before = score.clone()
    hook.trainer = resumed
    hook.before_train()
    assert (resumed.model.roi_heads.memory.filled > 0).all()  # the memory refilled
    assert torch.equal(score, before)  # the checkpoint's mean scores kept


def _two_rank_worker(rank, data, out_dir):
    from detectron2.modeling import build_model
    from torch import distributed as dist

    from seesaw_ecm.data.datasets import register_lvis_format
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank,
                            world_size=2)
    try:
        register_lvis_format("loce_init_train", data["train_json"], data["image_root"])
        cfg = small_cfg("loce", **{"MODEL.ROI_HEADS.NAME": "LOCEROIHeads",
                                   "MODEL.ROI_HEADS.NUM_CLASSES": 12, "SOLVER.IMS_PER_BATCH": 4,
                                   "MODEL.LONG_TAIL.LOCE.INIT_PASS.IMAGES_PER_CLASS": 2,
                                   "DATASETS.TRAIN": "('loce_init_train',)",
                                   "DATALOADER.NUM_WORKERS": 0})
        torch.manual_seed(rank)
        hook = LOCEInitPassHook(cfg)
        hook.trainer = SimpleNamespace(iter=0, model=build_model(cfg))
        hook.before_train()
        heads = hook.trainer.model.roi_heads
        torch.save({"score": heads.box_predictor.cls_loss.mean_score,
                    "filled": heads.memory.filled}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_fill_their_memories_and_share_the_mean_scores(small_synthetic, tmp_path):
    """Each rank forwards its share (2 images per class each, batches of IMS_PER_BATCH / 2),
    fills every class's memory; the mean scores are all-reduced: the same on both ranks."""
    mp.spawn(_two_rank_worker, args=(small_synthetic, str(tmp_path)), nprocs=2)
    states = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    for state in states:
        assert (state["filled"] > 0).all() and (state["score"][:-1] != 0.01).all()
    torch.testing.assert_close(states[0]["score"], states[1]["score"], rtol=0, atol=0)
