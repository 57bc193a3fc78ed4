"""The classification loss of the long-tail box predictor, built from MODEL.LONG_TAIL by name.

``LOSS_SPECS`` is the one table that maps a ``MODEL.LONG_TAIL.LOSS`` name to its builder (cfg
-> loss module of :mod:`seesaw_ecm.losses`, class statistics included), whether the decoupled
objectness branch is required, allowed or forbidden, and the classifier it is published with
(``CLASSIFIER: auto``). A new method is one builder and one row.
"""
import logging
from typing import Callable, NamedTuple

from ..data.statistics import class_statistics
from ..errors import SeesawEcmError
from ..losses import (BalancedGroupSoftmax, CrossEntropyLoss, DropLoss, ECMLoss, EQLLoss,
                      EQLv2Loss, EquilibriumLoss, FederatedLoss, GumbelLoss, SeesawLoss)

logger = logging.getLogger(__name__)

CLASSIFIERS = ("auto", "cosine", "linear")
STATISTICS_FROM = ("train", "checkpoint")


class LossSpec(NamedTuple):
    build: Callable  # (cfg) -> loss module
    objectness: str  # "required", "optional" or "forbidden": MODEL.LONG_TAIL.OBJECTNESS
    classifier: str  # "cosine" or "linear": what CLASSIFIER "auto" gives


def _num_classes(cfg):
    return cfg.MODEL.ROI_HEADS.NUM_CLASSES


def statistics_from_train(cfg):
    """Whether class statistics are counted on DATASETS.TRAIN (else they come with the weights)."""
    value = cfg.MODEL.LONG_TAIL.STATISTICS_FROM
    if value not in STATISTICS_FROM:
        raise SeesawEcmError(
            f"MODEL.LONG_TAIL.STATISTICS_FROM {value!r}: valid choices are "
            f"{', '.join(map(repr, STATISTICS_FROM))}")
    return value == "train"


def ecm_statistic(cfg):
    """MODEL.LONG_TAIL.ECM.STATISTIC, or the value of its deprecated old name
    MODEL.LONG_TAIL.STATISTIC when a config still sets that."""
    lt = cfg.MODEL.LONG_TAIL
    old = lt.get("STATISTIC", "")
    if not old:
        return lt.ECM.STATISTIC
    if old != lt.ECM.STATISTIC and lt.ECM.STATISTIC != "instance_count":
        raise SeesawEcmError(
            f"MODEL.LONG_TAIL.STATISTIC {old!r} (deprecated) and MODEL.LONG_TAIL.ECM.STATISTIC "
            f"{lt.ECM.STATISTIC!r} disagree: set only MODEL.LONG_TAIL.ECM.STATISTIC.")
    logger.warning("MODEL.LONG_TAIL.STATISTIC is deprecated (it is read by ECM only): use "
                   f"MODEL.LONG_TAIL.ECM.STATISTIC {old!r}.")
    return old


def _cross_entropy(cfg):
    lt = cfg.MODEL.LONG_TAIL
    if lt.OBJECTNESS:  # CE over the C classes + objectness = Seesaw with p = q = 0
        return SeesawLoss(_num_classes(cfg), p=0.0, q=0.0, eps=lt.SEESAW.EPS,
                          loss_weight=lt.LOSS_WEIGHT)
    return CrossEntropyLoss(_num_classes(cfg), loss_weight=lt.LOSS_WEIGHT)


def _seesaw(cfg):
    lt = cfg.MODEL.LONG_TAIL
    return SeesawLoss(_num_classes(cfg), p=lt.SEESAW.P, q=lt.SEESAW.Q, eps=lt.SEESAW.EPS,
                      loss_weight=lt.LOSS_WEIGHT)


def _ecm(cfg):
    lt = cfg.MODEL.LONG_TAIL
    counts = class_statistics(cfg, ecm_statistic(cfg)) if statistics_from_train(cfg) else None
    return ECMLoss(counts, fg_bg_ratio=lt.ECM.FG_BG_RATIO, loss_weight=lt.LOSS_WEIGHT,
                   num_classes=_num_classes(cfg), weight_dtype=lt.ECM.WEIGHT_DTYPE)


def _federated(cfg):
    lt = cfg.MODEL.LONG_TAIL
    counts = class_statistics(cfg, "image_count") if statistics_from_train(cfg) else None
    return FederatedLoss(counts, num_sampled_classes=lt.FEDERATED.NUM_CLASSES,
                         freq_weight_power=lt.FEDERATED.FREQ_WEIGHT_POWER,
                         loss_weight=lt.LOSS_WEIGHT, num_classes=_num_classes(cfg))


def _eql_like(loss_class, node):
    """EQL or DropLoss: image frequencies of DATASETS.TRAIN, lambda_ from its config node."""
    def build(cfg):
        lt = cfg.MODEL.LONG_TAIL
        freq = class_statistics(cfg, "image_frequency") if statistics_from_train(cfg) else None
        return loss_class(freq, lambda_=lt[node].LAMBDA_, prior_prob=lt.PRIOR_PROB,
                          loss_weight=lt.LOSS_WEIGHT, num_classes=_num_classes(cfg))
    return build


def _eqlv2(cfg):
    lt = cfg.MODEL.LONG_TAIL
    return EQLv2Loss(_num_classes(cfg), gamma=lt.EQLV2.GAMMA, mu=lt.EQLV2.MU, alpha=lt.EQLV2.ALPHA,
                     prior_prob=lt.PRIOR_PROB, loss_weight=lt.LOSS_WEIGHT)


def _gol(cfg):
    lt = cfg.MODEL.LONG_TAIL
    freq = class_statistics(cfg, "image_frequency") if statistics_from_train(cfg) else None
    return GumbelLoss(freq, lambda_=lt.GOL.LAMBDA_, clamp=lt.GOL.LOGIT_CLAMP,
                      bias_init=lt.GOL.BIAS_INIT, weight_init=lt.GOL.WEIGHT_INIT,
                      loss_weight=lt.LOSS_WEIGHT, num_classes=_num_classes(cfg))


def _bags(cfg):
    lt = cfg.MODEL.LONG_TAIL
    counts = class_statistics(cfg, "instance_count") if statistics_from_train(cfg) else None
    return BalancedGroupSoftmax(counts, beta=lt.BAGS.BETA, bin_split=lt.BAGS.BIN_SPLIT,
                                loss_weight=lt.LOSS_WEIGHT, num_classes=_num_classes(cfg))


def _loce(cfg):
    if cfg.MODEL.ROI_HEADS.NAME != "LOCEROIHeads":
        raise SeesawEcmError('MODEL.LONG_TAIL.LOSS "loce" needs MODEL.ROI_HEADS.NAME '
                             '"LOCEROIHeads" (it updates the mean scores and replays features).')
    lt = cfg.MODEL.LONG_TAIL
    return EquilibriumLoss(_num_classes(cfg), momentum=lt.LOCE.MOMENTUM,
                           initial_score=lt.LOCE.INITIAL_SCORE,
                           background_score=lt.LOCE.BACKGROUND_SCORE, loss_weight=lt.LOSS_WEIGHT)


# MODEL.LONG_TAIL.LOSS -> how to build it. "ce" and "cosine_ce" are the same loss; the names
# differ in the classifier the predictor gives them.
LOSS_SPECS = {
    "ce": LossSpec(_cross_entropy, "optional", "linear"),
    "cosine_ce": LossSpec(_cross_entropy, "optional", "cosine"),
    "federated": LossSpec(_federated, "forbidden", "linear"),
    "seesaw": LossSpec(_seesaw, "required", "cosine"),
    "ecm": LossSpec(_ecm, "forbidden", "cosine"),
    "eql": LossSpec(_eql_like(EQLLoss, "EQL"), "forbidden", "linear"),
    "eqlv2": LossSpec(_eqlv2, "forbidden", "linear"),
    "droploss": LossSpec(_eql_like(DropLoss, "DROPLOSS"), "forbidden", "linear"),
    "gol": LossSpec(_gol, "forbidden", "linear"),
    "bags": LossSpec(_bags, "forbidden", "linear"),
    "loce": LossSpec(_loce, "forbidden", "linear"),
}


def loss_spec(cfg):
    """The LOSS_SPECS row of MODEL.LONG_TAIL.LOSS, checked against OBJECTNESS."""
    lt = cfg.MODEL.LONG_TAIL
    if lt.LOSS not in LOSS_SPECS:
        raise SeesawEcmError(
            f"MODEL.LONG_TAIL.LOSS: Unknown loss {lt.LOSS!r}; valid choices: {sorted(LOSS_SPECS)}")
    spec = LOSS_SPECS[lt.LOSS]
    if (spec.objectness == "required" and not lt.OBJECTNESS) or (
            spec.objectness == "forbidden" and lt.OBJECTNESS):
        need = {k: v.objectness for k, v in LOSS_SPECS.items()}
        required = ", ".join(f"{k!r} needs OBJECTNESS True" for k, v in need.items()
                             if v == "required")
        allowed = sorted(k for k, v in need.items() if v != "forbidden")
        forbidden = sorted(k for k, v in need.items() if v == "forbidden")
        raise SeesawEcmError(
            f"MODEL.LONG_TAIL.LOSS {lt.LOSS!r} with OBJECTNESS {lt.OBJECTNESS} is not a valid "
            f"combination: {required}; OBJECTNESS True works with {allowed}; {forbidden} need "
            "OBJECTNESS False.")
    return spec


def build_cls_loss(cfg):
    """The classification loss module that MODEL.LONG_TAIL selects (statistics included)."""
    return loss_spec(cfg).build(cfg)


def uses_cosine_classifier(cfg):
    """Whether MODEL.LONG_TAIL (LOSS, CLASSIFIER) asks for the cosine classifier."""
    lt = cfg.MODEL.LONG_TAIL
    if lt.CLASSIFIER not in CLASSIFIERS:
        raise SeesawEcmError(
            f"MODEL.LONG_TAIL.CLASSIFIER {lt.CLASSIFIER!r}: valid choices are {CLASSIFIERS}")
    if lt.CLASSIFIER == "auto":
        return loss_spec(cfg).classifier == "cosine"
    return lt.CLASSIFIER == "cosine"
