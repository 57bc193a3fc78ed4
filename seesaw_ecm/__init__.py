"""seesaw_ecm: Seesaw Loss and ECM loss for long-tailed instance segmentation in Detectron2.

Importing the package registers its parts with detectron2 (ROI heads, mask head, backbones,
the built-in synthetic datasets); it changes nothing of detectron2's own. `seesaw_ecm.losses`
and `seesaw_ecm.layers` are plain PyTorch and also work where detectron2 is not installed.
"""
try:
    import detectron2  # noqa: F401
except ImportError:  # only the framework-free parts (losses, layers) are usable
    __all__ = []
else:
    from . import modeling  # noqa: F401  (registers the ROI heads, mask head, backbones)
    from .config import add_seesaw_ecm_config
    from .data import datasets as _datasets  # noqa: F401  (registers the synthetic set)

    __all__ = ["add_seesaw_ecm_config"]
