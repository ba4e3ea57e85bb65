"""A MIL head trained by two CPU processes through a real `accelerate launch` (gloo), on bags
of 2 to 40 tiles: both ranks run the same number of micro-steps and optimizer steps (no
hang), every slide is trained exactly once per epoch over the ranks, the weights agree."""

import json

import pytest
from test_train_ddp import launch_probe
from trainkit import run

from histodist.bench.mil import planted_slides, write_bag_set

pytestmark = pytest.mark.slow


def test_two_processes_train_every_slide_once_per_epoch(tmp_path):
    kw = dict(dim=16, tiles=(2, 40), planted=(1, 1), shift=3.0)
    train = planted_slides(9, seed=0, **kw)  # 9 slides over 2 ranks: one padding bag
    write_bag_set(tmp_path / "bags", {"train": train, "valid": planted_slides(5, seed=1,
                  prefix="v", **kw)}, per_shard=50)  # fmt: skip
    out = tmp_path / "probe"
    flags = ["--model", "abmil", "--mil-dim", "16", "--epochs", "2", "--accum-steps", "2",
             "--max-tiles", "16", "--workers", "1", "--batch-size", "1"]  # fmt: skip
    cmd = launch_probe(tmp_path, tmp_path / "bags", out, "mil", *flags)
    res = run(cmd, timeout=300, ACCELERATE_USE_CPU="true")
    assert res.returncode == 0, res.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["step"] == ranks[1]["step"] == 2 * 3  # ceil(ceil(9 / 2) / 2) per epoch
    assert ranks[0]["batches"] == ranks[1]["batches"] == {"0": 5, "1": 5}
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]
    slides = sorted(s.id for s in train)
    for epoch in ("0", "1"):
        a, b = ranks[0]["keys"][epoch], ranks[1]["keys"][epoch]
        assert sorted(a + b) == slides and not set(a) & set(b)  # each slide once
    assert ranks[0]["keys"]["0"] != ranks[0]["keys"]["1"]  # reshuffled every epoch
    lines = [json.loads(x) for x in (tmp_path / "runs/mil/metrics.jsonl").read_text().splitlines()]
    assert [x["val/num_samples"] for x in lines if "val/num_samples" in x] == [5, 5]
