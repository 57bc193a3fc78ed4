"""Open Images datasets from the official challenge files, registered for detectron2.

A dataset is given as
    NAME=BOXES_CSV:LABELS_CSV:CLASSES_CSV:HIERARCHY_JSON:IMAGE_ROOT[:SIZES_CSV]
(DATASETS.OPENIMAGES, or train_net.py --openimages-dataset), e.g. for the challenge 2019
validation set: challenge-2019-validation-detection-bbox.csv,
challenge-2019-validation-detection-human-imagelabels.csv,
challenge-2019-classes-description-500.csv, challenge-2019-label500-hierarchy.json and the
folder of <ImageID>.jpg files. CSV columns are read by name (the class description file has
none: MID, display name). Boxes are normalised in the files; they become absolute XYXY boxes
with each image's size, taken from SIZES_CSV (ImageID, Width, Height) when given, else read
once from the image headers (EXIF rotation applied, as detectron2 reads the images) and cached
in IMAGE_ROOT/image_sizes.csv. Group-of boxes stay ordinary boxes with `is_group_of` True
(EQLv2 trains them so; `iscrowd` would make detectron2 drop them). Verified image labels are
kept per image as `pos_category_ids` / `neg_category_ids` (contiguous ids).

Parent classes (DATASETS.OPENIMAGES_PARENT_CLASSES): the official metric expands the ground
truth to every ancestor (`openimages_hierarchy`). "expand_boxes": the dataset dicts are
expanded the same way, so the model is trained to predict parent classes itself;
"copy_detections": the dicts keep the files' boxes and labels, and the evaluator copies each
detection to every ancestor of its class before matching (the ground truth it evaluates
against is expanded either way).
"""
import csv
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from ..errors import DatasetFormatError, SeesawEcmError
from ..fileio import write_atomic
from .image_check import oriented_size
from .openimages_hierarchy import LabelHierarchy

logger = logging.getLogger(__name__)

BOX_COLUMNS = ("ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax", "IsGroupOf")
LABEL_COLUMNS = ("ImageID", "LabelName", "Confidence")
SIZE_COLUMNS = ("ImageID", "Width", "Height")
PARENT_MODES = ("expand_boxes", "copy_detections")
SIZES_CACHE = "image_sizes.csv"
FILE_KEYS = ("boxes", "labels", "classes", "hierarchy", "image_root", "sizes")  # spec order
SPEC_FORMAT = "NAME=BOXES_CSV:LABELS_CSV:CLASSES_CSV:HIERARCHY_JSON:IMAGE_ROOT[:SIZES_CSV]"
SYNTHETIC_OI_NAMES = ("synthetic_oi_train", "synthetic_oi_val")


def _fail(path, problem):
    raise DatasetFormatError(
        f"{path}: {problem}. Fix the file so that it follows the Open Images challenge format "
        "(https://storage.googleapis.com/openimages/web/challenge2019_downloads.html), or "
        "regenerate it.")


def _open(path):
    if not os.path.isfile(path):
        raise SeesawEcmError(f"Open Images file {path} does not exist. Check the dataset spec "
                             f"({SPEC_FORMAT}) given to DATASETS.OPENIMAGES / "
                             "--openimages-dataset.")
    return open(path, newline="")


def _rows(path, columns):
    """(line number, values of `columns`) for each data row of a CSV with a header."""
    with _open(path) as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            _fail(path, "empty file (no header row)")
        missing = [c for c in columns if c not in header]
        if missing:
            _fail(path, f"header {header} lacks column(s) {', '.join(missing)}")
        at = [header.index(c) for c in columns]
        for line, row in enumerate(reader, start=2):
            if len(row) != len(header):
                _fail(path, f"line {line} has {len(row)} fields, the header {len(header)}")
            yield line, [row[i] for i in at]


def read_classes(path):
    """The class description CSV (MID, display name; no header) -> (mids, names)."""
    mids, names = [], []
    with _open(path) as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if line == 1 and row and row[0] == "LabelName":
                continue  # tolerate a header row
            if len(row) != 2 or not row[0]:
                _fail(path, f"line {line} is not 'MID,display name'")
            mids.append(row[0])
            names.append(row[1])
    if not mids:
        _fail(path, "no classes")
    if len(set(mids)) != len(mids):
        _fail(path, "a class MID is listed twice")
    return mids, names


def read_hierarchy(path, mids):
    with _open(path) as f:
        try:
            tree = json.load(f)
        except json.JSONDecodeError as e:
            _fail(path, f"not valid JSON ({e.msg} at line {e.lineno})")
    return LabelHierarchy(tree, mids, source=path)


def _class_index(path, line, mid, index):
    k = index.get(mid)
    if k is None:
        _fail(path, f"line {line}: LabelName {mid} is not in the class description file")
    return k


def read_boxes(path, index):
    """{ImageID: [(class, x0, y0, x1, y1 normalised, is_group_of)]} in file order."""
    boxes = {}
    for line, (image, mid, x0, x1, y0, y1, group) in _rows(path, BOX_COLUMNS):
        k = _class_index(path, line, mid, index)
        try:
            x0, x1, y0, y1, group = float(x0), float(x1), float(y0), float(y1), int(group)
        except ValueError:
            _fail(path, f"line {line}: a coordinate or IsGroupOf is not a number")
        if not (0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1):
            _fail(path, f"line {line}: box XMin {x0} XMax {x1} YMin {y0} YMax {y1} is not "
                  "inside [0, 1] with min <= max")
        boxes.setdefault(image, []).append((k, x0, y0, x1, y1, group == 1))
    return boxes


def read_labels(path, index):
    """{ImageID: (positive class set, negative class set)} of the verified image labels."""
    labels = {}
    for line, (image, mid, confidence) in _rows(path, LABEL_COLUMNS):
        k = _class_index(path, line, mid, index)
        if confidence not in ("0", "1", "0.0", "1.0"):
            _fail(path, f"line {line}: Confidence {confidence!r} is not 0 or 1")
        labels.setdefault(image, (set(), set()))[confidence.startswith("0")].add(k)
    return labels


def _header_size(path):
    """(width, height) of an image as detectron2 reads it (EXIF orientation applied)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return oriented_size(im)
    except OSError as e:
        raise SeesawEcmError(f"Cannot read image {path} ({e}); check IMAGE_ROOT.") from None


def read_sizes(path):
    sizes = {}
    for line, (image, width, height) in _rows(path, SIZE_COLUMNS):
        try:
            sizes[image] = (int(width), int(height))
        except ValueError:
            _fail(path, f"line {line}: Width / Height is not an integer")
    return sizes


def image_sizes(image_ids, image_root, sizes_csv=None):
    """{ImageID: (width, height)}: from `sizes_csv`, else from the cache in image_root
    (completed from the image headers, and rewritten, when images are missing from it)."""
    if sizes_csv:
        sizes = read_sizes(sizes_csv)
        missing = [i for i in image_ids if i not in sizes]
        if missing:
            _fail(sizes_csv, f"no size for {len(missing)} image(s), e.g. {missing[0]}")
        return sizes
    cache = os.path.join(image_root, SIZES_CACHE)
    sizes = read_sizes(cache) if os.path.isfile(cache) else {}
    missing = [i for i in image_ids if i not in sizes]
    if missing:
        logger.info(f"Reading the sizes of {len(missing)} images from their headers")
        paths = [os.path.join(image_root, f"{i}.jpg") for i in missing]
        with ThreadPoolExecutor(8) as pool:
            sizes.update(zip(missing, pool.map(_header_size, paths)))
        rows = "".join(f"{i},{w},{h}\n" for i, (w, h) in sorted(sizes.items()))
        try:
            write_atomic(cache, ",".join(SIZE_COLUMNS) + "\n" + rows)
        except OSError as e:
            logger.warning(f"Could not cache image sizes in {cache} ({e}); they will be read "
                           "again next time. Give a SIZES_CSV in the dataset spec instead.")
    return sizes


def load_openimages(files, mids, hierarchy=None):
    """Dataset dicts of an Open Images dataset (`files`: parse_spec's dict); expanded to parent
    classes with `hierarchy` (LabelHierarchy) when given."""
    index = {m: k for k, m in enumerate(mids)}
    boxes = read_boxes(files["boxes"], index)
    labels = read_labels(files["labels"], index)
    image_ids = sorted(set(boxes) | set(labels))
    sizes = image_sizes(image_ids, files["image_root"], files.get("sizes"))
    records = []
    for image_id in image_ids:
        width, height = sizes[image_id]
        pos, neg = labels.get(image_id, ((), ()))
        record = {
            "file_name": os.path.join(files["image_root"], f"{image_id}.jpg"),
            "image_id": image_id, "height": height, "width": width,
            "annotations": [
                {"bbox": [x0 * width, y0 * height, x1 * width, y1 * height],
                 "bbox_mode": BoxMode.XYXY_ABS, "category_id": k, "is_group_of": group}
                for k, x0, y0, x1, y1, group in boxes.get(image_id, ())],
            "pos_category_ids": sorted(pos), "neg_category_ids": sorted(neg),
        }
        records.append(hierarchy.expand_record(record) if hierarchy else record)
    logger.info(f"Loaded {len(records)} Open Images images from {files['boxes']}")
    return records


def parse_spec(spec):
    """SPEC_FORMAT -> (name, {"boxes", "labels", "classes", "hierarchy", "image_root",
    "sizes"})."""
    name, sep, rest = spec.partition("=")
    parts = rest.split(":")
    if not (sep and name and len(parts) in (5, 6) and all(parts)):
        raise SeesawEcmError(f"Bad Open Images dataset spec {spec!r}: expected {SPEC_FORMAT}, "
                             "e.g. oi_val=val-bbox.csv:val-labels.csv:classes.csv:"
                             "hierarchy.json:/data/oi/validation")
    return name, dict(zip(FILE_KEYS, parts + [None] * (6 - len(parts))))


def _load(name, files, mids, hierarchy, expand):
    records = load_openimages(files, mids, hierarchy if expand else None)
    counts = np.zeros(len(mids), np.int64)
    for r in records:
        counts += np.bincount([a["category_id"] for a in r["annotations"]],
                              minlength=len(mids))
    MetadataCatalog.get(name).set(class_instance_count=counts.tolist())
    return records


def register_openimages(name, files, parent_classes="expand_boxes"):
    """Register an Open Images dataset (evaluator_type "openimages"). The class list and the
    hierarchy are read (and checked) now, the boxes when the dataset is first used."""
    if parent_classes not in PARENT_MODES:
        raise SeesawEcmError(f"DATASETS.OPENIMAGES_PARENT_CLASSES {parent_classes!r} is unknown;"
                             f" choose one of {', '.join(map(repr, PARENT_MODES))}.")
    mids, names = read_classes(files["classes"])
    hierarchy = read_hierarchy(files["hierarchy"], mids)
    expand = parent_classes == "expand_boxes"
    DatasetCatalog.register(name, lambda: _load(name, files, mids, hierarchy, expand))
    MetadataCatalog.get(name).set(
        thing_classes=names, class_mids=mids, hierarchy=hierarchy,
        # image labels hold contiguous ids (read by HTC-Lite's context loss)
        thing_dataset_id_to_contiguous_id={k: k for k in range(len(mids))},
        parent_classes=parent_classes, hierarchy_expanded=expand,
        openimages_files=files, evaluator_type="openimages")


def synthetic_oi_root():
    """Where the built-in synthetic Open Images set lives: $DETECTRON2_DATASETS/synthetic_oi."""
    return os.path.join(os.getenv("DETECTRON2_DATASETS", "datasets"), "synthetic_oi")


def _synthetic_specs(cfg):
    """Specs of the built-in synthetic sets the config uses (generated now if needed)."""
    used = [n for n in SYNTHETIC_OI_NAMES if n in tuple(cfg.DATASETS.TRAIN) + tuple(
        cfg.DATASETS.TEST)]
    if not used:
        return []
    from .openimages_synthetic import ensure_generated

    files = ensure_generated(synthetic_oi_root())
    return [f"{n}=" + ":".join(files[s][k] for k in FILE_KEYS)
            for n, s in zip(SYNTHETIC_OI_NAMES, ("train", "val")) if n in used]


def register_openimages_from_cfg(cfg):
    """Register the datasets of cfg.DATASETS.OPENIMAGES and the built-in synthetic ones that
    cfg.DATASETS.TRAIN / TEST name (idempotent; a name registered by this function earlier
    with other files or another parent mode is registered again)."""
    mode = cfg.DATASETS.OPENIMAGES_PARENT_CLASSES
    for spec in list(cfg.DATASETS.OPENIMAGES) + _synthetic_specs(cfg):
        name, files = parse_spec(spec)
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            if meta.get("openimages_files") is None:
                raise SeesawEcmError(f"Dataset name {name!r} given in DATASETS.OPENIMAGES is "
                                     "already registered (not as Open Images); choose another.")
            if meta.openimages_files == files and meta.parent_classes == mode:
                continue
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_openimages(name, files, mode)
