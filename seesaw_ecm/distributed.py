"""Work done once, on the main process, whose outcome every rank shares; synchronized
BatchNorm on several CPU processes."""
import sys

import torch
import torch.distributed as dist
from detectron2.utils import comm

from .errors import SeesawEcmError


def on_main_process(fn, *args):
    """``fn(*args)`` run on the main process only; its (picklable) result is returned on every
    rank.

    If ``fn`` raises there, every rank raises: the main process its own exception (traceback
    kept), the other ranks a SeesawEcmError with its message. Only that message string crosses
    processes: an exception object may not pickle, and a pickling failure on the main process
    would leave the other ranks waiting in the all-gather forever. When the main process's
    exception is a SeesawEcmError, every rank's has ``all_ranks = True`` (for
    :func:`report_error`).
    """
    result = error = message = None
    if comm.is_main_process():
        try:
            result = fn(*args)
        except Exception as e:  # noqa: BLE001  (raised again below, on every rank)
            error = e
            message = str(e) if isinstance(e, SeesawEcmError) else (
                f"{type(e).__name__} on the main process: {e}")
    bad_input = isinstance(error, SeesawEcmError)
    result, message, bad_input = comm.all_gather((result, message, bad_input))[0]
    if message is None:
        return result
    error = error or SeesawEcmError(message)
    error.all_ranks = bad_input
    raise error


def report_error(error):
    """Print a SeesawEcmError as one message on stderr, without a traceback. An error that every
    rank raised (``all_ranks``) is printed by the main process only, and every rank returns
    after it did so (a launcher that stops the other processes when one exits cannot cut the
    message off)."""
    all_ranks = getattr(error, "all_ranks", False)
    if comm.is_main_process() or not all_ranks:
        print(f"ERROR: {error}", file=sys.stderr, flush=True)
    if all_ranks:
        comm.synchronize()


# The config keys naming the norm of a model part that detectron2's get_norm builds (backbone,
# FPN, box-head convs, mask-head convs, FPG), and ResNeSt's (which converts timm's BatchNorms).
NORM_KEYS = ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.ROI_BOX_HEAD.NORM",
             "MODEL.ROI_MASK_HEAD.NORM", "MODEL.RESNEST.NORM", "MODEL.FPG.NORM")


def sync_bn_on_cpu(cfg):
    """Make NORM "SyncBN" work on several CPU processes (in place, before cfg.freeze()).

    detectron2 builds "SyncBN" as torch's nn.SyncBatchNorm, which refuses CPU tensors as soon as
    a process group exists, and is BatchNorm without one (one process: detectron2's launch
    starts no process group). On CPU in a process group each such key becomes "naiveSyncBN_N":
    detectron2's NaiveSyncBatchNorm, which all-reduces the statistics with any backend (GLOO),
    weighted by each process's batch (RoI counts differ between processes) and safe for empty
    inputs. Returns the keys changed."""
    if torch.device(cfg.MODEL.DEVICE).type != "cpu" or not (
            dist.is_available() and dist.is_initialized()):
        return []
    changed = []
    for key in NORM_KEYS:
        *path, name = key.split(".")
        node = cfg
        for part in path:
            node = node[part]
        if node[name] == "SyncBN":
            node[name] = "naiveSyncBN_N"
            changed.append(key)
    if changed and comm.is_main_process():  # before the loggers are set up, as train_net.py's
        print(f"SyncBN on {comm.get_world_size()} CPU processes: {', '.join(changed)} use "
              "detectron2's naiveSyncBN_N (torch's SyncBatchNorm needs GPU tensors).")
    return changed
