"""A real one-node Slurm cluster on 127.0.0.1 for the launch tests (root only).

    with local_slurm(tmp_dir) as slurm:   # or the `slurm_cluster` fixture in test_slurm.py
        job = slurm.submit(["launch/slurm/train.sbatch", ...], env)
        slurm.job(job)["JobState"]          # slurm.array(job) for an array's tasks

munged, slurmctld and slurmd run in the foreground as children of the test, with their own
munge socket, key, ports, state folders and SLURM_CONF in a private folder, so they clash
with nothing on the machine; leaving the block cancels the jobs and stops the daemons. No GPU
gres: jobs must not request GPUs. Debian packages: slurmd slurmctld slurm-client munge.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from trainkit import free_port

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "scancel", "sinfo")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot start here (not root, packages missing, daemons failed); says why."""


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def missing() -> str | None:
    """Why Slurm cannot start on this machine, or None."""
    if os.geteuid() != 0:
        return "a local Slurm needs root (slurmd starts jobs as their user)"
    absent = [n for n in DAEMONS + CLIENTS if _which(n) is None]
    if absent:
        return f"{', '.join(absent)} not installed (apt-get install slurmd slurmctld slurm-client munge)"
    return None


CONF = """ClusterName=histodist-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
AuthInfo=socket={d}/munge.sock
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/ctld.pid
SlurmdPidFile={d}/d.pid
SlurmctldLogFile={d}/ctld.log
SlurmdLogFile={d}/d.log
SlurmUser=root
ReturnToService=2
MpiDefault=none
JobRequeue=1
AccountingStorageType=accounting_storage/none
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class Slurm:
    """Client side of the running cluster: SLURM_CONF, submit, job state."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}
        self.jobs: list[str] = []

    def cmd(self, *args: str, check: bool = True) -> str:
        res = subprocess.run(
            [_which(args[0]) or args[0], *args[1:]],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and res.returncode:
            raise RuntimeError(f"{' '.join(args)}: {res.stderr.strip()}")
        return res.stdout

    def submit(self, args: list[str], env: dict, cwd: Path) -> str:
        """sbatch with `env` (plus SLURM_CONF) from `cwd`; returns the job id."""
        res = subprocess.run(
            [_which("sbatch"), "--parsable", *args],
            env={**env, "SLURM_CONF": self.env["SLURM_CONF"]},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if res.returncode:
            raise RuntimeError(f"sbatch: {res.stderr.strip()}")
        job = res.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def daemon_logs(self, lines: int = 30) -> str:
        """The last lines of slurmctld's and slurmd's logs, for a failing test's message."""
        out = []
        for name in ("ctld.log", "d.log"):
            path = self.folder / name
            text = path.read_text(errors="replace").splitlines() if path.is_file() else []
            out += [f"--- {name}", *text[-lines:]]
        return "\n".join(out)

    def job(self, job: str) -> dict[str, str]:
        """`scontrol show job` as {key: value} (JobState, Restarts, TimeLimit, ...)."""
        out = self.cmd("scontrol", "show", "job", "-o", job)
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def array(self, job: str) -> dict[str, dict[str, str]]:
        """An array job's tasks as {ArrayTaskId: `scontrol show job` fields}; the tasks not
        started yet may share one entry ("0-2", "1,2")."""
        out = self.cmd("scontrol", "show", "job", "-o", job)
        tasks = [dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
                 for line in out.splitlines() if line.strip()]  # fmt: skip
        return {t["ArrayTaskId"]: t for t in tasks}

    def wait(self, job: str, done, timeout: float, what: str) -> dict[str, str]:
        """Poll the job until done(info) is true; raises TimeoutError naming `what`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job)
            if done(info):
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job}: {what} not within {timeout:.0f} s (last: {info})")


def _start(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    with log.open("ab") as f:
        return subprocess.Popen(args, env=env, stdout=f, stderr=subprocess.STDOUT)


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_idle(slurm: Slurm, procs: list[subprocess.Popen], timeout: float = 40) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        if slurm.cmd("sinfo", "-h", "-o", "%T", check=False).strip() == "idle":
            return
        time.sleep(0.5)
    logs = [slurm.folder / n for n in ("munged.log", "ctld.log", "d.log")]
    tail = " | ".join(
        p.read_text().strip().splitlines()[-1] for p in logs if p.is_file() and p.stat().st_size
    )
    raise SlurmUnavailable(f"the local Slurm did not come up within {timeout:.0f} s: {tail}")


@contextlib.contextmanager
def local_slurm() -> Iterator[Slurm]:
    """Start munged, slurmctld and slurmd in a private /tmp folder (a short path: the munge
    socket path is limited to ~100 bytes); yield the client; cancel jobs and stop them."""
    why = missing()
    if why:
        raise SlurmUnavailable(why)
    d = Path(tempfile.mkdtemp(prefix="hd-slurm-", dir="/tmp"))
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    (d / "slurm.conf").write_text(
        CONF.format(host=host, d=d, ctld_port=free_port(), d_port=free_port(), cpus=os.cpu_count())
    )
    slurm = Slurm(d)
    procs: list[subprocess.Popen] = []
    try:
        subprocess.run([_which("mungekey"), "-c", "-k", str(d / "munge.key")], check=True,
                       capture_output=True)  # fmt: skip
        procs.append(_start([_which("munged"), "-F", "-f", f"--socket={d}/munge.sock",
                             f"--key-file={d}/munge.key", f"--pid-file={d}/munged.pid",
                             f"--seed-file={d}/munged.seed", f"--log-file={d}/munged.log"],
                            d / "munged.out", slurm.env))  # fmt: skip
        procs.append(_start([_which("slurmctld"), "-D"], d / "ctld.out", slurm.env))
        procs.append(_start([_which("slurmd"), "-D"], d / "d.out", slurm.env))
        _wait_idle(slurm, procs)
        yield slurm
    finally:
        for job in slurm.jobs:
            slurm.cmd("scancel", job, check=False)
        if slurm.jobs:
            time.sleep(2)  # let slurmd end the steps before it stops
        _stop(procs)
        shutil.rmtree(d, ignore_errors=True)
