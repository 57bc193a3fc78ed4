"""Every config key that seesaw_ecm adds to detectron2's defaults, with its default value."""
from detectron2.config import CfgNode as CN


def add_seesaw_ecm_config(cfg):
    """Add seesaw_ecm's keys to a detectron2 config (in place). Call before merge_from_file."""
    # LVIS-format datasets to register before training / evaluation, each as
    # "NAME=JSON_FILE:IMAGE_ROOT" (train_net.py --dataset appends here). Images are found through
    # each image's `file_name`, else the last two parts of its `coco_url`, under IMAGE_ROOT.
    cfg.DATASETS.LVIS_FORMAT = []

    # The long-tail box predictor, used by ROI_HEADS.NAME "LongTailROIHeads" and, in every
    # stage, by "LongTailCascadeROIHeads".
    cfg.MODEL.LONG_TAIL = CN()
    # Classification loss (seesaw_ecm.losses.LOSSES): "ce" (softmax CE, linear classifier),
    # "cosine_ce" (softmax CE, cosine classifier), "federated" (sigmoid Federated loss, linear),
    # "seesaw" (cosine, needs OBJECTNESS) or "ecm" (cosine). One key switches between methods.
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
    # Per-class statistic of the ECM margins, counted on DATASETS.TRAIN: "instance_count" (as
    # the official ECM file) or "image_count".
    cfg.MODEL.LONG_TAIL.STATISTIC = "instance_count"

    cfg.MODEL.LONG_TAIL.SEESAW = CN()
    cfg.MODEL.LONG_TAIL.SEESAW.P = 0.8  # mitigation exponent: (N_k / N_i)^p for N_k < N_i
    cfg.MODEL.LONG_TAIL.SEESAW.Q = 2.0  # compensation exponent: (sigma_k / sigma_i)^q if > 1
    cfg.MODEL.LONG_TAIL.SEESAW.EPS = 1e-2  # floor of sigma_i in the compensation ratio

    cfg.MODEL.LONG_TAIL.ECM = CN()
    # Background count = FG_BG_RATIO x sum of the class counts ("empirical fg/bg ratio of
    # Mask R-CNN" in the official code).
    cfg.MODEL.LONG_TAIL.ECM.FG_BG_RATIO = 6.3313

    # Federated loss: its negatives are sampled by the training image count of each class
    # (always image counts, whatever STATISTIC says).
    cfg.MODEL.LONG_TAIL.FEDERATED = CN()
    # Classes per batch: those present (background included) plus sampled negatives.
    cfg.MODEL.LONG_TAIL.FEDERATED.NUM_CLASSES = 50
    # Negative classes are drawn with probability proportional to image_count ** POWER.
    cfg.MODEL.LONG_TAIL.FEDERATED.FREQ_WEIGHT_POWER = 0.5

    # Gradient-balance diagnostic (seesaw_ecm/gradient_balance.py): per class, the summed
    # |dL/dz| of the classifier logits from RoIs of that class (positive) and of all others
    # (negative), saved in checkpoints and OUTPUT_DIR/gradient_balance.json. Off = no hook.
    cfg.MODEL.LONG_TAIL.GRADIENT_BALANCE = CN()
    # Install the hook (opt-in; measured < 0.5% slower per iteration when on, nothing when off).
    cfg.MODEL.LONG_TAIL.GRADIENT_BALANCE.ENABLED = False
    # Iterations between all-reduces of the sums and TensorBoard / metrics.json summaries.
    cfg.MODEL.LONG_TAIL.GRADIENT_BALANCE.PERIOD = 20

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

    # Temperature of the normalized mask predictor (ROI_MASK_HEAD.NAME "NormedMaskRCNNConvUpsampleHead").
    cfg.MODEL.ROI_MASK_HEAD.NORMED_TEMPERATURE = 20.0

    # Gradient clipping of the global norm over all parameters (the ECM recipe clips at 5);
    # detectron2 0.6's SOLVER.CLIP_GRADIENTS clips each parameter separately. 0 = off.
    cfg.SOLVER.CLIP_GRADIENTS_GLOBAL_NORM = 0.0

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
