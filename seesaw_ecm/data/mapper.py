"""detectron2's DatasetMapper with one clear message for an image that cannot be read."""
from detectron2.data import DatasetMapper
from detectron2.data.detection_utils import SizeMismatchError

from ..errors import SeesawEcmError


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
    a truncated file) or SizeMismatchError with a stack from a loader worker."""

    def __call__(self, dataset_dict):
        try:
            return super().__call__(dataset_dict)
        except (OSError, SizeMismatchError) as e:
            raise ImageReadError(
                f"Image {dataset_dict.get('file_name')} could not be read ({type(e).__name__}: "
                f"{e}). Restore the file, or remove its image from the annotation file; "
                "DATASETS.CHECK_IMAGE_FILES True finds missing files before training."
            ) from None
