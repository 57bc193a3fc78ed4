"""The long-tail predictor, ROI heads, mask head, class statistics and optimizer clipping."""
import json

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model, build_proposal_generator
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from torch.nn import functional as F

from seesaw_ecm import add_seesaw_ecm_config
from seesaw_ecm.data.datasets import register_lvis_format
from seesaw_ecm.data.statistics import class_statistics, count_classes
from seesaw_ecm.engine import Trainer
from seesaw_ecm.layers import NormedConv2d, NormedLinear
from seesaw_ecm.losses import CrossEntropyLoss, ECMLoss, FederatedLoss, SeesawLoss
from seesaw_ecm.modeling import LOSS_SPECS, LongTailOutputLayers, build_cls_loss
from seesaw_ecm.modeling.cls_loss import uses_cosine_classifier
from seesaw_ecm.modeling.mask_head import NormedMaskRCNNConvUpsampleHead
from seesaw_ecm.modeling.rpn import LowQualityFloorMatcher, LowQualityFloorRPN

C = 3


def small_cfg(loss="ce", objectness=False, **extra):
    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    cfg.merge_from_file("configs/Synthetic/Base-Synthetic-R18-FPN.yaml")
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_HEADS.NAME = "LongTailROIHeads"
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = C
    cfg.MODEL.LONG_TAIL.LOSS = loss
    cfg.MODEL.LONG_TAIL.OBJECTNESS = objectness
    cfg.OUTPUT_DIR = ""
    for k, v in extra.items():
        cfg.merge_from_list([k, v])
    return cfg


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """A registered 3-class LVIS-format set: instances per class [3, 1, 0], images [2, 1, 0]."""
    tri = [[1.0, 1.0, 9.0, 1.0, 5.0, 9.0]]
    ann = lambda i, img, cat: {"id": i, "image_id": img, "category_id": cat,  # noqa: E731
                               "bbox": [1, 1, 8, 8], "segmentation": tri}
    data = {
        "images": [{"id": i, "height": 16, "width": 16, "file_name": f"{i}.jpg"} for i in (1, 2)],
        "annotations": [ann(1, 1, 1), ann(2, 1, 1), ann(3, 2, 1), ann(4, 2, 2)],
        "categories": [{"id": i, "name": f"c{i}"} for i in (1, 2, 3)],
    }
    path = tmp_path_factory.mktemp("tiny") / "tiny.json"
    path.write_text(json.dumps(data))
    if "tiny_stats" not in DatasetCatalog.list():
        register_lvis_format("tiny_stats", str(path), str(path.parent))
    return "tiny_stats"


def fake_proposals(labels):
    """One image whose proposals have the given gt classes (C = background)."""
    n = len(labels)
    inst = Instances((32, 32))
    boxes = torch.tensor([[2.0, 2.0, 20.0, 20.0]]).repeat(n, 1)
    inst.proposal_boxes = Boxes(boxes)
    inst.gt_boxes = Boxes(boxes + 1)
    inst.gt_classes = torch.tensor(labels)
    return [inst]


def predictor(cls_loss, cosine=True):
    return LongTailOutputLayers(
        ShapeSpec(channels=8), cls_loss=cls_loss, cosine=cosine, temperature=20.0,
        box2box_transform=Box2BoxTransform((10.0, 10.0, 5.0, 5.0)), num_classes=C,
    )


@pytest.mark.parametrize(
    "loss, n_scores, prob_sum_one",
    [(SeesawLoss(C), C + 2, True), (CrossEntropyLoss(C), C + 1, True),
     (ECMLoss([5, 2, 1]), C + 1, False), (FederatedLoss([5, 2, 1]), C + 1, False)],
)
def test_predictor_layout_losses_and_probs(loss, n_scores, prob_sum_one):
    torch.manual_seed(0)
    pred = predictor(loss)
    x = torch.randn(6, 8)
    scores, deltas = pred(x)
    assert scores.shape == (6, n_scores) and deltas.shape == (6, 4 * C)
    assert isinstance(pred.cls_score, NormedLinear)
    labels = [0, 1, 2, 3, 3, 0]
    with EventStorage():
        losses = pred.losses((scores, deltas), fake_proposals(labels))
    # the loss terms are those of the loss module on the predictor's split of the logits
    direct = loss(*pred._split(scores), torch.tensor(labels))
    for k, v in direct.items():
        torch.testing.assert_close(losses[k], v)
    assert losses["loss_box_reg"] > 0
    sum(losses.values()).backward()
    assert pred.cls_score.weight.grad.abs().sum() > 0
    (probs,) = pred.predict_probs((scores, deltas), fake_proposals(labels))
    assert probs.shape == (6, C + 1)
    assert ((probs >= 0) & (probs <= 1)).all()
    if prob_sum_one:
        torch.testing.assert_close(probs.sum(1), torch.ones(6))


def test_seesaw_probs_are_class_softmax_times_objectness():
    pred = predictor(SeesawLoss(C))
    scores, deltas = pred(torch.randn(4, 8))
    (probs,) = pred.predict_probs((scores, deltas), fake_proposals([0, 1, 2, 3]))
    obj = F.softmax(scores[:, C:], dim=1)
    torch.testing.assert_close(probs[:, :C], F.softmax(scores[:, :C], dim=1) * obj[:, :1])
    torch.testing.assert_close(probs[:, C], obj[:, 1])


def test_linear_classifier_when_cosine_off():
    pred = predictor(CrossEntropyLoss(C), cosine=False)
    assert type(pred.cls_score) is torch.nn.Linear and pred.cls_score.out_features == C + 1


@pytest.mark.parametrize(
    "loss, classifier, cosine",
    [("ce", "auto", False), ("cosine_ce", "auto", True), ("federated", "auto", False),
     ("seesaw", "auto", True), ("ecm", "auto", True), ("ce", "cosine", True),
     ("ecm", "linear", False)],
)
def test_classifier_follows_the_loss_name_unless_overridden(loss, classifier, cosine):
    cfg = small_cfg(loss, loss == "seesaw", **{"MODEL.LONG_TAIL.CLASSIFIER": classifier})
    assert uses_cosine_classifier(cfg) is cosine


def test_unknown_classifier_lists_choices():
    with pytest.raises(ValueError, match="CLASSIFIER 'mlp'.*'auto', 'cosine', 'linear'"):
        uses_cosine_classifier(small_cfg(**{"MODEL.LONG_TAIL.CLASSIFIER": "mlp"}))


@pytest.mark.parametrize(
    "loss, objectness, cls, p",
    [("seesaw", True, SeesawLoss, 0.8), ("ce", True, SeesawLoss, 0.0),
     ("cosine_ce", True, SeesawLoss, 0.0), ("ce", False, CrossEntropyLoss, None),
     ("cosine_ce", False, CrossEntropyLoss, None)],
)
def test_build_cls_loss_from_cfg(loss, objectness, cls, p):
    built = build_cls_loss(small_cfg(loss, objectness))
    assert type(built) is cls
    if p is not None:
        assert built.p == p


@pytest.mark.parametrize("loss, objectness",
                         [("seesaw", False), ("ecm", True), ("federated", True)])
def test_invalid_combination_lists_valid_ones(loss, objectness):
    with pytest.raises(ValueError, match="not a valid combination.*'seesaw' needs OBJECTNESS True"):
        build_cls_loss(small_cfg(loss, objectness))


def test_unknown_loss_name_lists_choices():
    with pytest.raises(ValueError, match=r"Unknown loss 'focal'.*\['bags', 'ce', 'cosine_ce', "
                                         r"'droploss', 'ecm', 'eql', 'eqlv2', 'federated', "
                                         r"'gol', 'loce', 'seesaw'\]"):
        build_cls_loss(small_cfg("focal"))


def test_ecm_statistics_from_registered_dataset(tiny_dataset, tmp_path):
    cfg = small_cfg("ecm", **{"DATASETS.TRAIN": f"('{tiny_dataset}',)",
                              "OUTPUT_DIR": str(tmp_path)})
    loss = build_cls_loss(cfg)
    expected = ECMLoss([3, 1, 0])
    for name, buf in expected.named_buffers():
        torch.testing.assert_close(dict(loss.named_buffers())[name], buf)
    saved = json.loads((tmp_path / "class_statistics.json").read_text())
    assert saved["counts"] == [3, 1, 0] and saved["datasets"] == [tiny_dataset]
    assert class_statistics(cfg, "image_count").tolist() == [2, 1, 0]
    cfg.MODEL.LONG_TAIL.ECM.WEIGHT_DTYPE = "float32"
    official = build_cls_loss(cfg)
    assert torch.equal(official.weight, ECMLoss([3, 1, 0], weight_dtype="float32").weight)
    assert not torch.equal(official.weight, expected.weight)  # float32 rounding
    cfg.MODEL.LONG_TAIL.ECM.STATISTIC = "image_count"
    torch.testing.assert_close(build_cls_loss(cfg).sample_counts, ECMLoss([2, 1, 0]).sample_counts)


def test_deprecated_ecm_statistic_key_still_works(tiny_dataset, tmp_path, caplog):
    cfg = small_cfg("ecm", **{"DATASETS.TRAIN": f"('{tiny_dataset}',)",
                              "OUTPUT_DIR": str(tmp_path)})
    cfg.MODEL.LONG_TAIL.STATISTIC = "image_count"  # the old name
    torch.testing.assert_close(build_cls_loss(cfg).sample_counts, ECMLoss([2, 1, 0]).sample_counts)
    assert "MODEL.LONG_TAIL.STATISTIC is deprecated" in caplog.text
    cfg.MODEL.LONG_TAIL.ECM.STATISTIC = "image_count"  # both, equal: fine
    build_cls_loss(cfg)
    cfg.MODEL.LONG_TAIL.STATISTIC = "instance_count"  # both, different: which one?
    with pytest.raises(ValueError, match="disagree: set only MODEL.LONG_TAIL.ECM.STATISTIC"):
        build_cls_loss(cfg)


def test_loss_table_lists_every_name_with_its_layout():
    assert set(LOSS_SPECS) == {"ce", "cosine_ce", "federated", "seesaw", "ecm", "eql", "eqlv2",
                               "droploss", "gol", "bags", "loce"}
    for name, spec in LOSS_SPECS.items():  # the objectness rule agrees with the loss it builds
        objectness = spec.objectness == "required"
        heads = "LOCEROIHeads" if name == "loce" else "LongTailROIHeads"
        cfg = small_cfg(name, objectness, **{"MODEL.LONG_TAIL.STATISTICS_FROM": "checkpoint",
                                             "MODEL.ROI_HEADS.NAME": heads})
        loss = spec.build(cfg)
        assert loss.uses_objectness is objectness


def test_federated_weights_from_training_image_counts(tiny_dataset, tmp_path):
    # image counts [2, 1, 0] whatever MODEL.LONG_TAIL.ECM.STATISTIC says
    cfg = small_cfg("federated", **{"DATASETS.TRAIN": f"('{tiny_dataset}',)",
                                    "OUTPUT_DIR": str(tmp_path),
                                    "MODEL.LONG_TAIL.FEDERATED.NUM_CLASSES": 7,
                                    "MODEL.LONG_TAIL.FEDERATED.FREQ_WEIGHT_POWER": 0.5})
    loss = build_cls_loss(cfg)
    assert type(loss) is FederatedLoss and loss.num_sampled_classes == 7
    torch.testing.assert_close(loss.freq_weight, torch.tensor([2.0, 1.0, 0.0]).sqrt())
    saved = json.loads((tmp_path / "class_statistics.json").read_text())
    assert saved["statistic"] == "image_count"


def test_ecm_class_count_mismatch_is_clear(tiny_dataset):
    cfg = small_cfg("ecm", **{"DATASETS.TRAIN": f"('{tiny_dataset}',)"})
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 5
    with pytest.raises(ValueError, match="has 3 classes but MODEL.ROI_HEADS.NUM_CLASSES is 5"):
        build_cls_loss(cfg)


def test_ecm_without_training_data_or_statistics():
    cfg = small_cfg("ecm", **{"DATASETS.TRAIN": "()"})
    with pytest.raises(ValueError, match="DATASETS.TRAIN is empty"):
        build_cls_loss(cfg)
    cfg.MODEL.LONG_TAIL.STATISTICS_FROM = "checkpoint"  # eval-only: filled by the weights
    loss = build_cls_loss(cfg)
    loss.train()
    with pytest.raises(RuntimeError, match="placeholder"):
        loss(torch.zeros(2, C + 1), torch.tensor([0, C]))


def test_count_classes():
    dicts = [{"annotations": [{"category_id": 0}, {"category_id": 0},
                              {"category_id": 2, "iscrowd": 1}]},
             {"annotations": [{"category_id": 0}, {"category_id": 1}]}]
    assert count_classes(dicts, 3).tolist() == [3, 1, 0]
    assert count_classes(dicts, 3, "image_count").tolist() == [2, 1, 0]
    with pytest.raises(ValueError, match="outside"):
        count_classes(dicts, 1)
    with pytest.raises(ValueError, match="valid choices"):
        count_classes(dicts, 3, "area")


CHECKPOINT_STATISTICS = {"ecm": ECMLoss([4, 2, 1]), "federated": FederatedLoss([4, 2, 1])}


def one_image_batch():
    from detectron2.structures import BitMasks

    inst = Instances((64, 64), gt_boxes=Boxes(torch.tensor([[8.0, 8.0, 40.0, 40.0]])),
                     gt_classes=torch.tensor([1]))
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[:, 8:40, 8:40] = True
    inst.gt_masks = BitMasks(mask)
    return [{"image": torch.rand(3, 64, 64) * 255, "instances": inst, "height": 64, "width": 64}]


def build_small_model(loss, objectness, heads="LongTailROIHeads"):
    """A small model of `heads`; the statistics a checkpoint would bring are loaded."""
    cfg = small_cfg(loss, objectness,
                    **{"MODEL.ROI_MASK_HEAD.NAME": "NormedMaskRCNNConvUpsampleHead",
                       "MODEL.ROI_HEADS.NAME": heads})
    if heads == "LongTailCascadeROIHeads":
        cfg.merge_from_file("configs/Synthetic/cascade_mask_rcnn_R18_FPN_seesaw.yaml")
        cfg.merge_from_list(["MODEL.ROI_HEADS.NUM_CLASSES", C, "MODEL.LONG_TAIL.LOSS", loss,
                             "MODEL.LONG_TAIL.OBJECTNESS", objectness])
    cfg.MODEL.LONG_TAIL.STATISTICS_FROM = "checkpoint"
    model = build_model(cfg)
    predictors = model.roi_heads.box_predictor
    for pred in predictors if isinstance(predictors, torch.nn.ModuleList) else [predictors]:
        if loss in CHECKPOINT_STATISTICS:
            pred.cls_loss.load_state_dict(CHECKPOINT_STATISTICS[loss].state_dict())
    return model


LOSS_SETTINGS = [("seesaw", True), ("ecm", False), ("ce", False), ("cosine_ce", False),
                 ("federated", False)]


@pytest.mark.parametrize("loss, objectness", LOSS_SETTINGS)
def test_full_model_builds_trains_one_step_and_infers(loss, objectness):
    model = build_small_model(loss, objectness)
    assert isinstance(model.roi_heads.box_predictor, LongTailOutputLayers)
    assert isinstance(model.roi_heads.mask_head.predictor, NormedConv2d)
    torch.manual_seed(0)
    batch = one_image_batch()
    model.train()
    with EventStorage():
        losses = model(batch)
    expected = {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"}
    if objectness:
        expected.add("loss_objectness")
    assert set(losses) == expected
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model(batch)[0]["instances"]
    assert ((out.scores >= 0) & (out.scores <= 1)).all()
    assert (out.pred_classes < C).all()


@pytest.mark.parametrize("loss, objectness", LOSS_SETTINGS)
def test_cascade_every_stage_has_its_own_long_tail_predictor(loss, objectness):
    model = build_small_model(loss, objectness, "LongTailCascadeROIHeads")
    heads = model.roi_heads
    assert heads.num_cascade_stages == 3
    assert [m.thresholds[1] for m in heads.proposal_matchers] == [0.5, 0.6, 0.7]
    assert [p.box2box_transform.weights for p in heads.box_predictor] == [
        (10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0)]
    losses = [p.cls_loss for p in heads.box_predictor]
    assert all(isinstance(p, LongTailOutputLayers) for p in heads.box_predictor)
    assert len({id(x) for x in losses}) == 3 and len({type(x) for x in losses}) == 1
    assert all(p.bbox_pred.out_features == 4 for p in heads.box_predictor)  # class-agnostic

    torch.manual_seed(0)
    batch = one_image_batch()
    model.train()
    with EventStorage():
        out = model(batch)
    per_stage = {"loss_cls", "loss_box_reg"} | ({"loss_objectness"} if objectness else set())
    expected = {f"{k}_stage{s}" for k in per_stage for s in range(3)}
    assert set(out) == expected | {"loss_mask", "loss_rpn_cls", "loss_rpn_loc"}
    sum(out.values()).backward()
    for pred in heads.box_predictor:
        assert pred.cls_score.weight.grad.abs().sum() > 0
    if loss == "seesaw":  # each stage counted its own samples
        counts = [x.cum_samples for x in losses]
        assert all(c.sum() > 0 for c in counts)
        assert not torch.equal(counts[0], counts[2])


def test_cascade_scores_are_the_mean_of_the_stages_probabilities():
    model = build_small_model("seesaw", True, "LongTailCascadeROIHeads").eval()
    heads = model.roi_heads
    torch.manual_seed(0)
    batch = one_image_batch()
    stage_probs = []
    hooks = [p.register_forward_hook(
        lambda m, i, o: stage_probs.append(m.cls_loss.get_probs(*m._split(o[0]))))
        for p in heads.box_predictor]
    with torch.no_grad():
        instances = model(batch)[0]["instances"]
    for h in hooks:
        h.remove()
    assert len(stage_probs) == 3 and all(p.shape[1] == C + 1 for p in stage_probs)
    mean = sum(stage_probs) / 3
    assert len(instances) > 0
    assert ((instances.scores > 0) & (instances.scores <= 1)).all()
    # every output score is one of the averaged class probabilities (before NMS / top-k)
    fg = mean[:, :C].flatten()
    for score in instances.scores:
        assert torch.isclose(fg, score, rtol=1e-5, atol=1e-7).any()
    assert instances.pred_masks.shape[1:] == (64, 64) and instances.pred_boxes.tensor.shape[1] == 4


def test_global_norm_clipping():
    cfg = small_cfg()
    cfg.SOLVER.BASE_LR, cfg.SOLVER.MOMENTUM, cfg.SOLVER.WEIGHT_DECAY = 1.0, 0.0, 0.0
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED, cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = True, "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 2.0
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    before = [p.detach().clone() for p in model.parameters()]
    opt = Trainer.build_optimizer(cfg, model)
    (model(torch.ones(5, 3)).sum() * 100).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    assert total > 2.0
    with EventStorage() as storage:
        opt.step()
    assert storage.history("grad_norm").latest() == pytest.approx(total.item(), rel=1e-5)
    # SGD with lr 1: the step is the gradient scaled to global norm 2, in the same direction
    steps = [b - p.detach() for b, p in zip(before, model.parameters())]
    for s, g in zip(steps, grads):
        torch.testing.assert_close(s, g * (2.0 / total), rtol=1e-4, atol=1e-6)


def random_quality(seed, num_gt=6, num_pred=40):
    """(num_gt, num_pred) IoUs in [0, 0.8], many zeros, some ties, and a box with no overlap;
    multiples of 1/16, exact in float32 and never equal to a threshold 0.3 / 0.7."""
    g = torch.Generator().manual_seed(seed)
    iou = (torch.rand(num_gt, num_pred, generator=g) * 0.8 * 16).floor() / 16
    iou[torch.rand(num_gt, num_pred, generator=g) < 0.5] = 0
    iou[0] = 0  # a box no prediction overlaps
    return iou


@pytest.mark.parametrize("seed", range(20))
def test_rpn_floor_zero_is_detectron2s_matcher(seed):
    iou = random_quality(seed)
    stock = Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True)(iou)
    floored = LowQualityFloorMatcher([0.3, 0.7], [0, -1, 1], low_quality_min_iou=0.0)(iou)
    assert all(torch.equal(a, b) for a, b in zip(stock, floored))


@pytest.mark.parametrize("seed", range(20))
def test_rpn_floor_matches_mmdetections_min_pos_iou(seed):
    """Against mmdetection's MaxIoUAssigner rule, in a loop: a box's best predictions (ties
    included) turn positive only if that best IoU is >= min_pos_iou."""
    iou = random_quality(seed)
    matches, labels = LowQualityFloorMatcher([0.3, 0.7], [0, -1, 1], 0.3)(iou)
    best, _ = iou.max(dim=0)
    expected = [0 if v < 0.3 else (-1 if v < 0.7 else 1) for v in best.tolist()]
    for gt in range(iou.shape[0]):
        top = iou[gt].max().item()
        if top >= 0.3:
            expected = [1 if iou[gt, j].item() == top else e for j, e in enumerate(expected)]
    assert labels.tolist() == expected
    assert torch.equal(matches, iou.max(dim=0)[1])
    stock = Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True)(iou)[1]
    assert (stock == 1).sum() > (labels == 1).sum()  # the stock matcher made more positives


def test_rpn_floor_leaves_a_box_below_it_without_positive_anchors():
    iou = torch.tensor([[0.2, 0.1, 0.0, 0.0],    # best 0.2: below the floor
                        [0.0, 0.0, 0.5, 0.35]])  # best 0.5: its best anchor turns positive
    stock = Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True)(iou)[1]
    floored = LowQualityFloorMatcher([0.3, 0.7], [0, -1, 1], 0.3)(iou)[1]
    assert stock.tolist() == [1, 0, 1, -1] and floored.tolist() == [0, 0, 1, -1]


def test_low_quality_floor_rpn_from_config_labels_as_detectron2_at_zero():
    cfg = small_cfg(**{"MODEL.PROPOSAL_GENERATOR.NAME": "LowQualityFloorRPN"})
    shape = {f: ShapeSpec(channels=8, stride=s)
             for f, s in zip(cfg.MODEL.RPN.IN_FEATURES, (4, 8, 16, 32, 64))}
    anchors = [Boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 60.0, 60.0],
                                   [0.0, 0.0, 64.0, 64.0], [30.0, 0.0, 40.0, 8.0]]))]
    gt = Instances((64, 64), gt_boxes=Boxes(torch.tensor([[0.0, 0.0, 16.0, 16.0],
                                                          [30.0, 30.0, 34.0, 34.0]])))
    labels = {}
    for name, floor in (("RPN", 0.0), ("LowQualityFloorRPN", 0.0), ("LowQualityFloorRPN", 0.3)):
        cfg.MODEL.PROPOSAL_GENERATOR.NAME, cfg.MODEL.RPN.LOW_QUALITY_MIN_IOU = name, floor
        rpn = build_proposal_generator(cfg, shape)
        assert isinstance(rpn, LowQualityFloorRPN) == (name == "LowQualityFloorRPN")
        torch.manual_seed(0)
        labels[name, floor] = rpn.label_and_sample_anchors(anchors, [gt])[0][0].tolist()
    # gt 1 (IoU 0.01 with its best anchor) gets a positive only without the floor
    assert labels["RPN", 0.0] == labels["LowQualityFloorRPN", 0.0] == [1, 1, 0, 0]
    assert labels["LowQualityFloorRPN", 0.3] == [1, 0, 0, 0]


def test_normed_mask_predictor_starts_as_the_official():
    """NORMED_INIT "kaiming_normal": kaiming normal (fan_out = classes for a 1x1 kernel, relu
    gain), zero bias, as mmdetection's FCNMaskHead.init_weights; "pytorch" (the default) keeps
    nn.Conv2d's uniform init with std 1 / sqrt(3 fan_in) and its bias."""
    torch.manual_seed(0)
    cfg = small_cfg(**{"MODEL.ROI_HEADS.NUM_CLASSES": 400, "MODEL.ROI_MASK_HEAD.CONV_DIM": 256,
                       "MODEL.ROI_MASK_HEAD.NORMED_INIT": "kaiming_normal"})
    shape = ShapeSpec(channels=256, height=14, width=14)
    head = NormedMaskRCNNConvUpsampleHead(cfg, shape)
    weight, bias = head.predictor.weight, head.predictor.bias
    assert weight.shape == (400, 256, 1, 1) and torch.equal(bias, torch.zeros(400))
    assert weight.std().item() == pytest.approx((2 / 400) ** 0.5, rel=0.02)
    assert weight.mean().abs() < 0.003 and weight.abs().max() > 3 * weight.std()  # normal
    cfg.MODEL.ROI_MASK_HEAD.NORMED_INIT = "pytorch"
    stock = NormedMaskRCNNConvUpsampleHead(cfg, shape).predictor
    assert stock.weight.std().item() == pytest.approx((3 * 256) ** -0.5, rel=0.02)
    assert stock.weight.abs().max() <= 256 ** -0.5 and (stock.bias != 0).all()
