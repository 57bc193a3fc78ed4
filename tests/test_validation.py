"""The validation pass before the first iteration (seesaw_ecm/validation.py) and the bad-input
messages of the README's "Bad input" table: checks run as functions on a small synthetic set,
plus a few end-to-end train_net.py runs (slow) that must exit 2 with one message, no traceback,
and nothing written."""
import ast
import copy
import glob
import inspect
import itertools
import json
import os
import pickle
import shutil
import subprocess
import sys
import threading

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.utils import comm

from seesaw_ecm import add_seesaw_ecm_config
from seesaw_ecm.data import image_check
from seesaw_ecm.data.datasets import register_from_cfg, register_lvis_format
from seesaw_ecm.data.image_check import image_file_problems
from seesaw_ecm.data.mapper import CheckedDatasetMapper, ImageReadError
from seesaw_ecm.data.statistics import class_statistics
from seesaw_ecm.distributed import on_main_process
from seesaw_ecm.errors import SeesawEcmError
from seesaw_ecm.gradient_balance import check_period
import seesaw_ecm
from seesaw_ecm.modeling.cls_loss import LOSS_SPECS, build_cls_loss
from seesaw_ecm.validation import (CONFIG_CHECKS, DATASET_CHECKS, LOSS_ARGUMENTS,
                                   check_keys_the_model_reads, find_problems, validate_run)

SEESAW = "configs/Synthetic/mask_rcnn_R18_FPN_seesaw.yaml"
NUM_CLASSES = 12  # the small_synthetic fixture
_names = itertools.count()


def register(json_file, image_root):
    """Register an LVIS-format file under a fresh name; returns the name."""
    name = f"valid_{next(_names)}"
    register_lvis_format(name, json_file, image_root)
    return name


@pytest.fixture(scope="module")
def small(small_synthetic):
    """(train name, test name, the fixture's paths), registered once."""
    d = small_synthetic
    return register(d["train_json"], d["image_root"]), register(d["val_json"], d["image_root"]), d


def make_cfg(small, *opts, config=SEESAW):
    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    cfg.merge_from_file(config)
    train, test, _ = small
    cfg.merge_from_list(["DATASETS.TRAIN", (train,), "DATASETS.TEST", (test,),
                         "MODEL.ROI_HEADS.NUM_CLASSES", NUM_CLASSES, *opts])
    return cfg


def mutated_test_set(small, tmp_path, mutate):
    """A copy of the small test json changed by `mutate(data)`, registered; its name."""
    _, _, d = small
    data = json.load(open(d["val_json"]))
    mutate(data)
    path = tmp_path / "val.json"
    path.write_text(json.dumps(data))
    return register(str(path), d["image_root"])


def problems_of(small, *opts, config=SEESAW, eval_only=False):
    return find_problems(make_cfg(small, *opts, config=config), eval_only)


def test_good_input_has_no_problem(small):
    assert problems_of(small) == []
    assert problems_of(small, eval_only=True) == []


@pytest.mark.parametrize("config", [
    "mask_rcnn_R18_FPN_ce", "mask_rcnn_R18_FPN_cosine_ce", "mask_rcnn_R18_FPN_seesaw",
    "mask_rcnn_R18_FPN_ecm", "mask_rcnn_R18_FPN_federated", "cascade_mask_rcnn_R18_FPN_seesaw",
    "htc_lite_R18_FPN_seesaw",
])
@pytest.mark.parametrize("num_classes", [NUM_CLASSES - 1, NUM_CLASSES + 5])
def test_class_count_is_checked_for_every_loss_and_head(small, config, num_classes):
    train, test, _ = small
    found = problems_of(small, "MODEL.ROI_HEADS.NUM_CLASSES", num_classes,
                        config=f"configs/Synthetic/{config}.yaml")
    assert found == [f"Datasets {train!r}, {test!r} have {NUM_CLASSES} classes but "
                     f"MODEL.ROI_HEADS.NUM_CLASSES is {num_classes}; set "
                     f"MODEL.ROI_HEADS.NUM_CLASSES {NUM_CLASSES}."]


def test_eval_only_checks_test_sets_only(small):
    found = problems_of(small, "DATASETS.TRAIN", ("no_such_dataset",), eval_only=True)
    assert found == []
    found = problems_of(small, "DATASETS.TRAIN", ("no_such_dataset",))
    assert found == ["Dataset 'no_such_dataset' in DATASETS.TRAIN is not registered; register it "
                     "with --dataset NAME=JSON_FILE:IMAGE_ROOT (DATASETS.LVIS_FORMAT) or use a "
                     "built-in name."]


def test_other_class_names_in_the_test_set(small, tmp_path):
    def rename(data):
        data["categories"][3]["name"] = "renamed"

    test = mutated_test_set(small, tmp_path, rename)
    found = problems_of(small, "DATASETS.TEST", (test,))
    assert len(found) == 1 and f"Dataset {test!r} and {small[0]!r} have other class names " \
        "(class 3: 'renamed' vs" in found[0]


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["categories"][2].pop("frequency"),
     "have no valid LVIS 'frequency' ('r', 'c' or 'f') but others have one"),
    (lambda d: d["categories"][2].update(frequency="x"), "have no valid LVIS 'frequency'"),
    (lambda d: d["annotations"][4].pop("area"), "have no numeric 'area'"),
    (lambda d: d["annotations"][4].update(area="12"), "have no numeric 'area'"),
])
def test_fields_the_lvis_evaluation_reads(small, tmp_path, mutate, message):
    test = mutated_test_set(small, tmp_path, mutate)
    found = problems_of(small, "DATASETS.TEST", (test,))
    assert len(found) == 1 and found[0].startswith(f"Test dataset {test!r}: ")
    assert message in found[0]
    assert problems_of(small, "DATASETS.TRAIN", (test,), "DATASETS.TEST", ()) == []  # train: ok


def test_official_backend_needs_the_image_lists(small, tmp_path):
    def drop(data):
        for im in data["images"]:
            im.pop("neg_category_ids", None)

    test = mutated_test_set(small, tmp_path, drop)
    assert problems_of(small, "DATASETS.TEST", (test,)) == []  # fast: missing = empty
    found = problems_of(small, "DATASETS.TEST", (test,), "TEST.LVIS_EVAL_BACKEND", "lvis")
    assert len(found) == 1 and "lack 'neg_category_ids' or 'not_exhaustive_category_ids', which " \
        "TEST.LVIS_EVAL_BACKEND 'lvis' reads" in found[0]


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["images"][1].update(id=d["images"][0]["id"]), "image id {} is used twice"),
    (lambda d: d["annotations"][1].update(id=d["annotations"][0]["id"]),
     "annotation id {} is used twice"),
    (lambda d: d["categories"][1].update(id=d["categories"][0]["id"]),
     "category id {} is used twice"),
])
def test_duplicate_ids(small, tmp_path, mutate, message):
    test = mutated_test_set(small, tmp_path, mutate)
    found = problems_of(small, "DATASETS.TEST", (test,))
    dup = {"image": "images", "annotation": "annotations", "category": "categories"}[
        message.split()[0]]
    first_id = json.load(open(small[2]["val_json"]))[dup][0]["id"]
    assert len(found) == 1 and message.format(first_id) in found[0] and "Fix the file" in found[0]


def test_duplicate_image_ids_of_any_loader(small):
    """Datasets not loaded by the LVIS-format loader: image ids of the records, category ids in
    range when the metadata has no class names."""
    records = copy.deepcopy(DatasetCatalog.get(small[1]))
    records[1]["image_id"] = records[0]["image_id"]
    records[2]["annotations"][0]["category_id"] = NUM_CLASSES
    DatasetCatalog.register("valid_custom", lambda: records)
    found = problems_of(small, "DATASETS.TEST", ("valid_custom",),
                        "DATASETS.CHECK_IMAGE_FILES", False)
    assert found == [
        f"Dataset 'valid_custom': image ids {records[0]['image_id']} are used more than once; "
        "make them unique.",
        f"Dataset 'valid_custom' has category ids {NUM_CLASSES} outside [0, {NUM_CLASSES}): the "
        "dataset has more classes than MODEL.ROI_HEADS.NUM_CLASSES; set it to the number of "
        "classes."]


def test_missing_and_unreadable_image_files(small, tmp_path):
    _, test, d = small
    root = tmp_path / "images"
    records = DatasetCatalog.get(test)
    files = [root / os.path.relpath(r["file_name"], d["image_root"]) for r in records]
    for record, path in zip(records, files):  # a copy of the image tree
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(record["file_name"], path)
    files[0].unlink()
    files[1].chmod(0)
    files[2].unlink()
    files[2].mkdir()  # a folder is no image file
    test = register(d["val_json"], str(root) + os.sep)
    found = problems_of(small, "DATASETS.TEST", (test,))
    bad = [str(f) for f in files[:3]]
    if os.access(bad[1], os.R_OK):  # root reads any file
        bad.pop(1)
    assert len(found) == 1 and found[0].startswith(
        f"Dataset {test!r}: {len(bad)} of {len(files)} image files are missing or unreadable: "
        f"{bad[0]} (FileNotFoundError: No such file or directory), ")
    assert all(p in found[0] for p in bad) and found[0].endswith(
        ". Check the dataset's image root (--dataset NAME=JSON_FILE:IMAGE_ROOT), or set "
        "DATASETS.CHECK_IMAGE_FILES False to skip this check.")
    assert problems_of(small, "DATASETS.TEST", (test,), "DATASETS.CHECK_IMAGE_FILES", False) == []


def test_image_check_keeps_order_across_chunks(small, tmp_path):
    records = [dict(r) for r in DatasetCatalog.get(small[1])[:25]]
    for i, r in enumerate(records):
        if i % 3 == 0:
            r["file_name"] = str(tmp_path / f"{i}.jpg")
    expected = [r["file_name"] for i, r in enumerate(records) if i % 3 == 0]
    for chunk in (4, 200):
        found = image_file_problems(records, chunk=chunk)
        assert [r["file_name"] for r, _ in found] == expected
        assert {kind for _, (kind, _) in found} == {image_check.MISSING}


@pytest.mark.parametrize("opts, message", [
    (("TEST.LVIS_EVAL_BACKEND", "lvisapi"),
     "TEST.LVIS_EVAL_BACKEND 'lvisapi' is unknown; choose one of 'fast', 'lvis'."),
    (("MODEL.LONG_TAIL.LOSS", "seesaws"), "MODEL.LONG_TAIL.LOSS: Unknown loss 'seesaws'"),
    (("MODEL.LONG_TAIL.OBJECTNESS", False),
     "MODEL.LONG_TAIL.LOSS 'seesaw' with OBJECTNESS False is not a valid combination"),
    (("MODEL.LONG_TAIL.LOSS", "ecm"),
     "MODEL.LONG_TAIL.LOSS 'ecm' with OBJECTNESS True is not a valid combination"),
    (("MODEL.LONG_TAIL.CLASSIFIER", "cos"), "MODEL.LONG_TAIL.CLASSIFIER 'cos': valid choices"),
    (("MODEL.LONG_TAIL.STATISTICS_FROM", "weights"),
     "MODEL.LONG_TAIL.STATISTICS_FROM 'weights': valid choices are 'train', 'checkpoint'"),
    (("MODEL.LONG_TAIL.ECM.STATISTIC", "instances"),
     "MODEL.LONG_TAIL.ECM.STATISTIC 'instances': valid"),
    (("MODEL.LONG_TAIL.STATISTIC", "instances"),  # the deprecated name: same check
     "MODEL.LONG_TAIL.ECM.STATISTIC 'instances': valid"),
    (("MODEL.LONG_TAIL.GRADIENT_BALANCE.ENABLED", True, "MODEL.LONG_TAIL.GRADIENT_BALANCE.PERIOD",
      0), "MODEL.LONG_TAIL.GRADIENT_BALANCE.PERIOD is 0; it counts the iterations between"),
    (("MODEL.ROI_HEADS.NAME", "LongTailRoIHeads"), "MODEL.ROI_HEADS.NAME 'LongTailRoIHeads' is "
     "not registered; choose one of"),
    (("MODEL.META_ARCHITECTURE", "HTCLite"), "MODEL.META_ARCHITECTURE 'HTCLite' is not registered"),
    (("MODEL.ROI_HEADS.NAME", "TopKHeads", "TEST.AP_FIXED.ENABLED", True),
     "MODEL.ROI_HEADS.NAME 'TopKHeads' is not registered"),
    (("DATASETS.TRAIN", ()), "DATASETS.TRAIN is empty"),
    (("SOLVER.CLIP_GRADIENTS.ENABLED", True, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "global"),
     "SOLVER.CLIP_GRADIENTS.CLIP_TYPE 'global' is unknown; choose one of 'value', 'norm', "
     "'full_model'."),
    (("MODEL.LONG_TAIL.LOSS", "loce", "MODEL.LONG_TAIL.OBJECTNESS", False),
     'MODEL.LONG_TAIL.LOSS "loce" needs MODEL.ROI_HEADS.NAME "LOCEROIHeads"'),
    (("MODEL.LONG_TAIL.ECM.WEIGHT_DTYPE", "float16"),
     "MODEL.LONG_TAIL.ECM.WEIGHT_DTYPE 'float16': valid choices are 'float64', 'float32'."),
    (("MODEL.ROI_HEADS.NAME", "StandardROIHeads"),
     "MODEL.LONG_TAIL.LOSS 'seesaw' is ignored by MODEL.ROI_HEADS.NAME 'StandardROIHeads' (it "
     "trains its own softmax CE): set MODEL.ROI_HEADS.NAME 'LongTailROIHeads'"),
    (("MODEL.RPN.LOW_QUALITY_MIN_IOU", 0.3),
     "MODEL.RPN.LOW_QUALITY_MIN_IOU 0.3 is ignored by MODEL.PROPOSAL_GENERATOR.NAME 'RPN' (no "
     "floor on its low-quality matches): set MODEL.PROPOSAL_GENERATOR.NAME 'LowQualityFloorRPN'"),
    (("MODEL.PROPOSAL_GENERATOR.NAME", "LowQualityFloorRPN", "MODEL.RPN.LOW_QUALITY_MIN_IOU", 1.5),
     "MODEL.RPN.LOW_QUALITY_MIN_IOU must be in [0, 1]"),
    (("MODEL.ROI_MASK_HEAD.NORMED_INIT", "kaiming"),
     "MODEL.ROI_MASK_HEAD.NORMED_INIT 'kaiming': valid choices are 'pytorch', 'kaiming_normal'."),
])
def test_config_problems(small, opts, message):
    found = problems_of(small, *opts)
    assert len(found) == 1 and found[0].startswith(message), found


def test_keys_the_model_reads_pass_where_they_are_read(small):
    assert problems_of(small, "MODEL.ROI_HEADS.NAME", "StandardROIHeads",
                       "MODEL.LONG_TAIL.LOSS", "ce") == []
    assert problems_of(small, "MODEL.PROPOSAL_GENERATOR.NAME", "LowQualityFloorRPN",
                       "MODEL.RPN.LOW_QUALITY_MIN_IOU", 0.3) == []
    for path in sorted(glob.glob("configs/LVISv1/*.yaml")):  # every recipe sets what it reads
        cfg = get_cfg()
        add_seesaw_ecm_config(cfg)
        cfg.merge_from_file(path)
        assert check_keys_the_model_reads(cfg, False) == [], path


def _bad_loss_arguments():
    """(loss, key, bad value) for every row of LOSS_ARGUMENTS."""
    bad = {"FEDERATED.NUM_CLASSES": 0, "PRIOR_PROB": 1.0, "BAGS.BIN_SPLIT": (100, 10),
           "GOL.LOGIT_CLAMP": (10.0, -4.0)}
    return [(loss, key, bad[key]) for loss, rows in LOSS_ARGUMENTS.items() for key, *_ in rows]


@pytest.mark.parametrize("loss, key, bad", _bad_loss_arguments())
def test_loss_arguments_are_checked_as_the_loss_checks_them(small, loss, key, bad):
    """Validation rejects what the loss module rejects when the model builds it (and names the
    key), without building the loss."""
    opts = ("MODEL.LONG_TAIL.LOSS", loss, "MODEL.LONG_TAIL.OBJECTNESS", False)
    cfg = make_cfg(small, *opts, "MODEL.LONG_TAIL.STATISTICS_FROM", "checkpoint")
    build_cls_loss(cfg)  # the shipped value passes both
    assert problems_of(small, *opts) == []
    cfg.merge_from_list([f"MODEL.LONG_TAIL.{key}", bad])
    with pytest.raises(ValueError):
        build_cls_loss(cfg)
    found = problems_of(small, *opts, f"MODEL.LONG_TAIL.{key}", bad)
    assert len(found) == 1 and found[0].startswith(f"MODEL.LONG_TAIL.{key} must be "), found


def test_validation_does_not_build_the_loss(small, monkeypatch):
    built = []
    for name, spec in LOSS_SPECS.items():
        monkeypatch.setitem(LOSS_SPECS, name, spec._replace(build=built.append))
    for loss, objectness in (("seesaw", True), ("ecm", False), ("bags", False)):
        assert problems_of(small, "MODEL.LONG_TAIL.LOSS", loss,
                           "MODEL.LONG_TAIL.OBJECTNESS", objectness) == []
    assert built == []


def test_every_check_is_registered_and_says_what_it_checks():
    checks = CONFIG_CHECKS + DATASET_CHECKS
    assert len(set(checks)) == len(checks) >= 10
    for check in checks:
        assert check.__doc__ and len(check.__doc__.split()) >= 3, check.__name__
        assert list(inspect.signature(check).parameters) == ["cfg", "eval_only"], check.__name__


def test_validation_reaches_no_trainer():
    """seesaw_ecm.validation imports, directly or through the modules it imports, neither the
    trainer (seesaw_ecm.engine) nor train_net."""
    package = os.path.dirname(seesaw_ecm.__file__)
    seen, todo = set(), ["seesaw_ecm.validation"]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run too
        path = os.path.join(package, *parts[1:])
        path = os.path.join(path, "__init__.py") if os.path.isdir(path) else path + ".py"
        if not os.path.exists(path):
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom):
                base = parts if os.path.basename(path) == "__init__.py" else parts[:-1]
                base = base[:len(base) - node.level + 1] if node.level else []
                name = ".".join(base + ([node.module] if node.module else []))
                todo += [name] + [f"{name}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
    assert "seesaw_ecm.validation" in seen and "seesaw_ecm.modeling.cls_loss" in seen
    assert "seesaw_ecm.engine" not in seen and "train_net" not in seen


def test_htc_lite_context_needs_its_meta_architecture(small):
    config = "configs/Synthetic/htc_lite_R18_FPN_seesaw.yaml"
    assert problems_of(small, config=config) == []
    found = problems_of(small, "MODEL.META_ARCHITECTURE", "GeneralizedRCNN", config=config)
    assert len(found) == 1 and "only MODEL.META_ARCHITECTURE 'HTCLiteRCNN' provides" in found[0]
    assert problems_of(small, "MODEL.META_ARCHITECTURE", "GeneralizedRCNN",
                       "MODEL.HTC_LITE.CONTEXT", False, config=config) == []


def test_every_problem_in_one_message(small):
    cfg = make_cfg(small, "TEST.LVIS_EVAL_BACKEND", "nope", "MODEL.LONG_TAIL.LOSS", "nope",
                   "DATASETS.TEST", ("no_such_test_set",))
    with pytest.raises(SeesawEcmError) as e:
        validate_run(cfg)
    lines = str(e.value).splitlines()
    assert lines[0] == "3 problems in the input:" and len(lines) == 4
    assert "TEST.LVIS_EVAL_BACKEND 'nope'" in lines[1] and "MODEL.LONG_TAIL.LOSS" in lines[2]
    assert "'no_such_test_set' in DATASETS.TEST is not registered" in lines[3]
    assert getattr(e.value, "all_ranks") is True


def test_gradient_balance_period_zero():
    with pytest.raises(SeesawEcmError, match="PERIOD is 0; .* must be >= 1"):
        check_period(0)
    check_period(1)


def test_changed_image_root_of_a_registered_name(small, tmp_path):
    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    json_file = small[2]["val_json"]
    cfg.DATASETS.LVIS_FORMAT = [f"valid_root={json_file}:{tmp_path}/a/"]
    register_from_cfg(cfg)
    register_from_cfg(cfg)  # same file and root: idempotent
    cfg.DATASETS.LVIS_FORMAT = [f"valid_root={json_file}:{tmp_path}/b/"]
    with pytest.raises(SeesawEcmError, match=f"already registered with annotation file "
                       f"{json_file} and image root {tmp_path}/a/, not {json_file} and "
                       f"{tmp_path}/b/; choose another name"):
        register_from_cfg(cfg)


# --- an image met later, in the data loader ----------------------------------------------------

@pytest.fixture
def mapper_and_record(small):
    cfg = make_cfg(small)
    record = copy.deepcopy(DatasetCatalog.get(small[0])[0])
    return CheckedDatasetMapper(cfg, True), record


def _load_through_workers(mapper, records, num_workers):
    loader = torch.utils.data.DataLoader(records, batch_size=1, num_workers=num_workers,
                                         collate_fn=lambda batch: [mapper(r) for r in batch])
    return list(loader)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_missing_image_in_the_loader_is_one_message(mapper_and_record, tmp_path, num_workers):
    mapper, record = mapper_and_record
    assert mapper(copy.deepcopy(record))["image"].shape[0] == 3  # the good record maps
    record["file_name"] = str(tmp_path / "gone.png")
    with pytest.raises(ImageReadError) as e:
        _load_through_workers(mapper, [record], num_workers)
    assert str(e.value) == (
        f"Image {record['file_name']} could not be read (FileNotFoundError: [Errno 2] No such "
        f"file or directory: '{record['file_name']}'). Restore the file, or remove its image from "
        "the annotation file; DATASETS.CHECK_IMAGE_FILES True finds missing files before "
        "training.")


@pytest.mark.parametrize("content, message", [
    (b"not an image", "could not be read \\(UnidentifiedImageError: .*Restore the file"),
    # a real image of another size than the record says: the json is wrong, not the file
    (None, "has another size than its record \\(SizeMismatchError: .*\\)\\. Correct "
           "width/height in the json"),
])
def test_unreadable_image_in_the_loader(mapper_and_record, tmp_path, content, message):
    mapper, record = mapper_and_record
    if content is None:
        record["height"] += 1
    else:
        record["file_name"] = str(tmp_path / "bad.png")
        open(record["file_name"], "wb").write(content)
    with pytest.raises(ImageReadError, match=f"Image {record['file_name']} {message}"):
        mapper(record)


# --- end to end: train_net.py ------------------------------------------------------------------

def run_train_net(small, out_dir, *opts, config=SEESAW, flags=(), num_gpus=1):
    _, _, d = small
    cmd = [sys.executable, "train_net.py", "--config-file", config, "--num-gpus", str(num_gpus),
           *flags, "--dataset", f"e2e_train={d['train_json']}:{d['image_root']}",
           "--dataset", f"e2e_val={d['val_json']}:{d['image_root']}",
           "DATASETS.TRAIN", "('e2e_train',)", "DATASETS.TEST", "('e2e_val',)",
           "MODEL.ROI_HEADS.NUM_CLASSES", str(NUM_CLASSES), "SOLVER.IMS_PER_BATCH", "2",
           "SOLVER.MAX_ITER", "5", "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(out_dir), *opts]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def assert_one_clean_error(proc, message):
    """Exit 2, the message as the only thing on stderr (after warnings), no traceback."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR: ")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("num_gpus", [1, 2])
def test_train_net_wrong_class_count_fails_before_anything(small, tmp_path, num_gpus):
    """The issue's case (NUM_CLASSES one short with the Seesaw config; it used to train to the
    end): exit 2 from the validation pass, before the model is built or OUTPUT_DIR written;
    with two processes both agree and only the main one prints."""
    out = tmp_path / "out"
    proc = run_train_net(small, out, "MODEL.ROI_HEADS.NUM_CLASSES", str(NUM_CLASSES - 1),
                         num_gpus=num_gpus)
    assert_one_clean_error(proc, f"have {NUM_CLASSES} classes but MODEL.ROI_HEADS.NUM_CLASSES is "
                           f"{NUM_CLASSES - 1}; set MODEL.ROI_HEADS.NUM_CLASSES {NUM_CLASSES}.")
    assert not out.exists() and "Starting training" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_train_net_eval_only_bad_test_set_and_backend(small, tmp_path):
    _, _, d = small
    data = json.load(open(d["val_json"]))
    for a in data["annotations"]:
        a.pop("area")
    (tmp_path / "val.json").write_text(json.dumps(data))
    out = tmp_path / "out"
    proc = run_train_net(small, out, "DATASETS.TEST", "('e2e_bad_val',)",
                         "TEST.LVIS_EVAL_BACKEND", "official", flags=(
                             "--eval-only", "--dataset",
                             f"e2e_bad_val={tmp_path / 'val.json'}:{d['image_root']}"))
    assert_one_clean_error(proc, "2 problems in the input:")
    assert "TEST.LVIS_EVAL_BACKEND 'official' is unknown" in proc.stderr
    assert "have no numeric 'area'" in proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_train_net_missing_images_met_in_a_loader_worker(small, tmp_path):
    """Image check skipped: the first image a loader worker reads is missing."""
    _, _, d = small
    out = tmp_path / "out"
    proc = run_train_net(small, out, "DATASETS.CHECK_IMAGE_FILES", "False",
                         "DATALOADER.NUM_WORKERS", "1", "DATASETS.TRAIN", "('e2e_moved',)",
                         flags=("--dataset", f"e2e_moved={d['train_json']}:{tmp_path}/moved/"))
    assert_one_clean_error(proc, f"ERROR: Image {tmp_path}/moved/")
    assert "could not be read (FileNotFoundError" in proc.stderr
    assert not any(f.endswith(".pth") for f in os.listdir(out))  # no checkpoint
    # the same input with the check on: stopped by the validation pass
    proc = run_train_net(small, tmp_path / "out2", "DATASETS.TRAIN", "('e2e_moved',)",
                         flags=("--dataset", f"e2e_moved={d['train_json']}:{tmp_path}/moved/"))
    assert_one_clean_error(proc, f"image files are missing or unreadable: {tmp_path}/moved/")


# --- every rank agrees (the all-gather of the validation pass and of the class statistics) ----

class UnpicklableError(SeesawEcmError):
    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()  # as an exception holding a file or a tensor hook might


def as_rank(monkeypatch, rank, sent, fn, *args):
    """on_main_process(fn, *args) as `rank` of two; the all-gather pickles what rank 0 sends,
    as torch.distributed does (`sent` carries it from the rank-0 call to the rank-1 call).
    Returns the result or the exception raised."""
    monkeypatch.setattr(comm, "is_main_process", lambda: rank == 0)

    def all_gather(data):
        if rank == 0:
            sent.append(pickle.dumps(data))
        return [pickle.loads(sent[0]), data]

    monkeypatch.setattr(comm, "all_gather", all_gather)
    try:
        return on_main_process(fn, *args)
    except Exception as e:  # noqa: BLE001
        return e


def _raise(error):
    raise error


def test_unpicklable_error_on_the_main_process_reaches_every_rank(monkeypatch):
    with pytest.raises(TypeError):
        pickle.dumps(UnpicklableError("x"))  # sent as an object it would never arrive
    sent, error = [], UnpicklableError("Dataset 'x' is bad; fix it.")
    main = as_rank(monkeypatch, 0, sent, _raise, error)
    other = as_rank(monkeypatch, 1, sent, _raise, error)
    assert main is error and type(other) is SeesawEcmError and str(other) == str(error)
    assert main.all_ranks and other.all_ranks  # report_error: printed once, by the main process
    bug = RuntimeError("boom")
    main, other = (as_rank(monkeypatch, r, [], _raise, bug) for r in (0, 1))
    assert main is bug and not main.all_ranks  # a bug keeps its traceback on the main process


def test_success_is_shared(monkeypatch):
    sent = []
    assert as_rank(monkeypatch, 0, sent, lambda: [1, 2]) == [1, 2]
    assert as_rank(monkeypatch, 1, sent, lambda: [3]) == [1, 2]  # rank 1 never runs fn


def test_class_statistics_error_reaches_every_rank(small, monkeypatch):
    cfg = make_cfg(small, "MODEL.ROI_HEADS.NUM_CLASSES", NUM_CLASSES - 1, "OUTPUT_DIR", "")
    sent = []
    main, other = (as_rank(monkeypatch, r, sent, class_statistics, cfg, "instance_count")
                   for r in (0, 1))
    assert isinstance(main, SeesawEcmError) and str(other) == str(main)
    assert f"has {NUM_CLASSES} classes but MODEL.ROI_HEADS.NUM_CLASSES is" in str(main)


def test_train_and_test_sets_with_different_class_counts(small, tmp_path):
    def drop_last_class(data):
        last = max(c["id"] for c in data["categories"])
        data["categories"] = [c for c in data["categories"] if c["id"] != last]
        data["annotations"] = [a for a in data["annotations"] if a["category_id"] != last]
        for im in data["images"]:
            for key in ("neg_category_ids", "not_exhaustive_category_ids"):
                im[key] = [c for c in im.get(key, []) if c != last]

    test = mutated_test_set(small, tmp_path, drop_last_class)
    found = problems_of(small, "DATASETS.TEST", (test,))
    assert found == [f"Dataset {test!r} has {NUM_CLASSES - 1} classes but "
                     f"MODEL.ROI_HEADS.NUM_CLASSES is {NUM_CLASSES}; set "
                     f"MODEL.ROI_HEADS.NUM_CLASSES {NUM_CLASSES - 1}."]
    found = problems_of(small, "DATASETS.TEST", (test,), "MODEL.ROI_HEADS.NUM_CLASSES",
                        NUM_CLASSES - 1)
    assert found == [f"Dataset {small[0]!r} has {NUM_CLASSES} classes but "
                     f"MODEL.ROI_HEADS.NUM_CLASSES is {NUM_CLASSES - 1}; set "
                     f"MODEL.ROI_HEADS.NUM_CLASSES {NUM_CLASSES}."]
