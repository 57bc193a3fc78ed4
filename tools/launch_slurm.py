"""Train on a SLURM cluster through submitit: one job of --nodes machines with --gpus-per-node
processes each (one per GPU), requeued when it is preempted or reaches its time limit, each time
resuming from the last checkpoint in OUTPUT_DIR.

    python -m tools.launch_slurm --nodes 2 --gpus-per-node 8 --partition PARTITION \\
        --timeout 4320 --mem-gb 480 --config-file configs/LVIS/... [train_net.py flags] [KEY VALUE]

Run it from the repository root on a machine that submits jobs (sbatch), with the repository,
this Python environment, --job-dir and OUTPUT_DIR on a file system every node shares. The flags
below are the job's; every other flag and override goes to train_net.py unchanged (its
--num-gpus / --num-machines / --machine-rank / --dist-url are for its own launcher: here
--nodes and --gpus-per-node decide).

Each process is one rank of train_net.py, as under torchrun: submitit's
TorchDistributedEnvironment exports RANK, WORLD_SIZE, LOCAL_RANK, ... (rendezvous on the first
node) and seesaw_ecm.distributed.launch joins the process group from them. On preemption or at
the time limit SLURM signals the job (USR2, --signal-delay seconds before it is stopped),
submitit calls TrainJob.checkpoint() and requeues the job: the same run with --resume, which
loads OUTPUT_DIR's last checkpoint (written every SOLVER.CHECKPOINT_PERIOD iterations).
"""
import argparse
import copy

import submitit

import train_net
from seesaw_ecm.distributed import launch

# train_net.py's own launcher flags and their defaults: the job's flags replace them here
TRAIN_NET_LAUNCHER_FLAGS = {"num_gpus": 1, "num_machines": 1, "machine_rank": 0}


class TrainJob:
    """train_net.py with ``args`` (its parsed arguments) in one process of the job."""

    def __init__(self, args):
        self.args = args

    def __call__(self):
        # RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT from SLURM's
        # variables; the node's GPUs all stay visible (launch takes LOCAL_RANK's)
        submitit.helpers.TorchDistributedEnvironment().export(
            set_cuda_visible_devices=False, overwrite=True)
        return launch(train_net.main_reporting_errors, self.args)

    def checkpoint(self):
        """What submitit requeues on preemption or at the time limit: the same run, resumed
        from OUTPUT_DIR's last checkpoint."""
        args = copy.copy(self.args)
        args.resume = True
        return submitit.helpers.DelayedSubmission(TrainJob(args))


def build_parser():
    """The job's flags (everything else is train_net.py's)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False)  # an abbreviated train_net.py flag must not be taken for one of these
    parser.add_argument("--nodes", type=int, default=1, help="machines (default: %(default)s)")
    parser.add_argument("--gpus-per-node", type=int, default=8,
                        help="GPUs per machine, one process each (default: %(default)s)")
    parser.add_argument("--cpus-per-task", type=int, default=10,
                        help="CPU cores per process; DATALOADER.NUM_WORKERS data loaders run on "
                        "them (default: %(default)s)")
    parser.add_argument("--mem-gb", type=int,
                        help="memory per machine in GB (default: the partition's)")
    parser.add_argument("--partition", help="SLURM partition (default: the cluster's)")
    parser.add_argument("--timeout", type=int, default=4320,
                        help="time limit of one job in minutes; a longer run is requeued and "
                        "resumes (default: %(default)s)")
    parser.add_argument("--max-timeouts", type=int, default=20,
                        help="requeues at the time limit before the run gives up; preemptions "
                        "are requeued without limit (default: %(default)s)")
    parser.add_argument("--signal-delay", type=int, default=120,
                        help="seconds between SLURM's signal and the stop (default: %(default)s)")
    parser.add_argument("--constraint", help="SLURM node features, e.g. volta32gb")
    parser.add_argument("--comment", help="SLURM job comment")
    parser.add_argument("--account", help="SLURM account to charge")
    parser.add_argument("--job-name", default="seesaw_ecm", help="(default: %(default)s)")
    parser.add_argument("--job-dir", default="output/slurm/%j",
                        help="submitit's folder of the job's logs and pickles, on a shared file "
                        "system; %%j: the job id (default: %(default)s)")
    return parser


def parse_args(argv=None):
    """(the job's flags, train_net.py's parsed arguments) from the command line."""
    parser = build_parser()
    job, rest = parser.parse_known_args(argv)
    args = train_net.build_parser().parse_args(rest)
    given = [f"--{name.replace('_', '-')}" for name, default in TRAIN_NET_LAUNCHER_FLAGS.items()
             if getattr(args, name) != default]
    if given:
        parser.error(f"{' / '.join(given)}: train_net.py's own launcher; on SLURM set --nodes "
                     "and --gpus-per-node instead.")
    return job, args


def build_executor(job):
    """submitit's SlurmExecutor for the job's flags: one task per GPU on every node, requeued
    (#SBATCH --requeue) after USR2 on preemption or at the time limit."""
    executor = submitit.SlurmExecutor(folder=job.job_dir, max_num_timeout=job.max_timeouts)
    optional = {"partition": job.partition, "constraint": job.constraint, "comment": job.comment,
                "account": job.account, "mem": None if job.mem_gb is None else f"{job.mem_gb}GB"}
    executor.update_parameters(
        job_name=job.job_name, nodes=job.nodes, ntasks_per_node=job.gpus_per_node,
        gpus_per_node=job.gpus_per_node, cpus_per_task=job.cpus_per_task, time=job.timeout,
        signal_delay_s=job.signal_delay, additional_parameters={"requeue": True},
        **{k: v for k, v in optional.items() if v is not None})
    return executor


def main(argv=None):
    job, args = parse_args(argv)
    submitted = build_executor(job).submit(TrainJob(args))
    print(f"Submitted job {submitted.job_id} ({job.nodes} x {job.gpus_per_node} GPUs); "
          f"logs: {submitted.paths.stdout.parent}")
    return submitted


if __name__ == "__main__":
    main()
