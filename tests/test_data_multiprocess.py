"""Uneven shards over 2 ranks x 2 workers through a real `accelerate launch`.

One launch covers both contracts: every rank yields the same fixed number of training batches
(so DDP never hangs) and over the ranks an epoch reads every sample once, with fewer shards
than ranks x workers and a 1-sample shard (1, 15, 8) and with fewer shards than ranks (one
shard of 24); evaluation sees every sample exactly once.
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

from histodist.data import loader as data

# torchvision 0.29 deprecates its image decoders (histodist.data.loader silences it outside pytest)
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

SCRIPT = Path(__file__).parent / "scripts" / "data_ranks.py"


def shard_keys(shards: Path, name: str) -> set[str]:
    with tarfile.open(shards / name) as tf:
        return {m.name.split(".")[0] for m in tf.getmembers()}


@pytest.mark.slow
def test_two_ranks_two_workers_uneven_shards(tmp_path, pcam_jpeg):
    images = {"train": pcam_images(pcam_jpeg, "train", 12)}
    manifest = write_shards(tmp_path / "uneven", images, [1, 15, 8])
    write_shards(tmp_path / "one", images, [24])
    out = tmp_path / "ranks.json"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(SCRIPT), str(out), "2", str(tmp_path / "uneven"), str(tmp_path / "one")]  # fmt: skip
    proc = subprocess.run(
        cmd,
        env=accelerate_cpu_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = sorted(json.loads(out.read_text()), key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world"] for r in ranks} == {2}

    names = [s["name"] for s in manifest["splits"]["train"]["shards"]]
    every = set().union(*(shard_keys(tmp_path / "uneven", n) for n in names))
    steps = data.steps_per_epoch(24, 2, 4)  # 3 x 2 ranks x 4 = 24: no drop-last remainder
    for folder in range(2):
        for epoch in range(2):
            per_rank = [r["folders"][folder]["train"][epoch] for r in ranks]
            for r, batches in zip(ranks, per_rank, strict=True):
                assert r["folders"][folder]["train_len"] == len(batches) == steps
                assert all(len(b) == 4 for b in batches)
            keys = [k for batches in per_rank for b in batches for k in b]
            assert sorted(keys) == sorted(every)  # every sample once, over both ranks
        assert ranks[0]["folders"][folder]["train"][0] != ranks[0]["folders"][folder]["train"][1]
    assert "2 ranks x 2 workers" in ranks[0]["folders"][0]["describe"]

    evaluated = ranks[0]["eval"] + ranks[1]["eval"]
    assert len(evaluated) == manifest["splits"]["train"]["num_samples"] == 24
    assert not [k for k, n in Counter(evaluated).items() if n > 1]
    assert set(evaluated) == every
    assert set(ranks[1]["eval"]) == shard_keys(tmp_path / "uneven", names[1])  # shard 1 only
