"""One validation pass over a run's config and datasets, before the model or a data loader is
built and before anything is written to OUTPUT_DIR: every problem found, in one message.

The checks are small functions registered in ``CONFIG_CHECKS`` (the config alone) and
``DATASET_CHECKS`` (the datasets the run reads) by the decorators below, each with a docstring
saying what it checks; a check takes (cfg, eval_only) and returns a list of problems or raises
SeesawEcmError for one. Test datasets are also checked by the evaluator_type of their metadata
(``EVALUATOR_CHECKS``; other types are skipped): the fields that evaluator reads from the
annotation file.

:func:`validate_run` runs the checks on the main process and raises the same SeesawEcmError on
every rank.
"""
import collections
import functools
import logging
import time

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, PROPOSAL_GENERATOR_REGISTRY, ROI_HEADS_REGISTRY

from .data import image_check
from .data.augmentation import check_train_augmentation_config
from .data.image_check import image_file_problems
from .data.datasets import read_lvis_json
from .data.instaboost import import_instaboostfast
from .data.statistics import STATISTICS
from .distributed import on_main_process
from .errors import SeesawEcmError
from .evaluation.evaluator import lvis_evaluator_class
from .evaluation.lvis_fast import FREQ_LABELS
from .gradient_balance import check_period
from .losses.ecm import WEIGHT_DTYPES
from .modeling.calibration import check_config as check_calibration_config
from .modeling.cascade import LongTailCascadeROIHeads
from .modeling.cls_loss import (ecm_statistic, loss_spec, statistics_from_train,
                                uses_cosine_classifier)
from .modeling.htc_lite import HTCLiteRCNN, HTCLiteROIHeads
from .modeling.mask_head import NORMED_INITS
from .modeling.roi_heads import LongTailROIHeads
from .modeling.rpn import LowQualityFloorRPN
from .modeling.tta import check_tta_config
from .modeling.deform_conv import check_deform_conv_config
from .modeling.tsd import check_config as check_tsd_config
from .solver import check_clip_config

logger = logging.getLogger(__name__)

NAMED = 3  # ids / files named in a message; the rest are counted

CONFIG_CHECKS = []  # checks of the config alone, in the order they run
DATASET_CHECKS = []  # checks of the datasets the run reads, after the config's


def config_check(check):
    """Register `check(cfg, eval_only)` as a check of the config alone."""
    CONFIG_CHECKS.append(check)
    return check


def dataset_check(check):
    """Register `check(cfg, eval_only)` as a check of the datasets a run reads."""
    DATASET_CHECKS.append(check)
    return check


def _some(items):
    """'a, b, c (and 7 more)'."""
    items = list(items)
    more = f" (and {len(items) - NAMED} more)" if len(items) > NAMED else ""
    return ", ".join(str(x) for x in items[:NAMED]) + more


def _run(checks, cfg, eval_only):
    """The problems the checks find: those they return and the SeesawEcmError each raises."""
    problems = []
    for check in checks:
        try:
            problems += check(cfg, eval_only) or []
        except SeesawEcmError as e:
            problems.append(str(e))
    return problems


def _roi_heads(cfg):
    """The class of MODEL.ROI_HEADS.NAME, or None if it is not registered (reported apart)."""
    name = cfg.MODEL.ROI_HEADS.NAME
    return ROI_HEADS_REGISTRY.get(name) if name in ROI_HEADS_REGISTRY else None


def _registered(registry, key, name):
    if name not in registry:
        raise SeesawEcmError(
            f"{key} {name!r} is not registered; choose one of {sorted(n for n, _ in registry)}.")


@config_check
def check_lvis_eval_backend(cfg, eval_only):
    """TEST.LVIS_EVAL_BACKEND names an LVIS evaluator."""
    lvis_evaluator_class(cfg.TEST.LVIS_EVAL_BACKEND)


@config_check
def check_lvis_metrics_config(cfg, eval_only=False):
    """TEST.AP_FIXED / AP_POOL / BOUNDARY_AP can work: the fast backend, AP-pool on top of
    AP-fixed, K > 0, ROI heads with top-K-per-class inference, masks for boundary AP (also called
    when the evaluator is built)."""
    wanted = [k for k, on in (("TEST.AP_FIXED.ENABLED", cfg.TEST.AP_FIXED.ENABLED),
                              ("TEST.AP_POOL", cfg.TEST.AP_POOL),
                              ("TEST.BOUNDARY_AP", cfg.TEST.BOUNDARY_AP)) if on]
    if wanted and cfg.TEST.LVIS_EVAL_BACKEND != "fast":
        raise SeesawEcmError(f"{', '.join(wanted)} need TEST.LVIS_EVAL_BACKEND 'fast' (the "
                             f"official lvis API has none of them), not "
                             f"{cfg.TEST.LVIS_EVAL_BACKEND!r}.")
    if cfg.TEST.AP_POOL and not cfg.TEST.AP_FIXED.ENABLED:
        raise SeesawEcmError("TEST.AP_POOL is computed on the top-K-per-class detections: set "
                             "TEST.AP_FIXED.ENABLED True as well.")
    if cfg.TEST.AP_FIXED.ENABLED and cfg.TEST.AP_FIXED.TOPK_PER_CLASS <= 0:
        raise SeesawEcmError(f"TEST.AP_FIXED.TOPK_PER_CLASS must be > 0 (LVIS: 10000), got "
                             f"{cfg.TEST.AP_FIXED.TOPK_PER_CLASS}.")
    heads = _roi_heads(cfg)  # None: not registered, reported by check_roi_heads
    if cfg.TEST.AP_FIXED.ENABLED and heads and not issubclass(
            heads, (LongTailROIHeads, LongTailCascadeROIHeads)):  # those with a topk_filter
        raise SeesawEcmError(
            f"TEST.AP_FIXED needs ROI heads with top-K-per-class inference (LongTailROIHeads, "
            f"LongTailCascadeROIHeads, HTCLiteROIHeads), not {cfg.MODEL.ROI_HEADS.NAME!r}. For "
            "detectron2's StandardROIHeads with softmax CE, add MODEL.ROI_HEADS.NAME "
            "LongTailROIHeads (MODEL.LONG_TAIL.LOSS 'ce': the same weights and scores).")
    if cfg.TEST.BOUNDARY_AP and not cfg.MODEL.MASK_ON:
        raise SeesawEcmError("TEST.BOUNDARY_AP needs masks: set MODEL.MASK_ON True or turn "
                             "TEST.BOUNDARY_AP off.")


@config_check
def check_test_time_augmentation(cfg, eval_only):
    """TEST.AUG settings that test-time augmentation can run."""
    check_tta_config(cfg)


@config_check
def check_deformable_convs(cfg, eval_only):
    """MODEL.RESNETS.DEFORM_ON_PER_STAGE has a backbone builder that can run it on this install
    (without compiled detectron2 ops: the project's DCN builders)."""
    check_deform_conv_config(cfg)


@config_check
def check_train_augmentation(cfg, eval_only):
    """INPUT.LONG_EDGE_TRAIN and CROP_AFTER_RESIZE; with INPUT.INSTABOOST, instaboostfast
    installed."""
    check_train_augmentation_config(cfg)
    if cfg.INPUT.INSTABOOST.ENABLED:
        import_instaboostfast()


@config_check
def check_meta_architecture(cfg, eval_only):
    """MODEL.META_ARCHITECTURE is registered."""
    _registered(META_ARCH_REGISTRY, "MODEL.META_ARCHITECTURE", cfg.MODEL.META_ARCHITECTURE)


@config_check
def check_roi_heads(cfg, eval_only):
    """MODEL.ROI_HEADS.NAME is registered."""
    _registered(ROI_HEADS_REGISTRY, "MODEL.ROI_HEADS.NAME", cfg.MODEL.ROI_HEADS.NAME)


def _increasing(values):
    return list(values) == sorted(values)


# MODEL.LONG_TAIL.LOSS -> what its loss module requires of its arguments when it is built:
# (key under MODEL.LONG_TAIL, test of the value, the requirement in words)
_PRIOR = ("PRIOR_PROB", lambda v: 0 < v < 1, "in (0, 1)")
LOSS_ARGUMENTS = {
    "federated": (("FEDERATED.NUM_CLASSES", lambda v: v >= 1, ">= 1"),),
    "eql": (_PRIOR,),
    "eqlv2": (_PRIOR,),
    "droploss": (_PRIOR,),
    "gol": (("GOL.LOGIT_CLAMP", lambda v: len(v) == 2 and v[0] < v[1], "(min, max), min < max"),),
    "bags": (("BAGS.BIN_SPLIT", _increasing, "increasing"),),
}


@config_check
def check_long_tail(cfg, eval_only):
    """For the long-tail ROI heads, MODEL.LONG_TAIL: LOSS with OBJECTNESS, CLASSIFIER,
    STATISTICS_FROM, ECM.STATISTIC and WEIGHT_DTYPE, and the values the chosen loss requires
    (LOSS_ARGUMENTS), without building the loss (the model builds it once)."""
    heads = _roi_heads(cfg)
    if heads is None or not issubclass(heads, (LongTailROIHeads, LongTailCascadeROIHeads)):
        return []
    uses_cosine_classifier(cfg)  # checks CLASSIFIER, then LOSS with OBJECTNESS
    loss_spec(cfg)
    statistics_from_train(cfg)
    statistic = ecm_statistic(cfg)
    if statistic not in STATISTICS:
        raise SeesawEcmError(f"MODEL.LONG_TAIL.ECM.STATISTIC {statistic!r}: valid choices are "
                             f"{STATISTICS}.")
    if cfg.MODEL.LONG_TAIL.ECM.WEIGHT_DTYPE not in WEIGHT_DTYPES:
        raise SeesawEcmError(f"MODEL.LONG_TAIL.ECM.WEIGHT_DTYPE "
                             f"{cfg.MODEL.LONG_TAIL.ECM.WEIGHT_DTYPE!r}: valid choices are "
                             f"{', '.join(map(repr, WEIGHT_DTYPES))}.")
    lt = cfg.MODEL.LONG_TAIL
    if lt.LOSS == "loce" and cfg.MODEL.ROI_HEADS.NAME != "LOCEROIHeads":
        raise SeesawEcmError('MODEL.LONG_TAIL.LOSS "loce" needs MODEL.ROI_HEADS.NAME '
                             '"LOCEROIHeads" (it updates the mean scores and replays features).')
    problems = []
    for key, valid, requirement in LOSS_ARGUMENTS.get(lt.LOSS, ()):
        value = functools.reduce(lambda node, part: node[part], key.split("."), lt)
        if not valid(value):
            problems.append(f"MODEL.LONG_TAIL.{key} must be {requirement} for LOSS {lt.LOSS!r}, "
                            f"got {value}.")
    return problems


@config_check
def check_keys_the_model_reads(cfg, eval_only):
    """Keys that the chosen parts would silently ignore: MODEL.LONG_TAIL.LOSS other than "ce"
    with ROI heads that build no long-tail loss (detectron2's StandardROIHeads trains softmax
    CE), MODEL.RPN.LOW_QUALITY_MIN_IOU > 0 with a proposal generator that has no floor; and the
    values of that floor and of MODEL.ROI_MASK_HEAD.NORMED_INIT."""
    problems = []
    if cfg.MODEL.ROI_MASK_HEAD.NORMED_INIT not in NORMED_INITS:
        problems.append(f"MODEL.ROI_MASK_HEAD.NORMED_INIT {cfg.MODEL.ROI_MASK_HEAD.NORMED_INIT!r}: "
                        f"valid choices are {', '.join(map(repr, NORMED_INITS))}.")
    heads, loss = _roi_heads(cfg), cfg.MODEL.LONG_TAIL.LOSS
    if heads is not None and loss != "ce" and not issubclass(
            heads, (LongTailROIHeads, LongTailCascadeROIHeads)):
        problems.append(
            f"MODEL.LONG_TAIL.LOSS {loss!r} is ignored by MODEL.ROI_HEADS.NAME "
            f"{cfg.MODEL.ROI_HEADS.NAME!r} (it trains its own softmax CE): set "
            "MODEL.ROI_HEADS.NAME 'LongTailROIHeads' (cascade: 'LongTailCascadeROIHeads', "
            "HTC-Lite: 'HTCLiteROIHeads'), or MODEL.LONG_TAIL.LOSS 'ce'.")
    floor, rpn = cfg.MODEL.RPN.LOW_QUALITY_MIN_IOU, cfg.MODEL.PROPOSAL_GENERATOR.NAME
    if not 0 <= floor <= 1:
        problems.append(f"MODEL.RPN.LOW_QUALITY_MIN_IOU must be in [0, 1] (an IoU; 0 = no "
                        f"floor), got {floor}.")
    elif floor > 0 and rpn in PROPOSAL_GENERATOR_REGISTRY and not issubclass(
            PROPOSAL_GENERATOR_REGISTRY.get(rpn), LowQualityFloorRPN):
        problems.append(
            f"MODEL.RPN.LOW_QUALITY_MIN_IOU {floor} is ignored by MODEL.PROPOSAL_GENERATOR.NAME "
            f"{rpn!r} (no floor on its low-quality matches): set MODEL.PROPOSAL_GENERATOR.NAME "
            "'LowQualityFloorRPN', or MODEL.RPN.LOW_QUALITY_MIN_IOU 0.")
    return problems


@config_check
def check_cascade(cfg, eval_only):
    """For the cascade heads (and HTC-Lite's), MODEL.CASCADE values they can run."""
    heads = _roi_heads(cfg)
    if heads is not None and issubclass(heads, LongTailCascadeROIHeads):
        heads.check_config(cfg)


@config_check
def check_calibration(cfg, eval_only):
    """MODEL.ROI_HEADS.CALIBRATION: known values, and ROI heads whose predictors calibrate."""
    check_calibration_config(cfg)
    heads = _roi_heads(cfg)
    if (cfg.MODEL.ROI_HEADS.CALIBRATION.METHOD != "none" and heads is not None
            and not issubclass(heads, (LongTailROIHeads, LongTailCascadeROIHeads))):
        raise SeesawEcmError(
            f"MODEL.ROI_HEADS.CALIBRATION needs the long-tail box predictor, which "
            f"MODEL.ROI_HEADS.NAME {cfg.MODEL.ROI_HEADS.NAME!r} has not: set it "
            "\"LongTailROIHeads\" (the weights of a StandardROIHeads CE model load into it, with "
            "MODEL.LONG_TAIL.LOSS \"ce\", and give the same detections).")


@config_check
def check_htc_lite_context(cfg, eval_only):
    """Training HTCLiteROIHeads with MODEL.HTC_LITE.CONTEXT needs the HTCLiteRCNN
    meta-architecture (its image-level labels)."""
    heads = _roi_heads(cfg)
    arch = cfg.MODEL.META_ARCHITECTURE
    if (not eval_only and heads is not None and issubclass(heads, HTCLiteROIHeads)
            and cfg.MODEL.HTC_LITE.CONTEXT and arch in META_ARCH_REGISTRY
            and not issubclass(META_ARCH_REGISTRY.get(arch), HTCLiteRCNN)):
        raise SeesawEcmError(
            "HTCLiteROIHeads with MODEL.HTC_LITE.CONTEXT True trains on image-level labels that "
            "only MODEL.META_ARCHITECTURE 'HTCLiteRCNN' provides; set it (or CONTEXT False).")


@config_check
def check_tsd(cfg, eval_only):
    """With MODEL.TSD.ENABLED, MODEL.TSD values TSD can run."""
    if cfg.MODEL.TSD.ENABLED:
        check_tsd_config(cfg)


@config_check
def check_gradient_balance(cfg, eval_only):
    """With the gradient-balance hook, a positive MODEL.LONG_TAIL.GRADIENT_BALANCE.PERIOD."""
    if cfg.MODEL.LONG_TAIL.GRADIENT_BALANCE.ENABLED:
        check_period(cfg.MODEL.LONG_TAIL.GRADIENT_BALANCE.PERIOD)


@config_check
def check_gradient_clipping(cfg, eval_only):
    """SOLVER.CLIP_GRADIENTS: a known CLIP_TYPE ("full_model" included) and CLIP_VALUE > 0."""
    check_clip_config(cfg)


@config_check
def check_num_classes(cfg, eval_only):
    """MODEL.ROI_HEADS.NUM_CLASSES >= 1."""
    if cfg.MODEL.ROI_HEADS.NUM_CLASSES < 1:
        raise SeesawEcmError(f"MODEL.ROI_HEADS.NUM_CLASSES is {cfg.MODEL.ROI_HEADS.NUM_CLASSES}; "
                             "set it to the number of classes of the datasets.")


@config_check
def check_train_datasets_named(cfg, eval_only):
    """Training names its datasets (DATASETS.TRAIN not empty)."""
    if not eval_only and not cfg.DATASETS.TRAIN:
        raise SeesawEcmError("DATASETS.TRAIN is empty: name the training datasets (or evaluate "
                             "with --eval-only).")


def config_problems(cfg, eval_only=False):
    """Problems of the config alone (no dataset read): a list of messages."""
    return _run(CONFIG_CHECKS, cfg, eval_only)


def image_problems(name, records):
    """The image files of a dataset's records that are missing, not decodable (truncated,
    corrupt, not an image) or of another size than their record: one problem per kind."""
    found = collections.defaultdict(list)
    for record, (kind, detail) in image_file_problems(records):
        found[kind].append((record, detail))
    problems = []
    for kind, (what, fix) in IMAGE_FIXES.items():
        if found[kind]:
            named = _some(
                f"{r['file_name']} ({detail})" if kind != image_check.WRONG_SIZE else
                f"{r['file_name']} (image {r.get('image_id')}: json {r['width']}x{r['height']}, "
                f"file {detail})" for r, detail in found[kind])
            problems.append(f"Dataset {name!r}: {len(found[kind])} of {len(records)} image files "
                            f"{what}: {named}. {fix}")
    return problems


# image_check's kind of problem -> (what is wrong, the fix)
IMAGE_FIXES = {
    image_check.MISSING: (
        "are missing or unreadable",
        "Check the dataset's image root (--dataset NAME=JSON_FILE:IMAGE_ROOT), or set "
        "DATASETS.CHECK_IMAGE_FILES False to skip this check."),
    image_check.NOT_DECODABLE: (
        "are truncated, corrupt or not images",
        "Restore the files (copy them again), or remove their images from the annotation file."),
    image_check.WRONG_SIZE: (
        "have another size (width x height) than their json records",
        "Correct width/height in the json to the files' sizes (after their EXIF orientation), "
        "or restore the right files."),
}


def lvis_test_problems(meta, backend):
    """What LVIS evaluation reads from a test set's annotation file (meta.json_file) beyond the
    LVIS-format loader's checks: every category's `frequency` ('r', 'c', 'f'; APr / APc / APf) or
    none's (a COCO-format set: APr / APc / APf unavailable; the official lvis backend needs it),
    every annotation's `area` (area ranges, zero-area ground truth dropped) and, for the
    official lvis backend, every image's `neg_category_ids` and `not_exhaustive_category_ids`
    (LVISEval indexes them; the fast backend treats a missing list as empty)."""
    json_file = meta.get("json_file")
    if not json_file:
        return ["its metadata has no json_file, which the LVIS evaluator reads."]
    data = read_lvis_json(json_file)
    problems = []
    bad = [c["id"] for c in data["categories"] if c.get("frequency") not in FREQ_LABELS]
    if len(bad) == len(data["categories"]) and backend == "lvis":
        problems.append(f"the categories of {json_file} have no LVIS 'frequency' ('r', 'c' or "
                        "'f'), which TEST.LVIS_EVAL_BACKEND 'lvis' needs; use the 'fast' "
                        "backend (APr / APc / APf then reported as unavailable) or add it.")
    elif bad and len(bad) < len(data["categories"]):
        problems.append(f"categories {_some(bad)} of {json_file} have no valid LVIS 'frequency' "
                        "('r', 'c' or 'f') but others have one; add it to every category (for "
                        "APr / APc / APf) or remove it from all (a COCO-format set: APr / APc / "
                        "APf unavailable).")
    bad = [a["id"] for a in data["annotations"]
           if isinstance(a.get("area"), bool) or not isinstance(a.get("area"), (int, float))]
    if bad:
        problems.append(f"annotations {_some(bad)} of {json_file} have no numeric 'area', which "
                        "the evaluation reads; add it (the mask area in pixels).")
    if backend == "lvis":
        keys = ("neg_category_ids", "not_exhaustive_category_ids")
        bad = [im["id"] for im in data["images"] if any(k not in im for k in keys)]
        if bad:
            problems.append(f"images {_some(bad)} of {json_file} lack 'neg_category_ids' or "
                            "'not_exhaustive_category_ids', which TEST.LVIS_EVAL_BACKEND 'lvis' "
                            "reads; add them (empty lists if unknown) or use the 'fast' backend.")
    return problems


# evaluator_type of a test dataset's metadata -> (metadata, cfg) -> list of problems
EVALUATOR_CHECKS = {
    "lvis": lambda meta, cfg: lvis_test_problems(meta, cfg.TEST.LVIS_EVAL_BACKEND),
}


def _load(name, key):
    """(records, problem): the dataset's records, or the reason they could not be loaded."""
    if name not in DatasetCatalog.list():
        return None, (f"Dataset {name!r} in {key} is not registered; register it with --dataset "
                      "NAME=JSON_FILE:IMAGE_ROOT (DATASETS.LVIS_FORMAT) or use a built-in name.")
    try:
        return DatasetCatalog.get(name), None
    except SeesawEcmError as e:
        return None, f"Dataset {name!r}: {e}"
    except Exception as e:  # noqa: BLE001  (detectron2's or a user's loader: its message)
        return None, (f"Dataset {name!r} in {key} could not be loaded ({type(e).__name__}: {e}); "
                      "check its files ($DETECTRON2_DATASETS for detectron2's built-in sets).")


def record_problems(name, records, num_classes, check_ids=True):
    """Unique image ids and (with `check_ids`) category ids in [0, num_classes) of detectron2
    dataset dicts."""
    problems = []
    counts = collections.Counter(r.get("image_id") for r in records)
    twice = [i for i, n in counts.items() if n > 1]
    if twice:
        problems.append(f"Dataset {name!r}: image ids {_some(twice)} are used more than once; "
                        "make them unique.")
    if not check_ids:  # the class count is already reported wrong
        return problems
    bad = sorted({a["category_id"] for r in records for a in r.get("annotations", ())
                  if not 0 <= a["category_id"] < num_classes})
    if bad:
        problems.append(
            f"Dataset {name!r} has category ids {_some(bad)} outside [0, {num_classes}): the "
            "dataset has more classes than MODEL.ROI_HEADS.NUM_CLASSES; set it to the number "
            "of classes.")
    return problems


@dataset_check
def dataset_problems(cfg, eval_only=False):
    """Every dataset of DATASETS.TRAIN (training only: evaluation takes the class statistics from
    the weights) and DATASETS.TEST: registered and loadable (the LVIS-format loader validates its
    file: fields, references, unique ids), unique image ids, class count equal to
    MODEL.ROI_HEADS.NUM_CLASSES, the same class names in every dataset, category ids in
    [0, NUM_CLASSES), image files present, complete and of their records' size
    (DATASETS.CHECK_IMAGE_FILES), what the evaluator of each test set reads (EVALUATOR_CHECKS),
    every dataset with images and, for training, some image with annotations (detectron2 drops
    images without them: DATALOADER.FILTER_EMPTY_ANNOTATIONS)."""
    problems = []
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    train = () if eval_only else tuple(cfg.DATASETS.TRAIN)
    reference = None  # (name, class names) of the first dataset with NUM_CLASSES names
    wrong_count = {}  # class count other than NUM_CLASSES -> names of the datasets with it
    training = [0, 0]  # training images, those with an annotation that is no crowd region
    for name in dict.fromkeys(train + tuple(cfg.DATASETS.TEST)):
        key = "DATASETS.TRAIN" if name in train else "DATASETS.TEST"
        records, problem = _load(name, key)
        if problem or not records:
            problems.append(problem or f"Dataset {name!r} in {key} has no images (annotation "
                            f"file: {MetadataCatalog.get(name).get('json_file', 'unknown')}); "
                            f"name a dataset with images in {key}.")
            continue
        if name in train:
            training[0] += len(records)
            training[1] += sum(any(not a.get("iscrowd", 0) for a in r.get("annotations", ()))
                               for r in records)
        meta = MetadataCatalog.get(name)
        classes = meta.get("thing_classes")
        count_wrong = classes is not None and len(classes) != num_classes
        if count_wrong:
            wrong_count.setdefault(len(classes), []).append(repr(name))
        elif classes is not None and reference and list(classes) != list(reference[1]):
            diff = next(i for i, (a, b) in enumerate(zip(classes, reference[1])) if a != b)
            problems.append(
                f"Dataset {name!r} and {reference[0]!r} have other class names (class {diff}: "
                f"{classes[diff]!r} vs {reference[1][diff]!r}); every dataset of a run needs the "
                "same classes in the same order.")
        if classes is not None and not count_wrong:
            reference = reference or (name, classes)
        problems += record_problems(name, records, num_classes, check_ids=not count_wrong)
        if cfg.DATASETS.CHECK_IMAGE_FILES:
            problems += image_problems(name, records)
        check = EVALUATOR_CHECKS.get(meta.get("evaluator_type"))
        if check is not None and name in cfg.DATASETS.TEST:
            try:
                problems += [f"Test dataset {name!r}: {p}" for p in check(meta, cfg)]
            except SeesawEcmError as e:
                problems.append(f"Test dataset {name!r}: {e}")
    if training[0] and not training[1] and cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
        problems.append(
            f"DATASETS.TRAIN {train} has {training[0]} images but no annotation: detectron2 drops "
            "images without annotations from training (DATALOADER.FILTER_EMPTY_ANNOTATIONS "
            "True), which leaves nothing to train on; add the annotations to the file.")
    for count, names in wrong_count.items():
        which = f"Dataset {names[0]} has" if len(names) == 1 else (
            f"Datasets {', '.join(names)} have")
        problems.insert(0, f"{which} {count} classes but MODEL.ROI_HEADS.NUM_CLASSES is "
                        f"{num_classes}; set MODEL.ROI_HEADS.NUM_CLASSES {count}.")
    return problems


def find_problems(cfg, eval_only=False):
    """Every problem of the config and the datasets of a run (training, or evaluation only)."""
    return config_problems(cfg, eval_only) + _run(DATASET_CHECKS, cfg, eval_only)


def _message(problems):
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems in the input:\n" + "\n".join(f"  - {p}" for p in problems)


def _validate(cfg, eval_only):
    start = time.perf_counter()
    problems = find_problems(cfg, eval_only)
    if problems:
        raise SeesawEcmError(_message(problems))
    return time.perf_counter() - start


def validate_run(cfg, eval_only=False):
    """Check the config and datasets of a run on the main process; every rank raises the same
    SeesawEcmError (all problems in one message) or returns the seconds the checks took."""
    return on_main_process(_validate, cfg, eval_only)
