"""The official LVIS v1 recipes as detectron2 config values: ONE table, a source for every row.

Seesaw: open-mmlab/mmdetection 2.x (`configs/seesaw_loss/`, `configs/_base_/`); ECM:
janghyuncho/ECM-Loss (mmdetection 2.25.2 fork, `configs/effective_class_margin_loss/`); Federated
loss: facebookresearch/detectron2 main; GOL: kostas1515/GOL (mmdetection 2.21 fork,
`configs/gol/`). tests/test_recipes.py compares every shipped configs/LVISv1/*.yaml with the row
groups `groups_for` selects for it. A row is
(key, official value, source) or (key, value, source, relative tolerance).
"""
MM = "open-mmlab/mmdetection "
SEESAW = MM + "configs/seesaw_loss/mask_rcnn_r50_fpn_random_seesaw_loss_mstrain_2x_lvis_v1.py"
SEESAW_CASCADE = (MM + "configs/seesaw_loss/"
                  "cascade_mask_rcnn_r101_fpn_sample1e-3_seesaw_loss_mstrain_2x_lvis_v1.py")
ECM_DIR = "janghyuncho/ECM-Loss configs/effective_class_margin_loss/"
ECM_1X, ECM_2X, ECM_CASCADE = (
    ECM_DIR + f for f in ("r50_ecm_1x.py", "r50_ecm_2x.py", "c101_ecm_2x.py"))
MASK_RCNN = MM + "configs/_base_/models/mask_rcnn_r50_fpn.py (2.x)"
CASCADE = MM + "configs/_base_/models/cascade_mask_rcnn_r50_fpn.py"
SCHEDULE_1X = MM + "configs/_base_/schedules/schedule_1x.py"
SCHEDULE_2X = MM + "configs/_base_/schedules/schedule_2x.py"
LVIS_DATA = MM + "configs/_base_/datasets/lvis_v1_instance.py"
FED = "facebookresearch/detectron2 detectron2/config/defaults.py (main)"
# the other long-tail baselines (their official sources: docs/METHODS.md)
EQLV2_DIR = "tztztztztz/eqlv2 configs/"
EQL_1X, EQLV2_1X, CE_1X, BAGS_1X = (EQLV2_DIR + f for f in (
    "end2end/eql_r50_8x2_1x.py", "end2end/eqlv2_r50_8x2_1x.py", "end2end/mask_rcnn_r50_8x2_1x.py",
    "decouple/bags_r50_8x2_1x.py"))
EQLV2_SCHEDULE = EQLV2_DIR + "_base_/schedules/schedule_1x.py"
EQLV2_LOSS = "tztztztztz/eqlv2 mmdet/models/losses/eqlv2.py"
DROPLOSS = "timy90022/DropLoss projects/DropLoss_v1 (shipped base config)"
LOCE_DIR = "fcjian/LOCE configs/loce/"
LOCE_STAGE1 = LOCE_DIR + "mask_rcnn_r50_fpn_normed_mask_mstrain_2x_lvis_v1.py"
LOCE_FT = LOCE_DIR + "loce_mask_rcnn_r50_fpn_normed_mask_mstrain_2x_lvis_v1.py"
ECM_WEIGHT = "janghyuncho/ECM-Loss mmdet/models/losses/ecm_utils.py"
HTC = MM + "configs/htc/htc_without_semantic_r50_fpn_1x_coco.py"
GOL = "kostas1515/GOL configs/gol/droploss_normed_mask_r50_rfs_4x4_2x_gumbel.py"
GOL_LOSS = "kostas1515/GOL mmdet/models/losses/droploss.py"


def schedule_rows(epochs, steps, schedule_source, warmup_iters, warmup_ratio, clip, source):
    """The rows of an official schedule: epochs and lr steps, iteration warm-up, clipping (mmcv's
    grad_clip: the global norm of all gradients, SOLVER.CLIP_GRADIENTS.CLIP_TYPE "full_model")."""
    if clip:
        clipping = source + f": grad_clip max_norm={clip:g}, norm_type=2"
        clip_rows = [("SOLVER.CLIP_GRADIENTS.ENABLED", True, clipping),
                     ("SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model", clipping),
                     ("SOLVER.CLIP_GRADIENTS.CLIP_VALUE", clip, clipping),
                     ("SOLVER.CLIP_GRADIENTS.NORM_TYPE", 2.0, clipping)]
    else:
        clip_rows = [("SOLVER.CLIP_GRADIENTS.ENABLED", False, source + ": grad_clip=None")]
    return [
        ("SOLVER.EPOCHS", epochs, schedule_source + f": max_epochs={epochs}"),
        ("SOLVER.EPOCH_STEPS", steps, schedule_source + f": lr_config step={list(steps)}"),
        ("SOLVER.WARMUP_ITERS", warmup_iters, source + f": warmup_iters={warmup_iters}"),
        ("SOLVER.WARMUP_FACTOR", warmup_ratio, source + f": warmup_ratio={warmup_ratio:g}"),
    ] + clip_rows


ROWS = {
    "common": [
        ("SOLVER.IMS_PER_BATCH", 16, LVIS_DATA + ": samples_per_gpu=2 on 8 GPUs"),
        ("SOLVER.BASE_LR", 0.02, SCHEDULE_1X + ": SGD lr=0.02 (also ECM configs)"),
        ("SOLVER.MOMENTUM", 0.9, SCHEDULE_1X + ": momentum=0.9"),
        ("SOLVER.NESTEROV", False, SCHEDULE_1X + ": plain SGD"),
        ("SOLVER.WEIGHT_DECAY", 0.0001, SCHEDULE_1X + ": weight_decay=0.0001"),
        ("SOLVER.BIAS_LR_FACTOR", 1.0, SCHEDULE_1X + ": no paramwise_cfg"),
        ("SOLVER.GAMMA", 0.1, SCHEDULE_1X + ": policy='step' (mmcv default gamma 0.1)"),
        ("SOLVER.WARMUP_METHOD", "linear", SCHEDULE_1X + ": warmup='linear'"),
        ("MODEL.ROI_HEADS.NUM_CLASSES", 1203, SEESAW + ": num_classes=1203"),
        ("INPUT.MIN_SIZE_TRAIN", (640, 672, 704, 736, 768, 800),
         SEESAW + ": Resize img_scale (1333, 640) ... (1333, 800)"),
        ("INPUT.MIN_SIZE_TRAIN_SAMPLING", "choice", SEESAW + ": multiscale_mode='value'"),
        ("INPUT.MAX_SIZE_TRAIN", 1333, SEESAW + ": img_scale (1333, *)"),
        ("INPUT.MIN_SIZE_TEST", 800, SEESAW + ": test img_scale=(1333, 800)"),
        ("INPUT.MAX_SIZE_TEST", 1333, SEESAW + ": test img_scale=(1333, 800)"),
        ("INPUT.RANDOM_FLIP", "horizontal", SEESAW + ": RandomFlip flip_ratio=0.5"),
        ("MODEL.ANCHOR_GENERATOR.SIZES", ((32,), (64,), (128,), (256,), (512,)),
         MASK_RCNN + ": octave_base_scale 8 x strides 4..64"),
        ("MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", ((0.5, 1.0, 2.0),),
         MASK_RCNN + ": ratios=[0.5, 1.0, 2.0]"),
        ("MODEL.RPN.BATCH_SIZE_PER_IMAGE", 256, MASK_RCNN + ": rpn sampler num=256"),
        ("MODEL.RPN.POSITIVE_FRACTION", 0.5, MASK_RCNN + ": rpn sampler pos_fraction=0.5"),
        ("MODEL.RPN.IOU_THRESHOLDS", (0.3, 0.7), MASK_RCNN + ": neg_iou_thr=0.3, pos_iou_thr=0.7"),
        ("MODEL.PROPOSAL_GENERATOR.NAME", "LowQualityFloorRPN",
         MASK_RCNN + ": rpn MaxIoUAssigner with min_pos_iou (the RPN that reads the floor)"),
        ("MODEL.RPN.LOW_QUALITY_MIN_IOU", 0.3, MASK_RCNN + ": rpn assigner min_pos_iou=0.3"),
        ("MODEL.RPN.NMS_THRESH", 0.7, MASK_RCNN + ": rpn_proposal nms iou_threshold=0.7"),
        ("MODEL.RPN.PRE_NMS_TOPK_TRAIN", 2000, MASK_RCNN + ": rpn_proposal nms_pre=2000"),
        ("MODEL.RPN.PRE_NMS_TOPK_TEST", 1000, MASK_RCNN + ": test rpn nms_pre=1000"),
        ("MODEL.RPN.POST_NMS_TOPK_TEST", 1000, MASK_RCNN + ": test rpn max_per_img=1000"),
        ("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 512, MASK_RCNN + ": rcnn sampler num=512"),
        ("MODEL.ROI_HEADS.POSITIVE_FRACTION", 0.25, MASK_RCNN + ": pos_fraction=0.25"),
        ("MODEL.ROI_HEADS.IOU_THRESHOLDS", (0.5,), MASK_RCNN + ": rcnn pos_iou_thr=0.5"),
        ("MODEL.ROI_HEADS.PROPOSAL_APPEND_GT", True, MASK_RCNN + ": add_gt_as_proposals=True"),
        ("MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0001, SEESAW + ": test_cfg rcnn score_thr=0.0001"),
        ("TEST.DETECTIONS_PER_IMAGE", 300, SEESAW + ": max_per_img=300"),
        ("MODEL.ROI_BOX_HEAD.NUM_FC", 2, MASK_RCNN + ": Shared2FCBBoxHead"),
        ("MODEL.ROI_BOX_HEAD.FC_DIM", 1024, MASK_RCNN + ": fc_out_channels=1024"),
        ("MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 7, MASK_RCNN + ": RoIAlign output_size=7"),
        ("MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIAlignV2", MASK_RCNN + ": RoIAlign (aligned)"),
        ("MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO", 0, MASK_RCNN + ": sampling_ratio=0"),
        ("MODEL.ROI_MASK_HEAD.NUM_CONV", 4, MASK_RCNN + ": FCNMaskHead num_convs=4"),
        ("MODEL.ROI_MASK_HEAD.CONV_DIM", 256, MASK_RCNN + ": conv_out_channels=256"),
        ("MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", 14, MASK_RCNN + ": mask RoIAlign output_size=14"),
    ],
    # test-time NMS of the box head (every recipe but GOL, whose row is in its group)
    "nms": [
        ("MODEL.ROI_HEADS.NMS_THRESH_TEST", 0.5, MASK_RCNN + ": rcnn nms iou_threshold=0.5"),
    ],
    # the Mask R-CNN box head and RPN (not the cascade ones)
    "mask_rcnn": [
        ("MODEL.RPN.POST_NMS_TOPK_TRAIN", 1000, MASK_RCNN + ": rpn_proposal max_per_img=1000"),
        ("MODEL.RPN.SMOOTH_L1_BETA", 0.0, MASK_RCNN + ": rpn loss_bbox L1Loss"),
        ("MODEL.RPN.BOUNDARY_THRESH", -1, MASK_RCNN + ": allowed_border=-1"),
        ("MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA", 0.0, MASK_RCNN + ": bbox loss_bbox L1Loss"),
        ("MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS", (10.0, 10.0, 5.0, 5.0),
         MASK_RCNN + ": target_stds [0.1, 0.1, 0.2, 0.2]"),
        ("MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", False,
         MASK_RCNN + ": reg_class_agnostic=False"),
    ],
    # cascade box stages as detectron2 already expresses them (cascade and HTC-Lite recipes)
    "cascade": [
        ("MODEL.RPN.POST_NMS_TOPK_TRAIN", 2000, CASCADE + ": rpn_proposal max_per_img=2000"),
        ("MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", True,
         SEESAW_CASCADE + ", " + ECM_CASCADE + ": reg_class_agnostic=True"),
        ("MODEL.ROI_BOX_CASCADE_HEAD.IOUS", (0.5, 0.6, 0.7),
         CASCADE + ": rcnn assigners pos_iou_thr 0.5 / 0.6 / 0.7"),
    ],
    # the ROI heads: one group per architecture (LOCE's is in its loss group)
    "heads_standard": [
        ("MODEL.ROI_HEADS.NAME", "StandardROIHeads",
         MASK_RCNN + ": StandardRoIHead, softmax CrossEntropyLoss (detectron2's own)"),
    ],
    "heads_long_tail": [
        ("MODEL.ROI_HEADS.NAME", "LongTailROIHeads",
         SEESAW + ", " + ECM_1X + ": StandardRoIHead with the long-tail loss_cls"),
    ],
    "heads_cascade": [
        ("MODEL.ROI_HEADS.NAME", "LongTailCascadeROIHeads",
         CASCADE + ": CascadeRoIHead, 3 stages, the long-tail loss_cls in each"),
    ],
    "heads_htc_lite": [
        ("MODEL.ROI_HEADS.NAME", "HTCLiteROIHeads",
         HTC + " (HTC-Lite: no official code): cascade box stages, interleaved mask"),
    ],
    # mmdetection's cascade (MODEL.CASCADE): the switches off detectron2's cascade
    "cascade_mmdet": [
        ("MODEL.CASCADE.STAGE_LOSS_WEIGHTS", (1.0, 0.5, 0.25),
         CASCADE + ": stage_loss_weights=[1, 0.5, 0.25]"),
        ("MODEL.CASCADE.RESAMPLE_PER_STAGE", True,
         CASCADE + ": one RandomSampler (num=512, pos_fraction=0.25) per stage"),
        ("MODEL.CASCADE.TEST_SCORE", "logits",
         MM + "mmdet/models/roi_heads/cascade_roi_head.py: cls_score averaged, then activation"),
        ("MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA", 1.0,
         SEESAW_CASCADE + ", " + ECM_CASCADE + ": SmoothL1Loss beta=1.0 in every stage"),
        ("MODEL.RPN.SMOOTH_L1_BETA", 1.0 / 9.0, CASCADE + ": rpn SmoothL1Loss beta=1.0 / 9.0"),
        ("MODEL.RPN.BOUNDARY_THRESH", 0, CASCADE + ": rpn allowed_border=0"),
        ("MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS",
         ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0),
          (1 / 0.033, 1 / 0.033, 1 / 0.067, 1 / 0.067)),
         SEESAW_CASCADE + ", " + ECM_CASCADE + ": target_stds [0.1, 0.1, 0.2, 0.2], "
         "[0.05, 0.05, 0.1, 0.1], [0.033, 0.033, 0.067, 0.067]; 1 / std, the stds being rounded "
         "themselves: 30.3 / 14.9 pass", 2e-3),
    ],
    "cascade_mmdet_mask": [
        ("MODEL.CASCADE.MASK_PER_STAGE", True,
         CASCADE + ": mask_head per stage (cascade_roi_head.py averages the 3 sigmoid masks)"),
    ],
    "rfs": [
        ("DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler",
         LVIS_DATA + ": train type='ClassBalancedDataset'"),
        ("DATALOADER.REPEAT_THRESHOLD", 0.001, LVIS_DATA + ": oversample_thr=1e-3"),
        ("DATALOADER.REPEAT_ROUNDING", "ceil",
         MM + "mmdet/datasets/dataset_wrappers.py: ClassBalancedDataset repeats math.ceil(r)"),
    ],
    "random": [
        ("DATALOADER.SAMPLER_TRAIN", "TrainingSampler",
         SEESAW + ": train type=LVISV1Dataset (no ClassBalancedDataset)"),
    ],
    "schedule_seesaw_2x": schedule_rows(24, (16, 22), SCHEDULE_2X, 500, 0.001, 0.0, SCHEDULE_1X),
    "schedule_ecm_1x": schedule_rows(12, (8, 11), ECM_1X, 10000, 0.0001, 5.0, ECM_1X),
    "schedule_ecm_2x": schedule_rows(24, (20, 22), ECM_2X + ", " + ECM_CASCADE, 10000, 0.0001,
                                     5.0, ECM_2X),
    "seesaw": [
        ("MODEL.LONG_TAIL.LOSS", "seesaw", SEESAW + ": loss_cls type='SeesawLoss'"),
        ("MODEL.LONG_TAIL.OBJECTNESS", True, MM + "mmdet/models/losses/seesaw_loss.py: C+2 logits"),
        ("MODEL.LONG_TAIL.SEESAW.P", 0.8, SEESAW + ": p=0.8"),
        ("MODEL.LONG_TAIL.SEESAW.Q", 2.0, SEESAW + ": q=2.0"),
        ("MODEL.LONG_TAIL.SEESAW.EPS", 0.01, MM + "mmdet/models/losses/seesaw_loss.py: eps=1e-2"),
        ("MODEL.LONG_TAIL.LOSS_WEIGHT", 1.0, SEESAW + ": loss_weight=1.0"),
        ("MODEL.LONG_TAIL.CLASSIFIER", "auto", SEESAW + ": NormedLinear (cosine, via 'auto')"),
        ("MODEL.LONG_TAIL.TEMPERATURE", 20.0, SEESAW + ": NormedLinear tempearture=20"),
    ],
    "ecm": [
        ("MODEL.LONG_TAIL.LOSS", "ecm", ECM_1X + ": type='EffectiveClassMarginLoss'"),
        ("MODEL.LONG_TAIL.OBJECTNESS", False, ECM_1X + ": use_sigmoid=True, C+1 columns"),
        ("MODEL.LONG_TAIL.ECM.FG_BG_RATIO", 6.3313, ECM_1X + ": fg_bg_ratio=6.3313"),
        ("MODEL.LONG_TAIL.ECM.STATISTIC", "instance_count",
         "janghyuncho/ECM-Loss: per-class instance counts of LVIS v1 train"),
        ("MODEL.LONG_TAIL.ECM.WEIGHT_DTYPE", "float32",
         ECM_WEIGHT + ": get_detection_weight on the float32 counts tensor"),
        ("MODEL.LONG_TAIL.LOSS_WEIGHT", 1.0, ECM_1X + ": loss_weight=1.0"),
        ("MODEL.LONG_TAIL.CLASSIFIER", "auto", ECM_1X + ": NormedLinear (cosine, via 'auto')"),
        ("MODEL.LONG_TAIL.TEMPERATURE", 20.0, ECM_1X + ": NormedLinear tempearture=20"),
    ],
    "normed_mask": [
        ("MODEL.ROI_MASK_HEAD.NAME", "NormedMaskRCNNConvUpsampleHead",
         ECM_1X + " and the seesaw *normed_mask* configs: predictor NormedConv2d"),
        ("MODEL.ROI_MASK_HEAD.NORMED_TEMPERATURE", 20.0, ECM_1X + ": NormedConv2d tempearture=20"),
        ("MODEL.ROI_MASK_HEAD.NORMED_INIT", "kaiming_normal",
         MM + "mmdet/models/roi_heads/mask_heads/fcn_mask_head.py: init_weights, kaiming_normal_ "
         "mode='fan_out', nonlinearity='relu', bias 0"),
    ],
    "plain_mask": [
        ("MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead",
         SEESAW + ": FCNMaskHead with its plain conv predictor"),
    ],
    "federated": [
        ("MODEL.LONG_TAIL.LOSS", "federated", FED + ": USE_FED_LOSS"),
        ("MODEL.LONG_TAIL.FEDERATED.NUM_CLASSES", 50, FED + ": FED_LOSS_NUM_CLASSES = 50"),
        ("MODEL.LONG_TAIL.FEDERATED.FREQ_WEIGHT_POWER", 0.5,
         FED + ": FED_LOSS_FREQ_WEIGHT_POWER = 0.5"),
    ],
    "cosine_ce": [
        ("MODEL.LONG_TAIL.LOSS", "cosine_ce",
         SEESAW + ": its NormedLinear classifier with CrossEntropyLoss (the paper's baseline)"),
        ("MODEL.LONG_TAIL.TEMPERATURE", 20.0, SEESAW + ": NormedLinear tempearture=20"),
    ],
    "ce": [("MODEL.LONG_TAIL.LOSS", "ce", MASK_RCNN + ": CrossEntropyLoss use_sigmoid=False")],
    "schedule_eqlv2_1x": schedule_rows(12, (8, 11), EQLV2_SCHEDULE, 500, 0.001, 0.0,
                                       EQLV2_SCHEDULE),
    "schedule_loce_ft": schedule_rows(6, (3, 5), LOCE_FT, 500, 0.001, 0.0, LOCE_FT),
    "eql": [
        ("MODEL.LONG_TAIL.LOSS", "eql", EQL_1X + ": loss_cls type='EQL'"),
        ("MODEL.LONG_TAIL.EQL.LAMBDA_", 0.0011, EQL_1X + ": lambda_=0.0011"),
        ("MODEL.LONG_TAIL.PRIOR_PROB", 0.001, EQL_1X + ": bias init prior 0.001"),
        ("MODEL.LONG_TAIL.CLASSIFIER", "auto", EQL_1X + ": plain linear classifier"),
    ],
    "eqlv2": [
        ("MODEL.LONG_TAIL.LOSS", "eqlv2", EQLV2_1X + ": loss_cls type='EQLv2'"),
        ("MODEL.LONG_TAIL.EQLV2.GAMMA", 12.0, EQLV2_LOSS + ": gamma=12"),
        ("MODEL.LONG_TAIL.EQLV2.MU", 0.8, EQLV2_LOSS + ": mu=0.8"),
        ("MODEL.LONG_TAIL.EQLV2.ALPHA", 4.0, EQLV2_LOSS + ": alpha=4"),
        ("MODEL.LONG_TAIL.PRIOR_PROB", 0.001, EQLV2_1X + ": bias init prior 0.001"),
        ("MODEL.LONG_TAIL.CLASSIFIER", "auto", EQLV2_1X + ": plain linear classifier"),
    ],
    "droploss": [
        ("MODEL.LONG_TAIL.LOSS", "droploss", DROPLOSS + ": DropLoss"),
        ("MODEL.LONG_TAIL.DROPLOSS.LAMBDA_", 0.00177, DROPLOSS + ": lambda 0.00177"),
        ("MODEL.LONG_TAIL.PRIOR_PROB", 0.001, DROPLOSS + ": prior 0.001"),
    ],
    "gol": [
        ("MODEL.LONG_TAIL.LOSS", "gol", GOL + ": loss_cls type='DropLoss', use_classif='gumbel'"),
        ("MODEL.LONG_TAIL.GOL.LAMBDA_", 0.0011, GOL + ": lambda_=0.0011, version='v1'"),
        ("MODEL.LONG_TAIL.GOL.LOGIT_CLAMP", (-4.0, 10.0),
         GOL_LOSS + ": torch.clamp(cls_score, min=-4, max=10) before the Gumbel activation"),
        ("MODEL.LONG_TAIL.GOL.BIAS_INIT", -2.0,
         GOL + ": init_cfg Constant bias=-2, override name='fc_cls'"),
        ("MODEL.LONG_TAIL.GOL.WEIGHT_INIT", 0.001,
         GOL + ": init_cfg Constant val=0.001, override name='fc_cls'"),
        ("MODEL.LONG_TAIL.LOSS_WEIGHT", 1.0, GOL + ": loss_weight=1.0"),
        ("MODEL.LONG_TAIL.CLASSIFIER", "auto", GOL + ": Shared2FCBBoxHead fc_cls, plain linear"),
        ("MODEL.ROI_HEADS.NMS_THRESH_TEST", 0.3, GOL + ": test_cfg rcnn nms iou_threshold=0.3"),
    ],
    "bags": [
        ("MODEL.LONG_TAIL.LOSS", "bags", BAGS_1X + ": GroupSoftmax"),
        ("MODEL.LONG_TAIL.BAGS.BIN_SPLIT", (10, 100, 1000), BAGS_1X + ": bins 10 / 100 / 1000"),
        ("MODEL.LONG_TAIL.BAGS.BETA", 8.0, BAGS_1X + ": beta=8 (others per positive)"),
        ("MODEL.LONG_TAIL.TRAINABLE", (r"roi_heads\.box_predictor\.cls_score\.",),
         BAGS_1X + ": frozen but fc_cls"),
    ],
    "loce": [
        ("MODEL.LONG_TAIL.LOSS", "loce", LOCE_FT + ": EquilibriumLoss"),
        ("MODEL.ROI_HEADS.NAME", "LOCEROIHeads", LOCE_FT + ": LoceRoIHead"),
        ("MODEL.LONG_TAIL.LOCE.MOMENTUM", 0.9, LOCE_FT + ": mean score momentum 0.9"),
        ("MODEL.LONG_TAIL.LOCE.QUEUE_SIZE", 80, LOCE_FT + ": 80 features per class"),
        ("MODEL.LONG_TAIL.LOCE.SAMPLED_CLASSES", 8, LOCE_FT + ": 8 classes per iteration"),
        ("MODEL.LONG_TAIL.LOCE.SAMPLED_FEATURES", 4, LOCE_FT + ": 4 features per class"),
        ("MODEL.LONG_TAIL.LOCE.INIT_PASS.ENABLED", True, LOCE_FT + ": InitializerHook"),
        ("MODEL.LONG_TAIL.LOCE.INIT_PASS.IMAGES_PER_CLASS", 0,  # 0 = QUEUE_SIZE // 16
         "fcjian/LOCE mmdet/apis/train.py: init_num_samples=queue_size // 16"),
    ],
    "r50": [("MODEL.RESNETS.DEPTH", 50, MASK_RCNN + ": ResNet depth=50")],
    "r101": [("MODEL.RESNETS.DEPTH", 101,
              SEESAW_CASCADE + ", " + ECM_DIR + "r101_ecm_2x.py: depth=101")],
}


def groups_for(name):
    """The ROWS groups that apply to configs/LVISv1/`name`, from the parts of its name."""
    stages = name.startswith(("cascade", "htc_lite"))
    loss = next(k for k in ("seesaw", "ecm", "federated", "cosine_ce", "eqlv2", "eql", "droploss",
                            "gol", "bags", "loce", "ce") if f"_{k}_" in name)
    groups = ["common", loss, "rfs" if name.endswith("_rfs.yaml") else "random",
              "r101" if "_R_101_" in name else "r50"]
    if loss != "gol":  # GOL's test NMS is 0.3, a row of its group
        groups.append("nms")
    normed = "normed_mask" in name or loss in ("ecm", "loce")
    groups.append("normed_mask" if normed else "plain_mask")
    if loss == "ecm":
        groups.append("schedule_ecm_1x" if "_1x_" in name else "schedule_ecm_2x")
    elif loss == "loce":
        groups.append("schedule_loce_ft")
    elif "_1x_" in name:  # the eqlv2 repository's 1x (EQL, EQLv2, DropLoss, BaGS and its CE)
        groups.append("schedule_eqlv2_1x")
    else:
        groups.append("schedule_seesaw_2x")
    groups += ["cascade", "cascade_mmdet"] if stages else ["mask_rcnn"]
    if name.startswith("htc_lite"):
        groups.append("heads_htc_lite")
    elif stages:
        groups.append("heads_cascade")
    elif loss == "ce":
        groups.append("heads_standard")
    elif loss != "loce":
        groups.append("heads_long_tail")
    if name.startswith("cascade"):  # HTC-Lite keeps one mask head after the last stage
        groups.append("cascade_mmdet_mask")
    return groups
