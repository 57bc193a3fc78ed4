"""benchmarks.train_speed: the models it compares do the same work, and it runs end to end.

No timing is asserted (timings are the script's output, not a test's)."""
import os

import pytest
from detectron2.utils.events import EventStorage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def train_speed():
    from benchmarks import train_speed

    return train_speed


@pytest.mark.slow
def test_every_model_gets_the_same_workload(train_speed, tmp_path, monkeypatch):
    """Stock and Seesaw (the predictor that differs most) see the same number of foreground
    RoIs in the mask head at every step, so the timed ratio is the predictor's cost. With a
    learning rate > 0 they drift apart within a few steps."""
    monkeypatch.chdir(ROOT)
    data = train_speed.prepare_data(str(tmp_path / "data"), num_classes=60)
    cfg = train_speed.make_cfg("mask_rcnn", None, "cpu", data)
    batch = train_speed.make_batch(cfg, cfg.SOLVER.IMS_PER_BATCH)
    sizes = {}
    with EventStorage():
        cases = [train_speed.Case(name, train_speed.make_cfg("mask_rcnn", loss, "cpu", data), batch)
                 for name, loss in (("stock", None), ("seesaw", "seesaw"))]
        for case in cases:
            sizes[case.name] = []
            case.model.roi_heads.mask_head.register_forward_hook(
                lambda m, inputs, out, name=case.name: sizes[name].append(len(inputs[0])))
        result = train_speed.time_cases(cases, warmup=1, repeats=4,
                                        stock_of={"stock": "stock", "seesaw": "stock"})
    assert len(sizes["stock"]) == 5 and sizes["stock"] == sizes["seesaw"]
    assert set(result) == {"stock", "seesaw"}
    assert result["stock"][1] == 1.0 and result["seesaw"][0] > 0


def test_loce_is_timed_with_its_own_heads_on_mask_rcnn_only(train_speed, monkeypatch):
    """LOCE needs LOCEROIHeads (no cascade version): the first GPU run stopped at it."""
    monkeypatch.chdir(ROOT)
    names = [s[0] for s in train_speed.case_specs(("mask_rcnn", "cascade"), ("seesaw", "loce"),
                                                  False)]
    assert names == ["mask_rcnn stock", "mask_rcnn seesaw", "mask_rcnn loce", "cascade stock",
                     "cascade seesaw"]
    data = {"num_classes": 60, "dataset": "unused"}
    heads = {loss: train_speed.make_cfg("mask_rcnn", loss, "cpu", data).MODEL.ROI_HEADS.NAME
             for loss in (None, "seesaw", "loce")}
    assert heads == {None: "StandardROIHeads", "seesaw": "LongTailROIHeads",
                     "loce": "LOCEROIHeads"}
