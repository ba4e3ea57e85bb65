"""The launch scripts, run by bash with srun / scontrol / accelerate / torchrun replaced by stubs.

The stubs record their command lines (and a few environment variables) to a JSON-lines log;
`srun` also plays the nodes of the allocation, running its command once per node with that
node's SLURM_NODEID, as Slurm would. Nothing here needs Slurm, a GPU or the network.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh")) + sorted((LAUNCH / "slurm").glob("*.sbatch"))
SHARD_WSI = LAUNCH / "slurm" / "shard_wsi.sbatch"

STUB = """#!{python}
import json, os, re, signal, subprocess, sys, time
name = os.path.basename(sys.argv[0])
keep = ("SLURM_NODEID", "NCCL_DEBUG", "NCCL_SOCKET_IFNAME", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
        "ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU", "HISTODIST_ROOT",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE")
with open(os.environ["STUB_LOG"], "a") as log:
    env = {{k: os.environ[k] for k in keep if k in os.environ}}
    log.write(json.dumps({{"cmd": name, "argv": sys.argv[1:], "env": env}}) + "\\n")
args = sys.argv[1:]
if name == "scontrol" and args[:2] == ["show", "hostnames"]:
    # gpu[01-02,05] -> gpu01 gpu02 gpu05 (the forms the tests use)
    m = re.fullmatch(r"(.*)\\[(.*)\\]", args[2])
    if not m:
        print(args[2])
    else:
        for part in m.group(2).split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                print(f"{{m.group(1)}}{{i:0{{len(lo)}}d}}")
elif name == "python" and os.environ.get("STUB_PYTHON_BLOCK"):  # a long tiling run
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with open(os.environ["STUB_LOG"] + ".ready", "w") as f:
        f.write(str(os.getpid()))
    while True:
        time.sleep(0.05)
elif name == "scancel":  # Slurm signals the step's tasks: here the blocking srun plays them
    with open(os.environ["STUB_LOG"] + ".ready") as f:
        os.kill(int(f.read()), signal.SIGTERM)
elif name == "srun":
    if os.environ.get("STUB_SRUN_BLOCK"):  # a long training step, until a signal comes
        def stop(signum, frame):
            with open(os.environ["STUB_LOG"], "a") as log:
                log.write(json.dumps({{"cmd": "srun-signal", "argv": [signal.Signals(signum).name]}}) + "\\n")
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        with open(os.environ["STUB_LOG"] + ".ready", "w") as f:
            f.write(str(os.getpid()))
        while True:
            time.sleep(0.05)
    while args and args[0].startswith("-"):
        args.pop(0)
    codes = [subprocess.call(args, env={{**os.environ, "SLURM_NODEID": str(i), "SLURM_PROCID": str(i)}})
             for i in range(int(os.environ["SLURM_NNODES"]))]
    sys.exit(max(codes))
"""


@pytest.fixture
def stubs(tmp_path):
    """A PATH with stub srun/scontrol/scancel/accelerate/torchrun/python and their log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("srun", "scontrol", "scancel", "accelerate", "torchrun", "python"):
        path = bin_dir / name
        path.write_text(STUB.format(python=sys.executable))
        path.chmod(0o755)
    log = tmp_path / "stub.jsonl"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "NCCL_", "MIXED_", "ACCELERATE_"))
    }
    # No nvidia-smi on this PATH: GPU counts and precision come from the variables set below.
    env.update(PATH=f"{bin_dir}:/usr/bin:/bin", STUB_LOG=str(log), MIXED_PRECISION="bf16")
    env.pop("GPUS_PER_NODE", None)
    env.pop("RUN_NAME", None)
    return env, log


def calls(log: Path, cmd: str) -> list[dict]:
    if not log.exists():
        return []
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    return [c for c in lines if c["cmd"] == cmd]


def opt(argv: list[str], flag: str) -> str:
    """The value after `flag` in argv (which must hold it once)."""
    assert argv.count(flag) == 1, (flag, argv)
    return argv[argv.index(flag) + 1]


def slurm_env(env: dict, **extra) -> dict:
    return {
        **env,
        "SLURM_JOB_ID": "1234",
        "SLURM_JOB_NAME": "pcam-r50",
        "SLURM_JOB_NODELIST": "gpu[01-02]",
        "SLURM_NNODES": "2",
        "SLURM_NODEID": "0",
        "SLURM_PROCID": "0",
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_SUBMIT_DIR": str(ROOT),
        **extra,
    }


def run(script: Path, env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        ["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=60
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


USER_ARGS = ("--dataset", "pcam", "--shards", "/shared/shards/pcam", "--batch-size", "256")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_valid_bash(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    if script.name != "common.sh":  # sourced by the others, which set the options
        assert "set -euo pipefail" in script.read_text()


def test_sbatch_generates_one_accelerate_launch_per_node(stubs):
    env, log = stubs
    env = slurm_env(env, NCCL_SOCKET_IFNAME="ib0", SLURM_CPUS_PER_TASK="48")
    proc = run(LAUNCH / "slurm" / "train.sbatch", env, *USER_ARGS)

    (srun,) = calls(log, "srun")
    assert "--ntasks-per-node=1" in srun["argv"] and "--nodes=2" in srun["argv"]
    assert "--cpus-per-task=48" in srun["argv"]  # srun does not inherit it on Slurm 22.05-23.02
    launches = calls(log, "accelerate")
    assert len(launches) == 2
    port = str(29500 + 1234 % 10000)
    for node, call in enumerate(launches):
        argv = call["argv"]
        assert argv[0] == "launch"
        assert opt(argv, "--num_machines") == "2"
        assert opt(argv, "--machine_rank") == str(node)
        assert opt(argv, "--main_process_ip") == "gpu01"
        assert opt(argv, "--main_process_port") == port
        assert opt(argv, "--num_processes") == "8"  # 2 nodes x 4 GPUs
        assert opt(argv, "--config_file") == str(LAUNCH / "accelerate_config.yaml")
        assert opt(argv, "--mixed_precision") == "bf16"
        assert opt(argv, "-m") == "histodist.train"
        assert "--resume" in argv
        assert opt(argv, "--run-name") == "pcam-r50-1234"  # the same after a requeue
        assert tuple(argv[-len(USER_ARGS) :]) == USER_ARGS  # the user's flags come last and win
        assert call["env"]["NCCL_SOCKET_IFNAME"] == "ib0"  # passed through
        assert call["env"]["NCCL_DEBUG"] == "WARN"
        assert call["env"]["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert "2 nodes x 4 GPUs" in proc.stderr and "world size=8" in proc.stderr
    assert calls(log, "scontrol")[0]["argv"] == ["show", "hostnames", "gpu[01-02]"]


def test_sbatch_overrides_and_slurm_gpu_type(stubs):
    env, log = stubs
    env = slurm_env(
        env,
        SLURM_JOB_NODELIST="node[7-9]",
        SLURM_NNODES="3",
        SLURM_GPUS_ON_NODE="",
        SLURM_GPUS_PER_NODE="a100:8",
        MAIN_PROCESS_PORT="40000",
        RUN_NAME="my-run",
        MIXED_PRECISION="fp16",
        NCCL_DEBUG="INFO",
    )
    env.pop("SLURM_GPUS_ON_NODE")
    run(LAUNCH / "slurm" / "train.sbatch", env, "--dataset", "pcam")
    launches = calls(log, "accelerate")
    assert [opt(c["argv"], "--machine_rank") for c in launches] == ["0", "1", "2"]
    for c in launches:
        assert opt(c["argv"], "--main_process_ip") == "node7"
        assert opt(c["argv"], "--main_process_port") == "40000"
        assert opt(c["argv"], "--num_processes") == "24"
        assert opt(c["argv"], "--run-name") == "my-run"
        assert opt(c["argv"], "--mixed_precision") == "fp16"
        assert c["env"]["NCCL_DEBUG"] == "INFO"


def test_sbatch_without_gpu_count_fails_clearly(stubs):
    env, log = stubs
    env = slurm_env(env)
    env.pop("SLURM_GPUS_ON_NODE")
    proc = run(LAUNCH / "slurm" / "train.sbatch", env, *USER_ARGS, check=False)
    assert proc.returncode != 0 and "GPUS_PER_NODE" in proc.stderr
    assert calls(log, "accelerate") == []


def test_sbatch_outside_slurm_fails_clearly(stubs):
    env, _ = stubs
    proc = run(LAUNCH / "slurm" / "train.sbatch", env, check=False)
    assert proc.returncode != 0 and "SLURM_JOB_ID" in proc.stderr


@pytest.mark.parametrize("sig", ["USR1", "TERM"])
def test_sbatch_forwards_signals_and_requeues_on_time_limit(stubs, sig):
    """USR1 (time limit near): TERM to the step's tasks through scancel (never to srun, which
    would SIGKILL them), then requeue. TERM (preemption): the same, no requeue."""
    env, log = stubs
    env = slurm_env(env, STUB_SRUN_BLOCK="1")
    proc = subprocess.Popen(
        ["bash", str(LAUNCH / "slurm" / "train.sbatch"), *USER_ARGS],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ready = Path(f"{log}.ready")
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), "srun stub never started"
    proc.send_signal(getattr(signal, f"SIG{sig}"))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert [c["argv"] for c in calls(log, "scancel")] == [["--signal=TERM", "1234"]]
    assert [c["argv"] for c in calls(log, "srun-signal")] == [["SIGTERM"]]
    requeues = [c["argv"] for c in calls(log, "scontrol") if c["argv"][0] == "requeue"]
    assert requeues == ([["requeue", "1234"]] if sig == "USR1" else [])


def array_env(env: dict, **extra) -> dict:
    """A Slurm array task's environment: task 3 of --array=0-15, job 1236 (array 1200)."""
    return {**env, "SLURM_JOB_ID": "1236", "SLURM_ARRAY_JOB_ID": "1200",
            "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "15",
            "SLURM_ARRAY_TASK_COUNT": "16", "SLURM_CPUS_PER_TASK": "6", "SLURM_NTASKS": "1",
            "SLURM_SUBMIT_DIR": str(ROOT), **extra}  # fmt: skip


TILE_ARGS = ("--src", "/data/slides", "--mpp", "0.5", "--out", "/shared/shards/cohort")


def test_shard_wsi_sbatch_tiles_with_the_tasks_cpus(stubs):
    env, log = stubs
    proc = run(SHARD_WSI, array_env(env), *TILE_ARGS)
    (py,) = calls(log, "python")
    assert py["argv"] == ["-m", "histodist.shard", "--dataset", "wsi", "--workers", "6",
                          *TILE_ARGS]  # fmt: skip
    assert "array task 1200_3 (restart 0): index 3 of 0-15 (16 tasks), --workers 6" in proc.stderr
    run(SHARD_WSI, array_env(env), *TILE_ARGS, "--workers", "2")  # the user's flags win
    assert calls(log, "python")[1]["argv"][-2:] == ["--workers", "2"]


def test_shard_wsi_sbatch_refuses_what_it_cannot_run(stubs):
    env, log = stubs
    proc = run(SHARD_WSI, env, *TILE_ARGS, check=False)
    assert proc.returncode != 0 and "SLURM_JOB_ID" in proc.stderr
    proc = run(SHARD_WSI, array_env(env, SLURM_NTASKS="4"), *TILE_ARGS, check=False)
    assert proc.returncode == 2 and "--ntasks=1" in proc.stderr
    assert calls(log, "python") == []


def test_shard_wsi_sbatch_requeues_its_own_task_on_time_limit(stubs):
    """USR1 (time limit near): `scontrol requeue <array job>_<task>`, never the bare job id,
    which for an array's last task names the whole array; the tiler is left to Slurm."""
    env, log = stubs
    env = array_env(env, STUB_PYTHON_BLOCK="1", SLURM_JOB_ID="1200", SLURM_ARRAY_TASK_ID="15")
    proc = subprocess.Popen(["bash", str(SHARD_WSI), *TILE_ARGS], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    ready = Path(f"{log}.ready")
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), "python stub never started"
    proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 30
    while not calls(log, "scontrol") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None  # still waiting for the tiler, which Slurm ends
    os.kill(int(ready.read_text()), signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert [c["argv"] for c in calls(log, "scontrol")] == [["requeue", "1200_15"]]
    assert "time limit near: requeueing task 1200_15" in err


def test_single_gpu_runs_the_trainer_itself(stubs):
    """One process: the script execs `python -m histodist.train` (so SIGTERM reaches it, see
    test_launch_signals.py) with the precision accelerate launch would have set."""
    env, log = stubs
    run(LAUNCH / "single_gpu.sh", {**env, "RUN_NAME": "r1"}, *USER_ARGS)
    assert calls(log, "accelerate") == []
    (call,) = calls(log, "python")
    argv = call["argv"]
    assert argv[:3] == ["-m", "histodist.train", "--resume"] and opt(argv, "--run-name") == "r1"
    assert tuple(argv[-len(USER_ARGS) :]) == USER_ARGS
    assert call["env"]["ACCELERATE_MIXED_PRECISION"] == "bf16"  # MIXED_PRECISION
    assert "ACCELERATE_USE_CPU" not in call["env"]
    # Without MIXED_PRECISION (and without nvidia-smi) the config file's precision applies.
    env = {k: v for k, v in env.items() if k != "MIXED_PRECISION"}
    run(
        LAUNCH / "single_gpu.sh",
        {**env, "ACCELERATE_CONFIG": str(LAUNCH / "accelerate_config.fp16.yaml")},
    )
    assert calls(log, "python")[1]["env"]["ACCELERATE_MIXED_PRECISION"] == "fp16"


def test_single_node_uses_all_gpus(stubs):
    env, log = stubs
    env = {**env, "GPUS_PER_NODE": "8", "MIXED_PRECISION": "fp16"}
    run(LAUNCH / "single_node.sh", env, *USER_ARGS)
    (call,) = calls(log, "accelerate")
    argv = call["argv"]
    assert opt(argv, "--num_processes") == "8" and opt(argv, "--num_machines") == "1"
    assert opt(argv, "--mixed_precision") == "fp16"
    assert opt(argv, "--main_process_port") == "29500"
    assert "--run-name" not in argv  # histodist.train's default name


def test_single_node_with_one_gpu_is_single_gpu(stubs):
    env, log = stubs
    run(LAUNCH / "single_node.sh", {**env, "GPUS_PER_NODE": "1"}, *USER_ARGS)
    assert calls(log, "accelerate") == []
    (call,) = calls(log, "python")
    assert call["argv"][:2] == ["-m", "histodist.train"]


def test_multi_node_plain_accelerate(stubs):
    env, log = stubs
    env = {**env, "NUM_NODES": "4", "NODE_RANK": "3", "MAIN_PROCESS_IP": "10.0.0.1"}
    run(LAUNCH / "multi_node.sh", {**env, "GPUS_PER_NODE": "8"}, *USER_ARGS)
    (call,) = calls(log, "accelerate")
    argv = call["argv"]
    assert opt(argv, "--num_machines") == "4" and opt(argv, "--machine_rank") == "3"
    assert opt(argv, "--num_processes") == "32" and opt(argv, "--main_process_ip") == "10.0.0.1"
    bad = run(
        LAUNCH / "multi_node.sh", {**env, "NODE_RANK": "4", "GPUS_PER_NODE": "8"}, check=False
    )
    assert bad.returncode != 0 and "NODE_RANK=4" in bad.stderr
    missing = {k: v for k, v in env.items() if k != "MAIN_PROCESS_IP"}
    bad = run(LAUNCH / "multi_node.sh", {**missing, "GPUS_PER_NODE": "8"}, check=False)
    assert bad.returncode != 0 and "MAIN_PROCESS_IP" in bad.stderr


def test_torchrun_elastic(stubs):
    env, log = stubs
    env = {**env, "GPUS_PER_NODE": "2", "MAX_RESTARTS": "1", "RUN_NAME": "elastic"}
    run(LAUNCH / "torchrun_elastic.sh", env, *USER_ARGS)
    (call,) = calls(log, "torchrun")
    argv = call["argv"]
    assert opt(argv, "--max-restarts") == "1" and opt(argv, "--nproc-per-node") == "2"
    assert opt(argv, "--rdzv-backend") == "c10d" and opt(argv, "--rdzv-id") == "elastic"
    assert opt(argv, "--rdzv-endpoint") == "127.0.0.1:29500"
    assert opt(argv, "-m") == "histodist.train" and "--resume" in argv
    assert call["env"]["ACCELERATE_MIXED_PRECISION"] == "bf16"  # no accelerate config here
    assert call["env"]["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"  # restarts reconnect


def test_bad_precision_is_rejected(stubs):
    env, log = stubs
    proc = run(LAUNCH / "single_gpu.sh", {**env, "MIXED_PRECISION": "fp8"}, check=False)
    assert proc.returncode != 0 and "MIXED_PRECISION=fp8" in proc.stderr
    assert calls(log, "accelerate") == []


@pytest.mark.parametrize(
    "path", sorted(LAUNCH.glob("accelerate_config*.yaml")), ids=lambda p: p.name
)
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))  # raises on keys this accelerate does not know
    raw = yaml.safe_load(path.read_text())
    assert cfg.mixed_precision == raw["mixed_precision"] in ("bf16", "fp16")
    assert cfg.num_processes == raw["num_processes"] >= raw["num_machines"]
