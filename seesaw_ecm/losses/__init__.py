"""Classification losses of the box predictor: framework-free ``torch.nn.Module`` s.

Every loss has ``forward(...) -> dict`` of scalar loss terms (already multiplied by its
``loss_weight``), ``get_probs(...) -> (N, C + 1)`` scores with background last, and a class
attribute ``uses_objectness`` that says which logits it takes (C = foreground classes, label C =
background, labels (N,) int64 in [0, C]):

- ``uses_objectness = True`` (Seesaw): ``forward(class_logits (N, C), objectness_logits (N, 2)
  [fg, bg], labels)`` -> {loss_cls, loss_objectness}; ``get_probs(class_logits,
  objectness_logits)``.
- ``uses_objectness = False`` (ce, cosine_ce, federated, ECM): ``forward(logits (N, C + 1),
  labels)`` -> {loss_cls};
  ``get_probs(logits)``.

Constructors: ``CrossEntropyLoss(num_classes)``, ``SeesawLoss(num_classes, p, q, eps)``,
``ECMLoss(class_counts, fg_bg_ratio)``, ``FederatedLoss(class_image_counts, num_sampled_classes,
freq_weight_power)`` (the last two also ``(None, num_classes=C)``, to be filled from a
checkpoint); all take ``loss_weight``. Which ``MODEL.LONG_TAIL.LOSS`` name builds which loss is the
table ``seesaw_ecm.modeling.cls_loss.LOSS_SPECS``.
Under autocast (mixed precision) every ``forward`` runs in float32 (``precision.float32_loss``).
"""
from .cross_entropy import CrossEntropyLoss
from .ecm import ECMLoss, effective_class_margins
from .federated import FederatedLoss
from .seesaw import SeesawLoss

__all__ = ["CrossEntropyLoss", "ECMLoss", "FederatedLoss", "SeesawLoss", "effective_class_margins"]
