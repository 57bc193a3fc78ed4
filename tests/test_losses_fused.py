"""The fused loss computations against composite torch ones: ``sigmoid_bce`` (the kernel of
ECM, EQL, DropLoss, EQLv2 and Federated) against ``F.binary_cross_entropy_with_logits`` with an
explicit one-hot target and weight matrix, each sigmoid loss at LVIS width in float32, GOL's
kernel against ``F.binary_cross_entropy`` on the clamped Gumbel probabilities, Seesaw's
every-row path against its selected-rows path, LOCE's sort-based mean-score update against a
``torch.unique`` one, and no loss forward reading a value back to the host."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from seesaw_ecm.losses import (BalancedGroupSoftmax, DropLoss, ECMLoss, EQLLoss, EQLv2Loss,
                               EquilibriumLoss, GumbelLoss, SeesawLoss)
from seesaw_ecm.losses import seesaw as seesaw_module
from seesaw_ecm.losses.sigmoid_bce import sigmoid_bce

LVIS_C = 1203


def lvis_batch(n=256, c=LVIS_C, seed=0, columns=None, scale=4.0):
    """(N, columns) float32 logits spread wide (confident entries both ways), labels ~25% fg."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, columns or c + 1, generator=g) * scale
    fg = torch.rand(n, generator=g) < 0.25
    labels = torch.where(fg, torch.randint(c, (n,), generator=g), c)
    return logits, labels


def long_tail_counts(c=LVIS_C):
    return (1e5 / torch.arange(1, c + 1, dtype=torch.float64)).floor()


def reference_bce(x, labels, weight, target_weight=None, entry_weight=None):
    """The composite computation: one-hot targets, (N, K) weights, BCE-with-logits, summed."""
    n, k = x.shape
    target = F.one_hot(labels, max(k, int(labels.max()) + 1))[:, :k].to(x.dtype)
    w = weight.expand(n, k).clone()
    if entry_weight is not None:
        w = w * entry_weight
    positive = target > 0
    if target_weight is not None:
        w = torch.where(positive, target_weight[:, None].expand(n, k), w)
    else:
        w = torch.where(positive, weight.expand(n, k), w)
    return F.binary_cross_entropy_with_logits(x, target, weight=w, reduction="sum")


def value_and_grad(fn, logits):
    logits = logits.detach().clone().requires_grad_()
    value = fn(logits)
    (grad,) = torch.autograd.grad(value, logits)
    return value.detach(), grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", ["plain", "targets", "entries", "affine", "no positive"])
def test_sigmoid_bce_matches_bce_with_logits(dtype, variant):
    g = torch.Generator().manual_seed(1)
    n, k = 40, 7
    x = (torch.randn(n, k, generator=g, dtype=torch.float64) * 6).to(dtype)
    x[0, :3] = torch.tensor([60.0, -80.0, 30.0], dtype=dtype)  # saturated entries
    labels = torch.randint(k + (variant == "no positive") * 3, (n,), generator=g)
    labels[0] = 0
    weight = torch.rand(k, generator=g, dtype=torch.float64).to(dtype) + 0.1
    kwargs, scale, bias = {}, 1.0, None
    if variant == "targets":
        kwargs["target_weight"] = torch.rand(n, generator=g, dtype=torch.float64).to(dtype) * 5
    if variant == "entries":
        kwargs["entry_weight"] = (torch.rand(n, k, generator=g) < 0.6).to(dtype)
    if variant == "affine":
        scale, bias = 2.0, torch.randn(k, generator=g, dtype=torch.float64).to(dtype)
    got = value_and_grad(
        lambda z: sigmoid_bce(z, labels, weight, scale=scale, bias=bias, **kwargs), x)
    expected = value_and_grad(
        lambda z: reference_bce(z * scale + (0 if bias is None else bias), labels, weight,
                                **kwargs), x)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    if variant == "no positive":
        assert (labels >= k).any()  # rows whose entries are all negative were exercised


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sigmoid_bce_on_columns_matches_the_selected_submatrix(dtype):
    """columns=: the value of the BCE on the selected columns (labels mapped into them, none
    for a label outside), the gradient on them and zeros on every other column."""
    g = torch.Generator().manual_seed(4)
    n, k = 60, 9
    x = (torch.randn(n, k, generator=g, dtype=torch.float64) * 6).to(dtype)
    x[0, 2] = 60.0  # saturated
    labels = torch.randint(k, (n,), generator=g)
    weight = (torch.rand(k, generator=g, dtype=torch.float64) + 0.1).to(dtype)
    columns = torch.tensor([5, 2, 7, 0])
    position = torch.full((k,), columns.numel()).index_copy_(0, columns, torch.arange(4))
    assert (position[labels] == 4).any() and (position[labels] < 4).any()
    got = value_and_grad(lambda z: sigmoid_bce(z, labels, weight, columns=columns), x)
    expected = value_and_grad(lambda z: reference_bce(z[:, columns], position[labels],
                                                      weight[columns]), x)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    others = torch.ones(k, dtype=torch.bool).index_fill_(0, columns, False)
    assert got[1][:, others].abs().max() == 0 and got[1][:, columns].abs().min() > 0
    with pytest.raises(ValueError, match="columns"):
        sigmoid_bce(x, labels, weight, scale=2.0, columns=columns)


def test_sigmoid_bce_sigmoid_sums_and_a_second_backward():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(30, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(6, (30,), generator=g)  # 5: no positive in the row
    weight = torch.rand(5, generator=g, dtype=torch.float64)
    entry_weight = (torch.rand(30, 5, generator=g) < 0.5).double()
    loss, negative_sums, positive_sigmoid = sigmoid_bce(
        x, labels, weight, entry_weight=entry_weight, sigmoid_sums=True)
    negative = F.one_hot(labels, 6)[:, :5] == 0
    s = x.detach().sigmoid()
    torch.testing.assert_close(negative_sums, (s * entry_weight * negative).sum(0))
    has = labels < 5
    torch.testing.assert_close(positive_sigmoid[has], s[has, labels[has]])
    assert not negative_sums.requires_grad and not positive_sigmoid.requires_grad
    # the saved sigmoid is not modified by the backward: retain_graph gives the same gradient
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    (second,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(first, second)
    expected = value_and_grad(
        lambda z: reference_bce(z, labels, weight, entry_weight=entry_weight), x)
    torch.testing.assert_close(loss.detach(), expected[0])
    torch.testing.assert_close(first, expected[1])


@pytest.mark.parametrize("weight_dtype", ["float64", "float32"])
def test_ecm_float32_at_lvis_width_matches_the_composite_bce(weight_dtype):
    loss = ECMLoss(long_tail_counts(), weight_dtype=weight_dtype)
    logits, labels = lvis_batch()
    got = value_and_grad(lambda z: loss(z, labels)["loss_cls"], logits)
    x = lambda z: 2 * z.double() + loss.margin  # noqa: E731  (float64: the exact value)
    expected = value_and_grad(
        lambda z: reference_bce(x(z), labels, loss.weight) / len(labels), logits.double())
    torch.testing.assert_close(got[0].double(), expected[0], rtol=2e-6, atol=0)
    torch.testing.assert_close(got[1].double(), expected[1], rtol=1e-5, atol=1e-8)


def test_eql_and_droploss_at_lvis_width_match_the_composite_bce():
    frequency = long_tail_counts() / 1e5
    logits, labels = lvis_batch(columns=LVIS_C)
    for loss in (EQLLoss(frequency), DropLoss(frequency)):
        torch.manual_seed(0)
        got = value_and_grad(lambda z: loss(z, labels)["loss_cls"], logits)
        torch.manual_seed(0)  # the same draws for DropLoss
        kept = (~loss.ignored_negatives(labels, loss.tail_classes())).double()
        assert 0 < kept.mean() < 1
        expected = value_and_grad(
            lambda z: reference_bce(z, labels, torch.ones(LVIS_C, dtype=torch.float64),
                                    entry_weight=kept) / len(labels), logits.double())
        torch.testing.assert_close(got[0].double(), expected[0], rtol=2e-6, atol=0)
        torch.testing.assert_close(got[1].double(), expected[1], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gol_at_lvis_width_matches_the_composite_bce(dtype):
    frequency = long_tail_counts() / 1e5
    logits, labels = lvis_batch(columns=LVIS_C)
    logits = logits.to(dtype)
    logits[0, :3] = torch.tensor([-3.6, -20.0, 30.0])  # eps-floored, below and above the clamp
    loss = GumbelLoss(frequency).to(dtype)
    torch.manual_seed(0)
    got = value_and_grad(lambda z: loss(z, labels)["loss_cls"], logits)
    torch.manual_seed(0)  # the same draws
    kept = (~loss.ignored_negatives(labels, loss.tail_classes())).to(dtype)
    assert 0 < kept.mean() < 1

    def composite(z):  # the official computation: one-hot targets, (N, C) weights
        target = F.one_hot(labels, LVIS_C + 1)[:, :LVIS_C].to(dtype)
        weight = torch.where(target > 0, torch.ones_like(kept), kept)
        probs = torch.exp(-torch.exp(-z.clamp(*loss.clamp)))
        return F.binary_cross_entropy(probs, target, weight=weight, reduction="sum") / len(z)

    expected = value_and_grad(composite, logits)
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got[0], expected[0], rtol=rtol, atol=0)
    # 1 - p cancels for p near 1 (z near the upper clamp) in both, in another order of operations
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5 if dtype == torch.float32 else 1e-7,
                               atol=1e-12)
    assert got[1][0, 1] == 0 and got[1][0, 2] == 0  # outside the clamp


def test_eqlv2_at_lvis_width_matches_the_composite_bce_and_its_gradient_sums():
    loss = EQLv2Loss(LVIS_C).train()
    logits, labels = lvis_batch()
    loss(logits, labels)  # the weights now follow the first call's gradients
    pos_w, neg_w = (w.double() for w in loss.class_weights())
    pos_before, neg_before = loss.pos_grad.double(), loss.neg_grad.double()
    logits, labels = lvis_batch(seed=1)
    got = value_and_grad(lambda z: loss(z, labels)["loss_cls"], logits)
    expected = value_and_grad(
        lambda z: reference_bce(z, labels, neg_w, target_weight=pos_w[labels]) / len(labels),
        logits.double())
    torch.testing.assert_close(got[0].double(), expected[0], rtol=2e-6, atol=0)
    torch.testing.assert_close(got[1].double(), expected[1], rtol=1e-5, atol=1e-8)
    # the official collection: |sigmoid - t| * w summed per class over positives / negatives
    target = F.one_hot(labels, LVIS_C + 1).double()
    w = torch.where(target > 0, pos_w, neg_w)
    magnitude = (logits.double().sigmoid() - target).abs() * w
    pos = (magnitude * target).sum(0)[:LVIS_C]
    neg = (magnitude * (1 - target)).sum(0)[:LVIS_C]
    torch.testing.assert_close(loss.pos_grad.double() - pos_before, pos, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(loss.neg_grad.double() - neg_before, neg, rtol=1e-5, atol=1e-4)


def test_seesaw_every_row_path_equals_the_selected_rows_path():
    loss = SeesawLoss(LVIS_C)
    loss.cum_samples.copy_(long_tail_counts())
    logits, labels = lvis_batch(columns=LVIS_C)
    fg = labels < LVIS_C
    every_row = value_and_grad(
        lambda z: loss._seesaw_ce(z, labels.masked_fill(~fg, seesaw_module._IGNORED)), logits)
    selected = value_and_grad(lambda z: loss._seesaw_ce(z[fg], labels[fg]), logits)
    for a, b in zip(every_row, selected):
        torch.testing.assert_close(a, b)
    assert every_row[1][~fg].abs().max() == 0  # background rows: no class term


def unique_mean_score_reference(num_classes, logits, labels, entries, momentum=0.9):
    """The update with torch.unique over the foreground rows (the former computation)."""
    score = torch.full((num_classes + 1,), 0.01)
    fg = labels < num_classes
    scores = F.softmax(logits[fg], dim=1).gather(1, labels[fg][:, None])[:, 0]
    ids, inverse = torch.unique(entries[fg], return_inverse=True)
    total, count = torch.zeros(num_classes), torch.zeros(num_classes)
    for e in range(ids.numel()):
        rows = inverse == e
        c = int(labels[fg][rows][0])
        total[c] += scores[rows].mean()
        count[c] += 1
    keep = momentum ** count
    score[:-1] = keep * score[:-1] + (1 - keep) * total / count.clamp(min=1)
    return score


def test_loce_mean_score_update_matches_the_unique_computation():
    g = torch.Generator().manual_seed(3)
    c, n = 50, 300
    logits = torch.randn(n, c + 1, generator=g) * 3
    labels = torch.where(torch.rand(n, generator=g) < 0.4, torch.randint(c, (n,), generator=g), c)
    instance = torch.randint(40, (n,), generator=g)
    entries = torch.where(labels < c, instance, torch.randint(40, (n,), generator=g))
    entries[-20:] = -1 - labels[-20:].clamp(max=c - 1)  # replayed classes: one entry each
    labels[-20:] = labels[-20:].clamp(max=c - 1)
    # an instance id is one ground truth: one class for all its rows
    first_class = {}
    for i in range(n - 20):
        if labels[i] < c:
            labels[i] = first_class.setdefault(int(entries[i]), int(labels[i]))
    loss = EquilibriumLoss(c)
    loss.update_mean_score(logits, labels, entries)
    torch.testing.assert_close(loss.mean_score,
                               unique_mean_score_reference(c, logits, labels, entries))


class HostReads(TorchDispatchMode):
    """Records the ops that read a device value back to the host (a stream synchronisation on
    CUDA): scalars, data-dependent shapes, bool-mask indexing, bincount (its maximum)."""

    SYNCING = {"aten._local_scalar_dense.default", "aten.nonzero.default",
               "aten.masked_select.default", "aten._unique2.default", "aten.unique_dim.default",
               "aten.unique_consecutive.default", "aten.bincount.default"}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        bool_index = name.startswith(("aten.index.", "aten.index_put")) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for i in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else []))
        if name in self.SYNCING or bool_index:
            self.reads.append(name)
        return func(*args, **kwargs)


def _sync_free_cases():
    counts = long_tail_counts(20)
    frequency = counts / 1e5
    cases = {
        "ecm": (ECMLoss(counts), 21),
        "eql": (EQLLoss(frequency), 20),
        "droploss": (DropLoss(frequency), 20),
        "gol": (GumbelLoss(frequency), 20),
        "eqlv2": (EQLv2Loss(20), 21),
        "bags": (BalancedGroupSoftmax(counts * 1e-2), None),
        "loce": (EquilibriumLoss(20), 21),
    }
    return cases


@pytest.mark.parametrize("name", ["ecm", "eql", "droploss", "gol", "eqlv2", "bags", "loce",
                                  "seesaw"])
def test_loss_forward_and_backward_read_nothing_back(name, monkeypatch):
    logits, labels = lvis_batch(n=64, c=20, columns=32)
    if name == "seesaw":  # the accelerator path (on the CPU, selecting rows is free)
        monkeypatch.setattr(seesaw_module, "_select_rows", lambda device: False)
        loss = SeesawLoss(20).train()
        inputs = [logits[:, :20].clone().requires_grad_(), torch.randn(64, 2, requires_grad=True)]
    else:
        loss, width = _sync_free_cases()[name]
        loss.train()
        inputs = [logits[:, :width or loss.num_logits].clone().requires_grad_()]
    loss(*inputs, labels)  # EQLv2: from the second call on, weights from the statistics
    with HostReads() as mode:
        if name == "loce":
            loss.update_mean_score(inputs[0].detach(), labels, torch.arange(64) // 3)
        sum(loss(*inputs, labels).values()).backward()
    assert mode.reads == []


def test_host_reads_records_each_kind_of_read_back():
    x, mask = torch.randn(6), torch.tensor([True, False] * 3)
    reads = {
        "item": lambda: x.sum().item(),
        "bool": lambda: bool(x.sum() > 0),
        "mask index": lambda: x[mask],
        "nonzero": lambda: mask.nonzero(),
        "unique": lambda: torch.unique(mask.long()),
        "bincount": lambda: torch.bincount(mask.long()),
        "Seesaw on the CPU": lambda: SeesawLoss(3)(torch.randn(6, 3), torch.randn(6, 2),
                                                   torch.tensor([0, 3, 1, 3, 2, 3])),
    }
    for what, run in reads.items():
        with HostReads() as mode:
            run()
        assert mode.reads, what
