"""Checkpoints that a crash cannot leave half written.

fvcore's ``Checkpointer.save`` writes ``model_XXXXXXX.pth`` and then ``last_checkpoint`` in place:
a job killed while writing (SIGKILL, out of memory, pre-emption) leaves a truncated checkpoint or
an empty ``last_checkpoint``, and ``--resume`` then fails or loads garbage. Here every file the
checkpointer writes goes through :func:`seesaw_ecm.fileio.open_atomic` (a temporary file in the
same folder, fsynced, then renamed), so ``last_checkpoint`` always names a complete checkpoint.
"""
import contextlib
import glob
import io
import logging
import os

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils import comm

from .fileio import open_atomic

logger = logging.getLogger(__name__)


class _AtomicWrites:
    """A path manager that forwards everything to `path_manager`, except that ``open`` for
    writing ("w" / "wb") returns an atomic writer."""

    def __init__(self, path_manager):
        self._path_manager = path_manager

    def __getattr__(self, name):
        return getattr(self._path_manager, name)

    def open(self, path, mode="r", **kwargs):
        if mode not in ("w", "wb"):
            return self._path_manager.open(path, mode, **kwargs)
        return self._open_atomic(path, binary=mode == "wb")

    @staticmethod
    @contextlib.contextmanager
    def _open_atomic(path, binary):
        with open_atomic(path) as f:
            if binary:
                yield f
                return
            text = io.TextIOWrapper(f, encoding="utf-8", write_through=True)
            yield text
            text.detach()  # leave f open: open_atomic fsyncs and renames it


class AtomicCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer whose checkpoint files and ``last_checkpoint`` appear only
    complete. Temporary files left by a job killed while saving are removed when the next job
    on the same folder starts (main process)."""

    def __init__(self, model, save_dir="", **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.path_manager = _AtomicWrites(self.path_manager)
        if save_dir and comm.is_main_process():
            for stale in glob.glob(os.path.join(save_dir, ".*.tmp")):
                logger.info(f"Removing {stale}, left by a job killed while saving")
                os.unlink(stale)
