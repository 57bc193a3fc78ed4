"""Launchers: detectron2's launch flags pass through train_net.py, torchrun's processes join one
process group (two CPU processes count Seesaw's classes and evaluate as one process does), and
the SLURM launcher's job (its sbatch script, its requeue with --resume) without a cluster."""
import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from detectron2.utils import comm

import train_net
from e2e import SEESAW, SEESAW_RUN_OPTS, train_net_args
from seesaw_ecm import distributed
from seesaw_ecm.errors import SeesawEcmError

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT", "GROUP_RANK")
# Seesaw training whose class counts cannot depend on how the batch is split: learning rate 0
# (the weights stay the initial ones, which DDP broadcasts from rank 0), GroupNorm (no batch
# statistics), no random flip, and every foreground proposal sampled (positive fraction 1, more
# RoIs per image than proposals plus ground truth), so no random subsampling decides the labels.
FIXED_WEIGHTS_OPTS = (
    "SOLVER.MAX_ITER", "3", "SOLVER.BASE_LR", "0.0", "SOLVER.WARMUP_ITERS", "0", "SOLVER.STEPS",
    "()", "SOLVER.CHECKPOINT_PERIOD", "100", "MODEL.RESNETS.NORM", "GN", "INPUT.RANDOM_FLIP",
    "none", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "128",
    "MODEL.ROI_HEADS.POSITIVE_FRACTION", "1.0", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
    "TEST.DETECTIONS_PER_IMAGE", "20")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_machines(commands, out_dir):
    """Run `commands` at once (machines of one run, or one command), one thread per process;
    rank 0's output (the first command's): stdout, stderr."""
    logs = [(out_dir / f"machine{i}.out", out_dir / f"machine{i}.err")
            for i in range(len(commands))]
    out_dir.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for cmd, (out, err) in zip(commands, logs):
        with open(out, "w") as stdout, open(err, "w") as stderr:  # files: no pipe fills up
            procs.append(subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env=env,
                                          start_new_session=True))
    try:
        deadline = time.time() + 900
        codes = [p.poll() for p in procs]
        while None in codes and not set(codes) - {None, 0} and time.time() < deadline:
            time.sleep(0.5)
            codes = [p.poll() for p in procs]
    finally:  # a machine still waiting for a failed one: stop it and the processes it started
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    texts = [(out.read_text(), err.read_text()) for out, err in logs]
    assert codes == [0] * len(commands), [t[1][-5000:] for t in texts]
    return texts[0]


def launcher_commands(launcher, data, out_dir, *extra):
    """Two processes of train_net.py on 127.0.0.1, started by `launcher`: torchrun on one
    machine, torchrun on two machines of one process each, or detectron2's launch (train_net's
    own) on two machines."""
    port = str(_free_port())
    script = ["train_net.py", *train_net_args(data, out_dir, *extra)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--master-addr", "127.0.0.1",
                "--master-port", port]
    if launcher == "torchrun":
        return [[*torchrun, "--nproc-per-node", "2", *script]]
    if launcher == "torchrun_2_machines":
        return [[*torchrun, "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
                 *script] for rank in range(2)]
    assert launcher == "detectron2_2_machines"
    return [[sys.executable, "train_net.py", "--num-gpus", "1", "--num-machines", "2",
             "--machine-rank", str(rank), "--dist-url", f"tcp://127.0.0.1:{port}", *script[1:]]
            for rank in range(2)]


def _predictions(out_dir):
    """The evaluation's detections (LVIS results json), in a canonical order."""
    with open(out_dir / "inference" / "small_val" / "lvis_instances_results.json") as f:
        results = json.load(f)
    return sorted(results, key=lambda r: json.dumps(r, sort_keys=True))


def _copypaste(stdout):
    """The metrics detectron2 prints with 4 decimals (``copypaste:`` lines)."""
    return [line.split("copypaste:")[1] for line in stdout.splitlines() if "copypaste:" in line]


@pytest.fixture
def no_torchrun_env(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)


def test_detectron2_launch_gets_the_multi_machine_flags(no_torchrun_env, monkeypatch):
    calls = []
    monkeypatch.setattr(distributed, "detectron2_launch",
                        lambda *a, **k: calls.append((a, k)))
    args = train_net.build_parser().parse_args(
        ["--config-file", "x.yaml", "--num-gpus", "4", "--num-machines", "3", "--machine-rank",
         "2", "--dist-url", "tcp://10.0.0.1:23456"])
    distributed.launch(train_net.main, args)
    (positional, keywords), = calls
    assert positional == (train_net.main, 4)
    assert keywords["num_machines"] == 3 and keywords["machine_rank"] == 2
    assert keywords["dist_url"] == "tcp://10.0.0.1:23456" and keywords["args"] == (args,)


def test_under_torchrun_the_process_joins_the_group_from_the_environment(monkeypatch):
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(comm, "_LOCAL_PROCESS_GROUP", None)
    monkeypatch.setattr(distributed, "detectron2_launch", None)  # must not be called
    seen = {}

    def main(args):
        seen["backend"] = dist.get_backend()
        seen["sizes"] = (comm.get_world_size(), comm.get_local_size(), comm.get_local_rank())
        return "result"

    args = train_net.build_parser().parse_args(["--config-file", "x.yaml"])
    assert distributed.launch(main, args) == "result"
    assert seen == {"backend": "gloo", "sizes": (1, 1, 0)}
    assert not dist.is_initialized()  # left as it was found


def test_under_torchrun_train_net_launcher_flags_are_a_clear_error(monkeypatch):
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                        "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    args = train_net.build_parser().parse_args(["--config-file", "x.yaml", "--num-gpus", "2"])
    with pytest.raises(SeesawEcmError, match="--nproc-per-node"):
        distributed.launch(train_net.main, args)
    assert not dist.is_initialized()


@pytest.fixture(scope="module")
def one_process_run(small_synthetic, tmp_path_factory):
    """FIXED_WEIGHTS_OPTS's 3 iterations of 2 images in one process, on one thread as each of
    the two processes (other thread counts round differently): (folder, stdout)."""
    out = tmp_path_factory.mktemp("one_process")
    cmd = [sys.executable, "train_net.py", *train_net_args(small_synthetic, out / "run", SEESAW,
                                                           *FIXED_WEIGHTS_OPTS)]
    return out / "run", run_machines([cmd], out / "logs")[0]


def _counts(run_dir):
    model = torch.load(run_dir / "model_final.pth", weights_only=False)["model"]
    return model["roi_heads.box_predictor.cls_loss.cum_samples"]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "torchrun_2_machines", "detectron2_2_machines"])
def test_two_cpu_processes_count_and_evaluate_as_one(launcher, one_process_run, small_synthetic,
                                                     tmp_path):
    """The same 3 iterations of 2 images each: one process with both images of a batch, or two
    processes with one each; the Seesaw counts are all-reduced, so they match."""
    one_dir, one_stdout = one_process_run
    out_dir = tmp_path / "run"
    stdout, stderr = run_machines(
        launcher_commands(launcher, small_synthetic, out_dir, SEESAW, *FIXED_WEIGHTS_OPTS),
        tmp_path / "logs")
    assert "World size: 2" in stdout + stderr and "World size: 1" not in stdout + stderr
    assert (out_dir / "log.txt.rank1").exists() and not (out_dir / "log.txt.rank2").exists()
    # every training image has objects: each process alone would have counted fewer
    assert _counts(one_dir).sum() > 0
    assert torch.equal(_counts(out_dir), _counts(one_dir))
    assert _predictions(out_dir) == _predictions(one_dir)
    assert _copypaste(stdout) == _copypaste(one_stdout)


@pytest.mark.slow
def test_torchrun_evaluation_of_a_trained_model_equals_one_process(seesaw_run, small_synthetic,
                                                                   tmp_path):
    run_dir, _ = seesaw_run
    weights = ("--eval-only", "MODEL.WEIGHTS", str(run_dir / "model_final.pth"))
    # the one-process evaluation on one thread, as each of the two processes
    one = [sys.executable, "train_net.py", *train_net_args(
        small_synthetic, tmp_path / "one", SEESAW, *SEESAW_RUN_OPTS, *weights)]
    one_stdout, _ = run_machines([one], tmp_path / "one_logs")
    out_dir = tmp_path / "eval"
    stdout, stderr = run_machines(launcher_commands(
        "torchrun", small_synthetic, out_dir, SEESAW, *SEESAW_RUN_OPTS, *weights),
        tmp_path / "logs")
    assert "World size: 2" in stdout + stderr
    predictions = _predictions(tmp_path / "one")  # every detection of the model (score > 0)
    assert len(predictions) > 100
    assert _predictions(out_dir) == predictions
    assert _copypaste(stdout) == _copypaste(one_stdout)


# --- SLURM (tools/launch_slurm.py) without a cluster: stand-ins for srun and sbatch -------------

@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """srun and sbatch stand-ins on PATH: sbatch accepts any script as job 4242."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text('#!/bin/sh\necho "Submitted batch job 4242"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path / "jobs"


def test_slurm_job_runs_one_process_per_gpu_on_every_node_and_requeues_with_resume(fake_slurm):
    from tools import launch_slurm

    job = launch_slurm.main([
        "--nodes", "2", "--gpus-per-node", "4", "--partition", "learn", "--timeout", "600",
        "--mem-gb", "400", "--constraint", "volta32gb", "--comment", "a comment",
        "--job-dir", str(fake_slurm / "%j"), "--config-file", SEESAW, "SOLVER.MAX_ITER", "90"])
    assert job.job_id == "4242"
    script = (fake_slurm / "4242" / "4242_submission.sh").read_text()
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=learn",
                 "--time=600", "--mem=400GB", "--constraint=volta32gb", "--comment='a comment'",
                 "--requeue", "--signal=USR2@120"):
        assert f"#SBATCH {line}\n" in script, line
    assert "srun " in script and "-m submitit.core._submit" in script

    with open(fake_slurm / "4242" / "4242_submitted.pkl", "rb") as f:
        submitted = pickle.load(f).function  # what every task of the job runs
    assert isinstance(submitted, launch_slurm.TrainJob)
    args = submitted.args
    assert (args.config_file, args.opts, args.resume) == (SEESAW, ["SOLVER.MAX_ITER", "90"], False)
    requeued = submitted.checkpoint().function  # on preemption / at the time limit
    assert isinstance(requeued, launch_slurm.TrainJob) and requeued.args.resume
    assert {**vars(requeued.args), "resume": False} == vars(args)
    assert not args.resume  # the submitted job's arguments unchanged


def test_slurm_launcher_refuses_train_net_launcher_flags(fake_slurm, capsys):
    from tools import launch_slurm

    with pytest.raises(SystemExit) as exit_info:
        launch_slurm.main(["--job-dir", str(fake_slurm), "--config-file", SEESAW,
                           "--num-gpus", "8"])
    assert exit_info.value.code == 2
    assert "--num-gpus" in capsys.readouterr().err and not fake_slurm.exists()


@pytest.mark.slow
def test_slurm_job_on_two_cpu_processes_is_requeued_on_preemption_and_resumes(small_synthetic,
                                                                              tmp_path):
    """TrainJob as a SLURM job runs it, through submitit's LocalExecutor (2 tasks); both get
    SLURM's preemption signal (USR2) after the first checkpoint: rank 0 requeues the job and it
    resumes from that checkpoint, to the end of training and its evaluation."""
    import submitit

    from tools.launch_slurm import TrainJob

    out_dir = tmp_path / "run"
    args = train_net.build_parser().parse_args(train_net_args(
        small_synthetic, out_dir, SEESAW, *SEESAW_RUN_OPTS, "SOLVER.CHECKPOINT_PERIOD", "5"))
    executor = submitit.LocalExecutor(folder=tmp_path / "jobs")
    executor.update_parameters(tasks_per_node=2, nodes=1, timeout_min=30)
    job = executor.submit(TrainJob(args))
    try:
        last = out_dir / "last_checkpoint"
        while not (last.exists() and last.read_text() == "model_0000004.pth"):
            assert not job.done(), job.stderr()
            time.sleep(0.2)
        controller = job._process.pid  # submitit's local controller; its children: the tasks
        tasks = open(f"/proc/{controller}/task/{controller}/children").read().split()
        assert len(tasks) == 2
        for task in tasks:
            os.kill(int(task), signal.SIGUSR2)
        deadline = time.time() + 600
        while not job.done() and time.time() < deadline:
            time.sleep(1)
        results = job.results()[0]  # rank 0's train_net.main() of the requeued job
    finally:
        job.cancel(check=False)
    log = (out_dir / "log.txt").read_text()
    starts = [int(i) for i in re.findall(r"Starting training from iteration (\d+)", log)]
    assert starts[0] == 0 and len(starts) == 2 and starts[1] in (5, 10, 15), starts
    assert "World size: 2" in log and (out_dir / "model_final.pth").exists()
    assert "bbox" in results
