"""Bad input met before the first iteration (docs/TROUBLESHOOTING.md): train_net.py run
in-process on a changed copy of the small synthetic set or with changed arguments must exit 2
with one message naming the problem and the fix, print no traceback and create no OUTPUT_DIR.
Also the near misses it must accept: boxes within the border tolerance, images without
annotations beside annotated ones, COCO-format test sets without LVIS frequencies."""
import copy
import itertools
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

NUM_CLASSES = 12  # the small_synthetic fixture
SEESAW = "configs/Synthetic/mask_rcnn_R18_FPN_seesaw.yaml"
_names = itertools.count()


@pytest.fixture(scope="module")
def small_data(small_synthetic):
    """The fixture's json files parsed: {"train": dict, "val": dict}, and its paths."""
    d = small_synthetic
    return {s: json.load(open(d[f"{s}_json"])) for s in ("train", "val")}, d


def _image_path(root, im):
    return os.path.join(root, *im["coco_url"].split("/")[-2:])


class Case:
    """Input for one run: train / val json changes, image changes, config arguments."""

    def __init__(self, train=None, val=None, images=None, opts=(), flags=(), config=SEESAW,
                 yaml=None, after=()):
        self.train, self.val, self.images = train, val, images
        self.opts, self.flags, self.config, self.after = opts, flags, config, after
        self.yaml = yaml  # a config file's text after a _BASE_ of `config`, written at run time


def _write_case(case, small_data, tmp_path):
    """The train_net.py arguments of `case`, its files written under tmp_path."""
    data, d = small_data
    root = d["image_root"]
    if case.images:
        root = str(tmp_path / "images") + os.sep
        shutil.copytree(d["image_root"], root, ignore=shutil.ignore_patterns("annotations"))
    specs = []
    names = {}
    for split, mutate in (("train", case.train), ("val", case.val)):
        changed = copy.deepcopy(data[split])
        if mutate:
            mutate(changed)
        if case.images and split == "train":
            case.images(changed, root)
        path = tmp_path / f"{split}.json"
        path.write_text(json.dumps(changed))
        names[split] = f"bad_{split}_{next(_names)}"
        specs += ["--dataset", f"{names[split]}={path}:{root}"]
    config = case.config
    if case.yaml is not None:
        config = tmp_path / "config.yaml"
        config.write_text(f"_BASE_: {os.path.abspath(case.config)}\n{case.yaml}")
    return ["--config-file", str(config), *case.flags, *specs,
            "DATASETS.TRAIN", f"('{names['train']}',)", "DATASETS.TEST", f"('{names['val']}',)",
            "MODEL.ROI_HEADS.NUM_CLASSES", str(NUM_CLASSES), "SOLVER.IMS_PER_BATCH", "2",
            "SOLVER.MAX_ITER", "2", "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu",
            "OUTPUT_DIR", str(tmp_path / "out"), *case.opts, *case.after]


def run_refused(args, capsys):
    """train_net.py's main with `args`, in this process: the one error message it printed
    (SystemExit 2, no traceback)."""
    import train_net

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train_net.main_reporting_errors(train_net.build_parser().parse_args(args))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("ERROR: ") == 1 and "Traceback" not in err, err
    return err[err.index("ERROR: ") + len("ERROR: "):]


# --- helpers changing the copy ----------------------------------------------------------------

def set_bbox(index, bbox, **extra):
    def mutate(d):
        d["annotations"][index].update(bbox=bbox, **extra)
    return mutate


def image_size_of(index, key, delta):
    def mutate(d):
        d["images"][index][key] += delta
    return mutate


def truncate_image(index):
    def change(d, root):
        path = _image_path(root, d["images"][index])
        content = open(path, "rb").read()
        open(path, "wb").write(content[:len(content) // 2])
    return change


def overwrite_image(index, content):
    def change(d, root):
        open(_image_path(root, d["images"][index]), "wb").write(content)
    return change


def crowd_rle(d):
    a = d["annotations"][3]
    a.update(iscrowd=1, segmentation={"counts": [0, 10, 20], "size": [128, 128]})


def rle(d):
    d["annotations"][3]["segmentation"] = {"counts": [0, 10, 20], "size": [128, 128]}


def no_images(d):
    d["images"], d["annotations"] = [], []


def no_annotations(d):
    d["annotations"] = []


def drop_frequency_of_some(d):
    d["categories"][2].pop("frequency")


def coco_format(d):
    """An LVIS json as COCO has it: no frequency / counts, no image-level lists, iscrowd 0."""
    for c in d["categories"]:
        for key in ("frequency", "image_count", "instance_count", "synset", "synonyms", "def"):
            c.pop(key, None)
    for im in d["images"]:
        im.pop("neg_category_ids", None)
        im.pop("not_exhaustive_category_ids", None)
    for a in d["annotations"]:
        a["iscrowd"] = 0


# id -> (the case, the message parts the error must hold: a regex, matched in order)
CASES = {
    "bbox-nan": (Case(train=set_bbox(0, [float("nan"), 1, 5, 5])),
                 r"1 annotation with a bbox that is not 4 finite numbers: annotation 1 \(image "
                 r"\d+, 128x128, .*\): bbox \[nan, 1, 5, 5\]\. Fix the file: correct them"),
    "bbox-inf": (Case(train=set_bbox(0, [1, 1, float("inf"), 5])),
                 r"bbox that is not 4 finite numbers: annotation 1 .*bbox \[1, 1, inf, 5\]"),
    "bbox-string": (Case(train=set_bbox(0, [1, "2", 5, 5])),
                    r"bbox that is not 4 finite numbers: annotation 1 .*bbox \[1, '2', 5, 5\]"),
    "bbox-zero-width": (Case(train=set_bbox(1, [3, 3, 0, 5])),
                        r"1 annotation with a bbox without positive width and height: "
                        r"annotation 2 .*correct them \(a box needs width > 0"),
    "bbox-negative-height": (Case(train=set_bbox(1, [3, 3, 5, -2])),
                             r"bbox without positive width and height: annotation 2 "),
    "bbox-outside-image": (Case(train=set_bbox(2, [120, 3, 10, 5])),
                           r"1 annotation with a bbox outside its image \(by more than 1 px\): "
                           r"annotation 3 \(image \d+, 128x128, .*\): bbox \[120, 3, 10, 5\]\. "
                           r"Fix the file: correct them, or the image's width/height in the "
                           r"json if that is wrong"),
    "crowd-rle": (Case(train=crowd_rle),
                  r"1 annotation with a crowd region \(iscrowd 1\): annotation 4 .*remove the "
                  r"crowd annotations \(docs/TROUBLESHOOTING.md has a command\)"),
    "rle-segmentation": (Case(train=rle), r"1 annotation with an RLE segmentation: annotation 4"
                         r" .*convert the masks to polygons"),
    "image-truncated": (Case(images=truncate_image(0)),
                        r"1 of 160 image files are truncated, corrupt or not images: .*\.jpg "
                        r"\(OSError: image file is truncated.*Restore the files"),
    "image-not-an-image": (Case(images=overwrite_image(1, b"<html>not found</html>")),
                           r"1 of 160 image files are truncated, corrupt or not images: .*"
                           r"\(UnidentifiedImageError: no image format PIL reads\)\. Restore "
                           r"the files"),
    "image-size-differs": (Case(train=image_size_of(2, "width", 8)),
                           r"1 of 160 image files have another size \(width x height\) than their"
                           r" json records: .*\.jpg \(image \d+: json 136x128, file 128x128\)\. "
                           r"Correct width/height in the json"),
    "empty-training-set": (Case(train=no_images),
                           r"Dataset 'bad_train_\d+' in DATASETS.TRAIN has no images "
                           r"\(annotation file: .*train.json\); name a dataset with images"),
    "empty-test-set": (Case(val=no_images),
                       r"Dataset 'bad_val_\d+' in DATASETS.TEST has no images"),
    "training-set-without-annotations": (
        Case(train=no_annotations),
        r"DATASETS.TRAIN \('bad_train_\d+',\) has 160 images but no annotation: detectron2 drops "
        r"images without annotations from training \(DATALOADER.FILTER_EMPTY_ANNOTATIONS True\)"),
    "test-set-frequency-on-some-categories": (
        Case(val=drop_frequency_of_some),
        r"categories \d+ of .*val.json have no valid LVIS 'frequency' \('r', 'c' or 'f'\) but "
        r"others have one; add it to every category .* or remove it from all"),
    "coco-test-set-with-the-official-backend": (
        Case(val=coco_format, opts=("TEST.LVIS_EVAL_BACKEND", "lvis")),
        r"have no LVIS 'frequency' .*which TEST.LVIS_EVAL_BACKEND 'lvis' needs; use the 'fast' "
        r"backend"),
    "unknown-config-key": (Case(opts=("MODEL.ROI_HEADS.NUM_CLASS", "12")),
                           r"Unknown config key MODEL.ROI_HEADS.NUM_CLASS in the command line's "
                           r"KEY VALUE pairs: did you mean MODEL.ROI_HEADS.NUM_CLASSES\?"),
    "unknown-config-key-in-file": (
        Case(yaml="MODEL:\n  LONG_TAIL:\n    LOS: seesaw\n"),
        r"Unknown config key MODEL.LONG_TAIL.LOS in .*config\.yaml: did you mean "
        r"MODEL.LONG_TAIL.LOSS\?"),
    "wrong-value-type": (Case(opts=("SOLVER.BASE_LR", "1")),
                         r"Config key SOLVER.BASE_LR in the command line's KEY VALUE pairs takes "
                         r"a float \(now .*\), got '1' \(an int\); give a float, e.g. "
                         r"SOLVER.BASE_LR .* \(with a decimal point\)\."),
    "wrong-value-type-tuple": (Case(opts=("SOLVER.STEPS", "5")),
                               r"takes a tuple \(now \(900, 1100\)\), got '5' \(an int\); "
                               r"give a tuple, e.g. SOLVER.STEPS \"\(5,\)\"\."),
    "wrong-value-type-string-for-tuple": (
        Case(opts=("DATASETS.TRAIN", "mine")),
        r"Config key DATASETS.TRAIN in the command line's KEY VALUE pairs takes a tuple \(now "
        r".*\), got 'mine' \(a str\); give a tuple, e.g. DATASETS.TRAIN \"\('mine',\)\"\."),
    "missing-config-file": (Case(config="configs/no_such.yaml"),
                            r"Config file configs/no_such.yaml does not exist; check the path "
                            r"given to --config-file\."),
    "config-file-not-yaml": (Case(yaml="MODEL: [1\n"),
                             r"Config file .*\.yaml is not valid YAML \(.* at line \d+, column "
                             r"\d+\); fix its syntax\."),
    "flag-after-key-value-pairs": (Case(after=("--resume",)),
                                   r"--resume comes after the KEY VALUE pairs, which take every "
                                   r"word after the first pair .*put the flags first: "
                                   r"train_net.py --config-file FILE --resume KEY VALUE"),
    "key-without-value": (Case(after=("SOLVER.MAX_ITER",)),
                          r"The KEY VALUE pairs after the flags have an odd number of words: "
                          r"'SOLVER.MAX_ITER' \(or an earlier key\) has no value"),
    "wrong-value-type-broken-tuple": (
        Case(opts=("SOLVER.STEPS", "(10, 20")),
        r"takes a tuple \(now \(900, 1100\)\), got '\(10, 20' \(a str\); give a tuple, e.g. "
        r"SOLVER.STEPS \"\(900, 1100\)\" \(a Python literal: matching brackets"),
}


@pytest.mark.parametrize("case", CASES)
def test_refused_before_anything_is_written(case, small_data, tmp_path, capsys):
    """Every case: exit 2, one message with the problem and the fix, no OUTPUT_DIR."""
    spec, pattern = CASES[case]
    message = run_refused(_write_case(spec, small_data, tmp_path), capsys)
    assert re.search(pattern, message, re.S), message
    assert not (tmp_path / "out").exists()


def _validation_problems(case, small_data, tmp_path):
    """find_problems of `case`'s config and datasets (nothing run)."""
    import train_net
    from seesaw_ecm.data.datasets import register_from_cfg
    from seesaw_ecm.validation import find_problems

    args = train_net.build_parser().parse_args(_write_case(case, small_data, tmp_path))
    cfg = train_net.load_config(args)
    cfg.DATASETS.LVIS_FORMAT = list(args.dataset)
    register_from_cfg(cfg)
    return find_problems(cfg)


@pytest.mark.parametrize("case", [
    Case(train=set_bbox(0, [-0.9, 0.5, 129.5, 20])),  # within 1 px of the border: clipped
    Case(train=lambda d: d.update(annotations=d["annotations"][:40])),  # images without any
    Case(val=coco_format),  # COCO-format test set: APr / APc / APf unavailable
], ids=["bbox-within-tolerance", "some-images-without-annotations", "coco-test-set"])
def test_near_misses_are_accepted(case, small_data, tmp_path):
    assert _validation_problems(case, small_data, tmp_path) == []


def test_a_box_within_the_tolerance_is_clipped_to_the_image(small_data, tmp_path):
    """detectron2's mapper clips it (the accepted near miss above trains on the clipped box)."""
    from detectron2.data import detection_utils as utils
    from detectron2.data import transforms as T
    from detectron2.structures import BoxMode

    ann = {"bbox": [-0.9, 0.5, 129.5, 20], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0}
    ann = utils.transform_instance_annotations(ann, T.TransformList([]), (128, 128))
    boxes = utils.annotations_to_instances([ann], (128, 128)).gt_boxes.tensor.tolist()
    assert boxes == [[0.0, 0.5, 128.0, 20.5]]  # x from -0.9 to 128.6, clipped to [0, 128]


def test_coco_test_set_gives_ap_and_no_frequency_groups(small_data, tmp_path):
    """A COCO-format test set (no frequency): AP as with the LVIS frequencies, APr / APc / APf
    -100 (train_net's summary prints n/a), the report's groups empty."""
    from seesaw_ecm.engine import _fmt
    from seesaw_ecm.evaluation import lvis_fast

    data, _ = small_data
    lvis = copy.deepcopy(data["val"])
    for im in lvis["images"]:  # the same image-level lists in both: only the frequency differs
        im.pop("neg_category_ids", None)
        im.pop("not_exhaustive_category_ids", None)
    coco = copy.deepcopy(lvis)
    coco_format(coco)
    rng = np.random.default_rng(0)
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": s,
                "bbox": [v + rng.normal(0, 2) for v in a["bbox"]]}
               for a, s in zip(lvis["annotations"], rng.uniform(size=len(lvis["annotations"])))]
    ours = lvis_fast.evaluate(lvis_fast.LvisGroundTruth(coco), results, "bbox").metrics
    reference = lvis_fast.evaluate(lvis_fast.LvisGroundTruth(lvis), results, "bbox").metrics
    assert 0.2 < ours["AP"] < 1 and ours["AP"] == reference["AP"]
    assert ours["AP50"] == reference["AP50"]
    assert [ours[k] for k in ("APr", "APc", "APf")] == [-1, -1, -1]
    assert max(reference[k] for k in ("APr", "APc", "APf")) > 0  # with frequencies: groups
    assert _fmt(ours["APr"] * 100).strip() == "n/a"


def test_the_fast_evaluator_reports_a_coco_test_set(small_data, tmp_path):
    """FastLVISEvaluator end to end on a COCO-format test set: AP, APr/c/f -100, the report's
    categories without frequency."""
    from detectron2.data import DatasetCatalog
    from detectron2.structures import Boxes, Instances
    import torch

    from seesaw_ecm.data.datasets import register_lvis_format
    from seesaw_ecm.evaluation.evaluator import FastLVISEvaluator

    data, d = small_data
    coco = copy.deepcopy(data["val"])
    coco_format(coco)
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(coco))
    name = f"coco_{next(_names)}"
    register_lvis_format(name, str(path), d["image_root"])
    DatasetCatalog.get(name)  # sets the id mapping, as the test loader does
    cat_ids = sorted(c["id"] for c in coco["categories"])
    ev = FastLVISEvaluator(name, tasks=("bbox",), output_dir=str(tmp_path))
    ev.reset()
    for im in coco["images"]:
        anns = [a for a in coco["annotations"] if a["image_id"] == im["id"]]
        inst = Instances((im["height"], im["width"]))
        box = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        box[:, 2:] += box[:, :2]
        inst.pred_boxes = Boxes(box)
        inst.scores = torch.ones(len(anns))
        inst.pred_classes = torch.tensor([cat_ids.index(a["category_id"]) for a in anns])
        ev.process([{"image_id": im["id"], "height": im["height"], "width": im["width"]}],
                   [{"instances": inst}])
    result = ev.evaluate()["bbox"]
    assert result["AP"] > 99 and [result[k] for k in ("APr", "APc", "APf")] == [-100] * 3
    report = json.loads((tmp_path / "lvis_fast_eval.json").read_text())["bbox"]
    assert {c["frequency"] for c in report["per_category_ap"]} == {None}
    assert all(g["categories"] == 0 for g in report["groups"].values())


@pytest.mark.slow
@pytest.mark.parametrize("num_gpus", [1, 2])
def test_train_net_command_line_order_error_before_any_process(small_data, tmp_path, num_gpus):
    """As a user runs it: `--resume` after the KEY VALUE pairs stops train_net.py before it
    starts its processes: exit 2, one message (also with 2 processes), nothing written."""
    args = _write_case(Case(after=("--resume",)), small_data, tmp_path)
    proc = subprocess.run([sys.executable, "train_net.py", "--num-gpus", str(num_gpus), *args],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("ERROR: ") == 1 and "Traceback" not in proc.stderr
    assert "ERROR: --resume comes after the KEY VALUE pairs" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_every_troubleshooting_row_names_tests_that_exist():
    """docs/TROUBLESHOOTING.md: every row of its table names at least one test, and every test
    it names exists (a function, or a case id of CASES here)."""
    rows = [line for line in open("docs/TROUBLESHOOTING.md") if line.startswith("| ")][1:]
    rows = [r for r in rows if not r.startswith("|---")]
    assert len(rows) >= len(CASES)
    for row in rows:
        refs = re.findall(r"`(test_\w+\.py)::(\w+)(?:\[([\w-]+)\])?`", row)
        assert refs, row
        for path, name, case in refs:
            source = open(os.path.join("tests", path)).read()
            assert re.search(rf"^def {name}\(", source, re.M), (path, name)
            if case and path == "test_bad_input.py" and name.startswith("test_refused"):
                assert case in CASES, case
    named = {c for row in rows
             for c in re.findall(r"test_refused_before_anything_is_written\[([\w-]+)\]", row)}
    assert named == set(CASES)  # every case of the table above has its row


def _write_image(path, fmt, size=(40, 30), **save):
    from PIL import Image

    Image.new("RGB", size, (200, 40, 40)).save(path, fmt, **save)
    return str(path)


def test_image_check_reads_orientation_ends_and_sizes(tmp_path):
    """What check_image accepts: the size after EXIF orientation (detectron2's read_image), a
    complete file with bytes after its end marker; what it refuses: a truncated JPEG or PNG (no
    end marker, then a decode fails), another size."""
    from detectron2.data.detection_utils import read_image
    from PIL import Image

    from seesaw_ecm.data.image_check import MISSING, NOT_DECODABLE, WRONG_SIZE, check_image

    exif = Image.Exif()
    exif[274] = 6  # rotate 90 degrees: read_image returns a 30 x 40 image
    rotated = _write_image(tmp_path / "r.jpg", "JPEG", exif=exif.tobytes())
    assert read_image(rotated).shape[:2] == (40, 30)  # height, width
    assert check_image(rotated, 30, 40) is None
    assert check_image(rotated, 40, 30) == (WRONG_SIZE, "30x40")
    for fmt, ext in (("JPEG", "jpg"), ("PNG", "png")):
        path = _write_image(tmp_path / f"a.{ext}", fmt)
        assert check_image(path, 40, 30) is None
        content = open(path, "rb").read()
        open(path, "wb").write(content + b"\0" * 16)  # trailing bytes: decoded, accepted
        assert check_image(path, 40, 30) is None
        open(path, "wb").write(content[:len(content) * 2 // 3])
        kind, detail = check_image(path, 40, 30)
        assert kind == NOT_DECODABLE and detail.startswith(("OSError", "SyntaxError")), detail
    assert check_image(str(tmp_path / "none.jpg"), 40, 30)[0] == MISSING
    assert check_image(_write_image(tmp_path / "b.bmp", "BMP"), 40, 30) is None  # decoded
