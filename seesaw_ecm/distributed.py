"""Starting the processes (detectron2's launch, or a process group that torchrun / SLURM describe
in the environment); work done once, on the main process, whose outcome every rank shares;
synchronized BatchNorm on several CPU processes."""
import os
import sys

import torch
import torch.distributed as dist
from detectron2.engine import launch as detectron2_launch
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.utils import comm

from .errors import SeesawEcmError


# What torchrun (and tools/launch_slurm.py, through submitit) set in every process it starts.
ENV_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT")


def launched_from_env():
    """True when this process was started by torchrun (or the SLURM launcher): the process
    group is described by ENV_VARIABLES instead of train_net.py's arguments."""
    return all(name in os.environ for name in ENV_VARIABLES)


def launch(main_func, args, timeout=DEFAULT_TIMEOUT):
    """``main_func(args)`` in every process of the run, for train_net.py's arguments ``args``.

    Started by torchrun (:func:`launched_from_env`): this process is one rank already; it joins
    the process group from the environment (:func:`init_process_group_from_env`) and spawns
    nothing (--num-gpus / --num-machines / --machine-rank must then keep their defaults).
    Otherwise detectron2's launch spawns --num-gpus processes on this machine, machine
    --machine-rank of --num-machines, meeting at --dist-url.
    """
    if not launched_from_env():
        return detectron2_launch(main_func, args.num_gpus, num_machines=args.num_machines,
                                 machine_rank=args.machine_rank, dist_url=args.dist_url,
                                 args=(args,), timeout=timeout)
    if (args.num_gpus, args.num_machines, args.machine_rank) != (1, 1, 0):
        raise SeesawEcmError(
            "--num-gpus / --num-machines / --machine-rank are for train_net.py's own launcher, "
            "but this process was started by torchrun (or SLURM), which decides the processes: "
            "leave them out and set torchrun's --nproc-per-node / --nnodes / --node-rank.")
    init_process_group_from_env(timeout)
    result = main_func(args)
    dist.destroy_process_group()
    return result


def init_process_group_from_env(timeout=DEFAULT_TIMEOUT):
    """Join the process group described by torchrun's variables (env:// rendezvous at
    MASTER_ADDR:MASTER_PORT) as detectron2's launch does for its own processes: NCCL with a GPU
    (device LOCAL_RANK), GLOO without, and detectron2's local process group of the
    LOCAL_WORLD_SIZE ranks on this machine (ranks are numbered machine by machine)."""
    local_rank, local_size = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    has_gpu = torch.cuda.is_available()
    if has_gpu:  # every GPU of the machine visible, or (SLURM's binding) only this rank's
        devices = torch.cuda.device_count()
        if devices > 1 and local_rank >= devices:
            raise SeesawEcmError(f"{local_size} processes on this machine but {devices} GPUs "
                                 "visible: start one process per GPU.")
        torch.cuda.set_device(local_rank if devices > 1 else 0)
    dist.init_process_group("nccl" if has_gpu else "gloo", init_method="env://",
                            timeout=timeout)
    if hasattr(comm, "create_local_process_group"):  # detectron2 after 0.6
        comm.create_local_process_group(local_size)
    else:
        world, rank = dist.get_world_size(), dist.get_rank()
        for machine in range(world // local_size):
            group = dist.new_group(list(range(machine * local_size, (machine + 1) * local_size)))
            if machine == rank // local_size:
                comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()


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
