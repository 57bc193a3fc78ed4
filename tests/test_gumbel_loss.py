"""GOL (seesaw_ecm/losses/gumbel.py) against a loop version of the official loss
(kostas1515/GOL mmdet/models/losses/droploss.py, use_classif='gumbel'), in float64: values,
gradients (the formula of PyTorch's BCE backward, and finite differences), test-time scores, the
classifier init of the official config, and the loss key."""
import math

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.utils.events import EventStorage

from seesaw_ecm.losses import DropLoss, GumbelLoss
from seesaw_ecm.modeling import LongTailOutputLayers, build_cls_loss
from test_modeling import C as MODEL_C
from test_modeling import build_small_model, fake_proposals, one_image_batch, predictor, small_cfg

C = 5
FREQ = [0.5, 0.01, 0.0005, 0.001, 0.2]  # tail below lambda_ = 0.0011: classes 2 and 3
LAMBDA = 0.0011
LO, HI = -4.0, 10.0
BCE_EPS = 1e-12  # PyTorch's binary_cross_entropy backward: / max(p (1 - p), 1e-12)


def official_weights(labels, draws):
    """drop_w = 1 - threshold_func() * (1 - target) of the official DropLoss, entry by entry:
    a tail class's negative is dropped on a foreground RoI, and on a background RoI when its
    draw u > ratio (ratio = share of the foreground RoIs in tail classes; NaN: none dropped)."""
    n = len(labels)
    fg = [int(x) for x in labels if int(x) < C]
    ratio = sum(FREQ[x] < LAMBDA for x in fg) / len(fg) if fg else float("nan")
    w = [[1.0] * C for _ in range(n)]
    for i in range(n):
        label = int(labels[i])
        for j in range(C):
            tail = FREQ[j] < LAMBDA
            y = 1.0 if label == j else 0.0
            if label < C:
                threshold = 1.0 if tail else 0.0
            else:
                threshold = 1.0 if tail and float(draws[i][j]) > ratio else 0.0
            w[i][j] = 1 - threshold * (1 - y)
    return w


def official_loss_and_grad(logits, labels, draws):
    """The official loss sum_ij w_ij BCE(exp(-exp(-clamp(z))), y) / N, and its gradient as
    PyTorch computes it: w (p - y) / max(p (1 - p), eps) * dp/dz / N inside the clamp, 0
    outside. Plain floats, entry by entry."""
    n = len(labels)
    w = official_weights(labels, draws)
    total, grad = 0.0, [[0.0] * C for _ in range(n)]
    for i in range(n):
        for j in range(C):
            z = float(logits[i][j])
            y = 1.0 if int(labels[i]) == j else 0.0
            zc = min(max(z, LO), HI)
            p = math.exp(-math.exp(-zc))
            log_p = max(math.log(p), -100.0) if p > 0 else -100.0
            log_1mp = max(math.log(1 - p), -100.0) if p < 1 else -100.0
            total += w[i][j] * -(y * log_p + (1 - y) * log_1mp)
            if LO <= z <= HI:
                dp_dz = p * math.exp(-zc)
                grad[i][j] = w[i][j] * (p - y) / max(p * (1 - p), BCE_EPS) * dp_dz / n
    return total / n, torch.tensor(grad, dtype=torch.float64)


def sample_logits(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, C, generator=g, dtype=torch.float64) * 4  # spans both clamp bounds
    z[0, 0], z[1, 1], z[2, 2] = -3.6, -6.0, 12.0  # eps-floored, below and above the clamp
    return z


LABELS = [[0, 1, 2, C, 3, 1, C, 4, C, 2], [C] * 10, [0, C, C, 4, C, 1, C, C, C, C]]


@pytest.mark.parametrize("labels", LABELS)
def test_value_and_gradient_match_the_official_loss(labels):
    labels = torch.tensor(labels)
    logits = sample_logits(len(labels)).requires_grad_()
    loss = GumbelLoss(FREQ, lambda_=LAMBDA).double()
    torch.manual_seed(3)
    draws = torch.rand(len(labels), C)  # the draws the loss makes: same seed, same shape
    torch.manual_seed(3)
    value = loss(logits, labels)["loss_cls"]
    value.backward()
    ref_value, ref_grad = official_loss_and_grad(logits.tolist(), labels, draws.tolist())
    assert value.item() == pytest.approx(ref_value, rel=1e-12)
    # rtol: 1 - p cancels for p near 1 (z near 10), in both computations
    torch.testing.assert_close(logits.grad, ref_grad, rtol=1e-6, atol=1e-15)
    assert logits.grad[1, 1] == 0 and logits.grad[2, 2] == 0  # clamped: no gradient
    if int(labels[0]) == 0:  # a positive at z = -3.6: p (1 - p) < eps, almost no gradient
        assert 0 < -logits.grad[0, 0] < 1e-3 * math.exp(3.6) / len(labels)


def test_gradient_is_the_derivative_of_the_loss_inside_the_clamp():
    """Finite differences (gradcheck) where the BCE floor is inactive, with the draws fixed."""
    labels = torch.tensor(LABELS[0])
    g = torch.Generator().manual_seed(1)
    logits = (torch.rand(len(labels), C, generator=g, dtype=torch.float64) * 12 - 3)
    loss = GumbelLoss(FREQ, lambda_=LAMBDA).double()

    def fixed_draws(z):
        torch.manual_seed(5)
        return loss(z, labels)["loss_cls"]

    assert torch.autograd.gradcheck(fixed_draws, (logits.requires_grad_(),))


def test_drop_rule_is_droploss_and_the_link_is_not_the_sigmoid():
    labels = torch.tensor(LABELS[0])
    z = sample_logits(len(labels)).clamp(LO, HI)
    gol, drop = GumbelLoss(FREQ, lambda_=LAMBDA), DropLoss(FREQ, lambda_=LAMBDA)
    torch.manual_seed(0)
    ignored = gol.ignored_negatives(labels, gol.tail_classes())
    torch.manual_seed(0)
    assert torch.equal(ignored, drop.ignored_negatives(labels, drop.tail_classes()))
    torch.manual_seed(0)
    a = gol(z, labels)["loss_cls"]
    torch.manual_seed(0)
    assert not torch.isclose(a, drop(z, labels)["loss_cls"])


def test_scores_are_the_gumbel_cdf_of_the_unclamped_logits():
    z = torch.tensor([[-5.0, 0.0, 2.0, 12.0, -1.0]], dtype=torch.float64)
    probs = GumbelLoss(FREQ).get_probs(z)
    expected = [math.exp(-math.exp(-v)) for v in z[0].tolist()] + [0.0]
    torch.testing.assert_close(probs, torch.tensor([expected], dtype=torch.float64))
    assert probs[0, 3] > math.exp(-math.exp(-HI))  # not clamped at test time


def test_predictor_starts_from_the_official_init_and_scores_with_the_gumbel():
    pred = predictor(GumbelLoss(FREQ), cosine=False)
    assert pred.cls_score.out_features == C
    assert torch.equal(pred.cls_score.bias, torch.full((C,), -2.0))
    assert torch.equal(pred.cls_score.weight, torch.full_like(pred.cls_score.weight, 0.001))
    torch.nn.init.normal_(pred.cls_score.weight)
    x = torch.randn(4, 8)
    scores, deltas = pred(x)
    (probs,) = pred.predict_probs((scores, deltas), fake_proposals([0, 1, C, 2]))
    torch.testing.assert_close(probs[:, :C], torch.exp(-torch.exp(-scores)))
    assert (probs[:, C] == 0).all()


def test_loss_key_builds_it_from_its_config_keys():
    cfg = small_cfg("gol", **{"MODEL.LONG_TAIL.STATISTICS_FROM": "checkpoint"})
    loss = build_cls_loss(cfg)
    assert type(loss) is GumbelLoss
    assert (loss.lambda_, loss.clamp, loss.bias_init, loss.weight_init) == (
        0.0011, (-4.0, 10.0), -2.0, 0.001)
    for key, value in (("LAMBDA_", 0.3), ("LOGIT_CLAMP", (-2.0, 5.0)), ("BIAS_INIT", -1.0),
                       ("WEIGHT_INIT", 0.01)):
        cfg.MODEL.LONG_TAIL.GOL[key] = value
    loss = build_cls_loss(cfg)
    assert (loss.lambda_, loss.clamp, loss.bias_init, loss.weight_init) == (
        0.3, (-2.0, 5.0), -1.0, 0.01)
    pred = LongTailOutputLayers(cfg, ShapeSpec(channels=8))
    assert pred.cls_score.bias.eq(-1.0).all() and pred.cls_score.weight.eq(0.01).all()
    with pytest.raises(ValueError, match="lo < hi"):
        GumbelLoss(FREQ, clamp=(3.0, 3.0))


def test_autocast_runs_the_loss_in_float32():
    labels = torch.tensor(LABELS[0])
    z = sample_logits(len(labels)).float()
    loss = GumbelLoss(FREQ, lambda_=LAMBDA)
    torch.manual_seed(0)
    full = loss(z, labels)["loss_cls"]
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss(z.bfloat16(), labels)["loss_cls"]
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, loss_of_rounded(loss, z, labels))
    assert abs(low - full) < 0.05 * full


def loss_of_rounded(loss, z, labels):
    torch.manual_seed(0)
    return loss(z.bfloat16().float(), labels)["loss_cls"]


def test_full_model_trains_one_step_and_scores_with_the_gumbel():
    model = build_small_model("gol", False)
    pred = model.roi_heads.box_predictor
    assert type(pred.cls_loss) is GumbelLoss and pred.cls_score.out_features == MODEL_C
    pred.cls_loss.load_state_dict({"image_frequency": torch.linspace(0.0005, 0.5, MODEL_C)})
    batch = one_image_batch()
    torch.manual_seed(0)
    model.train()
    with EventStorage():
        losses = model(batch)
    sum(losses.values()).backward()
    assert torch.isfinite(losses["loss_cls"]) and pred.cls_score.weight.grad.abs().sum() > 0
    model.eval()
    seen = []
    pred.register_forward_hook(lambda module, args, out: seen.append(out[0]))
    with torch.no_grad():
        out = model(batch)[0]["instances"]
    # every detection's score is the Gumbel CDF of its class logit
    probs = torch.exp(-torch.exp(-seen[0]))
    assert len(out) and all(bool((probs[:, c] - s).abs().min() < 1e-6)
                            for s, c in zip(out.scores, out.pred_classes))
