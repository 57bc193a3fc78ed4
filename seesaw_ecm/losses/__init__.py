"""Classification losses of the box predictor: framework-free ``torch.nn.Module`` s.

Every loss has ``forward(...) -> dict`` of scalar loss terms (already multiplied by its
``loss_weight``), ``get_probs(...) -> (N, C + 1)`` scores with background last, and a class
attribute ``uses_objectness`` that says which logits it takes (C = foreground classes, label C =
background, labels (N,) int64 in [0, C]):

- ``uses_objectness = True`` (Seesaw): ``forward(class_logits (N, C), objectness_logits (N, 2)
  [fg, bg], labels)`` -> {loss_cls, loss_objectness}; ``get_probs(class_logits,
  objectness_logits)``.
- ``uses_objectness = False`` (ce, cosine_ce, federated, ECM, EQL, EQLv2, DropLoss, GOL,
  BaGS, LOCE):
  ``forward(logits, labels)`` -> {loss_cls}; ``get_probs(logits)``. The logits are (N, C + 1),
  background last, unless the loss says otherwise with ``num_logits``: (N, C) for EQL,
  DropLoss and GOL, (N, C + 1 + G) for BaGS.

Optional classifier hooks, read by the predictor: ``num_logits`` (default C + 1, C with
objectness), ``bias_init`` (a constant for the classifier bias, e.g. the prior
-log((1 - pi) / pi) of the sigmoid losses; default None = keep the classifier's own init) and
``weight_init`` (a constant for the classifier weights, GOL's; default None).

Constructors: ``CrossEntropyLoss(num_classes)``, ``SeesawLoss(num_classes, p, q, eps)``,
``ECMLoss(class_counts, fg_bg_ratio)``, ``FederatedLoss(class_image_counts, num_sampled_classes,
freq_weight_power)``, ``EQLLoss(image_frequency, lambda_, prior_prob)``,
``DropLoss(image_frequency, lambda_, prior_prob)``, ``GumbelLoss(image_frequency, lambda_,
clamp, bias_init, weight_init)`` (these five also ``(None, num_classes=C)``, to
be filled from a checkpoint), ``BalancedGroupSoftmax(class_counts, beta, bin_split)`` (also),
``EQLv2Loss(num_classes, gamma, mu, alpha, prior_prob)``, ``EquilibriumLoss(num_classes,
momentum, initial_score, background_score)`` (LOCE; its mean scores are updated by the LOCE ROI
heads through ``update_mean_score``); all take
``loss_weight``. Which ``MODEL.LONG_TAIL.LOSS`` name builds which loss is the
table ``seesaw_ecm.modeling.cls_loss.LOSS_SPECS``.
The sigmoid losses (ECM, EQL, DropLoss, EQLv2, Federated) compute their weighted BCE with
``sigmoid_bce.sigmoid_bce`` (one fused pass, no one-hot tensor). No loss forward reads a value
back to the host (a stream synchronisation on CUDA) except Federated's class sampling (a class
set of data-dependent size, as detectron2's) and Seesaw's row selection on the CPU.
Beside them, ``ProgressiveConstraintLoss`` (TSD's progressive constraint, read by
``seesaw_ecm.modeling.tsd``) compares two heads' scores and IoUs.
Under autocast (mixed precision) every ``forward`` runs in float32 (``precision.float32_loss``).
"""
from .cross_entropy import CrossEntropyLoss
from .droploss import DropLoss
from .ecm import ECMLoss, effective_class_margins
from .eql import EQLLoss
from .equilibrium import EquilibriumLoss
from .eqlv2 import EQLv2Loss
from .federated import FederatedLoss
from .gumbel import GumbelLoss
from .group_softmax import BalancedGroupSoftmax
from .progressive_constraint import ProgressiveConstraintLoss
from .seesaw import SeesawLoss

__all__ = ["BalancedGroupSoftmax", "CrossEntropyLoss", "DropLoss", "ECMLoss", "EQLLoss",
           "EQLv2Loss", "EquilibriumLoss", "FederatedLoss", "GumbelLoss",
           "ProgressiveConstraintLoss", "SeesawLoss", "effective_class_margins"]
