"""RoI features of one box stage, pooled when the box predictor asks for them: at the RoIs by
the ROI heads' pooler, or (TSD) with learned offsets of each output bin.

The offset pooling is TSD's deformable RoI pooling (mmdetection 1.x's custom CUDA op in the
official code) on `torch.nn.functional.grid_sample`, which runs on CPU and CUDA and passes
gradients to the sampling points, hence to the offsets; torchvision's roi_align passes none to
its boxes, so it cannot train them.
"""
import torch
from detectron2.modeling.poolers import assign_boxes_to_levels, convert_boxes_to_pooler_format
from torch.nn import functional as F


def deformable_roi_align(features, scales, rois, levels, offsets, sampling_ratio=2):
    """RoIAlign (detectron2's aligned convention) whose P x P bins each move by an offset.

    Bin (i, j) of RoI r is the RoI's bin moved by (offsets[r, i, j, 0] * w, offsets[r, i, j, 1]
    * h), w and h the RoI's size; its value is the mean of sampling_ratio^2 bilinear samples,
    evenly spread in the moved bin (zero outside the map). With zero offsets this is
    ``torchvision.ops.roi_align(aligned=True)`` with the same sampling ratio, inside the map.

    Args:
        features: list of L maps (B, C, Hl, Wl).
        scales: L spatial scales (1 / stride).
        rois: (R, 5) [image index, x0, y0, x1, y1] in image pixels.
        levels: (R,) int64, the map each RoI is pooled from.
        offsets: (R, P, P, 2) (dx, dy) per bin, in units of the RoI's width and height.
        sampling_ratio: S, samples per bin side.

    Returns:
        (R, C, P, P).
    """
    num, side = len(rois), offsets.shape[1]
    fine = side * sampling_ratio  # sampling grid: S x S points per bin
    steps = (torch.arange(fine, device=rois.device, dtype=rois.dtype) + 0.5) / fine
    start, size = rois[:, 1:3], rois[:, 3:5] - rois[:, 1:3]  # (R, 2) as (x, y)
    moved = offsets.repeat_interleave(sampling_ratio, 1).repeat_interleave(sampling_ratio, 2)
    grid = torch.stack(torch.meshgrid(steps, steps, indexing="xy"), dim=-1)  # (fine, fine, 2)
    points = start[:, None, None] + (grid + moved) * size[:, None, None]  # (R, fine, fine, 2)
    out = None
    for level, (x, scale) in enumerate(zip(features, scales)):
        for image in range(x.shape[0]):
            index = torch.nonzero((levels == level) & (rois[:, 0] == image)).flatten()
            if not len(index):
                continue
            # grid_sample (align_corners False) reads -1 / +1 at the outer edges of the map, so
            # image point p is at 2 p * scale / size - 1 (the RoIAlign pixel centres)
            wh = points.new_tensor([x.shape[3], x.shape[2]])
            where = points[index] * (2 * scale / wh) - 1
            pooled = F.grid_sample(x[image:image + 1], where.reshape(1, -1, fine, 2),
                                   align_corners=False)  # (1, C, n * fine, fine)
            pooled = pooled.reshape(x.shape[1], len(index), fine, fine).transpose(0, 1)
            pooled = F.avg_pool2d(pooled, sampling_ratio)
            if out is None:
                out = pooled.new_zeros(num, x.shape[1], side, side)
            out[index] = pooled.to(out.dtype)
    if out is None:  # no RoI
        out = features[0].new_zeros(num, features[0].shape[1], side, side)
    return out


class RoIFeatures:
    """The RoI features of one box stage, pooled on demand.

    Args:
        pooler: the ROI heads' detectron2 ROIPooler (its levels, scales and level assignment).
        features: the L maps it reads, (B, C, Hl, Wl).
        boxes: per image Boxes, the RoIs.
        post: applied to every pooled (R, C, P, P) tensor, or None: what the ROI heads add to
            RoI features (HTC-Lite's context, the cascade's gradient scaling).
    """

    def __init__(self, pooler, features, boxes, post=None):
        self.pooler = pooler
        self.features = features
        self.boxes = boxes
        self.post = post

    def rois(self):
        """(R, 5) [image index, x0, y0, x1, y1]."""
        return convert_boxes_to_pooler_format(self.boxes)

    def __call__(self, offsets=None, sampling_ratio=2):
        """(R, C, P, P): the pooler's features, or with ``offsets`` (R, P, P, 2) those of
        :func:`deformable_roi_align` from the same levels."""
        if offsets is None:
            x = self.pooler(self.features, self.boxes)
        else:
            p = self.pooler
            levels = assign_boxes_to_levels(self.boxes, p.min_level, p.max_level,
                                            p.canonical_box_size, p.canonical_level)
            scales = [level.spatial_scale for level in p.level_poolers]
            x = deformable_roi_align(self.features, scales, self.rois(), levels, offsets,
                                     sampling_ratio)
        return x if self.post is None else self.post(x)
