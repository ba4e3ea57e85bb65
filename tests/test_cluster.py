"""Cluster behaviour on one CPU machine: two "nodes" on loopback, shards over HTTP, a worker
crash under torchrun. Every run is real: the launch scripts, `accelerate launch` / `torchrun`,
histodist.train on tiny shards of real PCam patches (small-cnn, 32 px, a few steps).

Ranks run tests/cluster_probe.py (histodist.train's main() plus a record of the shards each
rank opened and a hash of its final parameters).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import shardkit
from safetensors.torch import load_file
from trainkit import free_port

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory, pcam_jpeg) -> Path:
    """4 train shards x 8 and 2 valid shards x 8 of real PCam patches."""
    out = tmp_path_factory.mktemp("cluster") / "shards"
    images = {
        "train": shardkit.pcam_images(pcam_jpeg, "train", 16),
        "valid": shardkit.pcam_images(pcam_jpeg, "valid", 8),
    }
    shardkit.write_shards(out, images, samples_per_shard=8)
    return out


def train_flags(shards: str, runs: Path, name: str, epochs: int = 1) -> list[str]:
    return [
        "--dataset", "pcam", "--shards", shards, "--model", "small-cnn", "--image-size", "32",
        "--batch-size", "4", "--epochs", str(epochs), "--workers", "0", "--seed", "1",
        "--runs-dir", str(runs), "--run-name", name, "--wandb", "disabled", "--no-progress",
        "--no-log-images",
    ]  # fmt: skip


def launch_env(tmp_path: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NCCL_"))}
    env.update(
        ACCELERATE_USE_CPU="true",
        MIXED_PRECISION="no",
        GPUS_PER_NODE="1",
        TRAIN_MODULE="cluster_probe",
        PROBE_OUT=str(tmp_path / "probe"),
        PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
    )
    return {**env, **extra}


def probe(tmp_path: Path, name: str) -> dict:
    return json.loads((tmp_path / "probe" / name).read_text())


def shards_read(tmp_path: Path, rank: int, split: str) -> set[str]:
    lines = (tmp_path / "probe" / f"shards-rank{rank}.txt").read_text().split()
    return {Path(url).name for url in lines if Path(url).name.startswith(split)}


def test_two_nodes_on_loopback(tmp_path, shards):
    """launch/multi_node.sh on "two machines" (127.0.0.1), one process each."""
    env = launch_env(
        tmp_path, NUM_NODES="2", MAIN_PROCESS_IP="127.0.0.1", MAIN_PROCESS_PORT=str(free_port())
    )
    cmd = ["bash", str(LAUNCH / "multi_node.sh"), *train_flags(str(shards), tmp_path, "2n")]
    nodes = [
        subprocess.Popen(cmd, env={**env, "NODE_RANK": str(r)}, cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for r in (1, 0)
    ]  # fmt: skip
    outs = [p.communicate(timeout=400)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(o[-3000:] for o in outs)

    ranks = [probe(tmp_path, f"rank{r}-attempt0.json") for r in (0, 1)]
    assert [(r["world_size"], r["exit_code"]) for r in ranks] == [(2, 0), (2, 0)]
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]
    train = [shards_read(tmp_path, r, "train") for r in (0, 1)]
    valid = [shards_read(tmp_path, r, "valid") for r in (0, 1)]
    assert train[0] and train[1] and not train[0] & train[1]
    assert valid[0] | valid[1] == {"valid-000000.tar", "valid-000001.tar"}
    assert not valid[0] & valid[1]
    assert (tmp_path / "2n" / "checkpoints" / "last" / "model.safetensors").is_file()


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class _DroppingHandler(SimpleHTTPRequestHandler):
    """Static files with HTTP Range; the first GET of each train shard is cut off mid-body."""

    dropped: set = set()

    def log_message(self, *args) -> None:
        pass

    def copyfile(self, source, outputfile) -> None:
        name = self.path.lstrip("/")
        if name.startswith("train") and name not in self.dropped:
            self.dropped.add(name)
            outputfile.write(source.read(2000))  # Content-Length promised the whole file
            self.close_connection = True
            return
        super().copyfile(source, outputfile)

    def send_head(self):
        rng = self.headers.get("Range")
        if not rng:
            return super().send_head()
        start = int(rng.split("=")[1].rstrip("-"))
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return None
        f = path.open("rb")
        f.seek(start)
        size = path.stat().st_size
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.send_header("Content-Length", str(size - start))
        self.end_headers()
        return f


@pytest.fixture
def http_base(shards):
    _DroppingHandler.dropped = set()
    srv = _Server(("127.0.0.1", 0), partial(_DroppingHandler, directory=str(shards)))
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def run_train(tmp_path: Path, flags: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "histodist.train", *flags], cwd=ROOT, capture_output=True,
        text=True, timeout=300, env={**launch_env(tmp_path), **env},
    )  # fmt: skip


def test_http_shards_train_like_local_files(tmp_path, shards, http_base):
    """The same run from http:// (every train shard's first download dropped mid-file) and
    from the folder gives identical weights; a missing shard fails naming its URL."""
    srv, base = http_base
    both = []
    for name, src in (("http", base), ("local", str(shards))):
        proc = run_train(tmp_path, [*train_flags(src, tmp_path, name), "--deterministic"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        both.append(load_file(tmp_path / name / "checkpoints" / "last" / "model.safetensors"))
    assert _DroppingHandler.dropped  # the resume path was exercised
    assert both[0].keys() == both[1].keys()
    assert all((both[0][k] == both[1][k]).all() for k in both[0])

    # --no-resample reads the shards in order, so the missing one is hit within two batches.
    (shards / "train-000001.tar").rename(tmp_path / "hidden.tar")
    try:
        proc = run_train(tmp_path, [*train_flags(base, tmp_path, "missing"), "--no-resample"])
    finally:
        (tmp_path / "hidden.tar").rename(shards / "train-000001.tar")
    assert proc.returncode != 0
    assert f"{base}/train-000001.tar" in proc.stderr and "404" in proc.stderr


def test_torchrun_restarts_a_killed_worker_from_the_last_checkpoint(tmp_path, shards):
    """Rank 1 dies after step 3 of 8; torchrun restarts both ranks, which resume at step 2."""
    env = launch_env(
        tmp_path, GPUS_PER_NODE="2", MAX_RESTARTS="1", MAIN_PROCESS_PORT=str(free_port()),
        PROBE_KILL="1:3", RDZV_ID="elastic-test",
    )  # fmt: skip
    flags = [*train_flags(str(shards), tmp_path, "elastic", epochs=2), "--checkpoint-every", "2"]
    proc = subprocess.run(
        ["bash", str(LAUNCH / "torchrun_elastic.sh"), *flags], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert (tmp_path / "probe" / "killed-rank1").read_text() == "3"
    assert "resumed" in log and "step 2" in log
    ranks = [probe(tmp_path, f"rank{r}-attempt1.json") for r in (0, 1)]
    assert [(r["world_size"], r["exit_code"]) for r in ranks] == [(2, 0), (2, 0)]
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]
    meta = json.loads((tmp_path / "elastic" / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["step"] == 8 and meta["epoch"] == 2
