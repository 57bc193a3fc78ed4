"""HTC-Lite: the global context encoder and its federated image-level loss, the interleaved
mask head, switches, and a checkpoint round trip (the training run is in test_train_net.py)."""
import io

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from torch.nn import functional as F

from seesaw_ecm import add_seesaw_ecm_config
from seesaw_ecm.errors import SeesawEcmError
from seesaw_ecm.modeling import GlobalContextEncoder, HTCLiteRCNN, HTCLiteROIHeads
from seesaw_ecm.modeling.htc_lite import context_loss

C = 4


def htc_cfg(*opts):
    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    cfg.merge_from_file("configs/Synthetic/htc_lite_R18_FPN_seesaw.yaml")
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.NUM_CLASSES", C,
                         "DATASETS.TRAIN", "()", "OUTPUT_DIR", "", *opts])
    return cfg


def batch(neg_category_ids=None):
    """Two 64x64 images: image 0 has classes 1 and 3, image 1 has class 0."""
    out = []
    for boxes, classes in (([[8.0, 8.0, 40.0, 40.0], [30.0, 20.0, 60.0, 50.0]], [1, 3]),
                           ([[4.0, 10.0, 30.0, 60.0]], [0])):
        boxes = torch.tensor(boxes)
        masks = torch.zeros(len(boxes), 64, 64, dtype=torch.bool)
        for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
            m[y0:y1, x0:x1] = True
        inst = Instances((64, 64), gt_boxes=Boxes(boxes), gt_classes=torch.tensor(classes),
                         gt_masks=BitMasks(masks))
        out.append({"image": torch.rand(3, 64, 64) * 255, "instances": inst, "height": 64,
                    "width": 64})
    if neg_category_ids is not None:
        for record, neg in zip(out, neg_category_ids):
            record["neg_category_ids"] = neg
    return out


def test_context_encoder_shapes():
    enc = GlobalContextEncoder(8, C, num_convs=2)
    context, logits = enc(torch.randn(3, 8, 5, 7))
    assert context.shape == (3, 8, 1, 1) and logits.shape == (3, C)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in enc.convs) == 2


def test_context_loss_counts_only_annotated_classes():
    logits = torch.randn(2, C, requires_grad=True)
    positives = torch.tensor([[0, 1, 0, 1], [1, 0, 0, 0]], dtype=torch.bool)
    negatives = torch.tensor([[1, 0, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)
    loss = context_loss(logits, positives, negatives)
    # by hand: BCE of the 5 annotated entries, averaged over them
    z = logits.detach()
    entries = [-F.logsigmoid(z[0, 1]), -F.logsigmoid(z[0, 3]), -F.logsigmoid(-z[0, 0]),
               -F.logsigmoid(z[1, 0]), -F.logsigmoid(-z[1, 2])]
    torch.testing.assert_close(loss, sum(entries) / 5)
    loss.backward()
    unverified = ~(positives | negatives)
    assert (logits.grad[unverified] == 0).all() and (logits.grad[~unverified] != 0).all()
    # exhaustive data (no negatives given): every entry counts
    full = context_loss(logits, positives)
    torch.testing.assert_close(full, F.binary_cross_entropy_with_logits(logits, positives.float()))


def test_meta_architecture_maps_negatives_to_contiguous_ids():
    model = build_model(htc_cfg())
    assert isinstance(model, HTCLiteRCNN) and isinstance(model.roi_heads, HTCLiteROIHeads)
    model.dataset_id_to_contiguous_id = {10: 0, 20: 1, 30: 2, 40: 3}
    mask = model._negatives({"neg_category_ids": [20, 40]}, C)
    assert mask.tolist() == [False, True, False, True]
    assert model._negatives({}, C) is None
    model.dataset_id_to_contiguous_id = None  # LVIS v1 builtin: ids 1..C
    assert model._negatives({"neg_category_ids": [1]}, C).tolist() == [True, False, False, False]


def test_training_losses_and_federated_context_targets(monkeypatch):
    import seesaw_ecm.modeling.htc_lite as htc

    torch.manual_seed(0)
    model = build_model(htc_cfg()).train()
    model.dataset_id_to_contiguous_id = {i + 1: i for i in range(C)}
    seen = {}

    def spy(logits, positives, negatives=None):
        seen.update(positives=positives.clone(), negatives=negatives.clone())
        return context_loss(logits, positives, negatives)

    monkeypatch.setattr(htc, "context_loss", spy)
    data = batch([[3], None])  # image 0: class id 3 (contiguous 2) verified absent
    del data[1]["neg_category_ids"]  # image 1: exhaustively annotated
    with EventStorage():
        losses = model(data)
    expected = {f"{k}_stage{s}" for k in ("loss_cls", "loss_objectness", "loss_box_reg")
                for s in range(3)} | {"loss_mask", "loss_context", "loss_rpn_cls", "loss_rpn_loc"}
    assert set(losses) == expected
    assert seen["positives"].tolist() == [[False, True, False, True], [True, False, False, False]]
    # image 0: only its listed negative; image 1 (exhaustive): every absent class
    assert seen["negatives"].tolist() == [[False, False, True, False], [False, True, True, True]]
    sum(losses.values()).backward()
    assert model.roi_heads.context_encoder.classifier.weight.grad.abs().sum() > 0


def test_context_off_and_plain_meta_architecture():
    model = build_model(htc_cfg("MODEL.HTC_LITE.CONTEXT", False)).train()
    assert model.roi_heads.context_encoder is None
    with EventStorage():
        assert "loss_context" not in model(batch())
    # context on without HTCLiteRCNN: the image-level annotations are missing -> clear error
    plain = build_model(htc_cfg("MODEL.META_ARCHITECTURE", "GeneralizedRCNN")).train()
    with EventStorage(), pytest.raises(SeesawEcmError, match="META_ARCHITECTURE HTCLiteRCNN"):
        plain(batch())
    with pytest.raises(SeesawEcmError, match="CONTEXT_IN_FEATURE 'p9'"):
        build_model(htc_cfg("MODEL.HTC_LITE.CONTEXT_IN_FEATURE", "p9"))


@pytest.mark.parametrize("interleaved", [True, False])
def test_mask_head_trains_on_last_stage_boxes(interleaved):
    torch.manual_seed(0)
    model = build_model(htc_cfg("MODEL.HTC_LITE.INTERLEAVED", interleaved)).train()
    heads = model.roi_heads
    record = {}
    last = heads.box_predictor[-1]
    predict_boxes, run_stage = last.predict_boxes, heads._run_stage

    def spy_stage(features, proposals, stage, context=None):
        if stage == heads.num_cascade_stages - 1:
            record["proposals"] = [p.proposal_boxes.tensor.clone() for p in proposals]
            record["gt_classes"] = [p.gt_classes.clone() for p in proposals]
        return run_stage(features, proposals, stage, context)

    def spy_boxes(predictions, proposals):
        out = predict_boxes(predictions, proposals)
        record["refined"] = [b.detach().clone() for b in out]
        return out

    def spy_mask_head(features, instances):
        record["mask_boxes"] = [i.proposal_boxes.tensor.clone() for i in instances]
        record["mask_classes"] = [i.gt_classes.clone() for i in instances]
        return {"loss_mask": features.sum() * 0}

    heads._run_stage, last.predict_boxes = spy_stage, spy_boxes
    heads.mask_head.forward = spy_mask_head
    with EventStorage():
        model(batch([[], []]))
    for i in range(2):
        fg = record["gt_classes"][i] < C
        assert fg.any()
        source = record["refined"] if interleaved else record["proposals"]
        torch.testing.assert_close(record["mask_boxes"][i], source[i][fg])
        torch.testing.assert_close(record["mask_classes"][i], record["gt_classes"][i][fg])
        # the refinement moved the boxes, so the two cases differ
        assert not torch.allclose(record["refined"][i][fg], record["proposals"][i][fg])


def test_inference_and_checkpoint_round_trip():
    torch.manual_seed(0)
    model = build_model(htc_cfg()).eval()
    images = [{k: v for k, v in r.items() if k != "instances"} for r in batch()]
    with torch.no_grad():
        out = model(images)
    inst = out[0]["instances"]
    assert len(inst) > 0 and ((inst.scores > 0) & (inst.scores <= 1)).all()
    assert inst.pred_masks.shape[1:] == (64, 64) and (inst.pred_classes < C).all()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    assert any(k.startswith("roi_heads.context_encoder.") for k in model.state_dict())
    torch.manual_seed(1)
    again = build_model(htc_cfg()).eval()
    buf.seek(0)
    again.load_state_dict(torch.load(buf, weights_only=True))
    with torch.no_grad():
        out2 = again(images)
    for a, b in zip(out, out2):
        torch.testing.assert_close(a["instances"].scores, b["instances"].scores)
        torch.testing.assert_close(a["instances"].pred_masks, b["instances"].pred_masks)
