"""HTC-Lite: the global context encoder and its federated image-level loss, the interleaved
mask head, switches, and a checkpoint round trip (the training run is in test_train_net.py)."""
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.data.catalog import Metadata
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from PIL import Image
from torch.nn import functional as F

from seesaw_ecm import add_seesaw_ecm_config
from seesaw_ecm.data.datasets import register_lvis_format
from seesaw_ecm.errors import SeesawEcmError
from seesaw_ecm.export import trace_model
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
        out.append({"image": torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))
                    * 255, "instances": inst, "height": 64, "width": 64})
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


def spy_context_targets(monkeypatch):
    """Record the (positives, negatives) the context loss receives."""
    import seesaw_ecm.modeling.htc_lite as htc

    seen = {}

    def spy(logits, positives, negatives=None):
        seen.update(positives=positives.clone(), negatives=negatives.clone())
        return context_loss(logits, positives, negatives)

    monkeypatch.setattr(htc, "context_loss", spy)
    return seen


def test_meta_architecture_reads_contiguous_negatives():
    model = build_model(htc_cfg())
    assert isinstance(model, HTCLiteRCNN) and isinstance(model.roi_heads, HTCLiteROIHeads)
    mask = model._negatives({"neg_category_ids": [1, 3]}, C)
    assert mask.tolist() == [False, True, False, True]
    assert model._negatives({}, C) is None
    assert model._negatives({"neg_category_ids": []}, C).tolist() == [False] * C


def lvis_file(tmp_path):
    """Two 64x64 images in LVIS format with non-contiguous category ids 10, 20, 30, 40 (as
    batch()): image 1 lists class id 30 as verified absent, image 2 has no neg_category_ids."""
    images, annotations = [], []
    for image_id, objects in ((1, [(20, [8, 8, 40, 40]), (40, [30, 20, 60, 50])]),
                              (2, [(10, [4, 10, 30, 60])])):
        Image.fromarray(np.full((64, 64, 3), 60 * image_id, np.uint8)).save(
            tmp_path / f"{image_id}.png")
        images.append({"id": image_id, "height": 64, "width": 64, "file_name": f"{image_id}.png"})
        for cat, (x0, y0, x1, y1) in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": cat, "bbox": [x0, y0, x1 - x0, y1 - y0],
                                "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]})
    images[0]["neg_category_ids"] = [30]
    categories = [{"id": i, "name": f"c{i}", "frequency": "r"} for i in (40, 10, 30, 20)]
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": categories}))
    return str(path)


def test_negatives_from_the_loader_through_the_mapper_with_non_contiguous_ids(
        tmp_path, monkeypatch):
    """The model is built before the data are loaded (as DefaultTrainer does): the loader's
    contiguous neg_category_ids reach the context loss through DatasetMapper, and an image
    without the key counts as exhaustive."""
    name = f"htc_negatives_{tmp_path.name}"
    register_lvis_format(name, lvis_file(tmp_path), str(tmp_path))
    cfg = htc_cfg("DATASETS.TRAIN", f"('{name}',)")
    torch.manual_seed(0)
    model = build_model(cfg).train()
    records = DatasetCatalog.get(name)
    assert records[0]["neg_category_ids"] == [2] and "neg_category_ids" not in records[1]
    mapper = DatasetMapper(cfg, is_train=True)
    data = [mapper(r) for r in records]
    assert data[0]["neg_category_ids"] == [2] and "neg_category_ids" not in data[1]
    seen = spy_context_targets(monkeypatch)
    with EventStorage():
        losses = model(data)
    assert seen["positives"].tolist() == [[False, True, False, True], [True, False, False, False]]
    assert seen["negatives"].tolist() == [[False, False, True, False], [False, True, True, True]]
    assert torch.isfinite(losses["loss_context"])


def test_training_losses_and_federated_context_targets(monkeypatch):
    torch.manual_seed(0)
    model = build_model(htc_cfg()).train()
    seen = spy_context_targets(monkeypatch)
    data = batch([[2], None])  # image 0: class 2 verified absent
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


def spy_mask_rois(heads, record):
    """Make the mask head record the RoIs (boxes, classes) it trains on and return loss 0."""

    def spy_mask_head(features, instances):
        record["mask_boxes"] = [i.proposal_boxes.tensor.clone() for i in instances]
        record["mask_classes"] = [i.gt_classes.clone() for i in instances]
        return {"loss_mask": features.sum() * 0}

    heads.mask_head.forward = spy_mask_head


@pytest.mark.parametrize("interleaved", [True, False])
def test_mask_head_trains_on_last_stage_boxes_clipped_to_the_image(interleaved):
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
        # regressed boxes reaching past the 64 x 64 image on every side
        out = [b + torch.tensor([-20.0, -20.0, 20.0, 20.0])
               for b in predict_boxes(predictions, proposals)]
        record["refined"] = [b.detach().clone() for b in out]
        return out

    heads._run_stage, last.predict_boxes = spy_stage, spy_boxes
    spy_mask_rois(heads, record)
    with EventStorage():
        model(batch([[], []]))
    for i in range(2):
        fg = record["gt_classes"][i] < C
        assert fg.any()
        source = record["refined"][i].clamp(0, 64) if interleaved else record["proposals"][i]
        assert (record["refined"][i][fg] < 0).any()
        torch.testing.assert_close(record["mask_boxes"][i], source[fg])
        assert (record["mask_boxes"][i] >= 0).all() and (record["mask_boxes"][i] <= 64).all()
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


@pytest.mark.parametrize("cap", [0, 1])
def test_mask_head_foreground_cap(cap):
    """MASK_MAX_FG_ROIS: at most `cap` foreground RoIs per image (a subset of them); 0 = all."""
    torch.manual_seed(0)
    model = build_model(htc_cfg("MODEL.HTC_LITE.MASK_MAX_FG_ROIS", cap)).train()
    heads = model.roi_heads
    record, run_stage = {}, heads._run_stage

    def spy_stage(features, proposals, stage, context=None):
        record["last"] = proposals
        return run_stage(features, proposals, stage, context)

    heads._run_stage = spy_stage
    spy_mask_rois(heads, record)
    with EventStorage():
        model(batch([[], []]))
    for i, last in enumerate(record["last"]):
        fg = last.proposal_boxes.tensor[last.gt_classes < C]  # refined in place (interleaved)
        boxes = record["mask_boxes"][i]
        assert len(boxes) == (min(cap, len(fg)) if cap else len(fg))
        # every trained RoI is one of the foreground RoIs
        assert all((fg == b).all(dim=1).any() for b in boxes)
    assert len(record["last"][0]) and (record["last"][0].gt_classes < C).sum() > 1


def test_masks_on_given_boxes_use_the_context():
    """Test-time augmentation predicts masks on given boxes (forward_with_given_boxes): they
    equal the masks of plain inference on the same boxes, which add the context."""
    torch.manual_seed(0)
    model = build_model(htc_cfg("MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.2)).eval()
    images = [{k: v for k, v in r.items() if k != "instances"} for r in batch()]
    with torch.no_grad():
        plain = model.inference(images, do_postprocess=False)
        boxes_only = [Instances(p.image_size, pred_boxes=p.pred_boxes, scores=p.scores,
                                pred_classes=p.pred_classes) for p in plain]
        given = model.inference(images, detected_instances=boxes_only, do_postprocess=False)
        model.roi_heads.context_encoder = None  # the same boxes without context: other masks
        without = model.inference(images, detected_instances=boxes_only, do_postprocess=False)
    assert len(plain[0]) > 0
    for p, g, w in zip(plain, given, without):
        torch.testing.assert_close(g.pred_masks, p.pred_masks)
    assert not torch.allclose(without[0].pred_masks, plain[0].pred_masks)


def test_torchscript_export_runs_with_another_number_of_rois():
    """The export traces one image; an image with another number of RoIs (proposals and
    detections) gives the eager result (the context's RoI-to-image index is traced as ops)."""
    torch.manual_seed(0)
    cfg = htc_cfg("MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.22)  # untrained: ~0.2 each
    model = build_model(cfg).eval()
    images = [torch.rand(3, 64, 64) * 255, torch.rand(3, 96, 80) * 255]
    with torch.no_grad():
        counts = [len(model.inference([{"image": im}], do_postprocess=False)[0])
                  for im in images]
    assert counts[0] != counts[1] and min(counts) > 0
    predictor = SimpleNamespace(model=model, cfg=cfg, metadata=Metadata())
    trace_model(predictor, images)  # raises if the traced graph differs from eager inference
