"""Host synchronisations per training step (tools/sync_counter.py, tools/count_syncs.py): the
counter sees what syncs on CUDA and nothing else, and every long-tail loss with every head syncs
no more often than stock detectron2 with the same architecture, apart from the extra syncs
listed in PER_PREDICTOR and PER_IMAGE with the reason each stays."""
import re

import pytest
import torch

from benchmarks.harness import LOSSES
from tools import count_syncs
from tools.sync_counter import SyncCounter

# The syncs that remain in seesaw_ecm/, per box predictor (one per cascade stage), by loss:
# {loss: {(operation, file): (count, why it stays)}}: outputs whose shapes depend on the labels
# or the memory in the published algorithms. Every other loss syncs exactly as CE.
PER_PREDICTOR = {
    "federated": {
        ("_unique2", "seesaw_ecm/losses/federated.py"):
            (1, "the classes present in the batch (detectron2's federated loss does the same)"),
        ("index with a boolean mask", "seesaw_ecm/losses/federated.py"):
            (1, "their foreground part"),
        ("int(tensor)", "seesaw_ecm/losses/federated.py"):
            (1, "how many negatives remain to sample (torch.multinomial takes an int)"),
    },
    "loce": {
        ("index with a boolean mask", "seesaw_ecm/modeling/feature_memory.py"):
            (1, "drawn classes with an empty queue replay nothing (official): the number of "
                "replayed RoIs depends on the memory"),
    },
}
# Syncs outside seesaw_ecm/ that the heads add to stock's, per image: {arch: {(operation, file):
# (count, why)}}.
PER_IMAGE = {
    "htc_lite": {
        ("Tensor.cpu", "detectron2/structures/masks.py"):
            (1, "the mask head trains on the last stage's matches: their polygon masks (a Python "
                "list on the host) are selected by those matches"),
    },
}
IMAGES = 2
# stock's classification metrics: read on the host per step by detectron2, kept on the device
# until the next write here (seesaw_ecm/deferred_scalars.py)
STOCK_METRICS = "detectron2/modeling/roi_heads/fast_rcnn.py"


def _allowed(arch, loss):
    """{(operation, file): count} of the syncs allowed beyond stock's for (arch, loss)."""
    stages = 3 if arch in ("cascade", "htc_lite") else 1
    allowed = {k: n * stages for k, (n, _) in PER_PREDICTOR.get(loss, {}).items()}
    head = "loce" if loss == "loce" else arch
    allowed.update({k: n * IMAGES for k, (n, _) in PER_IMAGE.get(head, {}).items()})
    return allowed


def _by_file(counter):
    """{(operation, file): count} of a SyncCounter's events."""
    out = {}
    for (op, where), n in counter.events.items():
        key = (op, where.split(":")[0])
        out[key] = out.get(key, 0) + n
    return out


CASES = [("mask_rcnn", loss) for loss in LOSSES] + [
    (arch, loss) for arch in ("cascade", "htc_lite") for loss in LOSSES if loss != "loce"]
FAST = {("mask_rcnn", "seesaw"), ("cascade", "ecm"), ("mask_rcnn", "loce")}


@pytest.fixture(scope="module")
def stock_counts():
    """{stock ROI heads name: SyncCounter of one stock step}, filled on first use."""
    return {}


def _counts(arch, loss, stock_counts):
    return count_syncs.count_config(count_syncs.grid_config(arch, loss), IMAGES,
                                    stock_counts=stock_counts)


@pytest.mark.parametrize("arch,loss", [
    pytest.param(*case, marks=() if case in FAST else pytest.mark.slow) for case in CASES])
def test_no_more_syncs_than_stock(arch, loss, stock_counts):
    """Every sync located in seesaw_ecm/ is one of _allowed's, and the step syncs no more often
    than stock's without its classification metrics, plus those allowed."""
    model, stock = _counts(arch, loss, stock_counts)
    allowed = _allowed(arch, loss)
    found = _by_file(model)
    report = (f"{arch} {loss}: {model.total} syncs per step, stock {stock.total}; config - stock:"
              f"\n{model.table(model.difference(stock))}")
    ours = {k: n for k, n in found.items() if k[1].startswith("seesaw_ecm/")}
    assert all(n <= allowed.get(k, 0) for k, n in ours.items()), report
    stock_metrics = sum(n for (op, file), n in _by_file(stock).items() if file == STOCK_METRICS)
    assert STOCK_METRICS not in {file for _, file in found}
    assert model.total <= stock.total - stock_metrics + sum(allowed.values()), report


def test_counter_sees_each_kind_of_sync_once():
    x = torch.randn(6, requires_grad=True)
    mask = x > 0
    with SyncCounter() as syncs:
        x.sum().item()
        bool(mask.any())
        x.detach().tolist()
        x.detach().numpy()
        x.cpu()
        f"{x.sum():.3f}"
        torch.nonzero(mask)
        torch.where(mask)
        torch.unique(mask)
        x.repeat_interleave(torch.ones(6, dtype=torch.long))
        x[mask].sum().backward()  # boolean indexing, and its backward (index_put)
    assert syncs.by_op() == {
        "Tensor.item": 1, "bool(tensor)": 1, "Tensor.tolist": 1, "Tensor.numpy": 1,
        "Tensor.cpu": 1, "format(tensor)": 1, "nonzero": 2, "_unique2": 1,
        "repeat_interleave without output_size": 1, "index with a boolean mask": 1,
        "index_put with a boolean mask": 1}
    where = syncs.by_location()
    assert all(loc.startswith("tests/test_sync_count.py:") for loc in where), where


def test_counter_ignores_work_that_stays_on_the_device():
    x = torch.randn(8, 5, requires_grad=True)
    labels = torch.randint(0, 5, (8,))
    with SyncCounter() as syncs:
        loss = torch.nn.functional.cross_entropy(x, labels)
        mask = labels > 2
        y = torch.where(mask[:, None], x, torch.zeros_like(x)).sum() + x[labels].sum()
        z = x.repeat_interleave(2, dim=0).sum() + x.masked_fill(mask[:, None], 0.0).sum()
        torch.nn.functional.one_hot(labels, 5)  # CUDA checks it with device asserts
        (loss + y + z).backward()
        torch.zeros(5).index_add_(0, labels[:3], torch.ones(3))
    assert syncs.total == 0, syncs.table()


def test_deferred_scalars_reach_the_history_at_their_iterations():
    from detectron2.utils.events import EventStorage

    from seesaw_ecm import deferred_scalars

    with EventStorage(start_iter=5) as storage, deferred_scalars.defer_cpu_tensors():
        with SyncCounter() as syncs:
            deferred_scalars.put_scalars(a=torch.tensor(0.1), b=torch.tensor(3))
            storage.iter = 6
            with storage.name_scope("stage1"):
                deferred_scalars.put_scalars(smoothing_hint=False, a=torch.tensor(0.2))
            deferred_scalars.put_scalars(valid=torch.tensor(False), c=torch.tensor(1.0))
            deferred_scalars.put_scalars(valid=torch.tensor(True), d=torch.tensor(2.0))
        assert syncs.total == 0 and "a" not in storage.histories()  # nothing read yet
        storage.iter = 7
        deferred_scalars.flush()
        assert storage.iter == 7
        assert storage.history("a").values() == [(float(torch.tensor(0.1)), 5)]
        assert storage.history("b").values() == [(3.0, 5)]
        assert storage.history("stage1/a").values() == [(float(torch.tensor(0.2)), 6)]
        assert storage.smoothing_hints()["stage1/a"] is False
        assert "c" not in storage.histories() and storage.history("d").values() == [(2.0, 6)]
        for i in range(deferred_scalars.MAX_PENDING):  # a loop without the hook: flushed
            deferred_scalars.put_scalars(e=torch.tensor(float(i)))
        assert len(storage.history("e").values()) == deferred_scalars.MAX_PENDING
    with EventStorage() as storage:  # CPU tensors, not deferred: no sync to save
        deferred_scalars.put_scalars(f=torch.tensor(1.5))
        deferred_scalars.put_scalars(valid=torch.tensor(False), g=torch.tensor(1.5))
        assert storage.latest() == {"f": (1.5, 0)}


@pytest.mark.parametrize("objectness", [False, True])
def test_predictor_metrics_equal_the_host_computation(objectness):
    """The box predictor's metrics (kept on the device) against detectron2's own (host reads)
    and a loop for the objectness layout."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.box_regression import Box2BoxTransform
    from detectron2.modeling.roi_heads.fast_rcnn import _log_classification_stats
    from detectron2.utils.events import EventStorage

    from seesaw_ecm import deferred_scalars
    from seesaw_ecm.losses import SeesawLoss
    from seesaw_ecm.modeling.predictor import LongTailOutputLayers, log_classification_stats

    torch.manual_seed(0)
    C, R = 5, 40
    logits = torch.randn(R, C + 2 if objectness else C + 1)
    labels = torch.randint(0, C + 1, (R,))
    with EventStorage() as storage, deferred_scalars.defer_cpu_tensors():
        if objectness:
            predictor = LongTailOutputLayers(
                ShapeSpec(channels=8), cls_loss=SeesawLoss(C, p=0.8, q=2.0),
                box2box_transform=Box2BoxTransform((10.0, 10.0, 5.0, 5.0)), num_classes=C)
            predictor._log_stats(logits, labels)
            fg = [i for i in range(R) if labels[i] < C]
            pred_bg = [bool(logits[i, C + 1] > logits[i, C]) for i in range(R)]
            expected = {
                "fast_rcnn/objectness_accuracy": sum(
                    pred_bg[i] != (i in fg) for i in range(R)) / R,
                "fast_rcnn/fg_cls_accuracy": sum(
                    int(logits[i, :C].argmax()) == int(labels[i]) for i in fg) / len(fg),
                "fast_rcnn/false_negative": sum(pred_bg[i] for i in fg) / len(fg)}
        else:
            log_classification_stats(logits, labels, prefix="ours")
            _log_classification_stats(logits, labels, prefix="d2")
            expected = {k.replace("d2/", "ours/"): v for k, (v, _) in storage.latest().items()}
        deferred_scalars.flush()
        got = {k: v for k, (v, _) in storage.latest().items() if k in expected}
    assert len(expected) == 3 and got.keys() == expected.keys()
    for k in expected:
        assert got[k] == pytest.approx(expected[k], abs=1e-7 if objectness else 0), k


def test_flush_hook_puts_the_pending_scalars_at_the_writer_s_iterations():
    from types import SimpleNamespace

    from detectron2.utils.events import EventStorage

    from seesaw_ecm import deferred_scalars

    with EventStorage() as storage, deferred_scalars.defer_cpu_tensors():
        hook = deferred_scalars.FlushScalarsHook(period=4)
        hook.trainer = SimpleNamespace(iter=0, max_iter=6, storage=storage)
        flushed_at = []
        for it in range(6):
            hook.trainer.iter = storage.iter = it
            deferred_scalars.put_scalars(acc=torch.tensor(it / 10))
            hook.after_step()
            if "acc" in storage.histories() and storage.latest()["acc"][1] == it:
                flushed_at.append(it)
        assert flushed_at == [3, 5]  # every 4th iteration and the last, as PeriodicWriter
        expected = [(float(torch.tensor(i / 10)), i) for i in range(6)]
        assert storage.history("acc").values() == expected


@pytest.mark.slow
def test_command_line_prints_the_counts_and_where_they_differ(capsys):
    count_syncs.main(["--config-file", "configs/Synthetic/mask_rcnn_R18_FPN_federated.yaml",
                      "--where", "MODEL.ROI_HEADS.NUM_CLASSES", "12"])
    out = capsys.readouterr().out
    model, stock = map(int, re.search(r"yaml (\d+), stock detectron2 \(StandardROIHeads\) (\d+)",
                                      out).groups())
    assert 0 < model <= stock
    assert "seesaw_ecm/losses/federated.py:" in out.split("config - stock, where they differ:")[1]


@pytest.mark.slow
def test_training_writes_the_deferred_metrics_at_every_write(small_synthetic, tmp_path):
    """train_net with the metrics deferred as on a GPU: each write of metrics.json (at the
    checkpoint of iteration 10, every 20 iterations and the last) holds the predictor's metrics
    of that iteration."""
    import json

    from e2e import SEESAW, train_net_in_process

    from seesaw_ecm import deferred_scalars

    with deferred_scalars.defer_cpu_tensors():
        train_net_in_process(small_synthetic, tmp_path, SEESAW, "SOLVER.MAX_ITER", "25",
                             "SOLVER.BASE_LR", "0.005")
    rows = [json.loads(line) for line in open(tmp_path / "metrics.json")]
    rows = [r for r in rows if "total_loss" in r]
    assert [r["iteration"] for r in rows] == [9, 19, 24]
    for row in rows:
        for name in ("objectness_accuracy", "fg_cls_accuracy", "false_negative"):
            assert 0 <= row[f"fast_rcnn/{name}"] <= 1


def test_gradient_balance_accumulates_and_unscales_without_a_sync():
    """The recorder's sums, divided by the GradScaler's scale read as a device tensor, against
    a loop; a skipped step adds nothing; no host sync on the way."""
    from types import SimpleNamespace

    from seesaw_ecm.gradient_balance import GradientBalance, GradientBalanceHook

    torch.manual_seed(0)
    C = 3
    grad, labels = torch.randn(10, C + 1), torch.tensor([0, 1, 3, 2, 2, 3, 0, 3, 1, 2])
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    fake_hook = SimpleNamespace(trainer=SimpleNamespace(_trainer=SimpleNamespace(
        grad_scaler=scaler)))
    assert GradientBalanceHook._loss_scale(fake_hook) == 4.0  # no device tensor yet
    scaler.scale(torch.ones(()))
    balance = GradientBalance(C)
    with SyncCounter() as syncs:
        scale = GradientBalanceHook._loss_scale(fake_hook)
        balance._accumulate(0, labels, grad * scale)
        balance.end_step(scale, skipped=scale < scale)
        balance._accumulate(0, labels, grad * scale)
        balance.end_step(scale, skipped=torch.tensor(True))  # what GradScaler skipped
    assert syncs.total == 0, syncs.table()
    balance.sync()
    positive = [sum(abs(float(grad[r, c])) for r in range(10) if labels[r] == c) for c in range(C)]
    negative = [sum(abs(float(grad[r, c])) for r in range(10) if labels[r] != c)
                for c in range(C)]
    samples = [float((labels == c).sum()) for c in range(C)]
    torch.testing.assert_close(balance.total[:, 0], torch.tensor(
        [positive, negative, samples], dtype=torch.float64))
