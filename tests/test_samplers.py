"""mmdetection-style repeat-factor sampling ("ceil") and schedules in epochs."""
import ast
import collections
import itertools
import json
import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.data.samplers import RepeatFactorTrainingSampler

import seesaw_ecm.data.samplers
import seesaw_ecm.epochs
from seesaw_ecm import add_seesaw_ecm_config
from seesaw_ecm.data.datasets import load_lvis_format_json, register_lvis_format
from seesaw_ecm.data.samplers import CeilRepeatSampler, repeat_counts
from seesaw_ecm.epochs import derive_schedule, plan_training
from seesaw_ecm.errors import SeesawEcmError


def official_ceil_counts(json_file, threshold):
    """mmdetection's ClassBalancedDataset, re-derived from the json alone: images without
    annotations are dropped (filter_empty_gt); f_c = fraction of the remaining images that contain
    c; image i is repeated ceil(max over its classes of max(1, sqrt(t / f_c))) times."""
    data = json.load(open(json_file))
    cats = collections.defaultdict(set)
    for a in data["annotations"]:
        cats[a["image_id"]].add(a["category_id"])
    images = [im["id"] for im in data["images"] if cats[im["id"]]]
    freq = collections.Counter(c for i in images for c in cats[i])
    rep = {c: max(1.0, math.sqrt(threshold / (n / len(images)))) for c, n in freq.items()}
    return {i: math.ceil(max(rep[c] for c in cats[i])) for i in images}


@pytest.fixture(scope="module")
def dicts(small_synthetic):
    return [d for d in load_lvis_format_json(small_synthetic["train_json"], "") if d["annotations"]]


@pytest.mark.parametrize("threshold", [1e-3, 0.05, 0.2, 0.6])
def test_repeat_counts_match_an_independent_computation(small_synthetic, dicts, threshold):
    expected = official_ceil_counts(small_synthetic["train_json"], threshold)
    counts = repeat_counts(dicts, threshold)
    assert {d["image_id"]: int(c) for d, c in zip(dicts, counts)} == expected
    if threshold > 0.01:  # the thresholds that oversample something on 160 images
        assert counts.max() >= 2


def test_one_epoch_holds_each_image_its_count_times_plus_the_padding(dicts):
    counts = repeat_counts(dicts, 0.2)
    size = int(counts.sum()) + 5
    sampler = CeilRepeatSampler(counts, size, seed=3)
    epoch = list(itertools.islice(iter(sampler), size))
    assert epoch == sampler.epoch(0)
    seen = torch.bincount(torch.tensor(epoch), minlength=len(counts))
    extra = torch.bincount(torch.tensor(epoch[:5]), minlength=len(counts))  # padding = first 5
    assert torch.equal(seen, counts + extra)
    assert sampler.epoch(1) != sampler.epoch(0)  # reshuffled every epoch
    assert CeilRepeatSampler(counts, size, seed=3).epoch(1) == sampler.epoch(1)  # by seed
    assert CeilRepeatSampler(counts, size, seed=4).epoch(1) != sampler.epoch(1)


def _rank_streams(counts, size, world, start, n, monkeypatch):
    streams = []
    for rank in range(world):
        monkeypatch.setattr("detectron2.utils.comm.get_rank", lambda r=rank: r)
        monkeypatch.setattr("detectron2.utils.comm.get_world_size", lambda: world)
        sampler = CeilRepeatSampler(counts, size, seed=7, start=start)
        streams.append(list(itertools.islice(iter(sampler), n)))
    return streams


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ranks_share_each_epoch_without_duplicates_or_gaps(dicts, world, monkeypatch):
    counts = repeat_counts(dicts, 0.2)
    batch = 8
    size = math.ceil(int(counts.sum()) / batch) * batch
    epochs = 3
    streams = _rank_streams(counts, size, world, 0, epochs * size // world, monkeypatch)
    single = CeilRepeatSampler(counts, size, seed=7)
    for e in range(epochs):
        # each rank's share of epoch e, interleaved back, is epoch e of the global stream
        shares = [s[e * size // world:(e + 1) * size // world] for s in streams]
        merged = [shares[p % world][p // world] for p in range(size)]
        assert merged == single.epoch(e)


@pytest.mark.parametrize("world", [1, 2])
def test_resume_yields_the_uninterrupted_stream(dicts, world, monkeypatch):
    counts = repeat_counts(dicts, 0.2)
    batch, size = 4, 4 * math.ceil(int(counts.sum()) / 4)
    full = _rank_streams(counts, size, world, 0, 3 * size, monkeypatch)
    for k in (1, 7, size // batch, 2 * size // batch + 3):  # iterations done before the stop
        resumed = _rank_streams(counts, size, world, k * batch, 50, monkeypatch)
        for rank in range(world):
            assert resumed[rank] == full[rank][k * batch // world:][:50]


def test_schedule_derivation_counts_aspect_groups_and_rounds_up(dicts):
    counts = repeat_counts(dicts, 0.2)
    wide = [d["width"] > d["height"] for d in dicts]
    groups = [sum(int(c) for c, w in zip(counts, wide) if w == g) for g in (False, True)]
    for batch in (2, 16, 48):
        s = derive_schedule(dicts, sampling="ceil", threshold=0.2, ims_per_batch=batch,
                            epochs=24, epoch_steps=(16, 22))
        ipe = sum(-(-n // batch) for n in groups)
        assert (s.images, s.iters_per_epoch) == (sum(groups), ipe)
        assert (s.max_iter, s.steps) == (24 * ipe, (16 * ipe, 22 * ipe))
    none = derive_schedule(dicts, sampling="none", threshold=0.2, ims_per_batch=16, epochs=12)
    assert none.images == len(dicts)
    stochastic = derive_schedule(dicts, sampling="stochastic", threshold=0.2, ims_per_batch=16,
                                 epochs=12)
    r = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(dicts, 0.2)
    assert stochastic.images == pytest.approx(float(r.double().sum()))
    assert none.images < stochastic.images < sum(groups)


@pytest.fixture
def train_cfg(make_cfg):
    """train_cfg(name, *opts): training on dataset `name`, 4 images per batch, then `opts`."""
    return lambda name, *opts: make_cfg(None, "DATASETS.TRAIN", f"('{name}',)",
                                        "SOLVER.IMS_PER_BATCH", "4", *opts)


@pytest.fixture(scope="module")
def registered(small_synthetic):
    name = "sampler_test_train"
    if name not in DatasetCatalog.list():
        register_lvis_format(name, small_synthetic["train_json"], small_synthetic["image_root"])
    return name


def test_plan_sets_max_iter_and_steps_and_reads_the_data_once(
        registered, dicts, train_cfg, monkeypatch):
    rfs = ["DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler",
           "DATALOADER.REPEAT_THRESHOLD", "0.2", "DATALOADER.REPEAT_ROUNDING", "ceil"]
    reads = []
    read = seesaw_ecm.epochs.train_dataset_dicts
    monkeypatch.setattr(seesaw_ecm.epochs, "train_dataset_dicts",
                        lambda cfg: reads.append(cfg) or read(cfg))
    plan = plan_training(
        train_cfg(registered, *rfs, "SOLVER.EPOCHS", "3", "SOLVER.EPOCH_STEPS", "(2,)"))
    expected = derive_schedule(dicts, sampling="ceil", threshold=0.2, ims_per_batch=4, epochs=3,
                               epoch_steps=(2,))
    assert plan.schedule == expected and len(reads) == 1
    derived = plan.cfg.SOLVER
    assert (derived.MAX_ITER, derived.STEPS) == (expected.max_iter, expected.steps)
    assert plan.ceil[1].epoch_size == expected.epoch_size  # the loader's sampler, same read
    off = train_cfg(registered, *rfs)
    no_epochs = plan_training(off)  # EPOCHS 0: MAX_ITER as set; "ceil" still reads once
    assert no_epochs.cfg is off and no_epochs.schedule is None and len(reads) == 2
    plain = train_cfg(registered)  # no epochs, detectron2's sampler: nothing to read
    assert plan_training(plain) == seesaw_ecm.epochs.TrainPlan(plain) and len(reads) == 2


@pytest.mark.parametrize("opts, message", [
    (["DATALOADER.REPEAT_ROUNDING", "floor"], "REPEAT_ROUNDING 'floor' is unknown"),
    (["DATALOADER.REPEAT_ROUNDING", "ceil"], "SAMPLER_TRAIN is 'TrainingSampler'"),
    (["SOLVER.EPOCH_STEPS", "(8,)"], "needs SOLVER.EPOCHS > 0"),
    (["SOLVER.EPOCHS", "12", "SOLVER.EPOCH_STEPS", "(11, 8)"], "must increase"),
    (["SOLVER.EPOCHS", "12", "SOLVER.EPOCH_STEPS", "(12,)"], "strictly between 0"),
    (["SOLVER.EPOCHS", "12", "SOLVER.REFERENCE_WORLD_SIZE", "8"], "REFERENCE_WORLD_SIZE"),
])
def test_bad_sampler_or_epoch_keys_are_clear_errors(registered, opts, message, train_cfg):
    with pytest.raises(SeesawEcmError, match=message):
        plan_training(train_cfg(registered, *opts))


@pytest.fixture(scope="module")
def tiny_train(small_synthetic, tmp_path_factory):
    """The first 8 annotated images of the small set, registered as "sampler_tiny_train"."""
    data = json.load(open(small_synthetic["train_json"]))
    keep = sorted({a["image_id"] for a in data["annotations"]})[:8]
    data["images"] = [im for im in data["images"] if im["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    path = tmp_path_factory.mktemp("tiny") / "train.json"
    path.write_text(json.dumps(data))
    name = "sampler_tiny_train"
    if name not in DatasetCatalog.list():
        register_lvis_format(name, str(path), small_synthetic["image_root"])
    return name


def _trainer_cfg(name, out_dir, *opts):
    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    cfg.merge_from_file("configs/Synthetic/mask_rcnn_R18_FPN_ce.yaml")
    cfg.merge_from_list([
        "DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()", "MODEL.ROI_HEADS.NUM_CLASSES",
        "12", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "2", "DATALOADER.NUM_WORKERS",
        "0", "DATALOADER.ASPECT_RATIO_GROUPING", "False", "MODEL.DEVICE", "cpu",
        "DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler",
        "DATALOADER.REPEAT_THRESHOLD", "0.3", "OUTPUT_DIR", str(out_dir), *opts])
    return cfg


def _batches(loader_iter, n):
    return [[d["image_id"] for d in next(loader_iter)] for _ in range(n)]


def test_ceil_train_sampler_holds_the_counts_padded_to_the_schedule(tiny_train, tmp_path):
    cfg = _trainer_cfg(tiny_train, tmp_path, "DATALOADER.REPEAT_ROUNDING", "ceil")
    dicts, sampler = plan_training(cfg).ceil
    counts = repeat_counts(dicts, 0.3)
    schedule = derive_schedule(dicts, sampling="ceil", threshold=0.3, ims_per_batch=2, epochs=1)
    assert sampler.epoch_size == schedule.epoch_size >= int(counts.sum())
    pad = sampler.epoch_size - int(counts.sum())
    epoch = torch.tensor(sampler.epoch(0))
    padding = torch.bincount(epoch[:pad], minlength=len(counts))  # the epoch's first `pad`
    assert torch.equal(torch.bincount(epoch, minlength=len(counts)) - padding, counts)
    stochastic = _trainer_cfg(tiny_train, tmp_path, "DATALOADER.REPEAT_ROUNDING", "stochastic")
    assert plan_training(stochastic).ceil is None  # detectron2 builds its own sampler


def test_samplers_do_not_import_the_epoch_schedule():
    """The schedule reads the samplers' definition of an epoch, never the other way round."""
    source = open(seesaw_ecm.data.samplers.__file__).read()
    imported = [n.module for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)]
    assert imported and not any("epochs" in (m or "") or "engine" in (m or "") for m in imported)


@pytest.mark.parametrize("rounding", ["ceil", "stochastic"])
def test_trainer_resumes_the_sampler_stream_where_it_stopped(tiny_train, tmp_path, rounding):
    from detectron2.utils.env import seed_all_rng

    from seesaw_ecm.engine import Trainer

    cfg = _trainer_cfg(tiny_train, tmp_path, "DATALOADER.REPEAT_ROUNDING", rounding)
    seed_all_rng(1)  # what train_net.py's default_setup does with SEED 1
    uninterrupted = _batches(iter(Trainer.build_train_loader(cfg)), 12)
    seed_all_rng(1)
    stopped = Trainer(cfg)
    stopped.iter = 6  # the checkpoint of iteration 6 (the trainer's state carries it)
    stopped.checkpointer.save("model_0000006")
    seed_all_rng(1)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 7
    resumed = _batches(trainer._trainer._data_loader_iter, 5)
    assert resumed == uninterrupted[7:]  # detectron2's sampler too (it would replay [:5])
    assert resumed != uninterrupted[:5]


@pytest.mark.slow
def test_epoch_training_logs_epochs_and_images_seen(tiny_train, tmp_path, caplog):
    from seesaw_ecm.engine import Trainer

    cfg = _trainer_cfg(tiny_train, tmp_path, "DATALOADER.REPEAT_ROUNDING", "ceil",
                       "SOLVER.EPOCHS", "2", "SOLVER.EPOCH_STEPS", "(1,)")
    with caplog.at_level("INFO", logger="seesaw_ecm.epochs"):
        trainer = Trainer(cfg)
    assert "Epoch schedule (ceil sampling of ('sampler_tiny_train',))" in caplog.text
    schedule = trainer.epoch_schedule
    ipe = schedule.iters_per_epoch
    assert schedule.images > 8 and trainer.max_iter == 2 * ipe
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.SOLVER.BASE_LR)
    sched, lrs = Trainer.build_lr_scheduler(trainer.cfg, opt), []
    for _ in range(trainer.max_iter):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    # warm-up in iterations, then the drop at the first iteration of epoch 2
    assert lrs[2:ipe] == [pytest.approx(0.02)] * (ipe - 2)
    assert lrs[ipe:] == [pytest.approx(0.002)] * ipe
    trainer.resume_or_load(resume=False)
    with caplog.at_level("INFO", logger="seesaw_ecm.epochs"):
        trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.json")]
    rows = [r for r in rows if "images_seen" in r]
    assert rows[-1]["iteration"] == 2 * ipe - 1 and rows[-1]["images_seen"] == 4 * ipe
    assert rows[-1]["epoch"] == pytest.approx(2.0)
    assert f"Epoch 1 finished at iteration {ipe}: {2 * ipe:,} images seen" in caplog.text


def test_schedule_command_prints_the_trainer_derivation(small_synthetic, dicts, capsys):
    import runpy

    schedule_tool = runpy.run_path("tools/schedule.py")  # defines main() without running it
    schedule_tool["main"](["--json", small_synthetic["train_json"], "--threshold", "0.2",
                           "--batch", "16", "--epochs", "24", "--steps", "16", "22",
                           "--draw-epochs", "3"])
    out = capsys.readouterr().out
    for sampling in ("none", "stochastic", "ceil"):
        s = derive_schedule(dicts, sampling=sampling, threshold=0.2, ims_per_batch=16, epochs=24,
                            epoch_steps=(16, 22))
        row = next(line for line in out.splitlines() if line.startswith(sampling + " "))
        assert row.split()[1:4] == [f"{s.images:,.1f}", f"{s.iters_per_epoch:,}",
                                    f"{s.max_iter:,}"]
        assert row.endswith(str(s.steps))
    drawn = [int(n.replace(",", "")) for n in out.split("seed 0): ")[1].split(", ")]
    ceil = derive_schedule(dicts, sampling="ceil", threshold=0.2, ims_per_batch=16, epochs=1)
    assert len(drawn) == 3 and all(len(dicts) <= n <= ceil.images for n in drawn)
