"""CARAFE (Content-Aware ReAssembly of FEatures, Wang et al. ICCV 2019) in plain PyTorch, an FPN
whose top-down path upsamples with it (BACKBONE.NAME "build_resnet_fpn_carafe_backbone") and, with
MODEL.CARAFE.MASK_HEAD, the mask head's upsampler in place of its deconvolution.

mmcv has CARAFE only as a compiled op; this is the same computation with unfold and einsum, so
it runs wherever torch does. Memory: the unfolded input holds C x k^2 values per input pixel
(at P2 of a 1333 x 800 image, 256 channels, k = 5: about 0.4 GB fp32 per image, and einsum
copies it once more), so the input is processed in chunks of rows under a size limit, and in
training each chunk is recomputed in the backward pass instead of kept (activation
checkpointing); the result is the same as in one piece.
"""
import torch
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import SeesawEcmError
from .deform_conv import build_resnet_dcn_backbone


def carafe(x, kernels, kernel_size, scale, chunk_bytes=None):
    """Reassemble x with per-output-pixel kernels.

    out[n, c, i, j] = sum over (a, b) in k x k of kernels[n, g, a * k + b, i, j] *
    x[n, c, i // scale + a - k // 2, j // scale + b - k // 2] (zero outside x), g = the group of
    channel c (C / G channels per group).

    Args:
        x: (N, C, H, W) features.
        kernels: (N, G * k * k, scale * H, scale * W) reassembly kernels (normalized by the
            caller).
        chunk_bytes: upper bound on the bytes of the unfolded input of one chunk of rows;
            None = all rows at once.
    Returns: (N, C, scale * H, scale * W).
    """
    n, c, h, w = x.shape
    k2 = kernel_size * kernel_size
    groups = kernels.shape[1] // k2
    pad = kernel_size // 2
    x_pad = F.pad(x, (pad, pad, pad, pad))
    row_bytes = n * c * k2 * w * x.element_size()
    rows = h if chunk_bytes is None else max(1, min(h, chunk_bytes // max(row_bytes, 1)))

    def reassemble(x_rows, kernels_rows):
        r = x_rows.shape[2] - 2 * pad
        cols = F.unfold(x_rows, kernel_size).view(n, groups, c // groups, k2, r, w)
        kern = kernels_rows.reshape(n, groups, k2, r, scale, w, scale)
        out = torch.einsum("ngckhw,ngkhawb->ngchawb", cols, kern)
        return out.reshape(n, c, r * scale, w * scale)

    outputs = []
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        args = (x_pad[:, :, r0:r1 + 2 * pad], kernels[:, :, r0 * scale:r1 * scale])
        if rows < h and torch.is_grad_enabled():  # keep only the inputs of each chunk
            outputs.append(checkpoint(reassemble, *args, use_reentrant=False))
        else:
            outputs.append(reassemble(*args))
    return torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]


class CARAFEPack(nn.Module):
    """CARAFE upsampler as mmcv's CARAFEPack: a 1x1 channel compressor, a content encoder conv
    predicting scale^2 kernels of k x k per input pixel (per group), pixel shuffle, a softmax over
    each kernel's k x k taps, then :func:`carafe`.

    (N, C, H, W) -> (N, C, scale * H, scale * W).
    """

    def __init__(self, channels, scale=2, up_kernel=5, up_group=1, encoder_kernel=3,
                 compressed_channels=64, chunk_bytes=None):
        super().__init__()
        self.scale, self.up_kernel, self.chunk_bytes = scale, up_kernel, chunk_bytes
        self.channel_compressor = nn.Conv2d(channels, compressed_channels, 1)
        self.content_encoder = nn.Conv2d(compressed_channels,
                                         up_kernel * up_kernel * up_group * scale * scale,
                                         encoder_kernel, padding=(encoder_kernel - 1) // 2)
        # mmcv's init: xavier uniform, content encoder normal(0.001) (near-uniform kernels)
        for conv in (self.channel_compressor, self.content_encoder):
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
        nn.init.normal_(self.content_encoder.weight, std=0.001)

    def kernels(self, x):
        """(N, C, H, W) -> softmax-normalized kernels (N, G * k * k, scale * H, scale * W)."""
        encoded = self.content_encoder(self.channel_compressor(x))
        # F.pixel_shuffle as a view + permute: torch's pixel_shuffle backward returns a wrongly
        # shaped gradient for an empty batch (a mask head on an image batch without foreground)
        n, gks, h, w = encoded.shape
        s = self.scale
        gk = gks // (s * s)
        kernels = encoded.view(n, gk, s, s, h, w).permute(0, 1, 4, 2, 5, 3).reshape(
            n, gk, h * s, w * s)
        k2 = self.up_kernel * self.up_kernel
        return kernels.view(n, gk // k2, k2, h * s, w * s).softmax(dim=2).view(
            n, gk, h * s, w * s)

    def forward(self, x):
        return carafe(x, self.kernels(x), self.up_kernel, self.scale, self.chunk_bytes)


class CARAFEFPN(FPN):
    """detectron2's FPN with a CARAFEPack (one per top-down step) in place of the nearest
    upsampling of the top-down path, as mmdetection's FPN_CARAFE."""

    def __init__(self, *args, carafe_kwargs=None, **kwargs):
        super().__init__(*args, **kwargs)
        channels = self.lateral_convs[0].out_channels
        self.upsamplers = nn.ModuleList(CARAFEPack(channels, **(carafe_kwargs or {}))
                                        for _ in self.lateral_convs[1:])

    def forward(self, x):
        bottom_up = self.bottom_up(x)
        # lateral/output convs are ordered from the coarsest input level to the finest
        prev = self.lateral_convs[0](bottom_up[self.in_features[-1]])
        results = [self.output_convs[0](prev)]
        for name, lateral, output, upsample in zip(
                self.in_features[-2::-1], self.lateral_convs[1:], self.output_convs[1:],
                self.upsamplers):
            prev = lateral(bottom_up[name]) + upsample(prev)
            if self._fuse_type == "avg":
                prev = prev / 2
            results.insert(0, output(prev))
        if self.top_block is not None:
            name = self.top_block.in_feature
            source = (bottom_up[name] if name in bottom_up
                      else results[self._out_features.index(name)])
            results.extend(self.top_block(source))
        return dict(zip(self._out_features, results))


def carafe_kwargs(cfg):
    """CARAFEPack arguments from MODEL.CARAFE."""
    c = cfg.MODEL.CARAFE
    return {"up_kernel": c.UP_KERNEL, "encoder_kernel": c.ENCODER_KERNEL,
            "compressed_channels": c.COMPRESSED_CHANNELS,
            "chunk_bytes": c.CHUNK_MB * 2 ** 20 if c.CHUNK_MB > 0 else None}


@BACKBONE_REGISTRY.register()
def build_resnet_fpn_carafe_backbone(cfg, input_shape):
    """build_resnet_fpn_backbone with CARAFE upsampling in the top-down path (the ResNet of
    build_resnet_dcn_backbone: deformable blocks also without detectron2's compiled ops)."""
    return CARAFEFPN(
        bottom_up=build_resnet_dcn_backbone(cfg, input_shape),
        in_features=cfg.MODEL.FPN.IN_FEATURES, out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM, top_block=LastLevelMaxPool(), fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
        carafe_kwargs=carafe_kwargs(cfg))


def with_carafe_upsampling(mask_head, **carafe_kwargs):
    """`mask_head` (returned, changed in place) with its 2x deconvolution (`deconv` of
    MaskRCNNConvUpsampleHead and its subclasses) replaced by a CARAFEPack (MODEL.CARAFE.MASK_HEAD),
    as mmdetection's FCNMaskHead with upsample_cfg carafe; the ReLU after it stays.
    carafe_kwargs: as CARAFEPack (e.g. :func:`carafe_kwargs` of a cfg)."""
    if not isinstance(getattr(mask_head, "deconv", None), nn.ConvTranspose2d):
        raise SeesawEcmError(
            f"MODEL.CARAFE.MASK_HEAD replaces the ConvTranspose2d `deconv` of the mask "
            f"head; {type(mask_head).__name__} has none. Switch it off or use "
            "MaskRCNNConvUpsampleHead / NormedMaskRCNNConvUpsampleHead.")
    # same name, so the nn.Sequential head keeps its layer order
    mask_head.deconv = CARAFEPack(mask_head.deconv.in_channels, **carafe_kwargs)
    return mask_head
