"""Seesaw, ECM and CE losses against independent loop-based reimplementations of the official
code / published formulas (float64), plus counting, checkpointing and distributed behaviour."""
import math
import os
import socket
import subprocess
import sys
import warnings
from decimal import Decimal, getcontext
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import distributed as dist
from torch import multiprocessing as mp

from seesaw_ecm.losses import (
    CrossEntropyLoss,
    ECMLoss,
    FederatedLoss,
    SeesawLoss,
    effective_class_margins,
)

C = 6
P, Q, EPS = 0.8, 2.0, 1e-2
COUNTS = [1000.0, 200.0, 50.0, 5.0, 0.0, 1.0]
PACKAGE_DIR = Path(__file__).resolve().parents[1] / "seesaw_ecm"


# ---------------------------------------------------------------- independent references
def official_seesaw_reference(cls_score, obj_score, labels, cum_samples, p=P, q=Q, eps=EPS):
    """mmdetection's seesaw_ce_loss + objectness CE, RoI by RoI and class by class: the
    weights S_ik = M_ik * C_ik are built first and log(S_ik) added to non-target logits."""
    n, c = cls_score.shape
    loss_cls = cls_score.sum() * 0
    loss_obj = obj_score.sum() * 0
    for r in range(n):
        i = int(labels[r])
        log_obj = torch.log_softmax(obj_score[r], 0)
        loss_obj = loss_obj - log_obj[1 if i == c else 0]
        if i == c:
            continue
        sigma = torch.softmax(cls_score[r].detach(), 0)
        modified = []
        for k in range(c):
            z = cls_score[r, k]
            if k != i:
                ratio = max(float(cum_samples[k]), 1.0) / max(float(cum_samples[i]), 1.0)
                mitigation = ratio**p if ratio < 1 else 1.0
                score_ratio = float(sigma[k]) / max(float(sigma[i]), eps)
                compensation = score_ratio**q if score_ratio > 1 else 1.0
                z = z + math.log(mitigation * compensation)
            modified.append(z)
        modified = torch.stack(modified)
        loss_cls = loss_cls - torch.log_softmax(modified, 0)[i]
    return loss_cls / max(n, 1), loss_obj / max(n, 1)


def ecm_reference_stats(counts, fg_bg_ratio):
    """pos/neg margins and weights from the paper's formulas with math on Python floats."""
    n = [max(float(x), 1.0) for x in counts]
    n.append(fg_bg_ratio * sum(n))
    total = sum(n)
    pos, neg, weight = [], [], []
    for n_pos in n:
        n_neg = total - n_pos
        s = n_pos**0.25 + n_neg**0.25
        pos.append(math.log(s / n_neg**0.25))
        neg.append(math.log(s / n_pos**0.25))
        a = n_neg / n_pos
        weight.append(a * math.log((1 + a) / a))
    return n, pos, neg, weight


def ecm_reference_loss(logits, labels, pos, neg, weight):
    """The published form with explicit exponentials (the official forward), float64."""
    n, c1 = logits.shape
    loss = logits.sum() * 0
    for r in range(n):
        for c in range(c1):
            e_pos = torch.exp(logits[r, c] + pos[c])
            e_neg = torch.exp(-logits[r, c] + neg[c])
            p_pos = e_pos / (e_pos + e_neg)
            t = 1.0 if int(labels[r]) == c else 0.0
            loss = loss - weight[c] * (t * torch.log(p_pos) + (1 - t) * torch.log(1 - p_pos))
    return loss / n


def seesaw_inputs(seed=0, n=14):
    g = torch.Generator().manual_seed(seed)
    cls = (torch.randn(n, C, generator=g, dtype=torch.float64) * 3).requires_grad_()
    obj = torch.randn(n, 2, generator=g, dtype=torch.float64).requires_grad_()
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 0, 3, 5, C, C, C, 1, 4])[:n]
    with torch.no_grad():
        cls[3, 3] = -12.0  # sigma_i < eps: the eps floor is exercised
    return cls, obj, labels


def grads(loss, *inputs):
    return torch.autograd.grad(loss, inputs)


# ---------------------------------------------------------------- package
def test_losses_and_layers_work_without_detectron2():
    # detectron2 made unimportable: the package still imports, and the losses still run
    code = (
        "import sys\n"
        "sys.modules['detectron2'] = None\n"
        "import torch, seesaw_ecm.losses as L, seesaw_ecm.layers\n"
        "assert not any(m.startswith('detectron2') for m in sys.modules if sys.modules[m])\n"
        "out = L.SeesawLoss(3)(torch.zeros(2, 3), torch.zeros(2, 2), torch.tensor([0, 3]))\n"
        "assert set(out) == {'loss_cls', 'loss_objectness'}\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=PACKAGE_DIR.parent)


def test_loss_layouts():
    assert SeesawLoss.uses_objectness and not ECMLoss.uses_objectness
    assert not CrossEntropyLoss.uses_objectness and not FederatedLoss.uses_objectness


# ---------------------------------------------------------------- Seesaw
@pytest.mark.parametrize("seed", [0, 1])
def test_seesaw_matches_official_value_and_gradient(seed):
    cls, obj, labels = seesaw_inputs(seed)
    loss = SeesawLoss(C, loss_weight=1.0).double().eval()
    loss.cum_samples.copy_(torch.tensor(COUNTS))
    out = loss(cls, obj, labels)
    ref_cls, ref_obj = official_seesaw_reference(cls, obj, labels, COUNTS)
    torch.testing.assert_close(out["loss_cls"], ref_cls, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["loss_objectness"], ref_obj, rtol=1e-12, atol=1e-12)
    for g, ref_g in zip(grads(out["loss_cls"] + out["loss_objectness"], cls, obj),
                        grads(ref_cls + ref_obj, cls, obj)):
        torch.testing.assert_close(g, ref_g, rtol=1e-10, atol=1e-12)


def test_seesaw_loss_weight_scales_both_terms():
    cls, obj, labels = seesaw_inputs()
    out1 = SeesawLoss(C).double()(cls, obj, labels)
    out2 = SeesawLoss(C, loss_weight=2.5).double()(cls, obj, labels)
    for key in ("loss_cls", "loss_objectness"):
        torch.testing.assert_close(out2[key], 2.5 * out1[key])


def test_seesaw_mitigation_gradient_scaled_by_count_ratio():
    # classes: 0 head (1000), 1 tail (10), 2 another head (1000); RoI of class 0 whose score
    # is the largest, so compensation is inactive. Relative to a non-target logit that is not
    # re-weighted (class 2), the penalty on the tail logit is (N_tail / N_head)^p times CE's.
    counts = torch.tensor([1000.0, 10.0, 1000.0], dtype=torch.float64)
    z = torch.tensor([[2.0, 0.3, 0.5]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0])
    loss = SeesawLoss(3).double().eval()
    loss.cum_samples.copy_(counts)
    (g,) = grads(loss(z, torch.zeros(1, 2, dtype=torch.float64), labels)["loss_cls"], z)
    (g_ce,) = grads(F.cross_entropy(z, labels), z)
    factor = (10 / 1000) ** P
    torch.testing.assert_close(g[0, 1] / g[0, 2], factor * g_ce[0, 1] / g_ce[0, 2], rtol=1e-12,
                               atol=0)
    e = z.detach()[0].exp()
    torch.testing.assert_close(g[0, 1], factor * e[1] / (e[0] + factor * e[1] + e[2]))
    assert 0 < g[0, 1] < g_ce[0, 1]


def test_seesaw_compensation_raises_gradient_of_misclassified_roi():
    # RoI of class 0 (rare) scored highest as class 1 (frequent: no mitigation on it);
    # class 2 (frequent, low score) is not re-weighted. Penalty on class 1 grows by
    # (sigma_1 / sigma_0)^q relative to CE.
    counts = torch.tensor([10.0, 1000.0, 1000.0], dtype=torch.float64)
    z = torch.tensor([[0.5, 2.0, -1.0]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0])
    loss = SeesawLoss(3).double().eval()
    loss.cum_samples.copy_(counts)
    (g,) = grads(loss(z, torch.zeros(1, 2, dtype=torch.float64), labels)["loss_cls"], z)
    (g_ce,) = grads(F.cross_entropy(z, labels), z)
    sigma = z.detach()[0].softmax(0)
    factor = (sigma[1] / sigma[0]) ** Q
    assert factor > 1
    torch.testing.assert_close(g[0, 1] / g[0, 2], factor * g_ce[0, 1] / g_ce[0, 2], rtol=1e-12,
                               atol=0)
    assert g[0, 1] > g_ce[0, 1]


@pytest.mark.parametrize("n", [4, 0])
def test_seesaw_without_foreground_keeps_graph(n):
    cls = torch.randn(n, C, requires_grad=True)
    obj = torch.randn(n, 2, requires_grad=True)
    labels = torch.full((n,), C)
    out = SeesawLoss(C).train()(cls, obj, labels)
    assert out["loss_cls"].item() == 0 and out["loss_cls"].requires_grad
    (out["loss_cls"] + out["loss_objectness"]).backward()
    assert torch.equal(cls.grad, torch.zeros_like(cls))
    assert torch.isfinite(obj.grad).all() and (n == 0 or obj.grad.abs().sum() > 0)


def test_seesaw_counts_update_in_training_before_loss():
    cls, obj, labels = seesaw_inputs()
    loss = SeesawLoss(C).double().train()
    out = loss(cls, obj, labels)
    expected = torch.tensor([2.0, 2, 1, 2, 2, 2], dtype=torch.float64)
    assert torch.equal(loss.cum_samples, expected)
    # the batch's own counts were used for its loss
    ref_cls, _ = official_seesaw_reference(cls, obj, labels, expected.tolist())
    torch.testing.assert_close(out["loss_cls"], ref_cls, rtol=1e-12, atol=1e-12)
    loss(cls, obj, labels)
    assert torch.equal(loss.cum_samples, 2 * expected)
    loss.eval()(cls, obj, labels)
    assert torch.equal(loss.cum_samples, 2 * expected)


def test_seesaw_state_dict_round_trip_and_missing_counts():
    loss = SeesawLoss(C)
    loss.cum_samples.copy_(torch.tensor(COUNTS))
    state = loss.state_dict()
    assert torch.equal(state["cum_samples"], torch.tensor(COUNTS))
    other = SeesawLoss(C)
    other.load_state_dict(state)
    assert torch.equal(other.cum_samples, loss.cum_samples)

    wrapped = torch.nn.ModuleDict({"head": SeesawLoss(C)})
    wrapped.head.cum_samples.fill_(7)
    with pytest.warns(UserWarning, match="head.cum_samples"):
        result = wrapped.load_state_dict({}, strict=True)
    assert not result.missing_keys
    assert torch.equal(wrapped.head.cum_samples, torch.zeros(C))


def test_seesaw_get_probs():
    cls, obj, _ = seesaw_inputs()
    probs = SeesawLoss(C).double().get_probs(cls.detach(), obj.detach())
    assert probs.shape == (cls.shape[0], C + 1)
    assert (probs >= 0).all() and (probs <= 1).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(cls.shape[0], dtype=torch.float64))
    torch.testing.assert_close(probs[:, C], obj.detach().softmax(1)[:, 1])


def _ddp_worker(rank, port, labels_per_rank, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=len(labels_per_rank))
    try:
        labels = torch.tensor(labels_per_rank[rank])
        loss = SeesawLoss(C).train()
        loss(torch.randn(len(labels), C), torch.randn(len(labels), 2), labels)
        torch.save(loss.cum_samples, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_seesaw_counts_all_reduced_across_ranks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    labels_per_rank = [[0, 0, 3, C, C], [1, 3, 3, 5, C, 2, C]]
    mp.spawn(_ddp_worker, args=(port, labels_per_rank, str(tmp_path)), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f"{r}.pt") for r in range(2))
    expected = torch.tensor([2.0, 1, 1, 3, 0, 1])
    assert torch.equal(rank0, expected) and torch.equal(rank1, expected)


# ---------------------------------------------------------------- ECM
def test_ecm_statistics_by_hand():
    counts, ratio = [1, 10, 100], 6.3313
    n, pos, neg, weight = ecm_reference_stats(counts, ratio)
    stats = effective_class_margins(counts, ratio)
    # written out: n_bg = 6.3313 * 111 = 702.7743, total = 813.7743
    assert n[-1] == pytest.approx(702.7743, rel=1e-14)
    a_rare = 812.7743 / 1
    assert weight[0] == pytest.approx(a_rare * math.log((1 + a_rare) / a_rare), rel=1e-9)
    a_bg = 111 / 702.7743
    assert weight[-1] == pytest.approx(a_bg * math.log((1 + a_bg) / a_bg), rel=1e-14)
    assert 0.30 < weight[-1] < 0.33  # "about 0.31 for background"
    expected = {"counts": n, "pos_margin": pos, "neg_margin": neg, "weight": weight,
                "margin": [0.25 * math.log(x / (sum(n) - x)) for x in n]}
    for key, values in expected.items():
        torch.testing.assert_close(stats[key], torch.tensor(values, dtype=torch.float64),
                                   rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(stats["margin"], stats["pos_margin"] - stats["neg_margin"],
                               rtol=1e-12, atol=1e-12)
    module = ECMLoss(counts, ratio)
    assert module.margin.dtype == module.weight.dtype == torch.float64
    torch.testing.assert_close(module.weight, stats["weight"], rtol=0, atol=0)
    assert set(module.state_dict()) == {"sample_counts", "margin", "weight"}


def test_ecm_statistics_precision_float64():
    # a frequent class (n = 1e6 of a total of ~1.27e6 with background) and a class of 1
    counts, ratio = [1_000_000, 154_545, 1], 0.1
    stats = effective_class_margins(counts, ratio)
    getcontext().prec = 50
    n = [Decimal(x) for x in counts]
    n.append(Decimal("0.1") * sum(n))
    total = sum(n)
    assert 1.26e6 < total < 1.28e6
    for c, n_pos in enumerate(n):
        a = (total - n_pos) / n_pos
        w = a * ((1 + a) / a).ln()
        margin = Decimal("0.25") * (n_pos / (total - n_pos)).ln()
        assert float(stats["weight"][c]) == pytest.approx(float(w), rel=2e-15, abs=0)
        assert float(stats["margin"][c]) == pytest.approx(float(margin), rel=2e-15, abs=1e-16)


@pytest.mark.parametrize("loss_weight", [1.0, 0.5])
def test_ecm_matches_published_formula(loss_weight):
    counts, ratio = [3, 40, 500, 7], 6.3313
    _, pos, neg, weight = ecm_reference_stats(counts, ratio)
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(9, 5, generator=g, dtype=torch.float64) * 2).requires_grad_()
    labels = torch.tensor([0, 1, 2, 3, 4, 4, 4, 2, 0])  # 4 = background
    out = ECMLoss(counts, ratio, loss_weight=loss_weight)(logits, labels)["loss_cls"]
    ref = loss_weight * ecm_reference_loss(logits, labels, pos, neg, weight)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads(out, logits)[0], grads(ref, logits)[0], rtol=1e-10,
                               atol=1e-12)


def test_ecm_matches_bce_with_logits_at_extreme_logits():
    loss = ECMLoss([3, 40, 500])
    logits = torch.tensor([[60.0, -80.0, 30.0, -45.0], [-200.0, 100.0, 0.0, 25.0]],
                          requires_grad=True)
    labels = torch.tensor([0, 3])
    x = 2 * logits + loss.margin.float()
    ref = F.binary_cross_entropy_with_logits(x, F.one_hot(labels, 4).float(),
                                             weight=loss.weight.float(), reduction="sum") / 2
    out = loss(logits, labels)["loss_cls"]
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grads(out, logits)[0], grads(ref, logits)[0])
    assert torch.isfinite(out)


def test_ecm_background_roi_is_positive_of_background_column():
    counts = [3, 40, 500]
    _, pos, neg, weight = ecm_reference_stats(counts, 6.3313)
    logits = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
    out = ECMLoss(counts)(logits, torch.tensor([3]))["loss_cls"]
    # z = 0: -log p_neg = log1p(e^(pos - neg)) for c < 3, -log p_pos = log1p(e^(neg - pos)) for bg
    expected = sum(w * math.log1p(math.exp((p - q) * (1 if c < 3 else -1)))
                   for c, (p, q, w) in enumerate(zip(pos, neg, weight)))
    assert out.item() == pytest.approx(expected, rel=1e-12)
    (g,) = grads(out, logits)
    assert g[0, 3] < 0 and (g[0, :3] > 0).all()


def lvis_like_counts():
    """1,203 instance counts summing to LVIS v1 train's 1,270,141, 145 of them in 1..5."""
    rare = [1, 2, 3, 4, 5] * 29
    others = [6 + (i * 37) % 2000 for i in range(1057)]
    return rare + others + [1_270_141 - sum(rare) - sum(others)]


def ecm_official_float32_weights(counts, fg_bg_ratio):
    """The official get_detection_weight on a float32 counts tensor, one float32 op at a time."""
    f = np.float32
    n = [f(c) for c in counts]
    fg = f(0)
    for x in n:
        fg = f(fg + x)
    n.append(f(fg * f(fg_bg_ratio)))
    total = f(0)
    for x in n:
        total = f(total + x)
    weights = []
    for x in n:
        a = f(f(total - x) / x)
        weights.append(float(f(a * np.log(f(f(f(1) + a) / a)))))
    return weights


def test_ecm_float32_weights_are_the_official_float32_computation():
    counts, ratio = lvis_like_counts(), 6.3313
    assert len(counts) == 1203 and counts[-1] > 3000
    exact = effective_class_margins(counts, ratio)
    official = effective_class_margins(counts, ratio, weight_dtype="float32")
    expected = torch.tensor(ecm_official_float32_weights(counts, ratio), dtype=torch.float64)
    # to 2 float32 ulps: torch's and numpy's float32 log differ in their last bits
    torch.testing.assert_close(official["weight"], expected, rtol=3e-7, atol=0)
    assert official["weight"].dtype == torch.float64
    for key in ("counts", "pos_margin", "neg_margin", "margin"):  # the margins agree
        assert torch.equal(official[key], exact[key]), key
    # the classes with <= 5 instances: 1.110 in float32, 1.000 exactly
    rare = torch.tensor(counts + [counts[-1]]) <= 5  # (the background column: frequent)
    assert int(rare.sum()) == 145
    assert torch.allclose(official["weight"][rare], torch.tensor(1.110, dtype=torch.float64),
                          atol=1e-3)
    assert torch.allclose(exact["weight"][rare], torch.ones(145, dtype=torch.float64), atol=1e-5)
    # the frequent classes and the background: the same to float32 precision
    torch.testing.assert_close(official["weight"][~rare][-2:], exact["weight"][~rare][-2:],
                               rtol=1e-5, atol=0)
    module = ECMLoss(counts, ratio, weight_dtype="float32")
    assert torch.equal(module.weight, official["weight"])
    logits, labels = torch.randn(4, 1204, dtype=torch.float64), torch.tensor([0, 7, 144, 1203])
    assert not torch.allclose(module(logits, labels)["loss_cls"],
                              ECMLoss(counts, ratio)(logits, labels)["loss_cls"], rtol=1e-3)
    with pytest.raises(ValueError, match="weight_dtype 'half'"):
        effective_class_margins(counts, ratio, weight_dtype="half")


def test_ecm_zero_count_classes_are_finite_and_warn():
    with pytest.warns(UserWarning, match="2 of 4 classes"):
        loss = ECMLoss([0, 5, 0, 100])
    for buf in (loss.sample_counts, loss.margin, loss.weight):
        assert torch.isfinite(buf).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clamped = ECMLoss([1, 5, 1, 100])
    torch.testing.assert_close(loss.margin, clamped.margin, rtol=0, atol=0)
    logits = torch.randn(4, 5, requires_grad=True)
    out = loss(logits, torch.tensor([0, 2, 4, 1]))["loss_cls"]
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError):
        ECMLoss([1, -2, 3])


def test_ecm_placeholder_then_load_state_dict():
    trained = ECMLoss([3, 40, 500, 7])
    with pytest.raises(ValueError):
        ECMLoss()
    with pytest.raises(ValueError, match="num_classes=3"):
        ECMLoss([3, 40, 500, 7], num_classes=3)
    eval_only = ECMLoss(None, num_classes=4)
    logits, labels = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 4])
    with pytest.raises(RuntimeError, match="placeholder"):
        eval_only.train()(logits, labels)
    assert eval_only.get_probs(logits).shape == (6, 5)
    eval_only.load_state_dict(trained.state_dict())
    for name in ("sample_counts", "margin", "weight"):
        assert torch.equal(getattr(eval_only, name), getattr(trained, name))
    torch.testing.assert_close(eval_only(logits, labels)["loss_cls"],
                               trained(logits, labels)["loss_cls"])


def test_ecm_get_probs():
    logits = torch.randn(7, 5, dtype=torch.float64)
    probs = ECMLoss([3, 40, 500, 7]).get_probs(logits)
    s = logits.sigmoid()
    torch.testing.assert_close(probs[:, :4], s[:, :4] * (1 - s[:, 4:]))
    torch.testing.assert_close(probs[:, 4], s[:, 4])
    assert (probs >= 0).all() and (probs <= 1).all()


@pytest.mark.parametrize("make", [lambda: ECMLoss([3, 40, 500]), lambda: CrossEntropyLoss(3),
                                  lambda: FederatedLoss([3, 40, 500])])
def test_empty_batch_keeps_graph(make):
    logits = torch.randn(0, 4, requires_grad=True)
    out = make()(logits, torch.zeros(0, dtype=torch.long))["loss_cls"]
    assert out.item() == 0 and out.requires_grad
    out.backward()


# ---------------------------------------------------------------- CE baseline
def test_cross_entropy_baseline():
    logits = torch.randn(8, 5, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 4, 4, 4, 1])
    loss = CrossEntropyLoss(4, loss_weight=0.5)
    torch.testing.assert_close(loss(logits, labels)["loss_cls"],
                               0.5 * F.cross_entropy(logits, labels))
    torch.testing.assert_close(loss.get_probs(logits), logits.softmax(1))


# ---------------------------------------------------------------- Federated
def federated_reference(logits, labels, classes):
    """Loop over RoIs and the given classes, float64: sum of -[t log s + (1 - t) log(1 - s)] / N."""
    total = Decimal(0)
    for i, label in enumerate(labels.tolist()):
        for c in classes:
            z = float(logits[i, c].detach())
            s = 1 / (1 + math.exp(-z))
            total += Decimal(-math.log(s) if label == c else -math.log(1 - s))
    return float(total) / len(labels)


FED_COUNTS = [900, 400, 100, 16, 4, 1, 0]  # image counts; class 6 never seen


def test_federated_sampled_classes():
    loss = FederatedLoss(FED_COUNTS, num_sampled_classes=5)
    torch.testing.assert_close(loss.freq_weight, torch.tensor(FED_COUNTS, dtype=torch.float).sqrt())
    torch.manual_seed(0)
    for _ in range(50):
        labels = torch.tensor([7, 7, 3, 7, 5, 3])  # present: 3, 5 and background (7)
        classes = loss.sample_classes(labels).tolist()
        assert classes[:2] == [3, 5] and len(classes) == 4 == len(set(classes))  # 5 - 3 places
        assert 7 not in classes and 6 not in classes  # never background, never a 0-count class
    # fewer eligible classes than places: all of them, no error
    big = FederatedLoss(FED_COUNTS, num_sampled_classes=50)
    assert sorted(big.sample_classes(torch.tensor([0, 7])).tolist()) == [0, 1, 2, 3, 4, 5]
    # more present classes than places: exactly the present foreground classes
    small = FederatedLoss(FED_COUNTS, num_sampled_classes=2)
    assert big.sample_classes(torch.tensor([2, 0, 1, 7])).tolist()[:3] == [0, 1, 2]
    assert small.sample_classes(torch.tensor([2, 0, 1, 7])).tolist() == [0, 1, 2]


def test_federated_negatives_drawn_by_image_count_power():
    # one place left, eligible classes 0, 1, 2 with image counts 1, 16, 81 and power 0.5:
    # probabilities 1/14, 4/14, 9/14
    loss = FederatedLoss([1, 16, 81, 5], num_sampled_classes=3, freq_weight_power=0.5)
    torch.manual_seed(0)
    labels = torch.tensor([3, 4])  # class 3 and background take two places
    draws = torch.tensor([loss.sample_classes(labels)[1].item() for _ in range(7000)])
    freq = torch.bincount(draws, minlength=4).double() / len(draws)
    torch.testing.assert_close(freq, torch.tensor([1, 4, 9, 0], dtype=torch.double) / 14,
                               atol=0.015, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_federated_matches_reference_value_and_gradient(seed):
    torch.manual_seed(seed)
    n, num = 12, len(FED_COUNTS)
    logits = (torch.randn(n, num + 1, dtype=torch.float64) * 3).requires_grad_()
    labels = torch.randint(0, num + 1, (n,))
    loss = FederatedLoss(FED_COUNTS, num_sampled_classes=5, loss_weight=0.7)
    torch.manual_seed(100 + seed)
    classes = loss.sample_classes(labels).tolist()
    torch.manual_seed(100 + seed)  # forward draws the same set
    out = loss(logits, labels)["loss_cls"]
    expected = 0.7 * federated_reference(logits, labels, classes)
    assert out.item() == pytest.approx(expected, rel=1e-12)
    (grad,) = grads(out, logits)
    # d/dz BCE = sigmoid(z) - t on the selected columns, 0 elsewhere (background column too)
    expected = torch.zeros_like(logits)
    target = (labels[:, None] == torch.arange(num + 1)).double()
    expected[:, classes] = (logits.sigmoid() - target)[:, classes].detach() * 0.7 / n
    torch.testing.assert_close(grad, expected)


def test_federated_is_bce_over_all_classes_when_every_class_is_sampled():
    logits = torch.randn(9, 5, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 4, 4, 4, 1, 0])
    loss = FederatedLoss([5, 3, 2, 1], num_sampled_classes=100)
    target = F.one_hot(labels, 5).float()[:, :4]
    expected = F.binary_cross_entropy_with_logits(logits[:, :4], target, reduction="sum") / 9
    torch.testing.assert_close(loss(logits, labels)["loss_cls"], expected)
    torch.testing.assert_close(loss.get_probs(logits), logits.sigmoid())


def test_federated_placeholder_then_load_state_dict():
    loss = FederatedLoss(None, num_classes=4)
    with pytest.raises(RuntimeError, match="placeholder"):
        loss(torch.zeros(2, 5), torch.tensor([0, 4]))
    loss.load_state_dict(FederatedLoss([5, 3, 2, 1]).state_dict())
    torch.testing.assert_close(loss.freq_weight, torch.tensor([5.0, 3, 2, 1]).sqrt())
    assert loss(torch.zeros(2, 5), torch.tensor([0, 4]))["loss_cls"] > 0
    with pytest.raises(ValueError, match="num_classes=3 but 4"):
        FederatedLoss([5, 3, 2, 1], num_classes=3)
