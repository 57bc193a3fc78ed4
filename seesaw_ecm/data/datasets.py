"""Registration of LVIS-format datasets: the built-in synthetic long-tailed set and any json.

Real LVIS v1 needs nothing from here: detectron2 registers `lvis_v1_train` / `lvis_v1_val`
under $DETECTRON2_DATASETS itself.

Why a loader of our own instead of detectron2's `load_lvis_json`: in detectron2 0.6 that loader
finds images only through `coco_url`, assumes category ids 1..C, takes metadata only for the
real LVIS names, and reports a malformed file with a bare assert. Ours validates the file first
and says what is wrong and how to fix it, accepts `file_name` or `coco_url` and any category ids,
and sets the metadata (class names, frequencies, counts) from the file.
"""
import json
import logging
import math
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from ..errors import DatasetFormatError, SeesawEcmError
from .openimages import register_openimages_from_cfg

logger = logging.getLogger(__name__)

SYNTHETIC_NAMES = ("synthetic_lt_train", "synthetic_lt_val", "synthetic_lt_holdout")
# the main job's variant (synthetic_lt.DEMO), at $DETECTRON2_DATASETS/synthetic_lt_demo
DEMO_NAMES = ("synthetic_lt_demo_train", "synthetic_lt_demo_val", "synthetic_lt_demo_holdout")
# the split of each name above; holdout: synthetic_lt.generate_holdout (for choosing a
# calibration's gamma or tau without the val split, which the benchmarks test on)
SPLITS = ("train", "val", "holdout")


def _fail(json_file, problem):
    raise DatasetFormatError(
        f"{json_file}: {problem}. Fix the file so that it follows the LVIS v1 format "
        "(https://www.lvisdataset.org/dataset: 'images', 'annotations', 'categories'), "
        "or regenerate it."
    )


def read_lvis_json(json_file):
    """Read and validate an LVIS-format annotation file. Returns the parsed dict.

    Raises DatasetFormatError (naming the file, the problem and the fix) instead of failing
    later somewhere inside detectron2 or lvis.
    """
    if not os.path.isfile(json_file):
        raise SeesawEcmError(
            f"Annotation file {json_file} does not exist. Check the path given to "
            "DATASETS.LVIS_FORMAT / --dataset, or $DETECTRON2_DATASETS for builtin datasets."
        )
    try:
        with open(json_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        _fail(json_file, f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})")
    if not isinstance(data, dict):
        _fail(json_file, "top level is not a JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            _fail(json_file, f"missing list '{key}'")
    cat_ids = _check_categories(json_file, data["categories"])
    images = _check_images(json_file, data["images"], cat_ids)
    _check_annotations(json_file, data["annotations"], images, cat_ids)
    return data


def _add_unique(json_file, seen, value, what):
    if value in seen:
        _fail(json_file, f"{what} id {value} is used twice")
    seen.add(value)


def _check_categories(json_file, categories):
    """The set of category ids; each category has an id (unique) and a name."""
    cat_ids = set()
    for c in categories:
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            _fail(json_file, f"category {c!r:.80} lacks 'id' or 'name'")
        _add_unique(json_file, cat_ids, c["id"], "category")
    if not cat_ids:
        _fail(json_file, "no categories")
    return cat_ids


def _check_images(json_file, images, cat_ids):
    """{image id: image}; each image has a unique id, its size (positive integers), a file name
    or URL, and image-level category lists (LVIS' neg_category_ids, not_exhaustive_category_ids)
    of known categories."""
    by_id = {}
    for im in images:
        if not isinstance(im, dict) or "id" not in im:
            _fail(json_file, f"image {im!r:.80} lacks 'id'")
        missing = [k for k in ("height", "width") if k not in im]
        if "file_name" not in im and "coco_url" not in im:
            missing.append("file_name or coco_url")
        if missing:
            _fail(json_file, f"image {im['id']} lacks {', '.join(missing)}")
        if not all(_is_number(im[k]) and im[k] > 0 and float(im[k]).is_integer()
                   for k in ("height", "width")):
            _fail(json_file, f"image {im['id']} has width {im['width']!r} and height "
                             f"{im['height']!r}; both must be positive integers (pixels)")
        if im["id"] in by_id:
            _fail(json_file, f"image id {im['id']} is used twice")
        by_id[im["id"]] = im
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            unknown = set(im.get(key, ())) - cat_ids
            if unknown:
                _fail(json_file, f"image {im['id']} has unknown category ids {sorted(unknown)} "
                                 f"in '{key}'")
    return by_id


def _is_number(value):
    """A finite int / float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# A box may pass the image border by this many pixels (rounding of polygon-derived boxes); the
# training mapper clips it to the image, as detectron2 does. Beyond it the box is refused.
BOX_TOLERANCE = 1.0

# What is wrong with an annotation (box_problem / segmentation_problem) -> the fix
ANNOTATION_FIXES = {
    "a bbox that is not 4 finite numbers": "correct them ([x, y, width, height] in pixels) or "
                                           "remove those annotations",
    "a bbox without positive width and height": "correct them (a box needs width > 0 and "
                                                "height > 0) or remove those annotations",
    f"a bbox outside its image (by more than {BOX_TOLERANCE:g} px)": (
        "correct them, or the image's width/height in the json if that is wrong, or remove those "
        "annotations"),
    "a crowd region (iscrowd 1)": (
        "remove the crowd annotations (docs/TROUBLESHOOTING.md has a command): the "
        "LVIS-format loader and the LVIS evaluation have no crowd regions (detectron2 drops them "
        "in training)"),
    "an RLE segmentation": "convert the masks to polygons (LVIS format) or remove those "
                           "annotations",
    "no valid polygon (each needs >= 3 x,y points)": "correct the polygons or remove those "
                                                     "annotations",
}


def box_problem(bbox, width, height):
    """What is wrong with an XYWH box in an image of width x height (a key of ANNOTATION_FIXES),
    or None."""
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        return "a bbox that is not 4 finite numbers"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return "a bbox without positive width and height"
    t = BOX_TOLERANCE
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        return f"a bbox outside its image (by more than {t:g} px)"
    return None


def segmentation_problem(annotation):
    """What is wrong with an annotation's segmentation (a key of ANNOTATION_FIXES), or None."""
    segm = annotation["segmentation"]
    if annotation.get("iscrowd"):
        return "a crowd region (iscrowd 1)"
    if isinstance(segm, dict):
        return "an RLE segmentation"
    if not isinstance(segm, list) or not segm or any(
            not isinstance(p, list) or len(p) < 6 or len(p) % 2 for p in segm):
        return "no valid polygon (each needs >= 3 x,y points)"
    return None


def _check_annotations(json_file, annotations, images, cat_ids):
    """Each annotation: unique id, known image and category, an XYWH box of finite numbers with
    positive size inside its image (BOX_TOLERANCE), valid polygons, no crowd region. Every
    annotation with a bad box or segmentation is counted in one error, per problem."""
    ann_ids = set()
    bad = {}  # problem -> [(annotation id, image)]
    for a in annotations:
        aid = a.get("id") if isinstance(a, dict) else None
        missing = [k for k in ("id", "image_id", "category_id", "bbox", "segmentation")
                   if k not in a]
        if missing:
            _fail(json_file, f"annotation {aid} lacks {', '.join(missing)}")
        _add_unique(json_file, ann_ids, aid, "annotation")
        im = images.get(a["image_id"])
        if im is None:
            _fail(json_file, f"annotation {aid} refers to unknown image_id {a['image_id']}")
        if a["category_id"] not in cat_ids:
            _fail(json_file, f"annotation {aid} refers to unknown category_id {a['category_id']}")
        for problem in (box_problem(a["bbox"], im["width"], im["height"]),
                        segmentation_problem(a)):
            if problem:
                bad.setdefault(problem, []).append((a, im))
    if bad:
        raise DatasetFormatError(f"{json_file}: " + " ".join(
            _annotations_message(problem, found) for problem, found in bad.items()))


def _annotations_message(problem, found):
    """One sentence: how many annotations have `problem`, the first 3 named with their image,
    and the fix."""
    named = "; ".join(
        f"annotation {a['id']} (image {im['id']}, {im['width']}x{im['height']}, "
        f"{_describe(im)}): bbox {a['bbox']!r:.60}" for a, im in found[:3])
    more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
    return (f"{len(found)} annotation{'s' * (len(found) > 1)} with {problem}: "
            f"{named}{more}. Fix the file: {ANNOTATION_FIXES[problem]}.")


def _describe(im):
    return im.get("file_name") or im["coco_url"]


def _set_metadata(name, cats):
    """cats: the file's categories sorted by id (contiguous class i = cats[i])."""
    MetadataCatalog.get(name).set(
        thing_classes=[c["name"] for c in cats],
        thing_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(cats)},
        # per contiguous class: LVIS frequency group and the counts the annotation file states
        class_frequency=[c.get("frequency", "") for c in cats],
        class_image_count=[{"id": c["id"], "image_count": c.get("image_count", 0)} for c in cats],
        class_instance_count=[c.get("instance_count", 0) for c in cats],
    )


def load_lvis_format_json(json_file, image_root, dataset_name=None):
    """Load an LVIS-format json into detectron2's dataset dicts (boxes XYWH_ABS, polygons).

    Category ids are mapped to contiguous 0..C-1 in id order, in the annotations and in
    `neg_category_ids` (the classes verified absent from an image, which HTC-Lite's context
    loss reads in contiguous ids; a record has the key only if its image has it, and an image
    without it counts as exhaustively annotated). `not_exhaustive_category_ids` keeps the
    file's ids. With `dataset_name`, the metadata (thing_classes,
    thing_dataset_id_to_contiguous_id, class_frequency, class_image_count,
    class_instance_count) is set too.
    """
    data = read_lvis_json(json_file)
    cats = sorted(data["categories"], key=lambda c: c["id"])
    if dataset_name is not None:
        _set_metadata(dataset_name, cats)
    id_map = {c["id"]: i for i, c in enumerate(cats)}
    anns_per_image = {}
    for a in data["annotations"]:
        anns_per_image.setdefault(a["image_id"], []).append(a)

    records = []
    for im in data["images"]:
        if "file_name" in im:
            file_name = os.path.join(image_root, im["file_name"])
        else:  # LVIS v1 style: "<split folder>/<file>" at the end of coco_url
            file_name = os.path.join(image_root, *im["coco_url"].split("/")[-2:])
        objs = [
            {
                "bbox": a["bbox"],
                "bbox_mode": BoxMode.XYWH_ABS,
                "category_id": id_map[a["category_id"]],
                "segmentation": a["segmentation"],
            }
            for a in anns_per_image.get(im["id"], [])
        ]
        record = {
            "file_name": file_name,
            "height": im["height"],
            "width": im["width"],
            "image_id": im["id"],
            "not_exhaustive_category_ids": im.get("not_exhaustive_category_ids", []),
            "annotations": objs,
        }
        if "neg_category_ids" in im:
            record["neg_category_ids"] = [id_map[c] for c in im["neg_category_ids"]]
        records.append(record)
    logger.info(f"Loaded {len(records)} images in LVIS format from {json_file}")
    return records


def _contiguous_negatives(name, load):
    """Wrap detectron2 0.6's LVIS loader of dataset `name`: its records keep
    `neg_category_ids` in the file's ids; map them as it maps `category_id` (the metadata's
    thing_dataset_id_to_contiguous_id, else id - 1), to match this package's loader (and
    detectron2's later releases). That loader gives every image the key (LVIS v1 images all
    have it)."""

    def wrapped():
        records = load()
        id_map = MetadataCatalog.get(name).get("thing_dataset_id_to_contiguous_id", None)
        for r in records:
            if "neg_category_ids" in r:
                r["neg_category_ids"] = [id_map[c] if id_map else c - 1
                                         for c in r["neg_category_ids"]]
        return records

    wrapped.contiguous_negatives = True
    return wrapped


def register_builtin_lvis_negatives():
    """Make detectron2's built-in LVIS datasets (lvis_v1_*, lvis_v0.5_*) load contiguous
    `neg_category_ids` (idempotent)."""
    from detectron2.data.datasets.builtin import _PREDEFINED_SPLITS_LVIS

    for splits in _PREDEFINED_SPLITS_LVIS.values():
        for name in splits:
            load = DatasetCatalog.data.get(name)  # the loader function (get() would call it)
            if load is not None and not getattr(load, "contiguous_negatives", False):
                DatasetCatalog.remove(name)
                DatasetCatalog.register(name, _contiguous_negatives(name, load))


def register_lvis_format(name, json_file, image_root):
    """Register an LVIS-format dataset under `name` (evaluated with LVISEvaluator)."""
    DatasetCatalog.register(name, lambda: load_lvis_format_json(json_file, image_root, name))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="lvis")


def parse_dataset_spec(spec):
    """"NAME=JSON_FILE:IMAGE_ROOT" -> (name, json_file, image_root), with a clear error."""
    name, sep, rest = spec.partition("=")
    json_file, sep2, image_root = rest.rpartition(":")
    if not (sep and sep2 and name and json_file and image_root):
        raise SeesawEcmError(
            f"Bad dataset spec {spec!r}: expected NAME=JSON_FILE:IMAGE_ROOT, "
            "e.g. my_train=/data/my/train.json:/data/my/images"
        )
    return name, json_file, image_root


def register_from_cfg(cfg):
    """Register every dataset listed in cfg.DATASETS.LVIS_FORMAT, and the Open Images ones
    (DATASETS.OPENIMAGES, built-in synthetic_oi_* named in DATASETS.TRAIN / TEST) (idempotent)."""
    for spec in cfg.DATASETS.LVIS_FORMAT:
        name, json_file, image_root = parse_dataset_spec(spec)
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            old = (meta.get("json_file"), meta.get("image_root"))
            if old == (json_file, image_root):
                continue
            raise SeesawEcmError(
                f"Dataset name {name!r} given in DATASETS.LVIS_FORMAT is already registered "
                f"with annotation file {old[0]} and image root {old[1]}, not {json_file} and "
                f"{image_root}; choose another name."
            )
        register_lvis_format(name, json_file, image_root)
    register_openimages_from_cfg(cfg)


def synthetic_root(folder="synthetic_lt"):
    """Where a built-in synthetic set lives: $DETECTRON2_DATASETS/<folder> (synthetic_lt: the
    default set; synthetic_lt_demo: the main job's)."""
    return os.path.join(os.getenv("DETECTRON2_DATASETS", "datasets"), folder)


def _load_synthetic(split, name, folder, params):
    # generated on first use, then cached
    from .synthetic_lt import ensure_generated, generate_holdout

    build = generate_holdout if split == "holdout" else ensure_generated
    paths = build(synthetic_root(folder), **params)
    return load_lvis_format_json(paths[f"{split}_json"], paths["image_root"], name)


def register_synthetic():
    """Register the built-in synthetic long-tailed sets: the default generator settings
    (synthetic_lt_*) and the main job's (synthetic_lt_demo_*, synthetic_lt.DEMO), each with
    its train, val and holdout split (SPLITS; the holdout split in `<folder>_holdout`)."""
    from .synthetic_lt import DEMO

    for names, folder, params in ((SYNTHETIC_NAMES, "synthetic_lt", {}),
                                  (DEMO_NAMES, "synthetic_lt_demo", DEMO)):
        for name, split in zip(names, SPLITS):
            root = synthetic_root(folder + ("_holdout" if split == "holdout" else ""))
            DatasetCatalog.register(
                name, lambda s=split, n=name, f=folder, p=params: _load_synthetic(s, n, f, p))
            MetadataCatalog.get(name).set(
                json_file=os.path.join(root, "annotations", f"lvis_v1_{split}.json"),
                image_root=root + os.sep,
                evaluator_type="lvis",
            )


register_synthetic()
register_builtin_lvis_negatives()
