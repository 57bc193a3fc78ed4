"""RoIAlign with a vectorized CPU backward: torchvision's forward, the same gradient faster.

torchvision's CPU ``_roi_align_backward`` recomputes every sample's bilinear weights once per
channel and adds them one scalar at a time; on the demo's cascade it took 18% of a training
iteration, 5-8x its own forward on the same RoIs (docs/BENCHMARKS.md "Where a CPU
iteration's time goes").
No maintained library has a faster CPU kernel, so the gradient is written here with torch ops:
RoIAlign's weights are separable, each output bin averaging a rows x columns grid of bilinear
samples, so the gradient of one RoI is ``A^T (g / count) B`` with ``A`` (bins x H) the summed
row weights and ``B`` (bins x W) the summed column weights, and a GEMM per image adds them up.
Each weight follows torchvision's kernel exactly (its sample positions, the -1 / size limits,
the clamp at the last row and column, the adaptive grid of ``sampling_ratio <= 0``); only the
order of the additions differs, so the gradient equals torchvision's to float rounding
(tests/test_roi_align.py). The forward is torchvision's own.
"""
import torch
from detectron2.layers import ROIAlign
from torchvision.ops import roi_align


def _axis_weights(start, bin_size, grid, n_bins, size):
    """Summed bilinear weights of one axis.

    Args:
        start, bin_size: (R,) the RoIs' first coordinate and bin size on this axis, in feature
            map cells (after the scale and the ``aligned`` half-cell offset).
        grid: (R,) samples per bin on this axis (float; <= 0 means none).
        n_bins: output bins on this axis; size: the feature map's size on this axis.
    Returns:
        (R, n_bins, size): the weight of every cell summed over the bin's samples, as
        torchvision's ``bilinear_interpolate_gradient`` gives them.
    """
    dtype = start.dtype
    samples = torch.arange(max(int(grid.max().item()), 1), dtype=dtype)
    bins = torch.arange(n_bins, dtype=dtype)
    step = bin_size[:, None, None]
    # the kernel's order of operations: (start + bin * size) + (i + 0.5) * size / grid
    pos = (start[:, None, None] + bins[None, :, None] * step) + (
        (samples + 0.5)[None, None, :] * step / grid.clamp(min=1)[:, None, None])
    inside = (samples[None, None, :] < grid[:, None, None]) & (pos >= -1) & (pos <= size)
    pos = pos.clamp(min=0)
    low = pos.floor()
    last = low >= size - 1  # the kernel puts both corners on the last cell, weight 1
    low = low.clamp(max=size - 1)
    high = (low + 1).clamp(max=size - 1)
    zero = torch.zeros_like(pos)
    frac = torch.where(last, zero, pos - low)
    weights = pos.new_zeros(len(start), n_bins, size)
    weights.scatter_add_(2, low.long(), torch.where(inside, 1 - frac, zero))
    weights.scatter_add_(2, high.long(), torch.where(inside, frac, zero))
    return weights


def roi_align_backward(grad, rois, input_shape, spatial_scale, sampling_ratio, aligned):
    """Gradient of ``torchvision.ops.roi_align`` with respect to its input.

    Args:
        grad: (R, C, PH, PW) gradient of the pooled output.
        rois: (R, 5) rows ``(batch index, x0, y0, x1, y1)`` in input-image coordinates.
        input_shape: (N, C, H, W) of the pooled feature map.
        spatial_scale, sampling_ratio, aligned: as given to ``roi_align``.
    Returns:
        (N, C, H, W) gradient of the feature map.
    """
    n, c, h, w = input_shape
    r, _, ph, pw = grad.shape
    out = grad.new_zeros(n, c, h, w)
    if r == 0:
        return out
    rois = rois.to(grad.dtype)
    offset = 0.5 if aligned else 0.0
    x0, y0, x1, y1 = (rois[:, i] * spatial_scale - offset for i in range(1, 5))
    roi_w, roi_h = x1 - x0, y1 - y0
    if not aligned:  # the kernel forces malformed RoIs to 1 x 1
        roi_w, roi_h = roi_w.clamp(min=1), roi_h.clamp(min=1)
    bin_h, bin_w = roi_h / ph, roi_w / pw
    if sampling_ratio > 0:
        grid_h = grid_w = torch.full_like(roi_h, sampling_ratio)
    else:
        grid_h, grid_w = torch.ceil(roi_h / ph), torch.ceil(roi_w / pw)
    rows = _axis_weights(y0, bin_h, grid_h, ph, h)     # (R, PH, H)
    cols = _axis_weights(x0, bin_w, grid_w, pw, w)     # (R, PW, W)
    count = (grid_h * grid_w).clamp(min=1)             # no samples: rows / cols are zero
    batch = rois[:, 0].long()
    if not bool((batch[1:] >= batch[:-1]).all()):  # detectron2's poolers give them sorted
        order = batch.argsort(stable=True)
        batch, grad, rows, cols, count = batch[order], grad[order], rows[order], cols[order], \
            count[order]
    # (R, PH C, PW) x (R, PW, W) -> (R, PH C, W): every bin spread over the columns
    scaled = (grad / count[:, None, None, None]).transpose(1, 2).reshape(r, ph * c, pw)
    spread = torch.bmm(scaled, cols).view(r * ph, c * w)
    rows = rows.view(r * ph, h)
    end = 0
    for i, k in enumerate(torch.bincount(batch, minlength=n).tolist()):  # the batch's images
        if k:
            start, end = end, end + k * ph
            # (H, R_i PH) x (R_i PH, C W) -> (H, C, W)
            out[i] = (rows[start:end].t() @ spread[start:end]).view(h, c, w).permute(1, 0, 2)
    return out


class _RoIAlignFunction(torch.autograd.Function):
    """torchvision's ``roi_align`` forward with ``roi_align_backward`` (no double backward)."""

    @staticmethod
    def forward(ctx, input, rois, output_size, spatial_scale, sampling_ratio, aligned):
        ctx.save_for_backward(rois)
        ctx.args = (input.shape, spatial_scale, sampling_ratio, aligned)
        return roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (rois,) = ctx.saved_tensors
        return roi_align_backward(grad, rois, *ctx.args), None, None, None, None, None


class ROIAlignVectorizedBackward(ROIAlign):
    """detectron2's ``ROIAlign`` whose backward on CPU is ``roi_align_backward``; on a GPU, in
    inference and in TorchScript it is detectron2's own (the CUDA kernel has no such cost).

    Shapes as ``ROIAlign``: input (N, C, H, W), rois (R, 5) -> (R, C, PH, PW).
    """

    def forward(self, input, rois):
        # detectron2's ROIAlign.forward written out: TorchScript cannot call super().forward
        assert rois.dim() == 2 and rois.size(1) == 5
        if input.is_quantized:
            input = input.dequantize()
        rois = rois.to(dtype=input.dtype)
        if (not torch.jit.is_scripting() and input.is_cpu and input.requires_grad
                and torch.is_grad_enabled()):
            return self._vectorized(input, rois)
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio,
                         self.aligned)

    @torch.jit.unused
    def _vectorized(self, input, rois):
        return _RoIAlignFunction.apply(input, rois, self.output_size, self.spatial_scale,
                                       self.sampling_ratio, self.aligned)


def use_vectorized_roi_align_backward(model):
    """Turn every detectron2 ``ROIAlign`` of ``model`` (its poolers' levels) into
    ``ROIAlignVectorizedBackward`` in place; returns how many."""
    found = [m for m in model.modules() if type(m) is ROIAlign]
    for m in found:
        m.__class__ = ROIAlignVectorizedBackward
    return len(found)
