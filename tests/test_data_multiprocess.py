"""Uneven shards (3) over 2 ranks x 2 workers through a real `accelerate launch`.

One launch covers both contracts: every rank yields the same fixed number of training batches
(so DDP never hangs) from its own shards, and evaluation sees every sample exactly once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from shardkit import pcam_images, write_shards
from trainkit import accelerate_cpu_env, free_port

from histodist import data

# torchvision 0.29 deprecates its image decoders (histodist.data silences it outside pytest)
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

SCRIPT = Path(__file__).parent / "scripts" / "data_ranks.py"


def shard_keys(shards: Path, name: str) -> set[str]:
    with tarfile.open(shards / name) as tf:
        return {m.name.split(".")[0] for m in tf.getmembers()}


@pytest.mark.slow
def test_two_ranks_two_workers_uneven_shards(tmp_path, pcam_jpeg):
    shards = tmp_path / "shards"
    manifest = write_shards(shards, {"train": pcam_images(pcam_jpeg, "train", 12)}, [10, 8, 6])
    out = tmp_path / "ranks.json"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(SCRIPT), str(shards), str(out), "2"]  # fmt: skip
    proc = subprocess.run(
        cmd, env=accelerate_cpu_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = sorted(json.loads(out.read_text()), key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1]

    steps = data.steps_per_epoch(24, 2, 4)
    names = [s["name"] for s in manifest["splits"]["train"]["shards"]]
    own = [
        shard_keys(shards, names[0]) | shard_keys(shards, names[2]),
        shard_keys(shards, names[1]),
    ]
    for r in ranks:  # fixed steps, full batches, only the rank's own shards (0,2 | 1)
        assert r["train_len"] == steps
        for epoch in r["train"]:
            assert len(epoch) == steps and all(len(b) == 4 for b in epoch)
            assert {k for b in epoch for k in b} <= own[r["rank"]]
        assert r["train"][0] != r["train"][1]  # reshuffled per epoch

    evaluated = ranks[0]["eval"] + ranks[1]["eval"]
    assert len(evaluated) == manifest["splits"]["train"]["num_samples"] == 24
    assert not [k for k, n in Counter(evaluated).items() if n > 1]
    assert set(evaluated) == set().union(*(shard_keys(shards, n) for n in names))
    assert set(ranks[1]["eval"]) == own[1]  # rank 1 read shard 1 only
