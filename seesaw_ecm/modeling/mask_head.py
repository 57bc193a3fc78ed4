"""Mask head with a normalized (cosine) 1x1 predictor, as in the Seesaw / ECM "normed mask"
configs, and the options every ROI heads class of the project composes around its mask head
(:func:`with_mask_options`)."""
from torch import nn

from detectron2.config import configurable
from detectron2.modeling.roi_heads.mask_head import ROI_MASK_HEAD_REGISTRY, MaskRCNNConvUpsampleHead

from ..layers import NormedConv2d
from .carafe import carafe_kwargs, with_carafe_upsampling
from .mask_scoring import build_mask_scoring_head

NORMED_INITS = ("pytorch", "kaiming_normal")  # MODEL.ROI_MASK_HEAD.NORMED_INIT


@ROI_MASK_HEAD_REGISTRY.register()
class NormedMaskRCNNConvUpsampleHead(MaskRCNNConvUpsampleHead):
    """MaskRCNNConvUpsampleHead whose predictor is a NormedConv2d: per-pixel cosine similarity
    of the (R, D, 2S, 2S) mask features with each class's weight, times a temperature.

    ``init`` "kaiming_normal" starts the predictor as the official one (mmdetection's
    FCNMaskHead.init_weights: kaiming normal weights, mode fan_out, relu gain; zero bias);
    "pytorch" keeps nn.Conv2d's own initialization."""

    @configurable
    def __init__(self, input_shape, *, num_classes, conv_dims, temperature=20.0, init="pytorch",
                 **kwargs):
        super().__init__(input_shape, num_classes=num_classes, conv_dims=conv_dims, **kwargs)
        in_channels = self.predictor.in_channels
        self.predictor = NormedConv2d(in_channels, self.predictor.out_channels, kernel_size=1,
                                      temperature=temperature)
        if init not in NORMED_INITS:
            raise ValueError(f"init {init!r}: valid choices are {NORMED_INITS}")
        if init == "kaiming_normal":
            nn.init.kaiming_normal_(self.predictor.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(self.predictor.bias)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["temperature"] = cfg.MODEL.ROI_MASK_HEAD.NORMED_TEMPERATURE
        ret["init"] = cfg.MODEL.ROI_MASK_HEAD.NORMED_INIT
        return ret


def with_mask_options(cfg, mask_head, input_shape):
    """`mask_head` (built by detectron2's build_mask_head) with the options of cfg, in this
    order: MODEL.CARAFE.MASK_HEAD's CARAFE upsampler in place of its deconvolution, then
    MODEL.MASK_SCORING.ON's MaskScoringHead around it. input_shape: the ROI heads' input,
    {feature name: ShapeSpec}. Each option is off by default; with none on, `mask_head`."""
    if cfg.MODEL.CARAFE.MASK_HEAD:
        mask_head = with_carafe_upsampling(mask_head, **carafe_kwargs(cfg))
    if cfg.MODEL.MASK_SCORING.ON:
        mask_head = build_mask_scoring_head(cfg, mask_head, input_shape)
    return mask_head
