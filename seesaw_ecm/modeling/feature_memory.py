"""Memory-augmented feature sampling of LOCE (Feng et al., ICCV 2021), as the official
``mmdet/models/utils/mfs.py``: per-class queues of RoI features of jittered ground-truth boxes,
from which classes with a low mean score are replayed into the box head's batch. Plain torch."""
import math

import torch

# The 16 jittered boxes of a ground-truth box: every sign pattern of (x1, y1, x2, y2), shape (4, 16)
_SIGNS = torch.tensor([[1.0 if (j >> (3 - r)) & 1 else -1.0 for j in range(16)] for r in range(4)])


def jittered_boxes(gt_boxes, image_size):
    """(G * 16, 4) boxes: each corner coordinate of each (G, 4) XYXY box moved by
    sign * u * side / 6, u ~ U(0, 1) one (4, 16) draw per call (the official per-image draw),
    side = width for x and height for y, for all 16 sign patterns; clamped to the image
    ((height, width)), box by box in the order of `gt_boxes`."""
    wh = (gt_boxes[:, 2:] - gt_boxes[:, :2]).repeat(1, 2)  # (G, 4): w, h, w, h
    signs = _SIGNS.to(gt_boxes)
    offsets = signs * torch.rand(signs.shape, device=gt_boxes.device, dtype=gt_boxes.dtype) / 6
    boxes = gt_boxes[:, :, None] + offsets[None] * wh[:, :, None]  # (G, 4, 16)
    boxes = boxes.permute(0, 2, 1).reshape(-1, 4)
    height, width = image_size
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height - 1)
    return boxes


class FeatureMemory:
    """Per-class circular queues of ``queue_size`` RoI features (with their proposal and
    ground-truth boxes, from which the regression targets follow).

    Size: C x queue_size x prod(feature_shape) x bytes per element (plus 8 floats a slot for
    the boxes): 1,203 x 80 x 256 x 7 x 7 x 4 B = 4.83 GB for LVIS in float32, half in float16.
    :meth:`nbytes` states it before anything is allocated; the tensors are allocated at the
    first :meth:`enqueue`, on ``device`` ("cpu", as the official default, or "model": the
    device of the features), by LOCE's initialisation pass when it runs. Not a module and not
    in checkpoints: a resumed run refills it within a few iterations.

    Args:
        num_classes: C.
        feature_shape: shape of one RoI feature, e.g. (256, 7, 7).
        queue_size: slots per class (80).
        sampled_classes: classes drawn per call of :meth:`sample` (8, with replacement).
        sampled_features: features drawn per drawn class (4, with replacement).
        dtype: storage dtype of the features (torch.float32 or torch.float16).
        device: "cpu" or "model".
    """

    def __init__(self, num_classes, feature_shape, queue_size=80, sampled_classes=8,
                 sampled_features=4, dtype=torch.float32, device="cpu"):
        if device not in ("cpu", "model"):
            raise ValueError(f"device must be 'cpu' or 'model', got {device!r}")
        self.num_classes = num_classes
        self.feature_shape = tuple(feature_shape)
        self.queue_size = queue_size
        self.sampled_classes = sampled_classes
        self.sampled_features = sampled_features
        self.dtype = dtype
        self.device = device
        self.features = None  # (C, Q, *feature_shape), allocated by the first enqueue
        self.boxes = None  # (C, Q, 8): proposal box, ground-truth box
        self.filled = None  # (C,) int64 slots in use
        self.pointer = None  # (C,) int64 next slot to write

    def nbytes(self):
        """Bytes the queues take once allocated."""
        slots = self.num_classes * self.queue_size
        item = torch.empty((), dtype=self.dtype).element_size()
        return slots * (math.prod(self.feature_shape) * item + 8 * 4) + 2 * self.num_classes * 8

    def _allocate(self, device):
        device = torch.device("cpu") if self.device == "cpu" else device
        c, q = self.num_classes, self.queue_size
        self.features = torch.zeros((c, q) + self.feature_shape, dtype=self.dtype, device=device)
        self.boxes = torch.zeros((c, q, 8), device=device)
        self.filled = torch.zeros(c, dtype=torch.long, device=device)
        self.pointer = torch.zeros(c, dtype=torch.long, device=device)

    @torch.no_grad()
    def enqueue(self, features, labels, proposal_boxes, gt_boxes):
        """Write each class's first ``queue_size`` new entries after its last ones, wrapping
        around (the official enqueue_dequeue), all classes at once, without a host sync: an
        entry after a class's first ``queue_size`` writes that class's entry of the same slot
        again (the same value twice), instead of being dropped.

        Args:
            features: (M, *feature_shape); labels: (M,) int64 in [0, C);
            proposal_boxes, gt_boxes: (M, 4) XYXY.
        """
        if self.features is None:
            self._allocate(features.device)
        device = self.features.device
        labels = labels.to(device)
        order = torch.sort(labels, stable=True).indices
        sorted_labels = labels[order]
        counts = torch.zeros(self.num_classes, dtype=torch.long, device=device).scatter_add_(
            0, labels, torch.ones_like(labels))  # bincount, which syncs on CUDA
        first = torch.cumsum(counts, 0) - counts  # where each class starts in `order`
        rank = torch.arange(labels.numel(), device=device) - first[sorted_labels]
        rank = rank % self.queue_size
        source = order[first[sorted_labels] + rank]  # the entry itself when rank < queue_size
        slot = (self.pointer[sorted_labels] + rank) % self.queue_size
        self.features[sorted_labels, slot] = features.to(device, self.dtype)[source]
        self.boxes[sorted_labels, slot] = torch.cat([proposal_boxes, gt_boxes], 1).to(
            device, torch.float32)[source]
        written = counts.clamp(max=self.queue_size)
        self.pointer = (self.pointer + written) % self.queue_size
        self.filled = (self.filled + written).clamp(max=self.queue_size)

    @torch.no_grad()
    def sample(self, mean_score, device):
        """Replayed entries: ``sampled_classes`` classes drawn with replacement with
        probability proportional to 1 / (mean score + 1e-7), ``sampled_features`` entries
        each drawn uniformly with replacement from the class's filled slots; drawn classes
        with an empty queue give nothing.

        Args:
            mean_score: (C + 1,) running mean scores (the background entry is not used).
            device: where the returned tensors go.
        Returns:
            features (K, *feature_shape) float32, labels (K,), proposal_boxes (K, 4),
            gt_boxes (K, 4); K = 0 before the first enqueue.
        """
        if self.features is None:
            empty = torch.zeros((0,) + self.feature_shape, device=device)
            return empty, torch.zeros(0, dtype=torch.long, device=device), \
                torch.zeros(0, 4, device=device), torch.zeros(0, 4, device=device)
        inverse = 1.0 / (mean_score[: self.num_classes].float() + 1e-7)
        classes = torch.multinomial(inverse, self.sampled_classes, replacement=True)
        classes = classes.to(self.filled.device)
        classes = classes[self.filled[classes] > 0]
        slots = (torch.rand(classes.numel(), self.sampled_features, device=classes.device)
                 * self.filled[classes, None]).long()
        rows = classes[:, None].expand_as(slots)
        boxes = self.boxes[rows, slots].reshape(-1, 8).to(device)
        features = self.features[rows, slots].reshape((-1,) + self.feature_shape)
        return (features.to(device, torch.float32), rows.reshape(-1).to(device),
                boxes[:, :4], boxes[:, 4:])
