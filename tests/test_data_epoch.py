"""A training epoch reads every sample once, whatever the shards, ranks and workers.

The property: over all ranks, one epoch without resampling reads min(N, world x steps x batch)
distinct samples (at least N - world x batch: only the drop-last remainder is left out), none
twice unless the ranks need more samples than there are (N < world x batch), and every rank
yields exactly steps_per_epoch batches. Checked on the plan alone over a wide grid, on real
PCam shards by running each (rank, worker) pipeline in-process over a grid of shard sizes,
and with real DataLoader worker processes for a few cases (the 2-process `accelerate launch`
is in test_data_multiprocess.py).
"""

from __future__ import annotations

import io
import itertools
import math
import random
import shutil
import tarfile
from collections import Counter

import pytest
from shardkit import pcam_images, write_shards

from histodist.data import epoch_plan
from histodist.data import loader as data

# torchvision 0.29 deprecates its image decoders (histodist.data.loader silences it outside pytest)
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

N = 40  # real PCam patches, 20 per class
SIZES = {
    "one-sample-shard": [1, 23, 9, 7],
    "one-shard": [40],  # fewer shards than ranks
    "two-shards": [31, 9],  # fewer shards than ranks x workers
    "very-uneven": [1, 2, 30, 1, 6],
    "equal": [5] * 8,
}


def check_epoch(rank_batches: list[list[list[str]]], n: int, batch: int, steps: int) -> Counter:
    """Assert the property on the keys each rank's batches hold; return the read counts."""
    world = len(rank_batches)
    for batches in rank_batches:
        assert len(batches) == steps and all(len(b) == batch for b in batches)
    reads = Counter(k for batches in rank_batches for b in batches for k in b)
    total = world * steps * batch
    assert len(reads) == min(n, total) >= n - world * batch
    assert max(reads.values()) == (1 if total <= n else math.ceil(total / n))
    return reads


def test_plan_covers_the_split_over_a_wide_grid():
    rng = random.Random(0)
    for _ in range(400):
        sizes = [rng.choice([0, 1, 2, 7, 50, 333]) for _ in range(rng.randint(1, 9))]
        sizes[0] = sizes[0] or 1
        world, workers, batch = rng.randint(1, 9), rng.randint(0, 5), rng.randint(1, 40)
        n, steps = sum(sizes), data.steps_per_epoch(sum(sizes), world, batch)
        plan = epoch_plan.plan_epoch(sizes, world_size=world, batch_size=batch, steps=steps,
                                     workers=workers, seed=3, epoch=rng.randint(0, 5))  # fmt: skip
        quotas = epoch_plan.worker_quotas(steps, workers)
        ranks = []
        for rank in plan:
            assert [sum(map(len, w)) for w in rank] == [q * batch for q in quotas]
            assert all(0 <= p.start < p.stop <= sizes[p.shard] for w in rank for p in w)
            keys = [f"{p.shard}/{i}" for w in rank for p in w for i in range(p.start, p.stop)]
            ranks.append([keys[i : i + batch] for i in range(0, len(keys), batch)])
        check_epoch(ranks, n, batch, steps)
        summary = epoch_plan.plan_summary(plan, sizes)
        assert summary["left_out"] == max(0, n - world * steps * batch) < world * batch


def test_plan_is_shared_by_ranks_and_changes_with_the_epoch():
    kw = dict(world_size=4, batch_size=32, steps=31, workers=4, seed=0)
    sizes = [450] * 8 + [400]
    assert epoch_plan.plan_epoch(sizes, epoch=1, **kw) == epoch_plan.plan_epoch(
        sizes, epoch=1, **kw
    )
    assert epoch_plan.plan_epoch(sizes, epoch=1, **kw) != epoch_plan.plan_epoch(
        sizes, epoch=2, **kw
    )


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory, pcam_jpeg) -> dict:
    images = {"train": pcam_images(pcam_jpeg, "train", N // 2)}
    root = tmp_path_factory.mktemp("epoch")
    for name, sizes in SIZES.items():
        write_shards(root / name, images, sizes)
    return {name: str(root / name) for name in SIZES}


def simulate_rank(monkeypatch, loader: data.ShardLoader) -> list[list[str]]:
    """The keys of a rank's batches, each worker's pipeline run in this process, interleaved
    as DataLoader interleaves its workers (one item from each in turn)."""
    k = max(1, loader.workers)
    per_worker = []
    for w in range(k):
        monkeypatch.setattr(data, "worker_context", lambda w=w: (w, k))
        per_worker.append([b["key"] for b in loader.dataset if "image" in b])
    monkeypatch.undo()
    return [b for turn in itertools.zip_longest(*per_worker) for b in turn if b is not None]


def epoch_keys(monkeypatch, shards, *, world, workers, batch, epoch=0, real=False):
    ranks = []
    for rank in range(world):
        loader = data.train_loader(shards, batch_size=batch, rank=rank, world_size=world,
                                   workers=workers, shuffle_buffer=8, seed=5)  # fmt: skip
        loader.set_epoch(epoch)
        if real:
            ranks.append([b["key"] for b in loader])
        else:
            ranks.append(simulate_rank(monkeypatch, loader))
    return ranks


@pytest.mark.parametrize("name", list(SIZES))
def test_every_sample_once_per_epoch_on_real_shards(monkeypatch, shard_sets, name):
    for world, workers, batch in itertools.product([1, 2, 3, 5], [0, 3], [4, 3]):
        steps = data.steps_per_epoch(N, world, batch)
        ranks = epoch_keys(monkeypatch, shard_sets[name], world=world, workers=workers,
                           batch=batch, epoch=world)  # fmt: skip
        check_epoch(ranks, N, batch, steps)


def test_more_ranks_than_samples_per_batch_repeat_only_to_fill(monkeypatch, shard_sets):
    """N=40 < world x batch = 80: every rank still yields its one batch; each sample read
    twice at most, every sample read."""
    ranks = epoch_keys(monkeypatch, shard_sets["two-shards"], world=5, workers=2, batch=16)
    reads = check_epoch(ranks, N, 16, 1)
    assert sum(reads.values()) == 80


@pytest.mark.parametrize(
    ("name", "world", "workers"), [("one-sample-shard", 2, 3), ("one-shard", 3, 2)]
)
def test_dataloader_workers_follow_the_plan(monkeypatch, shard_sets, name, world, workers):
    """Real worker processes yield what the in-process simulation predicts, in its order."""
    real = epoch_keys(monkeypatch, shard_sets[name], world=world, workers=workers, batch=4,
                      epoch=1, real=True)  # fmt: skip
    check_epoch(real, N, 4, data.steps_per_epoch(N, world, 4))
    simulated = epoch_keys(monkeypatch, shard_sets[name], world=world, workers=workers,
                           batch=4, epoch=1)  # fmt: skip
    assert real == simulated


def test_workers_open_only_the_shards_of_their_plan(monkeypatch, shard_sets):
    """No shard is opened beyond a worker's pieces (not even to fetch one sample more)."""
    opened = []
    real_open = data.open_url
    monkeypatch.setattr(
        data, "open_url", lambda url, **kw: opened.append(url) or real_open(url, **kw)
    )
    for rank in range(2):
        loader = data.train_loader(shard_sets["equal"], batch_size=4, rank=rank, world_size=2,
                                   workers=0, shuffle_buffer=8)  # fmt: skip
        pieces = loader.dataset.plan(1)[rank][0]
        opened.clear()
        assert len(list(loader)) == 5
        assert opened == [loader.dataset.shards[p.shard][0] for p in pieces]


def test_describe_says_how_the_split_is_divided(shard_sets):
    loader = data.train_loader(shard_sets["one-sample-shard"], batch_size=4, rank=0,
                               world_size=3, workers=2)  # fmt: skip
    line = loader.describe()
    for part in ("40 samples in 4 shards", "3 ranks x 2 workers", "3 batches of 4 per rank",
                 "36 samples per epoch (4 left out, 0 twice)"):  # fmt: skip
        assert part in line, line
    resampled = data.train_loader(shard_sets["equal"], batch_size=4, rank=0, world_size=2,
                                  workers=2, resample=True)  # fmt: skip
    assert "drawn with replacement" in resampled.describe()


@pytest.mark.filterwarnings("ignore:skipping")
def test_samples_lost_to_decode_errors_are_made_up(monkeypatch, shard_sets, tmp_path):
    """Two undecodable images: every rank still yields its batches, the loss is counted and
    made up by reading other samples."""
    src = tmp_path / "s"
    shutil.copytree(shard_sets["equal"], src)
    path = src / "train-000003.tar"
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    jpgs = [m.name for m, _ in members if m.name.endswith(".jpg")][:2]
    with tarfile.open(path, "w") as tf:
        for m, payload in members:
            payload = b"not a jpeg" if m.name in jpgs else payload
            m.size = len(payload)
            tf.addfile(m, io.BytesIO(payload))
    errors = 0
    ranks = []
    for rank in range(2):
        loader = data.train_loader(str(src), batch_size=4, rank=rank, world_size=2, workers=2,
                                   shuffle_buffer=8)  # fmt: skip
        ranks.append([b["key"] for b in loader])
        errors += loader.stats()["decode_errors"]
    # the two, and again wherever a worker making up its batches reads that shard
    assert errors >= 2 and [len(r) for r in ranks] == [5, 5]
    reads = Counter(k for r in ranks for b in r for k in b)
    assert len(reads) >= N - 2 - 2 and sum(reads.values()) == N
    assert not {j.split(".")[0] for j in jpgs} & set(reads)


def test_coverage_bench_grid(capsys):
    from histodist.bench import coverage

    assert coverage.main([]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in coverage.LAYOUTS)
    row = coverage.grid_row("4000 9x450", [450] * 8 + [400], world=4, workers=4, batch=32)
    assert row["distinct"] == row["read"] == 3968 / 4000 and row["max_reads"] == 1
