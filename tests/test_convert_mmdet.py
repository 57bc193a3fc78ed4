"""tools/convert_mmdet.py: official mmdetection checkpoints -> this project's models, with output
parity against mmdetection 3.3.0's own forward pass on CPU (tests/mmdet_stubs.py).

The mmdetection models are built from the config files in mmdetection's wheel, with random
weights and BatchNorm statistics (seeded), saved as mmdetection checkpoints, converted, and
compared stage by stage on one image: FPN features, anchors, RPN proposals, box logits and
deltas on the same RoIs, final boxes / scores / labels (before detectron2's empty-box filter)
and mask logits. Tolerances: float32 features and logits within 1e-4 of their largest magnitude
(the two frameworks sum in different orders); boxes within 1e-3 px; labels exact.
Without mmdetection installed (tools/install/requirements-test.lock) the parity tests skip.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from seesaw_ecm import convert_mmdet, model_zoo
from seesaw_ecm.errors import SeesawEcmError

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MMDET_R50 = ("configs/seesaw_loss/"
             "mask-rcnn_r50_fpn_seesaw-loss-normed-mask_sample1e-3-ms-2x_lvis-v1.py")
MMDET_CASCADE = "configs/seesaw_loss/cascade-mask-rcnn_r101_fpn_seesaw-loss_random-ms-2x_lvis-v1.py"
R50 = "mask_rcnn_r50_fpn_sample1e-3_seesaw_loss_normed_mask_mstrain_2x_lvis_v1"
CASCADE = "cascade_mask_rcnn_r101_fpn_random_seesaw_loss_mstrain_2x_lvis_v1"  # plain masks
ECM = "r50_ecm_1x_lvis_v1"
C = 1203
PROPOSALS, DETECTIONS = 60, 40
H, W = 100, 140  # not multiples of 32: both pad to 128 x 160


def config(name):
    return os.path.join(ROOT, convert_mmdet.OFFICIAL_MODELS[name].config)


def close(a, b, rel=1e-4):
    """|a - b| <= rel x max |a| (float32 sums in another order)."""
    a, b = a.double(), b.double()
    return a.shape == b.shape and bool((a - b).abs().max() <= rel * a.abs().max().clamp(min=1e-6))


# --- without mmdetection -----------------------------------------------------------------------

def test_every_official_model_has_a_config_of_its_kind():
    assert len(convert_mmdet.OFFICIAL_MODELS) == 16
    for name, row in convert_mmdet.OFFICIAL_MODELS.items():
        cfg = model_zoo.load_config(os.path.join(ROOT, row.config))
        assert convert_mmdet.model_kind(cfg) == (row.depth, row.loss, row.cascade,
                                                 row.normed_mask), name
        assert (cfg.INPUT.FORMAT, cfg.MODEL.RESNETS.STRIDE_IN_1X1) == ("RGB", False)
        assert list(cfg.MODEL.PIXEL_MEAN) == [123.675, 116.28, 103.53]
        assert list(cfg.MODEL.PIXEL_STD) == [58.395, 57.12, 57.375]
        assert cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE == cfg.MODEL.ROI_MASK_HEAD.POOLER_TYPE \
            == "ROIAlignV2"
        assert (cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST, cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST,
                cfg.TEST.DETECTIONS_PER_IMAGE) == (1e-4, 0.5, 300)
        assert (cfg.MODEL.RPN.PRE_NMS_TOPK_TEST, cfg.MODEL.RPN.POST_NMS_TOPK_TEST,
                cfg.MODEL.RPN.NMS_THRESH) == (1000, 1000, 0.7)
        if row.cascade:
            assert (cfg.MODEL.CASCADE.TEST_SCORE, cfg.MODEL.CASCADE.MASK_PER_STAGE) == (
                "logits", True)


def test_rules_map_the_mmdetection_names():
    mapped = {k: convert_mmdet.target_key(k)[1] for k in [
        "backbone.layer1.0.downsample.1.running_var", "backbone.layer4.2.conv2.weight",
        "neck.lateral_convs.0.conv.weight", "neck.fpn_convs.3.conv.bias",
        "roi_head.bbox_head.2.shared_fcs.1.weight", "roi_head.mask_head.1.conv_logits.bias"]}
    assert mapped == {
        "backbone.layer1.0.downsample.1.running_var":
            "backbone.bottom_up.res2.0.shortcut.norm.running_var",
        "backbone.layer4.2.conv2.weight": "backbone.bottom_up.res5.2.conv2.weight",
        "neck.lateral_convs.0.conv.weight": "backbone.fpn_lateral2.weight",
        "neck.fpn_convs.3.conv.bias": "backbone.fpn_output5.bias",
        "roi_head.bbox_head.2.shared_fcs.1.weight": "roi_heads.box_head.2.fc2.weight",
        "roi_head.mask_head.1.conv_logits.bias": "roi_heads.mask_head.1.predictor.bias"}
    assert convert_mmdet.target_key("backbone.bn1.num_batches_tracked") == (True, None)
    assert convert_mmdet.target_key("roi_head.bbox_head.fc_cls_extra.weight") == (False, None)


def test_a_misnamed_or_corrupted_file_is_refused(tmp_path):
    path = tmp_path / f"{R50}-00000000.pth"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(SeesawEcmError, match="corrupted: its name expects a sha256 starting "
                                             "with 00000000"):
        convert_mmdet.convert_checkpoint(str(path), config(R50), str(tmp_path / "zoo"))
    with pytest.raises(SeesawEcmError, match="does not exist"):
        convert_mmdet.convert_checkpoint(str(tmp_path / "x.pth"), config(R50), str(tmp_path))
    state = {"backbone.conv1.weight": torch.ones(2), "backbone.bn1.num_batches_tracked":
             torch.tensor(3)}
    torch.save(state, tmp_path / "bare.pth")  # a bare state dict
    torch.save({"meta": {"epoch": 12}, "state_dict": state, "optimizer": {"state": {}}},
               tmp_path / "mmdet2.pth")  # mmdetection 2.x, optimizer state included
    for name, dropped in (("bare.pth", []), ("mmdet2.pth", ["meta", "optimizer"])):
        read, meta, entries = convert_mmdet.read_mmdet_checkpoint(str(tmp_path / name))
        assert read.keys() == state.keys() and torch.equal(read["backbone.conv1.weight"],
                                                           state["backbone.conv1.weight"])
        assert entries == dropped and meta == ({"epoch": 12} if dropped else {})
    torch.save({"state_dict": {}, "extra": 1}, tmp_path / "odd.pth")
    with pytest.raises(SeesawEcmError, match=r"top-level entries \['extra'\]"):
        convert_mmdet.read_mmdet_checkpoint(str(tmp_path / "odd.pth"))


def test_class_names_recorded_in_the_checkpoint_must_be_lvis_v1_in_order():
    from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES
    names = [c["name"] for c in sorted(LVIS_CATEGORIES, key=lambda c: c["id"])]
    names[654] = "speaker_(stereo_equipment)"  # mmdetection's spelling
    convert_mmdet.check_classes({"CLASSES": tuple(names)}, C)  # 2.x meta
    convert_mmdet.check_classes({"dataset_meta": {"classes": names}}, C)  # 3.x meta
    convert_mmdet.check_classes({}, C)  # nothing recorded: nothing to check
    names[3], names[4] = names[4], names[3]
    with pytest.raises(SeesawEcmError, match=f"class 3 is '{names[3]}'"):
        convert_mmdet.check_classes({"CLASSES": names}, C)
    with pytest.raises(SeesawEcmError, match="trained on 80 classes"):
        convert_mmdet.check_classes({"CLASSES": names[:80]}, C)


def test_a_checkpoint_of_another_kind_is_refused_by_name(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(SeesawEcmError, match="normed mask.*use configs/LVISv1/mmdet/"
                                             "mask_rcnn_r50_fpn_random_seesaw_loss_mstrain"):
        convert_mmdet.convert_checkpoint(
            str(path), config(R50), str(tmp_path / "zoo"),
            name="mask_rcnn_r50_fpn_random_seesaw_loss_mstrain_2x_lvis_v1")


# --- against mmdetection -----------------------------------------------------------------------

def _mmdet():
    pytest.importorskip("mmdet", reason="mmdetection 3.3.0 is a test-only extra: "
                        "tools/install/requirements-test.lock")
    import mmdet_stubs
    return mmdet_stubs


def _image(seed=0):
    """(H, W, 3) uint8 BGR image."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (H, W, 3), generator=g, dtype=torch.uint8)


class Pair:
    """The mmdetection model, its checkpoint converted, and the Detectron2 model loaded from the
    converted files, with both preprocessed inputs of one image."""

    def __init__(self, tmp, mmdet_config, name, ecm=False, seed=0):
        stubs = _mmdet()
        bgr = _image(seed)
        bbox_head = None
        if ecm:
            _register_ecm_reference()
            bbox_head = {"loss_cls": {"type": "ECMReference", "num_classes": C}}
        normalized = ((bgr.flip(-1).float() - torch.tensor([123.675, 116.28, 103.53]))
                      / torch.tensor([58.395, 57.12, 57.375])).permute(2, 0, 1)[None]
        self.mm = stubs.mmdet_model(mmdet_config, seed, normalized, PROPOSALS, DETECTIONS,
                                    bbox_head)
        self._set_loss_statistics(seed)
        self.checkpoint = stubs.mmdet_checkpoint(self.mm, os.path.join(tmp, "mmdet.pth"))
        self.info = convert_mmdet.convert_checkpoint(self.checkpoint, config(name),
                                                     os.path.join(tmp, "zoo"), name=name)
        self.weights = os.path.join(tmp, "zoo", self.info["files"]["pth"]["name"])
        self.d2 = model_zoo.get_predictor(self.weights, opts=[
            "MODEL.RPN.PRE_NMS_TOPK_TEST", PROPOSALS, "MODEL.RPN.POST_NMS_TOPK_TEST", PROPOSALS,
            "TEST.DETECTIONS_PER_IMAGE", DETECTIONS]).model
        from mmdet.structures import DetDataSample
        sample = DetDataSample(metainfo={"img_shape": (H, W), "ori_shape": (H, W),
                                         "scale_factor": (1.0, 1.0)})
        data = self.mm.data_preprocessor({"inputs": [bgr.permute(2, 0, 1)],
                                          "data_samples": [sample]}, False)
        self.mm_input, self.samples = data["inputs"], data["data_samples"]
        self.d2_input = [{"image": bgr.flip(-1).permute(2, 0, 1).float()}]  # RGB, as configured
        with torch.no_grad():
            self.mm_feats = self.mm.extract_feat(self.mm_input)
            self.d2_images = self.d2.preprocess_image(self.d2_input)
            self.d2_feats = self.d2.backbone(self.d2_images.tensor)

    def _set_loss_statistics(self, seed):
        g = torch.Generator().manual_seed(seed + 1)
        for name, buf in self.mm.named_buffers():
            if name.endswith("cum_samples"):
                buf.copy_(torch.randint(0, 10000, buf.shape, generator=g).float())

    def d2_proposals(self, mm_rpn):
        """The mmdetection proposals as detectron2 Instances."""
        from detectron2.structures import Boxes, Instances
        return [Instances((H, W), proposal_boxes=Boxes(r.bboxes.clone()),
                          objectness_logits=r.scores.logit()) for r in mm_rpn]


_ECM_REGISTERED = []


def _register_ecm_reference():
    """ECM-Loss's inference as the official EffectiveClassMarginLoss writes it (its buffers,
    C + 1 output channels, sigmoid scores times 1 - sigmoid(background)), registered with
    mmdetection so that its Shared2FCBBoxHead hosts an ECM classifier."""
    if _ECM_REGISTERED:
        return
    from mmdet.registry import MODELS
    from torch import nn

    @MODELS.register_module()
    class ECMReference(nn.Module):
        custom_cls_channels = custom_activation = custom_accuracy = True

        def __init__(self, num_classes, fg_bg_ratio=6.3313, seed=3, **unused):
            super().__init__()
            self.num_classes = num_classes
            g = torch.Generator().manual_seed(seed)
            n = torch.randint(1, 50000, (num_classes,), generator=g).float()
            n = torch.cat([n, n.sum()[None] * fg_bg_ratio])
            a = (n.sum() - n) / n
            self.register_buffer("sample_n", n)
            self.register_buffer("detection_cls_weight", (a * ((1 + a) / a).log())[None])

        def get_cls_channels(self, num_classes):
            return num_classes + 1

        def get_activation(self, cls_score):
            cls_score = cls_score.sigmoid()
            cls_score[:, :self.num_classes] *= (1 - cls_score[:, self.num_classes:])
            return cls_score

    _ECM_REGISTERED.append(ECMReference)


@pytest.fixture(scope="module")
def r50(tmp_path_factory):
    return Pair(str(tmp_path_factory.mktemp("r50")), MMDET_R50, R50)


@pytest.fixture(scope="module")
def ecm(tmp_path_factory):
    return Pair(str(tmp_path_factory.mktemp("ecm")), MMDET_R50, ECM, ecm=True)


def test_class_order_is_lvis_v1_by_category_id():
    _mmdet().install_mmcv_ops()
    from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES
    from mmdet.datasets import LVISV1Dataset
    mm = list(LVISV1Dataset.METAINFO["classes"])
    d2 = [c["name"] for c in sorted(LVIS_CATEGORIES, key=lambda c: c["id"])]
    assert len(mm) == len(d2) == C
    # one spelling fixed by mmdetection; the order is the same
    assert {i: (a, b) for i, (a, b) in enumerate(zip(mm, d2)) if a != b} == {
        654: ("speaker_(stereo_equipment)", "speaker_(stero_equipment)")}


def test_features_and_anchors_equal_mmdetection(r50):
    assert r50.mm_input.shape == r50.d2_images.tensor.shape == (1, 3, 128, 160)
    assert close(r50.mm_input, r50.d2_images.tensor, 1e-6)
    levels = ["p2", "p3", "p4", "p5", "p6"]
    for mm, level in zip(r50.mm_feats, levels):
        assert close(mm, r50.d2_feats[level]), level
    sizes = [f.shape[-2:] for f in r50.mm_feats]
    mm_anchors = r50.mm.rpn_head.prior_generator.grid_priors(sizes, device="cpu")
    d2_anchors = r50.d2.proposal_generator.anchor_generator([r50.d2_feats[f] for f in levels])
    for mm, d2 in zip(mm_anchors, d2_anchors):
        assert torch.allclose(mm, d2.tensor, atol=1e-4)


def test_rpn_proposals_equal_mmdetection(r50):
    with torch.no_grad():
        mm = r50.mm.rpn_head.predict(r50.mm_feats, r50.samples, rescale=False)[0]
        d2 = r50.d2.proposal_generator(r50.d2_images, r50.d2_feats)[0][0]
    assert len(mm) == len(d2) == PROPOSALS
    assert torch.allclose(mm.bboxes, d2.proposal_boxes.tensor, atol=1e-3)
    assert torch.allclose(mm.scores, d2.objectness_logits.sigmoid(), atol=1e-5)


def _box_outputs(pair, stage=None):
    """mmdetection's and detectron2's box-head outputs on the same (mmdetection) RoIs."""
    from detectron2.structures import Boxes
    from mmdet.structures.bbox import bbox2roi
    with torch.no_grad():
        rpn = pair.mm.rpn_head.predict(pair.mm_feats, pair.samples, rescale=False)
        rois = bbox2roi([r.bboxes for r in rpn])
        heads = pair.d2.roi_heads
        args = (pair.mm_feats, rois) if stage is None else (stage, pair.mm_feats, rois)
        mm = pair.mm.roi_head._bbox_forward(*args)
        x = heads.box_pooler([pair.d2_feats[f] for f in heads.box_in_features],
                             [Boxes(rpn[0].bboxes)])
        box_head = heads.box_head if stage is None else heads.box_head[stage]
        predictor = heads.box_predictor if stage is None else heads.box_predictor[stage]
        scores, deltas = predictor(box_head(x))
    return rpn, (mm["cls_score"], mm["bbox_pred"]), (scores, deltas)


def test_box_logits_and_deltas_on_the_same_rois_equal_mmdetection(r50):
    _, (mm_scores, mm_deltas), (scores, deltas) = _box_outputs(r50)
    assert scores.shape == mm_scores.shape == (PROPOSALS, C + 2)  # C classes, fg, bg
    assert close(mm_scores, scores) and close(mm_deltas, deltas)


def _detections(pair):
    """Final (boxes, scores, labels) of both on the same proposals; detectron2's before its
    empty-box filter (detector_postprocess)."""
    with torch.no_grad():
        rpn = pair.mm.rpn_head.predict(pair.mm_feats, pair.samples, rescale=False)
        mm = pair.mm.roi_head.predict_bbox(pair.mm_feats, [s.metainfo for s in pair.samples],
                                           rpn, pair.mm.roi_head.test_cfg, rescale=False)[0]
        d2 = pair.d2.roi_heads._forward_box(pair.d2_feats, pair.d2_proposals(rpn))[0]
    return mm, d2


def _assert_same_detections(mm, d2):
    assert len(mm) == len(d2) == DETECTIONS
    assert torch.equal(mm.labels, d2.pred_classes)
    assert torch.allclose(mm.scores, d2.scores, rtol=1e-4, atol=1e-7)
    assert torch.allclose(mm.bboxes, d2.pred_boxes.tensor, atol=1e-3)


def test_final_detections_and_masks_equal_mmdetection(r50):
    mm, d2 = _detections(r50)
    _assert_same_detections(mm, d2)
    from detectron2.structures import Boxes
    from mmdet.structures.bbox import bbox2roi
    heads = r50.d2.roi_heads
    with torch.no_grad():
        mm_masks = r50.mm.roi_head._mask_forward(r50.mm_feats, bbox2roi([mm.bboxes]))
        x = heads.mask_pooler([r50.d2_feats[f] for f in heads.mask_in_features],
                              [Boxes(mm.bboxes)])
        masks = heads.mask_head.layers(x)
    assert masks.shape == (DETECTIONS, C, 28, 28)
    assert close(mm_masks["mask_preds"], masks)


def test_end_to_end_predictions_equal_mmdetection(r50):
    """The whole models, image in, detections out (detectron2 before detector_postprocess)."""
    with torch.no_grad():
        mm = r50.mm.predict(r50.mm_input, r50.samples, rescale=False)[0].pred_instances
        d2 = r50.d2.inference(r50.d2_input, do_postprocess=False)[0]
    _assert_same_detections(mm, d2)


def test_seesaw_counts_and_ecm_statistics_become_the_loss_buffers(r50, ecm):
    state = model_zoo.load_weights(r50.weights)
    mm_counts = r50.mm.roi_head.bbox_head.loss_cls.cum_samples
    assert torch.equal(state["roi_heads.box_predictor.cls_loss.cum_samples"], mm_counts[:C])
    state = model_zoo.load_weights(ecm.weights)
    loss = ecm.mm.roi_head.bbox_head.loss_cls
    n = loss.sample_n.double()
    prefix = "roi_heads.box_predictor.cls_loss."
    assert torch.equal(state[prefix + "sample_counts"], n)
    assert torch.equal(state[prefix + "weight"], loss.detection_cls_weight.double().flatten())
    margin = 0.25 * torch.log(n / (n.sum() - n))  # pos - neg margin of the official loss
    assert torch.allclose(state[prefix + "margin"], margin, rtol=1e-9, atol=1e-12)
    assert "roi_heads.box_predictor.objectness.weight" not in state


def test_ecm_logits_and_sigmoid_scores_equal_mmdetection(ecm):
    _, (mm_scores, mm_deltas), (scores, deltas) = _box_outputs(ecm)
    assert scores.shape == mm_scores.shape == (PROPOSALS, C + 1)  # background last
    assert close(mm_scores, scores) and close(mm_deltas, deltas)
    _assert_same_detections(*_detections(ecm))


def test_the_converted_folder_loads_everywhere(r50, tmp_path):
    """model_zoo lists it; a plain DefaultPredictor on its yaml gives the zoo's predictions."""
    from detectron2.engine import DefaultPredictor
    folder = os.path.dirname(r50.weights)
    [listed] = model_zoo.list_models(folder)
    assert listed["converted_from"]["sha256"] == convert_mmdet._sha256_file(r50.checkpoint)
    assert listed["metrics"] == {"bbox": {"AP": 27.6}, "segm": {"AP": 26.8}}
    assert len(listed["classes"]) == C
    assert any("num_batches_tracked" in k for k in listed["converted_from"]["dropped_keys"])
    assert listed["converted_from"]["dropped_entries"] == ["meta"]
    opts = ["MODEL.RPN.POST_NMS_TOPK_TEST", "30", "TEST.DETECTIONS_PER_IMAGE", "10"]
    zoo = model_zoo.get_predictor(R50, zoo_dir=folder, opts=opts)
    cfg = model_zoo.load_config(os.path.join(folder, f"{R50}.yaml"),
                                ["MODEL.WEIGHTS", r50.weights, "MODEL.DEVICE", "cpu", *opts])
    plain = DefaultPredictor(cfg)
    image = _image(5).numpy()
    a, b = zoo(image)["instances"], plain(image)["instances"]
    assert len(a) == 10 and torch.equal(a.scores, b.scores)


# --- a wrong mapping must break parity ---------------------------------------------------------

def _swap_fpn_levels(monkeypatch):
    rules = list(convert_mmdet._RULES)
    for i, (pattern, target) in enumerate(rules):
        if pattern.pattern.startswith(r"neck\.fpn_convs"):
            swap = {"1": 2, "2": 1}  # P3 <-> P4
            rules[i] = (pattern, lambda m: f"backbone.fpn_output{swap.get(m[1], int(m[1])) + 2}"
                                           f".{m[2]}")
    monkeypatch.setattr(convert_mmdet, "_RULES", rules)


def _objectness_unsplit(monkeypatch):
    """fg / bg objectness rows swapped: the wrong two of the C + 2 rows as the objectness."""
    def split(key, value, model_state, num_classes):
        objectness = key.replace(".cls_score.", ".objectness.")
        return {key: value[:num_classes], objectness: value[num_classes:].flip(0)}
    monkeypatch.setattr(convert_mmdet, "_split_classifier", split)


def _no_objectness_factor(monkeypatch):
    """Scores as plain softmax over the C class logits: the objectness branch ignored."""
    from seesaw_ecm.losses import SeesawLoss
    monkeypatch.setattr(SeesawLoss, "get_probs", lambda self, cls, obj: torch.cat(
        [cls.softmax(-1), obj[:, 1:] * 0], dim=1))


@pytest.mark.parametrize("broken", [_swap_fpn_levels, _objectness_unsplit,
                                    _no_objectness_factor])
def test_a_wrong_mapping_breaks_parity(r50, monkeypatch, broken):
    source, _, _ = convert_mmdet.read_mmdet_checkpoint(r50.checkpoint)
    good = {k: v.clone() for k, v in r50.d2.state_dict().items()}
    broken(monkeypatch)
    cfg = model_zoo.load_config(config(R50))
    state, _ = convert_mmdet.convert_state_dict(source, r50.d2.state_dict(), cfg)
    try:
        r50.d2.load_state_dict(state)
        with torch.no_grad():
            feats = r50.d2.backbone(r50.d2_images.tensor)
        if broken is _swap_fpn_levels:
            assert not all(close(mm, feats[f]) for mm, f in zip(r50.mm_feats, ["p2", "p3", "p4"]))
        else:
            mm, d2 = _detections(r50)
            assert len(d2) == DETECTIONS
            assert not torch.allclose(mm.scores, d2.scores, rtol=1e-2)
    finally:
        r50.d2.load_state_dict(good)


# --- cascade -----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", [CASCADE, "c101_ecm_2x_lvis_v1"])
def test_cascade_r101_equals_mmdetection_and_probability_averaging_would_not(tmp_path, name):
    """Seesaw's and ECM's cascades: the stages' logits averaged, then one activation."""
    mmdet_config = MMDET_CASCADE
    if name != CASCADE:  # ECM: mmdetection's cascade with ECM's classifier in every stage
        mmdet_config = _wheel_config(convert_mmdet.OFFICIAL_MODELS[name])
    pair = Pair(str(tmp_path), mmdet_config, name, ecm=name != CASCADE)
    for level, mm in zip(["p2", "p3", "p4", "p5", "p6"], pair.mm_feats):
        assert close(mm, pair.d2_feats[level]), level
    for stage in range(3):
        _, (mm_scores, mm_deltas), (scores, deltas) = _box_outputs(pair, stage)
        assert close(mm_scores, scores) and close(mm_deltas, deltas), stage
    mm, d2 = _detections(pair)
    _assert_same_detections(mm, d2)
    from mmdet.structures.bbox import bbox2roi
    with torch.no_grad():  # mmdetection: the mean of the three heads' sigmoid masks
        rois = bbox2roi([mm.bboxes])
        probs = sum(pair.mm.roi_head._mask_forward(k, pair.mm_feats, rois)["mask_preds"].sigmoid()
                    for k in range(3)) / 3
        d2 = pair.d2.roi_heads._forward_mask(pair.d2_feats, [d2])[0]
    expected = probs[torch.arange(DETECTIONS), mm.labels]
    assert torch.allclose(d2.pred_masks[:, 0], expected, atol=1e-5)
    pair.d2.roi_heads.test_score = "probs"  # detectron2's averaging of probabilities
    try:
        _, d2 = _detections(pair)
        assert not torch.allclose(mm.scores, d2.scores, rtol=1e-2)
    finally:
        pair.d2.roi_heads.test_score = "logits"


# --- the command line --------------------------------------------------------------------------

def test_command_line_converts_and_reports_a_bad_key_by_name(r50, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [ROOT, os.environ.get("PYTHONPATH", "")])}
    tool = os.path.join(ROOT, "tools", "convert_mmdet.py")
    out = tmp_path / "zoo"
    run = subprocess.run([sys.executable, tool, r50.checkpoint, "--config", config(R50),
                          "--output", str(out), "--name", R50], capture_output=True, text=True,
                         env=env)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["files"] == r50.info["files"]  # same tensors, same files
    state = torch.load(r50.checkpoint, weights_only=True)
    state["state_dict"]["roi_head.bbox_head.fc_extra.weight"] = torch.zeros(1)
    del state["state_dict"]["rpn_head.rpn_reg.bias"]
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    run = subprocess.run([sys.executable, tool, str(bad), "--config", config(R50), "--output",
                          str(tmp_path / "bad"), "--name", R50], capture_output=True, text=True,
                         env=env)
    assert run.returncode == 2
    assert "roi_head.bbox_head.fc_extra.weight" in run.stderr and "Traceback" not in run.stderr
    del state["state_dict"]["roi_head.bbox_head.fc_extra.weight"]
    torch.save(state, bad)
    run = subprocess.run([sys.executable, tool, str(bad), "--config", config(R50), "--output",
                          str(tmp_path / "bad"), "--name", R50], capture_output=True, text=True,
                         env=env)
    assert run.returncode == 2 and "proposal_generator.rpn_head.anchor_deltas.bias" in run.stderr


# --- every official model, and fine-tuning from a converted one ---------------------------------

def _wheel_config(row):
    """The mmdetection 3.3.0 wheel's config of an official model's architecture (ECM: the
    Seesaw one with the normalized mask predictor; its loss is swapped in by the caller)."""
    normed = "-normed-mask" if row.normed_mask else ""
    sampler = "sample1e-3" if "sample1e-3" in row.config or row.loss == "ecm" else "random"
    cascade = "cascade-" if row.cascade else ""
    return (f"configs/seesaw_loss/{cascade}mask-rcnn_r{row.depth}_fpn_seesaw-loss{normed}_"
            f"{sampler}-ms-2x_lvis-v1.py")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(convert_mmdet.OFFICIAL_MODELS))
def test_every_official_architecture_converts_key_for_key(name):
    """Each project config takes every tensor of the mmdetection model of its checkpoint."""
    from detectron2.modeling import build_model
    stubs = _mmdet()
    row = convert_mmdet.OFFICIAL_MODELS[name]
    bbox_head = None
    if row.loss == "ecm":
        _register_ecm_reference()
        bbox_head = {"loss_cls": {"type": "ECMReference", "num_classes": C}}
    mm = stubs.mmdet_model(_wheel_config(row), bbox_head=bbox_head)
    cfg = model_zoo.load_config(config(name), ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    state, dropped = convert_mmdet.convert_state_dict(mm.state_dict(), model.state_dict(), cfg)
    model.load_state_dict(state)  # strict
    assert all("num_batches_tracked" in k or "cum_samples[1203]" in k for k in dropped)


TINY = {  # mmdetection's Seesaw Mask R-CNN at the size of configs/Synthetic (R-18, FPN 64)
    "model.backbone.depth": 18, "model.neck.in_channels": [64, 128, 256, 512],
    "model.neck.out_channels": 64, "model.rpn_head.in_channels": 64,
    "model.rpn_head.feat_channels": 64, "model.rpn_head.anchor_generator.scales": [4],
    "model.roi_head.bbox_roi_extractor.out_channels": 64,
    "model.roi_head.mask_roi_extractor.out_channels": 64,
    "model.roi_head.bbox_head.in_channels": 64, "model.roi_head.bbox_head.fc_out_channels": 256,
    "model.roi_head.bbox_head.num_classes": 12,
    "model.roi_head.bbox_head.loss_cls.num_classes": 12,
    "model.roi_head.mask_head.in_channels": 64, "model.roi_head.mask_head.conv_out_channels": 64,
    "model.roi_head.mask_head.num_classes": 12,
}
TINY_D2 = [  # the same model in the synthetic Seesaw config, as configs/LVISv1/mmdet/ set it
    "MODEL.RESNETS.NORM", "FrozenBN", "MODEL.BACKBONE.FREEZE_AT", "2",
    "MODEL.RESNETS.STRIDE_IN_1X1", "False", "INPUT.FORMAT", "RGB",
    "MODEL.PIXEL_MEAN", "[123.675, 116.28, 103.53]", "MODEL.PIXEL_STD", "[58.395, 57.12, 57.375]",
    "MODEL.ROI_HEADS.NUM_CLASSES", "12"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random-weight mmdetection Seesaw checkpoint (counts 0, 100, ..., 1200) and its
    conversion with the synthetic Seesaw config: (mmdetection model, zoo folder, weights)."""
    stubs = _mmdet()
    tmp = tmp_path_factory.mktemp("tiny")
    mm = stubs.mmdet_model(MMDET_R50, options=TINY)
    mm.roi_head.bbox_head.loss_cls.cum_samples.copy_(torch.arange(13.0) * 100)
    checkpoint = stubs.mmdet_checkpoint(mm, str(tmp / "tiny.pth"))
    info = convert_mmdet.convert_checkpoint(
        checkpoint, os.path.join(ROOT, "configs/Synthetic/mask_rcnn_R18_FPN_seesaw.yaml"),
        str(tmp / "zoo"), name="tiny_seesaw", opts=TINY_D2)
    return mm, tmp / "zoo", str(tmp / "zoo" / info["files"]["pth"]["name"])


def test_fine_tuning_from_a_converted_model_resumes_the_seesaw_counts(
        tiny, small_synthetic, tmp_path):
    from seesaw_ecm.engine import Trainer
    mm, zoo, weights = tiny
    counts = mm.roi_head.bbox_head.loss_cls.cum_samples
    cfg = model_zoo.load_config(str(zoo / "tiny_seesaw.yaml"), [
        "MODEL.WEIGHTS", weights, "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path / "run"),
        "DATASETS.LVIS_FORMAT", f"['tiny_train={small_synthetic['train_json']}:"
        f"{small_synthetic['image_root']}']", "DATASETS.TRAIN", "('tiny_train',)",
        "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.BASE_LR", "0.001", "SOLVER.CHECKPOINT_PERIOD", "100",
        "DATALOADER.NUM_WORKERS", "0"])
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)  # MODEL.WEIGHTS: the converted file
    predictor = trainer.model.roi_heads.box_predictor
    assert torch.equal(predictor.cls_loss.cum_samples, counts[:12])
    fc1 = trainer.model.roi_heads.box_head.fc1.weight.detach().clone()
    assert torch.equal(fc1, mm.roi_head.bbox_head.shared_fcs[0].weight)
    trainer.train()
    after = predictor.cls_loss.cum_samples
    assert (after >= counts[:12]).all() and after.sum() > counts[:12].sum()
    assert not torch.equal(trainer.model.roi_heads.box_head.fc1.weight, fc1)  # it trained


@pytest.mark.slow
def test_train_net_eval_only_runs_a_converted_model(tiny, small_synthetic, tmp_path):
    from e2e import run_train_net, summary
    _, zoo, weights = tiny
    proc = run_train_net(small_synthetic, tmp_path, str(zoo / "tiny_seesaw.yaml"), "--eval-only",
                         "MODEL.WEIGHTS", weights)
    assert set(summary(proc.stdout)) == {"bbox", "segm"}, proc.stdout[-2000:]
