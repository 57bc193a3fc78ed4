"""Mask head with a normalized (cosine) 1x1 predictor, as in the Seesaw / ECM "normed mask"
configs."""
from detectron2.config import configurable
from detectron2.modeling.roi_heads.mask_head import ROI_MASK_HEAD_REGISTRY, MaskRCNNConvUpsampleHead

from ..layers import NormedConv2d


@ROI_MASK_HEAD_REGISTRY.register()
class NormedMaskRCNNConvUpsampleHead(MaskRCNNConvUpsampleHead):
    """MaskRCNNConvUpsampleHead whose predictor is a NormedConv2d: per-pixel cosine similarity
    of the (R, D, 2S, 2S) mask features with each class's weight, times a temperature."""

    @configurable
    def __init__(self, input_shape, *, num_classes, conv_dims, temperature=20.0, **kwargs):
        super().__init__(input_shape, num_classes=num_classes, conv_dims=conv_dims, **kwargs)
        in_channels = self.predictor.in_channels
        self.predictor = NormedConv2d(in_channels, self.predictor.out_channels, kernel_size=1,
                                      temperature=temperature)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["temperature"] = cfg.MODEL.ROI_MASK_HEAD.NORMED_TEMPERATURE
        return ret
