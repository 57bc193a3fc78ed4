"""InstaBoost (Fang et al., ICCV 2019) for the training mapper (INPUT.INSTABOOST), through PyPI's
`instaboostfast` as mmdetection's InstaBoost pipeline step: with probability AUG_RATIO an image's
instances are cut out, the holes inpainted, and the instances pasted back moved, scaled, rotated
(and flipped, per ACTION_PROB), their polygons and boxes recomputed; then a colour jitter with
probability COLOR_PROB.

`instaboostfast` needs numpy, OpenCV (the headless build is enough), scipy, scikit-image,
pycocotools and Pillow at runtime; tools/install installs it without its declared dependencies,
which would pull a second OpenCV (opencv-python). Its mask-to-polygon step fails on numpy >= 1.24
for a mask of several parts (see `mask_to_polygons`); importing it through
`import_instaboostfast` puts the fixed step in its place.
"""
import numpy as np
from detectron2.structures import BoxMode

from ..errors import SeesawEcmError


def mask_to_polygons(mask, tolerance=0):
    """instaboostfast 0.1.2's `binary_mask_to_polygon` (COCO polygons of a binary (H, W) mask:
    one per contour, >= 3 points, coordinates >= 0), without its `np.subtract(contours, 1)`
    over the list of contours, which numpy >= 1.24 refuses when they differ in length (a mask
    in several parts, e.g. an occluded instance: every such image would raise ValueError)."""
    from instaboostfast.pycococreater import close_contour
    from skimage import measure

    polygons = []
    for contour in measure.find_contours(np.pad(mask, 1), 0.5):
        contour = measure.approximate_polygon(close_contour(contour - 1), tolerance)
        if len(contour) >= 3:
            polygons.append([max(v, 0) for v in np.flip(contour, axis=1).ravel().tolist()])
    return polygons


def import_instaboostfast():
    """The `instaboostfast` module, with `mask_to_polygons` in place of its polygon step, or
    SeesawEcmError saying how to install it."""
    try:
        import instaboostfast
        from instaboostfast import affine_transform
    except ImportError as e:
        raise SeesawEcmError(
            f"INPUT.INSTABOOST.ENABLED needs the package instaboostfast ({e}); run "
            "tools/install/install.sh (it installs instaboostfast and its dependencies without "
            "a second OpenCV) or turn INPUT.INSTABOOST.ENABLED off.") from None
    affine_transform.binary_mask_to_polygon = mask_to_polygons  # the module's own name for it
    return instaboostfast


class InstaBoost:
    """Callable (image (H, W, 3) uint8, detectron2 annotation dicts) -> the same, augmented with
    probability `aug_ratio`. Images whose annotations are not all polygons (RLE masks) or that
    have none are left as they are (instaboostfast reads polygons). Returned boxes are XYWH_ABS;
    instances pushed out of the image are dropped."""

    def __init__(self, aug_ratio=0.5, **config):
        """config: instaboostfast.InstaBoostConfig's arguments (action_candidate, action_prob,
        scale, dx, dy, theta, color_prob, heatmap_flag)."""
        self._lib = import_instaboostfast()
        self.aug_ratio = aug_ratio
        self.config = self._lib.InstaBoostConfig(**config)

    @classmethod
    def from_cfg(cls, cfg):
        """From INPUT.INSTABOOST, or None when it is off."""
        ib = cfg.INPUT.INSTABOOST
        if not ib.ENABLED:
            return None
        return cls(ib.AUG_RATIO, action_candidate=tuple(ib.ACTION_CANDIDATE),
                   action_prob=tuple(ib.ACTION_PROB), scale=tuple(ib.SCALE), dx=ib.DX,
                   dy=ib.DY, theta=tuple(ib.THETA), color_prob=ib.COLOR_PROB,
                   heatmap_flag=ib.HEATMAP)

    def __call__(self, image, annotations):
        if (not annotations or np.random.rand() >= self.aug_ratio
                or not all(isinstance(a.get("segmentation"), list) for a in annotations)):
            return image, annotations
        anns = [dict(a, bbox=BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYWH_ABS),
                     bbox_mode=BoxMode.XYWH_ABS) for a in annotations]
        anns, image = self._lib.get_new_data(anns, image.astype(np.uint8), self.config)
        return image, [a for a in anns if a["bbox"][2] > 0 and a["bbox"][3] > 0]
