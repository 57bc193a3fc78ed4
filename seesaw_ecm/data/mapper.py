"""detectron2's DatasetMapper with one clear message for an image that cannot be read, and the
LVIS 2020 entry's training augmentation (seesaw_ecm/data/augmentation.py, instaboost.py)."""
import copy

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.data.detection_utils import SizeMismatchError

from ..errors import SeesawEcmError
from .augmentation import train_augmentations
from .instaboost import InstaBoost


class ImageReadError(SeesawEcmError):
    """An image file that is missing, unreadable, not an image, or of another size than its
    record says.

    Raised in a DataLoader worker, it reaches the main process as ``ImageReadError(text)``, where
    torch's ``ExceptionWrapper.reraise`` makes `text` the worker's whole traceback; the
    constructor keeps only the original message, so train_net.py reports one line.
    """

    def __init__(self, message):
        marker = f"{type(self).__name__}: "
        if "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


class CheckedDatasetMapper(DatasetMapper):
    """DatasetMapper whose failure to read a record's image is an ImageReadError naming the
    file and the fix, not a raw OSError (FileNotFoundError, PIL's UnidentifiedImageError,
    a truncated file) or SizeMismatchError with a stack from a loader worker.

    In training its augmentations are `train_augmentations(cfg)` (INPUT.LONG_EDGE_TRAIN,
    INPUT.CROP before or after the resize, boxes recomputed from the masks after a crop), and
    with INPUT.INSTABOOST.ENABLED each image goes through InstaBoost before them."""

    @configurable
    def __init__(self, is_train, *, instaboost=None, **kwargs):
        super().__init__(is_train, **kwargs)
        self.instaboost = instaboost

    @classmethod
    def from_config(cls, cfg, is_train=True):
        ret = super().from_config(cfg, is_train)
        if is_train:
            ret["augmentations"], crops = train_augmentations(cfg)
            ret["recompute_boxes"] = crops and cfg.MODEL.MASK_ON
            ret["instaboost"] = InstaBoost.from_cfg(cfg)
        return ret

    def __call__(self, dataset_dict):
        try:
            if self.instaboost is None or "annotations" not in dataset_dict:
                return super().__call__(dataset_dict)
            return self._boosted(dataset_dict)
        except SizeMismatchError as e:
            raise ImageReadError(
                f"Image {dataset_dict.get('file_name')} has another size than its record "
                f"(SizeMismatchError: {e}). Correct width/height in the json (the file's size "
                "after its EXIF orientation), or restore the right file."
            ) from None
        except OSError as e:
            raise ImageReadError(
                f"Image {dataset_dict.get('file_name')} could not be read ({type(e).__name__}: "
                f"{e}). Restore the file, or remove its image from the annotation file; "
                "DATASETS.CHECK_IMAGE_FILES True finds missing files before training."
            ) from None

    def _boosted(self, dataset_dict):
        """DatasetMapper.__call__ for a training record (no semantic segmentation, no
        precomputed proposals) with InstaBoost between reading the image and the augmentations:
        detectron2's mapper reads the image itself, inside the one call."""
        dataset_dict = copy.deepcopy(dataset_dict)
        image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        image, dataset_dict["annotations"] = self.instaboost(image, dataset_dict["annotations"])
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        self._transform_annotations(dataset_dict, transforms, image.shape[:2])
        return dataset_dict
