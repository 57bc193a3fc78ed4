"""Mixed precision (SOLVER.AMP.ENABLED) under CPU autocast (bfloat16): every loss computed in
float32, every head finite forward and backward, the gradient-balance recorder unscaled and
blind to skipped steps, and a short training run."""
import copy
import json
from types import SimpleNamespace

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from test_grad_balance import LABELS, long_tail_predictor, proposals
from test_htc_lite import batch
from e2e import run_train_net

from seesaw_ecm import add_seesaw_ecm_config
from seesaw_ecm.gradient_balance import GradientBalance, GradientBalanceHook, attach, detach
from seesaw_ecm.layers import NormedLinear
from seesaw_ecm.losses import CrossEntropyLoss, ECMLoss, FederatedLoss, SeesawLoss
from seesaw_ecm.modeling.htc_lite import context_loss

C = 8
BF16 = dict(device_type="cpu", dtype=torch.bfloat16)
SCALE = 2.0 ** 16


def loss_inputs(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, C + 2, generator=g) * 4
    labels = torch.randint(0, C + 1, (n,), generator=g)
    return logits, labels


# name -> (loss module, function of (module, logits (N, C + 2), labels) -> dict of losses)
LOSSES = {
    "ce": (CrossEntropyLoss(C), lambda m, z, y: m(z[:, : C + 1], y)),
    "seesaw": (SeesawLoss(C), lambda m, z, y: m(z[:, :C], z[:, C:], y)),
    "ecm": (ECMLoss(torch.arange(1.0, C + 1) ** 2), lambda m, z, y: m(z[:, : C + 1], y)),
    "federated": (FederatedLoss(torch.arange(1.0, C + 1), num_sampled_classes=5),
                  lambda m, z, y: m(z[:, : C + 1], y)),
    "context": (None, lambda m, z, y: {"loss_context": context_loss(
        z[:8, :C], torch.nn.functional.one_hot(y[:8], C + 1)[:, :C].bool(),
        torch.eye(8, C, dtype=torch.bool))}),
}


def run_loss(name, logits, labels):
    module, call = LOSSES[name]
    module = copy.deepcopy(module)  # Seesaw counts its samples: every call starts the same
    torch.manual_seed(0)  # Federated samples its negative classes
    return call(module, logits, labels)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_is_float32_under_autocast(name):
    """Under bfloat16 autocast, with the bfloat16 logits a classifier gives there, each loss
    term is float32, equal (rtol 1e-6) to the float32 computation on the same (rounded) logits
    and within rtol 2e-2 of the float32 loss of the unrounded logits; the gradient is finite."""
    logits, labels = loss_inputs()
    low = logits.bfloat16().requires_grad_()
    with torch.autocast(**BF16):
        amp = run_loss(name, low, labels)
    same_inputs = run_loss(name, low.detach().float(), labels)
    full = run_loss(name, logits, labels)
    for key, value in amp.items():
        assert value.dtype == torch.float32 and torch.isfinite(value)
        torch.testing.assert_close(value, same_inputs[key], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(value, full[key], rtol=2e-2, atol=1e-4)
    sum(amp.values()).backward()
    assert low.grad.dtype == torch.bfloat16 and torch.isfinite(low.grad).all()
    assert low.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cosine_classifier_under_autocast(dtype):
    """NormedLinear on large 16-bit features (norms ~1e4: squares far above float16's 65504)
    under autocast: autocast takes the norms in float32, so the cosine logits equal float32's
    within 16-bit rounding of values up to the temperature (20)."""
    layer = NormedLinear(1024, 5)
    x = torch.randn(6, 1024) * 300
    with torch.autocast(device_type="cpu", dtype=dtype):
        out = layer(x.to(dtype))
    torch.testing.assert_close(out.float(), layer(x), rtol=0, atol=0.1)


def model_cfg(config, *opts):
    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    cfg.merge_from_file(f"configs/Synthetic/{config}.yaml")
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.NUM_CLASSES", 4,
                         "DATASETS.TRAIN", "()", "MODEL.LONG_TAIL.STATISTICS_FROM", "checkpoint",
                         "OUTPUT_DIR", "", *opts])
    return cfg


def fill_statistics(model):
    """Class statistics of ECM / Federated losses built for a checkpoint (placeholders)."""
    for m in model.modules():
        if isinstance(m, (ECMLoss, FederatedLoss)):
            m.load_state_dict(type(m)(torch.arange(1.0, m.num_classes + 1)).state_dict())


# (the losses alone are all tested above; ~3 s of CPU each: bfloat16 convolutions are slow)
@pytest.mark.parametrize("config", [
    "mask_rcnn_R18_FPN_ce", "mask_rcnn_R18_FPN_ecm", "cascade_mask_rcnn_R18_FPN_seesaw",
    "htc_lite_R18_FPN_seesaw", "cascade_mask_rcnn_R18_FPN_ecm_mmdet",
])
def test_every_head_trains_under_autocast(config):
    """LongTailROIHeads (linear CE; cosine ECM with the normalized mask head),
    LongTailCascadeROIHeads (Seesaw: objectness layout) and HTCLiteROIHeads: one forward
    under bfloat16 autocast gives finite loss terms, the long-tail ones float32, and a finite
    gradient for every parameter."""
    torch.manual_seed(0)
    model = build_model(model_cfg(config)).train()
    fill_statistics(model)
    with EventStorage(), torch.autocast(**BF16):
        losses = model(batch([[2], [1]]))
        total = sum(losses.values())
    assert all(torch.isfinite(v) for v in losses.values()), losses
    assert all(v.dtype == torch.float32 for k, v in losses.items() if k.startswith("loss_cls"))
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) > 0.9 * sum(1 for _ in model.parameters())
    assert all(torch.isfinite(g).all() for g in grads)


# --- gradient-balance recorder ----------------------------------------------------------------

def recorded_step(predictor, balance, loss_scale, seed=0):
    """One forward / backward of the predictor's losses times `loss_scale` (as GradScaler
    scales them), recorded into `balance`."""
    torch.manual_seed(seed)
    attach([predictor], balance)
    x = torch.randn(len(LABELS), 8) * 3
    with EventStorage():
        losses = predictor.losses(predictor(x), proposals(LABELS))
    (sum(losses.values()) * loss_scale).backward()
    detach([predictor])


def test_recorder_unscales_the_loss_scale():
    predictor = long_tail_predictor(SeesawLoss(3))
    totals, raw = [], []
    for scale in (1.0, SCALE):
        balance = GradientBalance(3)
        recorded_step(copy.deepcopy(predictor), balance, scale)
        raw.append(balance.step[:2].sum().item())  # what the recorder summed before: scaled
        balance.end_step(scale)
        balance.sync()
        totals.append(balance.total)
    assert raw[1] == pytest.approx(SCALE * raw[0]) and raw[0] > 0
    torch.testing.assert_close(totals[1], totals[0], rtol=1e-12, atol=0)


def test_hook_reads_the_grad_scaler_and_skips_skipped_steps():
    """Through the trainer hook with a real (CPU) GradScaler: step 0 counts unscaled; step 1
    has an inf gradient elsewhere in the model, the scaler skips it (and halves its scale),
    and the recorder drops it although the logit gradients were finite."""
    torch.manual_seed(0)
    predictor = long_tail_predictor(CrossEntropyLoss(3))
    reference = GradientBalance(3)
    recorded_step(copy.deepcopy(predictor), reference, 1.0)
    reference.sync()

    model = SimpleNamespace(roi_heads=SimpleNamespace(box_predictor=predictor))
    hook = GradientBalanceHook(model, period=100, checkpoint_period=0)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    optimizer = torch.optim.SGD(predictor.parameters(), lr=0.0)
    hook.trainer = SimpleNamespace(iter=0, max_iter=100,
                                   _trainer=SimpleNamespace(grad_scaler=scaler))
    hook.before_train()  # attaches the recorder, reads the scaler's first scale
    for it in range(2):
        hook.trainer.iter = it
        optimizer.zero_grad()
        torch.manual_seed(0)
        x = torch.randn(len(LABELS), 8) * 3
        with EventStorage():
            losses = predictor.losses(predictor(x), proposals(LABELS))
        scaler.scale(sum(losses.values())).backward()
        if it == 1:
            predictor.bbox_pred.weight.grad[0, 0] = float("inf")
        scaler.step(optimizer)
        scaler.update()
        hook.after_step()
    hook.after_train()
    assert scaler.get_scale() == SCALE / 2  # step 1 was skipped
    hook.balance.sync()
    torch.testing.assert_close(hook.balance.total, reference.total, rtol=1e-12, atol=0)


def test_non_finite_step_is_dropped():
    balance = GradientBalance(3)
    recorded_step(long_tail_predictor(CrossEntropyLoss(3)), balance, float("inf"))
    assert not torch.isfinite(balance.step).all()
    balance.end_step(1.0)
    balance.sync()
    assert balance.total.abs().sum() == 0


# --- training run -----------------------------------------------------------------------------

@pytest.mark.slow
def test_train_net_with_amp_on_cpu(small_synthetic, tmp_path):
    """train_net.py with SOLVER.AMP.ENABLED True on CPU (bfloat16 autocast): HTC-Lite with
    the gradient-balance recorder trains with finite losses and records finite sums. (3
    iterations: bfloat16 autocast measured ~5x slower than float32 on the CI's CPU.)"""
    run_train_net(small_synthetic, tmp_path, "configs/Synthetic/htc_lite_R18_FPN_seesaw.yaml",
                  "SOLVER.AMP.ENABLED", "True", "SOLVER.MAX_ITER", "3",
                  "MODEL.LONG_TAIL.GRADIENT_BALANCE.ENABLED", "True", "DATASETS.TEST", "()")
    rows = [json.loads(line) for line in open(tmp_path / "metrics.json")]
    train = [r for r in rows if "total_loss" in r]
    assert train[-1]["iteration"] == 2
    assert all(torch.isfinite(torch.tensor(v)) for r in train for k, v in r.items()
               if k.startswith("loss_"))
    log = open(tmp_path / "log.txt").read()
    assert "bfloat16 autocast" in log
    balance = json.loads((tmp_path / "gradient_balance.json").read_text())
    assert 0 < sum(map(sum, balance["positive"])) < float("inf")
