"""Every config key that seesaw_ecm adds to detectron2's defaults, with its default value.

:func:`add_seesaw_ecm_config` calls one ``add_*_config`` per node, each adding the keys of the
part that reads them (every key with its default and a one-line comment). They live together
here, not beside their parts, so that one file lists every knob and adding the keys imports no
model code. Keys that moved are in ``RENAMED_KEYS``: a config (yaml file or opts list) that still
sets one fails to merge with an error naming the new key.
"""
import difflib
import re

import yaml
from detectron2.config import CfgNode as CN

from .errors import SeesawEcmError

# Old key -> (new key, how to convert its value). detectron2 merges refuse an old key with an
# error naming the new one (yacs' renamed keys; `merge_config` raises it as SeesawEcmError).
RENAMED_KEYS = {
    "MODEL.ROI_ALIGN_VECTORIZED_BACKWARD": (
        "MODEL.ROI_ALIGN.VECTORIZED_BACKWARD", "the same value, under the RoIAlign node."),
    "SOLVER.CLIP_GRADIENTS_GLOBAL_NORM": (
        "SOLVER.CLIP_GRADIENTS", "a global-norm clip at X becomes SOLVER.CLIP_GRADIENTS.ENABLED "
        "True, CLIP_TYPE \"full_model\", CLIP_VALUE X (0 = off: leave ENABLED False)."),
}


def add_seesaw_ecm_config(cfg):
    """Add seesaw_ecm's keys to a detectron2 config (in place). Call before merge_from_file."""
    for add in (add_datasets_config, add_long_tail_config, add_long_tail_baselines_config,
                add_gradient_balance_config, add_htc_lite_config, add_cascade_config,
                add_tsd_config, add_rpn_config, add_mask_head_config, add_mask_scoring_config,
                add_carafe_config, add_resnest_config, add_fpg_config,
                add_train_augmentation_config, add_roi_align_config, add_sampling_config,
                add_solver_config, add_evaluation_config, add_calibration_config):
        add(cfg)
    for old, (new, how) in RENAMED_KEYS.items():
        if not cfg.key_is_renamed(old):  # (yacs refuses a second registration)
            cfg.register_renamed_key(old, new, how)


def merge_config(cfg, config_file=None, opts=()):
    """Merge a yaml file, then an opts list ("KEY", value, ...), into cfg. Bad input raises
    SeesawEcmError naming the problem and the fix: a missing or unparsable file, a flag placed
    among the KEY VALUE pairs (argparse gives every word after the first pair to them), a key
    without a value, a key of RENAMED_KEYS (naming its new key), an unknown key (naming the
    closest valid one) and a value of the wrong type (naming the key's type and current value)."""
    opts = list(opts)
    _check_opts(opts)
    source = config_file
    try:
        if config_file:
            cfg.merge_from_file(config_file)
        source = "the command line's KEY VALUE pairs"
        cfg.merge_from_list(opts)
    except (KeyError, AssertionError, ValueError, OSError, yaml.YAMLError) as e:
        raise SeesawEcmError(_merge_error(cfg, e, source, config_file)) from None


def _check_opts(opts):
    flags = [o for o in opts if isinstance(o, str) and o.startswith("--")]
    if flags:
        raise SeesawEcmError(
            f"{' '.join(flags)} comes after the KEY VALUE pairs, which take every word after the "
            "first pair (here as config keys); put the flags first: train_net.py --config-file "
            f"FILE {' '.join(flags)} KEY VALUE ...")
    if len(opts) % 2:
        raise SeesawEcmError(
            f"The KEY VALUE pairs after the flags have an odd number of words: {opts[-1]!r} (or "
            "an earlier key) has no value; give each key its value, quoting values with spaces, "
            "e.g. DATASETS.TRAIN \"('a', 'b')\".")


def _flat_keys(node, prefix=""):
    for k, v in node.items():
        if isinstance(v, CN):
            yield from _flat_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def _lookup(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _merge_error(cfg, error, source, config_file):
    """The message of an error of detectron2's / yacs' merge (KeyError, AssertionError,
    ValueError, OSError, yaml.YAMLError) in `source`."""
    text = str(error.args[0]) if error.args else str(error)
    if any(f"Key {old} was renamed" in text for old in RENAMED_KEYS):
        return text
    unknown = re.search(r"Non-existent (?:config )?key: (\S+)", text)
    if unknown:
        key = unknown.group(1)
        close = difflib.get_close_matches(key, list(_flat_keys(cfg)), n=1, cutoff=0.8)
        hint = f"did you mean {close[0]}? " if close else ""
        return (f"Unknown config key {key} in {source}: {hint}Check its spelling against the "
                "keys of detectron2 and seesaw_ecm/config.py.")
    mismatch = re.search(r"Type mismatch \((.+?) vs\. (.+?)\) with values \((.*) vs\. (.*)\) "
                         r"for config key: (\S+)", text)
    if mismatch:
        key, given, given_type = mismatch.group(5), mismatch.group(4), mismatch.group(2)
        current = _lookup(cfg, key)
        kind = type(current).__name__
        example = current
        if isinstance(current, (tuple, list)):  # the value given, as a one-element tuple
            example = f'"({given!r},)"' if _type_name(given_type) == "str" else f'"({given},)"'
            if given.startswith(("(", "[")):  # a literal that Python could not read
                example = f'"{current}" (a Python literal: matching brackets, quoted strings)'
        return (f"Config key {key} in {source} takes {_a(kind)} (now {current!r}), got "
                f"{given!r} ({_a(_type_name(given_type))}); give {_a(kind)}, e.g. {key} "
                f"{example}" + (" (with a decimal point)" if isinstance(current, float) else "")
                + ".")
    if isinstance(error, yaml.YAMLError):
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return (f"Config file {getattr(mark, 'name', config_file)} is not valid YAML "
                f"({getattr(error, 'problem', None) or text}{where}); fix its syntax.")
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError):
        return (f"Config file {getattr(error, 'filename', None) or config_file} could not be read "
                f"({type(error).__name__}: {error.strerror}); check its permissions.")
    if isinstance(error, FileNotFoundError) or "does not exist" in text:
        missing = getattr(error, "filename", None) or config_file
        if missing != config_file:
            return (f"Config file {missing}, the _BASE_ of {config_file}, does not exist; check "
                    "that _BASE_ path (relative to the file naming it).")
        return f"Config file {missing} does not exist; check the path given to --config-file."
    raise error


def _a(noun):
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


def _type_name(yacs_type):
    """"<class 'int'>" (yacs' message) -> "int"."""
    match = re.fullmatch(r"<class '(.+)'>", yacs_type)
    return match.group(1) if match else yacs_type


def add_datasets_config(cfg):
    """DATASETS: datasets to register, and the image-file check of validation."""
    # LVIS-format datasets to register before training / evaluation, each as
    # "NAME=JSON_FILE:IMAGE_ROOT" (train_net.py --dataset appends here). Images are found through
    # each image's `file_name`, else the last two parts of its `coco_url`, under IMAGE_ROOT.
    cfg.DATASETS.LVIS_FORMAT = []
    # Open Images datasets (official challenge files; docs/EVALUATION.md) to register, each as
    # "NAME=BOXES_CSV:LABELS_CSV:CLASSES_CSV:HIERARCHY_JSON:IMAGE_ROOT[:SIZES_CSV]"
    # (train_net.py --openimages-dataset appends here).
    cfg.DATASETS.OPENIMAGES = []
    # How the model covers the parent classes of the Open Images hierarchy (the official metric
    # expands the ground truth, not the detections): "expand_boxes" = train on boxes and labels
    # expanded to every ancestor (the model predicts parents itself); "copy_detections" = train
    # on the files' boxes and copy each detection to every ancestor of its class at evaluation.
    cfg.DATASETS.OPENIMAGES_PARENT_CLASSES = "expand_boxes"

    # Validation before training / evaluation (seesaw_ecm/validation.py): check that every
    # image file of DATASETS.TRAIN / TEST is a complete image of its record's width x height
    # (header and end read, seesaw_ecm/data/image_check.py; ~12 s per 110k small JPEGs on 2 busy
    # cores). False skips it; a file that fails later is still named.
    cfg.DATASETS.CHECK_IMAGE_FILES = True


def add_long_tail_config(cfg):
    """MODEL.LONG_TAIL: the long-tail box predictor, its classifier and loss (Seesaw, ECM,
    Federated)."""
    # The long-tail box predictor, used by ROI_HEADS.NAME "LongTailROIHeads" and, in every
    # stage, by "LongTailCascadeROIHeads".
    cfg.MODEL.LONG_TAIL = CN()
    # Classification loss (seesaw_ecm.modeling.cls_loss.LOSS_SPECS): "ce" (softmax CE, linear
    # classifier), "cosine_ce" (softmax CE, cosine classifier), "federated" (sigmoid Federated
    # loss, linear), "seesaw" (cosine, needs OBJECTNESS), "ecm" (cosine), "eql", "eqlv2",
    # "droploss" (sigmoid, linear), "gol" (DropLoss with the Gumbel activation, linear), "bags"
    # (group softmax, linear) or "loce" (equilibrium loss, linear; needs ROI_HEADS.NAME
    # "LOCEROIHeads"). One key switches between methods.
    cfg.MODEL.LONG_TAIL.LOSS = "ce"
    # Multiplier of the classification loss terms (loss_cls, and loss_objectness for Seesaw).
    cfg.MODEL.LONG_TAIL.LOSS_WEIGHT = 1.0
    # Classifier: "auto" = the one LOSS names above; "cosine" = NormedLinear (L2-normalized
    # features and weights); "linear" = nn.Linear. Override only for ablations.
    cfg.MODEL.LONG_TAIL.CLASSIFIER = "auto"
    # Temperature (tau) that multiplies the cosine similarities of the cosine classifier.
    cfg.MODEL.LONG_TAIL.TEMPERATURE = 20.0
    # Decoupled objectness branch (2 logits, fg / bg) beside C class logits. Required by
    # "seesaw"; with "ce" it gives CE over the C classes on foreground RoIs + objectness CE.
    cfg.MODEL.LONG_TAIL.OBJECTNESS = False
    # Where class statistics (ECM margins, Federated sampling weights) come from: "train" =
    # counted on DATASETS.TRAIN when the model is built; "checkpoint" = left empty and loaded
    # with MODEL.WEIGHTS (eval-only, deployment; train_net.py --eval-only sets it).
    cfg.MODEL.LONG_TAIL.STATISTICS_FROM = "train"
    # Deprecated old name of ECM.STATISTIC (read by ECM only); "" = unset. Still accepted, with
    # a warning.
    cfg.MODEL.LONG_TAIL.STATISTIC = ""

    cfg.MODEL.LONG_TAIL.SEESAW = CN()
    cfg.MODEL.LONG_TAIL.SEESAW.P = 0.8  # mitigation exponent: (N_k / N_i)^p for N_k < N_i
    cfg.MODEL.LONG_TAIL.SEESAW.Q = 2.0  # compensation exponent: (sigma_k / sigma_i)^q if > 1
    cfg.MODEL.LONG_TAIL.SEESAW.EPS = 1e-2  # floor of sigma_i in the compensation ratio

    cfg.MODEL.LONG_TAIL.ECM = CN()
    # Background count = FG_BG_RATIO x sum of the class counts ("empirical fg/bg ratio of
    # Mask R-CNN" in the official code).
    cfg.MODEL.LONG_TAIL.ECM.FG_BG_RATIO = 6.3313
    # Per-class statistic of the ECM margins, counted on DATASETS.TRAIN: "instance_count" (as
    # the official ECM file) or "image_count".
    cfg.MODEL.LONG_TAIL.ECM.STATISTIC = "instance_count"
    # Precision of the class weights a log((1 + a) / a): "float64" (default: the exact value of
    # the formula) or "float32" (the official code: (1 + a) / a rounds for the rarest classes,
    # LVIS v1 w = 1.110 instead of 1.000; the LVIS ECM recipes set it to train as published).
    cfg.MODEL.LONG_TAIL.ECM.WEIGHT_DTYPE = "float64"

    # Federated loss: its negatives are sampled by the training image count of each class
    # (always image counts, whatever ECM.STATISTIC says).
    cfg.MODEL.LONG_TAIL.FEDERATED = CN()
    # Classes per batch: those present (background included) plus sampled negatives.
    cfg.MODEL.LONG_TAIL.FEDERATED.NUM_CLASSES = 50
    # Negative classes are drawn with probability proportional to image_count ** POWER.
    cfg.MODEL.LONG_TAIL.FEDERATED.FREQ_WEIGHT_POWER = 0.5


def add_long_tail_baselines_config(cfg):
    """MODEL.LONG_TAIL: the other long-tail baselines' losses and decoupled training."""
    # Other long-tail baselines (issue 18): "eql", "eqlv2", "droploss" (sigmoid losses with a
    # linear classifier whose bias starts at the prior below, as their official code), "bags".
    # Initial sigmoid probability pi of every classifier column: bias = -log((1 - pi) / pi).
    cfg.MODEL.LONG_TAIL.PRIOR_PROB = 0.001
    cfg.MODEL.LONG_TAIL.EQL = CN()
    # Tail classes: training image frequency (images with the class / images) below LAMBDA_
    # (LVIS v1 0.0011 as the eqlv2 configs; LVIS v0.5 0.00177).
    cfg.MODEL.LONG_TAIL.EQL.LAMBDA_ = 0.0011
    cfg.MODEL.LONG_TAIL.EQLV2 = CN()
    cfg.MODEL.LONG_TAIL.EQLV2.GAMMA = 12.0  # slope of neg_w = sigmoid(GAMMA (g - MU))
    cfg.MODEL.LONG_TAIL.EQLV2.MU = 0.8  # centre of the mapping, g = pos_grad / neg_grad
    cfg.MODEL.LONG_TAIL.EQLV2.ALPHA = 4.0  # pos_w = 1 + ALPHA (1 - neg_w)
    cfg.MODEL.LONG_TAIL.DROPLOSS = CN()
    # Tail-class image-frequency threshold, as EQL.LAMBDA_ (the official shipped config: 0.00177).
    cfg.MODEL.LONG_TAIL.DROPLOSS.LAMBDA_ = 0.00177
    # "gol": Gumbel Optimised Loss, DropLoss's rule with p = exp(-exp(-z)) as the link of its
    # binary cross-entropy and as the test-time score (seesaw_ecm/losses/gumbel.py).
    cfg.MODEL.LONG_TAIL.GOL = CN()
    # Tail-class image-frequency threshold, as DROPLOSS.LAMBDA_ (official LVIS v1 configs: 0.0011).
    cfg.MODEL.LONG_TAIL.GOL.LAMBDA_ = 0.0011
    # (min, max) the logits are clamped to inside the loss (official); no gradient outside.
    cfg.MODEL.LONG_TAIL.GOL.LOGIT_CLAMP = (-4.0, 10.0)
    # Classifier bias at the start (official init_cfg bias=-2: scores exp(-exp(2)) = 6.2e-4).
    cfg.MODEL.LONG_TAIL.GOL.BIAS_INIT = -2.0
    # Every classifier weight at the start (official init_cfg Constant val=0.001).
    cfg.MODEL.LONG_TAIL.GOL.WEIGHT_INIT = 0.001
    # "bags": Balanced Group Softmax (linear classifier, C + 1 + G logits).
    cfg.MODEL.LONG_TAIL.BAGS = CN()
    # Foreground groups by training instance count: [0, 10), [10, 100), [100, 1000), [1000, inf).
    cfg.MODEL.LONG_TAIL.BAGS.BIN_SPLIT = (10, 100, 1000)
    # "Others" RoIs kept per positive RoI in each foreground group (sampled each batch).
    cfg.MODEL.LONG_TAIL.BAGS.BETA = 8.0
    # Decoupled training (second stages of BaGS, LOCE): regular expressions (re.match) of the
    # parameter names that train; all others are frozen (BatchNorm left without a trainable
    # parameter becomes FrozenBatchNorm2d) and MODEL.WEIGHTS must be the first stage's model.
    # Empty = everything trains. The box classifier (any cascade stage):
    # r"roi_heads\.box_predictor\.(\d+\.)?cls_score\."
    cfg.MODEL.LONG_TAIL.TRAINABLE = []
    # "loce": equilibrium loss, with ROI_HEADS.NAME "LOCEROIHeads" (memory-augmented sampling).
    cfg.MODEL.LONG_TAIL.LOCE = CN()
    cfg.MODEL.LONG_TAIL.LOCE.MOMENTUM = 0.9  # mean score m <- a m + (1 - a) batch, a = MOMENTUM^n
    cfg.MODEL.LONG_TAIL.LOCE.INITIAL_SCORE = 0.01  # initial mean score of every class
    cfg.MODEL.LONG_TAIL.LOCE.BACKGROUND_SCORE = 0.01  # fixed mean score of the background
    # Feature memory: QUEUE_SIZE RoI features per class; size C x QUEUE_SIZE x 256 x 7 x 7 x
    # 4 B = 4.83 GB at 1,203 classes in float32 (logged when the heads are built).
    cfg.MODEL.LONG_TAIL.LOCE.QUEUE_SIZE = 80
    # Storage of the memory's features: "float32" (official) or "float16" (half the size).
    cfg.MODEL.LONG_TAIL.LOCE.MEMORY_DTYPE = "float32"
    # Where the memory lives: "model" (the model's device: on a GPU no copies and no host
    # syncs per step, for its GPU memory) or "cpu" (the official default: enqueued features
    # are copied to the host, replayed ones back to the model's device, every step).
    cfg.MODEL.LONG_TAIL.LOCE.MEMORY_DEVICE = "model"
    cfg.MODEL.LONG_TAIL.LOCE.SAMPLED_CLASSES = 8  # classes replayed per iteration (by 1 / m_c)
    cfg.MODEL.LONG_TAIL.LOCE.SAMPLED_FEATURES = 4  # features replayed per drawn class
    # Initialisation pass (the official InitializerHook; seesaw_ecm/loce_init.py): before
    # iteration 1, the training forward in eval mode and without gradients over IMAGES_PER_CLASS
    # images of every class per GPU, filling every class's feature memory and measuring its
    # mean score (on resume: the memory only; the mean scores stay the checkpoint's). Off =
    # empty memories, mean scores at INITIAL_SCORE.
    cfg.MODEL.LONG_TAIL.LOCE.INIT_PASS = CN()
    cfg.MODEL.LONG_TAIL.LOCE.INIT_PASS.ENABLED = True  # run the pass (official: yes)
    # Images per class and GPU; 0 = QUEUE_SIZE // 16 (the official: 5 at 80 slots, 16 per box).
    cfg.MODEL.LONG_TAIL.LOCE.INIT_PASS.IMAGES_PER_CLASS = 0


def add_gradient_balance_config(cfg):
    """MODEL.LONG_TAIL.GRADIENT_BALANCE: the gradient-balance diagnostic."""
    # Gradient-balance diagnostic (seesaw_ecm/gradient_balance.py): per class, the summed
    # |dL/dz| of the classifier logits from RoIs of that class (positive) and of all others
    # (negative), saved in checkpoints and OUTPUT_DIR/gradient_balance.json. Off = no hook.
    cfg.MODEL.LONG_TAIL.GRADIENT_BALANCE = CN()
    # Install the hook (opt-in; measured < 0.5% slower per iteration when on, nothing when off).
    cfg.MODEL.LONG_TAIL.GRADIENT_BALANCE.ENABLED = False
    # Iterations between all-reduces of the sums and TensorBoard / metrics.json summaries.
    cfg.MODEL.LONG_TAIL.GRADIENT_BALANCE.PERIOD = 20


def add_calibration_config(cfg):
    """MODEL.ROI_HEADS.CALIBRATION: test-time calibration of the class scores
    (seesaw_ecm/modeling/calibration.py), for every box predictor and cascade stage."""
    cfg.MODEL.ROI_HEADS.CALIBRATION = CN()
    # "none" (the loss's own scores), "norcal" (scores / count^GAMMA, background apart) or
    # "logit_adjustment" (class logits - TAU log(prior), then the loss's activation).
    cfg.MODEL.ROI_HEADS.CALIBRATION.METHOD = "none"
    # NorCal's exponent of the class counts (official: tuned on held-out data; 0 = no change).
    cfg.MODEL.ROI_HEADS.CALIBRATION.GAMMA = 0.0
    # Logit adjustment's factor of log(prior) (1 = the Bayes-optimal shift; 0 = no change).
    cfg.MODEL.ROI_HEADS.CALIBRATION.TAU = 0.0
    # NorCal: divide each proposal's C + 1 re-weighted scores by their sum (official: True).
    cfg.MODEL.ROI_HEADS.CALIBRATION.RENORMALIZE = True
    # Class counts: "model" = those the loss keeps in the checkpoint (Seesaw, ECM, BaGS, EQL,
    # DropLoss), else the instance counts of DATASETS.TRAIN; or "instance_count" / "image_count"
    # of DATASETS.TRAIN (the official NorCal: LVIS image counts).
    cfg.MODEL.ROI_HEADS.CALIBRATION.COUNTS = "model"


def add_htc_lite_config(cfg):
    """MODEL.HTC_LITE: the HTC-Lite heads."""
    # HTC-Lite (MODEL.META_ARCHITECTURE "HTCLiteRCNN", ROI_HEADS.NAME "HTCLiteROIHeads"): the
    # cascade box stages of ROI_BOX_CASCADE_HEAD with the MODEL.LONG_TAIL predictor, one mask
    # head after the last stage, and a global context encoder. Each part is one key (ablations).
    cfg.MODEL.HTC_LITE = CN()
    # Global context encoder: its per-image vector is added to the RoI features of every box
    # stage and of the mask head, and it is trained by an image-level multi-label loss over the
    # annotated classes (LVIS: positives + neg_category_ids of the image).
    cfg.MODEL.HTC_LITE.CONTEXT = True
    # Backbone output it reads: the coarsest FPN level, as mmdetection's GlobalContextHead.
    cfg.MODEL.HTC_LITE.CONTEXT_IN_FEATURE = "p6"
    # 3x3 conv + ReLU layers of the context encoder before global average pooling.
    cfg.MODEL.HTC_LITE.CONTEXT_NUM_CONVS = 4
    # Weight of loss_context (mmdetection's GlobalContextHead config in SCNet uses 3.0).
    cfg.MODEL.HTC_LITE.CONTEXT_LOSS_WEIGHT = 3.0
    # True: the mask head trains on the last stage's foreground RoIs after that stage refined
    # their boxes (HTC's interleaved execution); False: on the same RoIs, unrefined.
    cfg.MODEL.HTC_LITE.INTERLEAVED = True
    # Most foreground RoIs per image the mask head trains on (a random subset above it; 0 = no
    # cap). The last cascade stage relabels every sampled RoI at IoU 0.7 after refining it, so
    # its foreground is not bounded by ROI_HEADS.POSITIVE_FRACTION; 128 = Mask R-CNN's bound
    # (BATCH_SIZE_PER_IMAGE 512 x POSITIVE_FRACTION 0.25).
    cfg.MODEL.HTC_LITE.MASK_MAX_FG_ROIS = 128


def add_cascade_config(cfg):
    """MODEL.CASCADE: the cascade's differences to detectron2's."""
    # The cascade (ROI_HEADS.NAME "LongTailCascadeROIHeads", and the box stages of
    # "HTCLiteROIHeads"): detectron2's CascadeROIHeads at the defaults; each key switches one
    # difference to mmdetection's CascadeRoIHead, the cascade of the official Seesaw / ECM runs.
    cfg.MODEL.CASCADE = CN()
    # False: one mask head, trained on stage-1 foreground RoIs (detectron2). True: one mask head
    # per stage, trained on that stage's foreground RoIs; test masks = mean of their sigmoids.
    cfg.MODEL.CASCADE.MASK_PER_STAGE = False
    # [] (detectron2): stage losses unweighted, gradient into the pooled RoI features scaled by
    # 1 / stages. One weight per stage (mmdetection: [1.0, 0.5, 0.25]): every loss of stage i
    # (classification, box, mask) times w_i, no gradient scaling.
    cfg.MODEL.CASCADE.STAGE_LOSS_WEIGHTS = []
    # False (detectron2): later stages relabel the stage-1 RoIs, refined, at their IoU. True
    # (mmdetection): each stage drops the ground-truth RoIs, adds the ground truth again and
    # samples ROI_HEADS.BATCH_SIZE_PER_IMAGE RoIs at POSITIVE_FRACTION at its own IoU.
    cfg.MODEL.CASCADE.RESAMPLE_PER_STAGE = False
    # Test class scores: "probs" = mean of the stages' probabilities (detectron2); "logits" =
    # the loss's activation of the mean of the stages' raw outputs (mmdetection).
    cfg.MODEL.CASCADE.TEST_SCORE = "probs"


def add_tsd_config(cfg):
    """MODEL.TSD: task-aware spatial disentanglement (LVIS 2020 entry)."""
    # TSD, task-aware spatial disentanglement (seesaw_ecm/modeling/tsd.py): the box predictor of
    # every stage of LongTailROIHeads, LongTailCascadeROIHeads and HTCLiteROIHeads pools again
    # for classification (an offset per bin) and regression (a translation of the RoI), with
    # the progressive constraint; the ROI_BOX_HEAD head trains beside it as the sibling head.
    cfg.MODEL.TSD = CN()
    cfg.MODEL.TSD.ENABLED = False  # TSD box predictors (off: the plain long-tail predictor)
    # Offsets in units of OFFSET_SCALE x the RoI's width / height (the official trans_std).
    cfg.MODEL.TSD.OFFSET_SCALE = 0.1
    # Bilinear samples per bin side of the offset pooling (the official CUDA op: 4; memory of
    # the grid_sample version grows with its square).
    cfg.MODEL.TSD.SAMPLING_RATIO = 2
    cfg.MODEL.TSD.OFFSET_FC_DIM = 256  # width of the FC layers that predict the offsets
    # Progressive constraint: TSD must beat the sibling head by these margins (in [0, 1]; the
    # official configs: 0.3, 0.3), each clipped at 1 - the sibling's value.
    cfg.MODEL.TSD.PC_CLS_MARGIN = 0.3  # m_c, on the probability of the RoI's label
    cfg.MODEL.TSD.PC_LOC_MARGIN = 0.3  # m_r, on the IoU of the regressed box with its gt box
    cfg.MODEL.TSD.PC_LOSS_WEIGHT = 1.0  # weight of loss_pc_cls and loss_pc_loc; 0 = no PC


def add_rpn_config(cfg):
    """MODEL.RPN: the floor of the low-quality matches (PROPOSAL_GENERATOR.NAME
    "LowQualityFloorRPN")."""
    # Low-quality matches (a ground-truth box's best anchors, positive below the IoU threshold)
    # only for boxes whose best anchor IoU is >= this: mmdetection's min_pos_iou (0.3 in the
    # official LVIS recipes). 0 = no floor, detectron2's RPN.
    cfg.MODEL.RPN.LOW_QUALITY_MIN_IOU = 0.0


def add_mask_head_config(cfg):
    """MODEL.ROI_MASK_HEAD: the normalized mask predictor."""
    # Temperature of the normalized mask predictor (ROI_MASK_HEAD.NAME
    # "NormedMaskRCNNConvUpsampleHead").
    cfg.MODEL.ROI_MASK_HEAD.NORMED_TEMPERATURE = 20.0
    # Initial weights of the normalized mask predictor: "pytorch" (default, as before: nn.Conv2d's
    # own init and bias) or "kaiming_normal" (the official: mmdetection's FCNMaskHead, kaiming
    # normal with mode fan_out and the relu gain, zero bias; set in the LVIS recipes).
    cfg.MODEL.ROI_MASK_HEAD.NORMED_INIT = "pytorch"


def add_mask_scoring_config(cfg):
    """MODEL.MASK_SCORING: the MaskIoU head (LVIS 2020 entry)."""
    # Mask scoring (seesaw_ecm/modeling/mask_scoring.py, as mmdetection's MaskIoUHead): a head
    # predicting each mask's IoU with its ground truth; at inference score = class score x IoU.
    # Read by LongTailROIHeads, LongTailCascadeROIHeads and HTCLiteROIHeads.
    cfg.MODEL.MASK_SCORING = CN()
    cfg.MODEL.MASK_SCORING.ON = False  # add the MaskIoU head (needs MODEL.MASK_ON)
    cfg.MODEL.MASK_SCORING.LOSS_WEIGHT = 0.5  # weight of the MSE loss_mask_iou (mmdet's 0.5)
    cfg.MODEL.MASK_SCORING.NUM_CONVS = 4  # 3x3 convs of the head (the last one has stride 2)
    cfg.MODEL.MASK_SCORING.CONV_DIM = 256  # output channels of those convs
    cfg.MODEL.MASK_SCORING.FC_DIM = 1024  # width of the head's two FC layers


def add_carafe_config(cfg):
    """MODEL.CARAFE: CARAFE upsampling (LVIS 2020 entry)."""
    # CARAFE upsampling (seesaw_ecm/modeling/carafe.py, as mmcv's CARAFEPack), used by
    # MODEL.BACKBONE.NAME "build_resnet_fpn_carafe_backbone" (FPN top-down path, scale 2).
    cfg.MODEL.CARAFE = CN()
    # Also upsample in the mask head with CARAFE instead of its 2x deconvolution (LongTail*,
    # HTC-Lite ROI heads).
    cfg.MODEL.CARAFE.MASK_HEAD = False
    cfg.MODEL.CARAFE.UP_KERNEL = 5  # k: each output pixel reassembles a k x k input window
    cfg.MODEL.CARAFE.ENCODER_KERNEL = 3  # kernel of the conv that predicts the k x k kernels
    cfg.MODEL.CARAFE.COMPRESSED_CHANNELS = 64  # channels of the 1x1 compressor before it
    # Memory bound: rows are processed in chunks whose unfolded input (C x k^2 per pixel) stays
    # under this many MiB, recomputed in the backward pass; 0 = one piece (about 0.4 GB fp32 per
    # image at P2 of 1333 x 800, 256 channels, plus as much again for einsum).
    cfg.MODEL.CARAFE.CHUNK_MB = 64


def add_resnest_config(cfg):
    """MODEL.RESNEST: ResNeSt backbones (LVIS 2020 entry)."""
    # ResNeSt backbones (seesaw_ecm/modeling/resnest.py, timm's networks; the LVIS 2020 entry's
    # ResNeSt-200 + DCNv2): MODEL.BACKBONE.NAME "build_resnest_fpn_backbone" (detectron2's FPN
    # and its MODEL.FPN keys) or "build_resnest_backbone"; MODEL.BACKBONE.FREEZE_AT as for ResNet.
    # timm's weights expect RGB input normalized by ImageNet mean / std (docs/LVIS2020.md).
    cfg.MODEL.RESNEST = CN()
    # 50 (timm resnest50d), 101 (resnest101e), 200 (resnest200e, the entry's); also 14, 26, 269.
    cfg.MODEL.RESNEST.DEPTH = 50
    cfg.MODEL.RESNEST.OUT_FEATURES = ["res2", "res3", "res4", "res5"]  # strides 4, 8, 16, 32
    # Every BatchNorm of the network becomes: "FrozenBN" (detectron2's default with pretrained
    # weights), "BN" or "SyncBN"; the stages MODEL.BACKBONE.FREEZE_AT fixes are FrozenBN anyway.
    cfg.MODEL.RESNEST.NORM = "FrozenBN"
    # DCNv2 per stage (res2..res5): the 3x3 split-attention conv of every block of the stage
    # becomes a modulated deformable conv (mmdetection's ResNeSt DCN configs: [False, True, True,
    # True], i.e. mmdetection's stage_with_dcn; the entry's own config is not public).
    cfg.MODEL.RESNEST.DEFORM_ON_PER_STAGE = [False, False, False, False]
    # timm state dict file (.pth / .bin / .safetensors) of the same network, e.g. timm's
    # ImageNet weights copied from a machine with hub access; "" = random initialisation.
    cfg.MODEL.RESNEST.WEIGHTS = ""


def add_fpg_config(cfg):
    """MODEL.FPG: the Feature Pyramid Grids neck (LVIS 2020 entry)."""
    # Feature Pyramid Grids (seesaw_ecm/modeling/fpg.py; MODEL.BACKBONE.NAME
    # "build_fpg_backbone"), the neck of mmdetection's FPG configs: outputs p2..p6.
    cfg.MODEL.FPG = CN()
    # BACKBONE_REGISTRY name of the bottom-up network, e.g. "build_resnest_backbone".
    cfg.MODEL.FPG.BOTTOM_UP = "build_resnet_backbone"
    cfg.MODEL.FPG.IN_FEATURES = ["res2", "res3", "res4", "res5"]  # strides must double
    cfg.MODEL.FPG.OUT_CHANNELS = 256  # channels of every grid node and output
    # Bottom-up pathways (the published FPG: 9); at least the number of output levels (5).
    cfg.MODEL.FPG.STACK_TIMES = 9
    cfg.MODEL.FPG.NORM = "BN"  # after every grid transition conv (published: BN); "" = none


def add_train_augmentation_config(cfg):
    """INPUT: the training augmentation of the LVIS 2020 entry."""
    # Training augmentation of the LVIS 2020 entry (seesaw_ecm/data/augmentation.py,
    # instaboost.py), read by the training mapper (seesaw_ecm/data/mapper.py). The entry: long
    # edge 768-1792, random crop 1280 x 1280, InstaBoost.
    # (min, max): resize so that the longer edge is drawn uniformly from [min, max], aspect kept
    # (the entry: (768, 1792)), in place of MIN_SIZE_TRAIN / MAX_SIZE_TRAIN; () = off.
    cfg.INPUT.LONG_EDGE_TRAIN = ()
    # True: detectron2's INPUT.CROP runs after the resize (mmdetection's order; the entry:
    # TYPE "absolute", SIZE (1280, 1280)); False: before it (detectron2). Either way boxes are
    # recomputed from the cropped masks.
    cfg.INPUT.CROP_AFTER_RESIZE = False
    # InstaBoost (PyPI instaboostfast, as mmdetection's InstaBoost step; defaults are its).
    cfg.INPUT.INSTABOOST = CN()
    cfg.INPUT.INSTABOOST.ENABLED = False  # augment training images (needs polygon masks)
    cfg.INPUT.INSTABOOST.AUG_RATIO = 0.5  # probability that an image is augmented
    # What may happen to each instance: "normal" (moved, scaled, rotated), "horizontal" (the same,
    # flipped), "skip" (left where it is).
    cfg.INPUT.INSTABOOST.ACTION_CANDIDATE = ("normal", "horizontal", "skip")
    cfg.INPUT.INSTABOOST.ACTION_PROB = (1.0, 0.0, 0.0)  # probabilities of ACTION_CANDIDATE
    cfg.INPUT.INSTABOOST.SCALE = (0.8, 1.2)  # range of each instance's scale factor
    cfg.INPUT.INSTABOOST.DX = 15.0  # largest shift, in pixels, along x
    cfg.INPUT.INSTABOOST.DY = 15.0  # largest shift, in pixels, along y
    cfg.INPUT.INSTABOOST.THETA = (-1.0, 1.0)  # range of the rotation, in degrees
    cfg.INPUT.INSTABOOST.COLOR_PROB = 0.5  # probability of a colour jitter of the image
    # Place instances by the heatmap of likely positions (slower) instead of at random.
    cfg.INPUT.INSTABOOST.HEATMAP = False


def add_roi_align_config(cfg):
    """MODEL.ROI_ALIGN: seesaw_ecm/roi_align.py, the RoIAlign layers of every RoI pooler."""
    cfg.MODEL.ROI_ALIGN = CN()
    # True: the RoI poolers' backward on CPU is seesaw_ecm/roi_align.py's vectorized one (the
    # same gradient to float rounding, 6-7x faster than torchvision's CPU kernel at the demo's
    # sizes: benchmarks/roi_align_backward.py); the forward, GPU training and inference are
    # unchanged. False: torchvision's (every recorded result before 2026-12-03). The demo
    # configs (configs/Demo) turn it on.
    cfg.MODEL.ROI_ALIGN.VECTORIZED_BACKWARD = False


def add_sampling_config(cfg):
    """DATALOADER: the rounding of repeat-factor sampling (seesaw_ecm/data/samplers.py)."""
    # Repeat-factor sampling (DATALOADER.SAMPLER_TRAIN "RepeatFactorTrainingSampler") rounding of
    # r_i: "stochastic" = detectron2's sampler (floor(r_i) + 1 with probability frac(r_i)), "ceil"
    # = mmdetection's ClassBalancedDataset (exactly ceil(r_i) copies per epoch, resumable).
    cfg.DATALOADER.REPEAT_ROUNDING = "stochastic"


def add_solver_config(cfg):
    """SOLVER: schedules in epochs (seesaw_ecm/epochs.py). Global-norm gradient clipping needs no
    key of its own: SOLVER.CLIP_GRADIENTS.CLIP_TYPE "full_model" (seesaw_ecm/solver.py) clips the
    norm over all parameters together at CLIP_VALUE (the ECM recipe: 5), where detectron2's
    "value" and "norm" clip each parameter separately."""
    # Schedule in epochs, as the official configs state it: > 0 derives SOLVER.MAX_ITER and
    # SOLVER.STEPS from the training set, the sampler and IMS_PER_BATCH. 0 = MAX_ITER, STEPS.
    cfg.SOLVER.EPOCHS = 0
    # Epochs after which the learning rate is multiplied by SOLVER.GAMMA (with SOLVER.EPOCHS).
    cfg.SOLVER.EPOCH_STEPS = ()


def add_evaluation_config(cfg):
    """TEST: the LVIS evaluation backend and the LVIS metrics beyond the standard AP."""
    # LVIS evaluation backend for LVIS-format test sets: "fast" (seesaw_ecm.evaluation: equal
    # numbers, streamed per process, a fraction of the time and memory) or "lvis" (the official
    # lvis API through detectron2's LVISEvaluator).
    cfg.TEST.LVIS_EVAL_BACKEND = "fast"
    # LVIS metrics beyond the standard AP (300 detections per image); FastLVISEvaluator only
    # (TEST.LVIS_EVAL_BACKEND "fast"). Definitions and sources: seesaw_ecm/evaluation/lvis_fast.py.
    cfg.TEST.AP_FIXED = CN()
    # AP-fixed with top-K-per-class inference: the ROI heads drop the per-image cap, use
    # SCORE_THRESH below, and predict masks only for detections within their image's
    # TEST.DETECTIONS_PER_IMAGE best or above their class' running K-th score; the evaluator
    # reports AP-fixed (top K per class over the test set, all processes) next to standard AP.
    cfg.TEST.AP_FIXED.ENABLED = False
    # K: detections kept per category over the whole test set (AP-fixed, LVIS 2021: 10,000).
    cfg.TEST.AP_FIXED.TOPK_PER_CLASS = 10000
    # Box score threshold with AP_FIXED (replaces ROI_HEADS.SCORE_THRESH_TEST; "about 0").
    cfg.TEST.AP_FIXED.SCORE_THRESH = 1e-4
    # Also report AP-pool (all / r / c / f: one precision curve per frequency pool, scores
    # ranked across classes) on the AP-fixed detections; needs TEST.AP_FIXED.ENABLED.
    cfg.TEST.AP_POOL = False
    # Also evaluate the "boundary" task (boundary AP: IoU = min(mask IoU, boundary IoU), the
    # boundary 2% of the image diagonal deep); needs masks. With AP_FIXED it gets AP-fixed too.
    cfg.TEST.BOUNDARY_AP = False
