"""Checkpoints that a crash cannot leave half written.

fvcore's ``Checkpointer.save`` writes ``model_XXXXXXX.pth`` and then ``last_checkpoint`` in place:
a job killed while writing (SIGKILL, out of memory, pre-emption) leaves a truncated checkpoint or
an empty ``last_checkpoint``, and ``--resume`` then fails or loads garbage. Here every file the
checkpointer writes goes through :func:`seesaw_ecm.fileio.open_atomic` (a temporary file in the
same folder, fsynced, then renamed), so ``last_checkpoint`` always names a complete checkpoint.

Each checkpoint also gets its sha256, in ``NAME.pth.sha256`` beside it (``sha256sum`` format,
written before ``last_checkpoint`` names the checkpoint), which the loader verifies when it
exists (``--resume``, ``MODEL.WEIGHTS``): a checkpoint modified or truncated after it was
written is refused with both hashes. A missing or unreadable checkpoint is refused with one
message (SeesawEcmError) instead of a traceback; for evaluation (``strict``) so are weights
that lack keys of the model (e.g. the loss statistics of the config's loss) or whose shapes
differ (e.g. another MODEL.ROI_HEADS.NUM_CLASSES).
"""
import contextlib
import glob
import io
import logging
import os
import zipfile

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils import comm

from .errors import SeesawEcmError
from .fileio import open_atomic, write_atomic
from .model_zoo import _sha256_file, check_sha256

logger = logging.getLogger(__name__)
SHA256_SUFFIX = ".sha256"  # the sha256 record of NAME.pth: NAME.pth.sha256
_VERIFIED = set()  # (path, size, mtime) of the checkpoints verified in this process


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


def _verified_sha256(path, record, source):
    """Check `path` against its sha256 `record` (SeesawEcmError naming both hashes); a file
    already verified unchanged (same size and modification time) is not read again."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return
    with open(record) as f:
        expected = (f.read().split() or ["(empty)"])[0]
    check_sha256(path, expected, _sha256_file(path), record,
                 f"copy it again, or (named by {source}) resume from an earlier checkpoint of "
                 "the folder: write its name into last_checkpoint.")
    _VERIFIED.add(key)


def check_weights_file(cfg, eval_only, resume):
    """Before anything is built or written: SeesawEcmError if --eval-only has no weights
    (MODEL.WEIGHTS empty and no last_checkpoint to resume from), if the local checkpoint to
    load does not exist, or if its sha256 record disagrees with it."""
    last = os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")
    if resume and os.path.isfile(last):
        with open(last) as f:
            path, source = os.path.join(cfg.OUTPUT_DIR, f.read().strip()), f"{last} (--resume)"
    else:
        path, source = cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS"
    if not path and eval_only:
        raise SeesawEcmError(
            "--eval-only needs the weights to evaluate, but MODEL.WEIGHTS is empty (a randomly "
            "initialised model would be evaluated): add MODEL.WEIGHTS path/to/model_final.pth, "
            "or --resume with OUTPUT_DIR holding the run's last_checkpoint.")
    if not path or "://" in path:
        return
    if not os.path.isfile(path):
        raise SeesawEcmError(f"Checkpoint {path}, named by {source}, does not exist: "
                             f"{_missing_fix(source)}.")
    verify_checkpoint(path, source)


def verify_checkpoint(path, source):
    """SeesawEcmError if the existing checkpoint file `path` (named by `source`, for the
    message) disagrees with its sha256 record NAME.pth.sha256, or, without a record, is a
    torch.save file cut short."""
    if os.path.isfile(path + SHA256_SUFFIX):
        _verified_sha256(path, path + SHA256_SUFFIX, source)
    elif _is_zip(path):  # torch.save's format: a cut file has lost its directory at the end
        try:
            zipfile.ZipFile(path).close()  # reads the central directory only
        except (zipfile.BadZipFile, OSError) as e:
            raise _unreadable(path, source, e) from None


def _is_zip(path):
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _unreadable(path, source, error):
    return SeesawEcmError(
        f"Checkpoint {path} ({os.path.getsize(path)} bytes), named by {source}, cannot be "
        f"read: {type(error).__name__}: {str(error)[:200]}. It is truncated or not a PyTorch "
        "checkpoint; resume from an earlier checkpoint (write its name into last_checkpoint) "
        "or give another file.")


def _missing_fix(source):
    return ("check the path given as MODEL.WEIGHTS" if source == "MODEL.WEIGHTS" else
            "write the name of an existing checkpoint of the folder into last_checkpoint, or "
            "start without --resume")


class AtomicCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer whose checkpoint files and ``last_checkpoint`` appear only
    complete, with each checkpoint's sha256 recorded and verified (module docstring). Temporary
    files left by a job killed while saving are removed when the next job on the same folder
    starts (main process).

    Args:
        strict: refuse weights that lack a key of the model or hold another shape for one
            (evaluation); otherwise detectron2's warnings (fine-tuning from other weights).
    """

    def __init__(self, model, save_dir="", *, strict=False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.path_manager = _AtomicWrites(self.path_manager)
        self.strict = strict
        self._source, self._path = "MODEL.WEIGHTS", ""
        if save_dir and comm.is_main_process():
            for stale in glob.glob(os.path.join(save_dir, ".*.tmp")):
                logger.info(f"Removing {stale}, left by a job killed while saving")
                os.unlink(stale)

    def tag_last_checkpoint(self, last_filename_basename):
        """Record the checkpoint's sha256, then name it in ``last_checkpoint``."""
        path = os.path.join(self.save_dir, last_filename_basename)
        write_atomic(path + SHA256_SUFFIX, f"{_sha256_file(path)}  {last_filename_basename}\n")
        super().tag_last_checkpoint(last_filename_basename)

    def resume_or_load(self, path, *, resume=True):
        resuming = resume and self.has_checkpoint()
        self._source = (f"{os.path.join(self.save_dir, 'last_checkpoint')} (--resume)"
                        if resuming else "MODEL.WEIGHTS")
        return super().resume_or_load(path, resume=resume)

    def load(self, path, checkpointables=None):
        """fvcore's load; a local checkpoint that does not exist is refused with one message
        (fvcore asserts)."""
        if path and "://" not in path and not os.path.isfile(path):
            raise SeesawEcmError(f"Checkpoint {path}, named by {self._source}, does not exist: "
                                 f"{_missing_fix(self._source)}.")
        self._path = path
        return super().load(path, checkpointables)

    def _load_file(self, filename):
        """The checkpoint, after its sha256 is checked against ``NAME.pth.sha256`` if that
        exists; an unreadable file (truncated, not a checkpoint) refused with one message."""
        if os.path.isfile(filename + SHA256_SUFFIX):
            _verified_sha256(filename, filename + SHA256_SUFFIX, self._source)
        try:
            return super()._load_file(filename)
        except Exception as e:  # torch.load / pickle: truncated or not a checkpoint
            raise _unreadable(filename, self._source, e) from None

    def _load_model(self, checkpoint):
        # the keys themselves: a loss may hide its missing buffer (Seesaw's cum_samples restarts
        # at 0 when fine-tuning from weights without it) from load_state_dict's missing_keys
        given = None if checkpoint.get("matching_heuristics") else {
            k[len("module."):] if k.startswith("module.") else k for k in checkpoint["model"]}
        incompatible = super()._load_model(checkpoint)
        if self.strict:
            missing = incompatible.missing_keys if given is None else [
                k for k in self.model.state_dict() if k not in given]
            _refuse_incompatible(missing, incompatible.incorrect_shapes,
                                 f"{self._path} ({self._source})")
        return incompatible


def _refuse_incompatible(missing, incorrect_shapes, source):
    """SeesawEcmError naming the model's keys that the weights lack (`missing`; BatchNorm's
    counters and detectron2's pixel mean / std, set by the config, excepted) and the keys whose
    shapes differ (`incorrect_shapes`: key, the weights' shape, the config's shape)."""
    reshaped = {k for k, _, _ in incorrect_shapes}  # fvcore drops them: they are missing too
    missing = [k for k in missing if k not in reshaped and k not in ("pixel_mean", "pixel_std")
               and not k.endswith("num_batches_tracked")]
    shapes = [f"{k}: the config's model has {tuple(model)}, the weights {tuple(ckpt)}"
              for k, ckpt, model in incorrect_shapes]
    if not missing and not shapes:
        return
    problems = []
    if missing:
        problems.append(f"the weights lack {len(missing)} keys of the config's model "
                        f"({', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''})")
    if shapes:
        problems.append(f"{len(shapes)} shapes differ ({'; '.join(shapes[:4])}"
                        f"{'; ...' if len(shapes) > 4 else ''})")
    raise SeesawEcmError(
        f"The weights {source} do not fit the config: {' and '.join(problems)}. Evaluate them "
        "with the config they were trained with (MODEL.LONG_TAIL.LOSS, whose statistics such as "
        "Seesaw's cum_samples or ECM's margin are part of the weights; "
        "MODEL.ROI_HEADS.NUM_CLASSES; the ROI heads and predictor).")
