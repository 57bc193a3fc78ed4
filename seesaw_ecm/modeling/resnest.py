"""ResNeSt (Zhang et al. 2020; the LVIS 2020 entry's ResNeSt-200 + DCNv2) as a detectron2
backbone: timm's implementation (`timm.create_model(name, features_only=True)`), not a copy.

Outputs res2..res5 (strides 4, 8, 16, 32), so detectron2's FPN and this project's FPG take it as
they take detectron2's ResNet. What the wrapper adds to timm's network, in this order:
- pretrained weights from a local file (read by timm, checked strictly: the hubs timm downloads
  from are unreachable here);
- DCNv2 in chosen stages, where mmdetection's ResNeSt puts it (`SplitAttentionConv2d.conv` with
  `stage_with_dcn`): in every block of such a stage the grouped 3x3 conv inside the
  split-attention module (timm: `blockN.conv2.conv`, radix x cardinality groups, the block's
  only spatial conv) becomes a ModulatedDeformConvPack with the same weights. The attention
  branch (pooling, fc1, fc2) is untouched, as in mmdetection;
- detectron2's normalization choices and MODEL.BACKBONE.FREEZE_AT.
timm is imported when a ResNeSt is built, so the rest of seesaw_ecm works without it.
"""
import os

from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from torch import nn

from ..errors import SeesawEcmError
from .deform_conv import ModulatedDeformConvPack

# MODEL.RESNEST.DEPTH -> timm model (the ResNeSt paper's networks; 'd' / 'e' = deep stem of
# width 32 / 64, average-pool downsampling)
TIMM_RESNEST = {14: "resnest14d", 26: "resnest26d", 50: "resnest50d", 101: "resnest101e",
                200: "resnest200e", 269: "resnest269e"}
STAGES = ("res2", "res3", "res4", "res5")  # timm's layer1..layer4


def _to_naive_sync_bn(module):
    """Every BatchNorm2d of `module` -> detectron2's NaiveSyncBatchNorm(stats_mode="N"), values
    kept: "SyncBN" on CPU process groups (seesaw_ecm.distributed.sync_bn_on_cpu), as
    detectron2's get_norm("naiveSyncBN_N") for its own layers."""
    if isinstance(module, nn.BatchNorm2d):
        naive = NaiveSyncBatchNorm(module.num_features, eps=module.eps, momentum=module.momentum,
                                   affine=module.affine, stats_mode="N")
        naive.load_state_dict(module.state_dict())
        return naive
    for name, child in module.named_children():
        setattr(module, name, _to_naive_sync_bn(child))
    return module


# MODEL.RESNEST.NORM -> conversion of the BatchNorm2d layers timm builds (keeping their values)
NORM_CONVERSIONS = {
    "BN": lambda module: module,
    "FrozenBN": FrozenBatchNorm2d.convert_frozen_batchnorm,
    "SyncBN": nn.SyncBatchNorm.convert_sync_batchnorm,
    "naiveSyncBN_N": _to_naive_sync_bn,
}


def _create_timm_model(name, out_indices, weights):
    try:
        import timm
    except ImportError as e:
        raise SeesawEcmError(
            f"ResNeSt backbones need timm ({e}): run tools/install/install.sh, or "
            "`pip install --no-deps timm==1.0.31` (tools/install/requirements.lock).") from e
    if weights and not os.path.isfile(weights):
        raise SeesawEcmError(
            f"MODEL.RESNEST.WEIGHTS: no file {weights!r}. Copy timm's ImageNet weights of {name} "
            f"(e.g. model.safetensors of timm/{name}.in1k on the Hugging Face hub) to this "
            "machine and give its path, or set MODEL.RESNEST.WEIGHTS \"\" (random init).")
    body = timm.create_model(name, features_only=True, out_indices=out_indices)
    if weights:
        # timm's reader (.safetensors, .pth / .bin, EMA or wrapped state dicts). Not timm's
        # pretrained= path: with features_only it loads non-strictly and only logs missing keys.
        # Here every tensor of the backbone must come from the file (its classifier and the
        # stages after the last output are left over).
        try:
            missing = body.load_state_dict(timm.models.load_state_dict(weights), strict=False)[0]
        except RuntimeError as e:  # shapes differ
            missing = [str(e)[:500]]
        if missing:
            raise SeesawEcmError(f"MODEL.RESNEST.WEIGHTS {weights!r} does not fit timm's {name} "
                                 f"(MODEL.RESNEST.DEPTH); missing or different: {missing[:5]}")
    return body


class ResNeSt(Backbone):
    """timm's ResNeSt with detectron2's backbone interface.

    forward(x (N, 3, H, W)) -> {name: (N, C, ceil(H / s), ceil(W / s))} for the names in
    out_features (res2..res5: C = 256, 512, 1024, 2048; s = 4, 8, 16, 32).
    """

    def __init__(self, depth, out_features=STAGES, deform_on_per_stage=(False,) * 4,
                 norm="FrozenBN", freeze_at=0, weights=""):
        """
        Args:
            depth: a key of TIMM_RESNEST.
            deform_on_per_stage: 4 booleans (res2..res5): DCNv2 in every block of the stage.
            norm: a key of NORM_CONVERSIONS.
            freeze_at: as detectron2's ResNet: 0 = nothing frozen, 1 = the stem, k = the stem
                and res2..res{k} (parameters fixed, BatchNorm as FrozenBatchNorm2d).
            weights: a timm state dict file (.pth, .bin, .safetensors) of the same network;
                "" = random initialisation.
        """
        super().__init__()
        if depth not in TIMM_RESNEST:
            raise SeesawEcmError(f"MODEL.RESNEST.DEPTH {depth} is not one of {list(TIMM_RESNEST)}.")
        if not out_features or set(out_features) - set(STAGES):
            raise SeesawEcmError(f"MODEL.RESNEST.OUT_FEATURES {list(out_features)}: choose "
                                 f"among {list(STAGES)}.")
        if len(deform_on_per_stage) != len(STAGES):
            raise SeesawEcmError("MODEL.RESNEST.DEFORM_ON_PER_STAGE needs 4 booleans (res2..res5),"
                                 f" got {list(deform_on_per_stage)}.")
        if norm not in NORM_CONVERSIONS:
            raise SeesawEcmError(f"MODEL.RESNEST.NORM {norm!r}: use one of "
                                 f"{list(NORM_CONVERSIONS)} (the BatchNorm layers keep their "
                                 "pretrained statistics).")
        self._out_features = [s for s in STAGES if s in out_features]
        indices = tuple(STAGES.index(s) + 1 for s in self._out_features)  # timm's 0 = the stem
        self.body = _create_timm_model(TIMM_RESNEST[depth], indices, weights)
        info = self.body.feature_info
        self._out_feature_channels = dict(zip(self._out_features, info.channels()))
        self._out_feature_strides = dict(zip(self._out_features, info.reduction()))
        for k, deform in enumerate(deform_on_per_stage, start=1):
            layer = getattr(self.body, f"layer{k}", None)  # None: after the last output
            if deform and layer is not None:
                for block in layer:
                    block.conv2.conv = ModulatedDeformConvPack.from_conv(block.conv2.conv)
        self.body = NORM_CONVERSIONS[norm](self.body)
        self.freeze(freeze_at)

    def freeze(self, freeze_at):
        """Fix the stem (freeze_at >= 1) and res2..res{freeze_at} (see __init__)."""
        names = (["conv1", "bn1"] if freeze_at >= 1 else []) + [
            f"layer{k}" for k in range(1, freeze_at)]
        for name in names:
            if hasattr(self.body, name):
                self._freeze_child(name)
        return self

    def _freeze_child(self, name):
        child = getattr(self.body, name)
        for p in child.parameters():
            p.requires_grad_(False)
        setattr(self.body, name, FrozenBatchNorm2d.convert_frozen_batchnorm(child))

    def forward(self, x):
        return dict(zip(self._out_features, self.body(x)))


@BACKBONE_REGISTRY.register()
def build_resnest_backbone(cfg, input_shape):
    """ResNeSt from MODEL.RESNEST and MODEL.BACKBONE.FREEZE_AT (3-channel input)."""
    c = cfg.MODEL.RESNEST
    if input_shape.channels != 3:
        raise SeesawEcmError(f"ResNeSt takes 3-channel images, got {input_shape.channels} "
                             "(MODEL.PIXEL_MEAN).")
    return ResNeSt(c.DEPTH, out_features=c.OUT_FEATURES,
                   deform_on_per_stage=c.DEFORM_ON_PER_STAGE, norm=c.NORM,
                   freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT, weights=c.WEIGHTS)


@BACKBONE_REGISTRY.register()
def build_resnest_fpn_backbone(cfg, input_shape):
    """detectron2's build_resnet_fpn_backbone with the ResNeSt bottom-up (MODEL.FPN keys)."""
    return FPN(bottom_up=build_resnest_backbone(cfg, input_shape),
               in_features=cfg.MODEL.FPN.IN_FEATURES, out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
               norm=cfg.MODEL.FPN.NORM, top_block=LastLevelMaxPool(),
               fuse_type=cfg.MODEL.FPN.FUSE_TYPE)
