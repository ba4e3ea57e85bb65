"""Run under `accelerate launch` (2 processes): train and eval loaders on each rank.

    data_ranks.py OUT WORKERS SHARDS [SHARDS ...]

Checks inside the launch that every rank yields exactly len(train loader) batches for two
epochs of each shard folder, then gathers (over torch.distributed, as training would) what
each rank saw, with the evaluation keys of the first folder, and lets rank 0 write it as JSON
to OUT for the test to compare with the manifests.
"""

from __future__ import annotations

import json
import sys

import torch.distributed as dist
from accelerate import Accelerator

from histodist.data import loader as data


def train_epochs(shards: str, rank: int, world: int, workers: int, acc) -> dict:
    train = data.train_loader(
        shards, batch_size=4, rank=rank, world_size=world, seed=7, workers=workers, shuffle_buffer=8
    )
    epochs = []
    for epoch in range(2):
        train.set_epoch(epoch)
        keys = [b["key"] for b in train]
        assert len(keys) == len(train), (rank, len(keys), len(train))
        acc.wait_for_everyone()  # a rank with more steps would hang DDP here: it does not
        epochs.append(keys)
    return {"train_len": len(train), "train": epochs, "describe": train.describe()}


def main(out: str, workers: int, folders: list[str]) -> None:
    acc = Accelerator(cpu=True)
    rank, world = acc.process_index, acc.num_processes
    assert world == 2, f"expected 2 processes, got {world}"
    trained = [train_epochs(shards, rank, world, workers, acc) for shards in folders]
    evaluated = [
        k
        for b in data.eval_loader(
            folders[0], "train", batch_size=4, rank=rank, world_size=world, workers=workers
        )
        for k in b["key"]
    ]
    mine = {"rank": rank, "world": world, "folders": trained, "eval": evaluated}
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if acc.is_main_process:
        with open(out, "w") as f:
            json.dump(gathered, f)
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
