"""Run under `accelerate launch` (2 processes): train and eval loaders on each rank.

Checks inside the launch that every rank yields exactly len(train loader) batches, then gathers
(over torch.distributed, as training would) what each rank saw and lets rank 0 write it as
JSON to argv[2] for the test to compare with the manifest.
"""

from __future__ import annotations

import json
import sys

import torch.distributed as dist
from accelerate import Accelerator

from histodist import data


def main(shards: str, out: str, workers: int) -> None:
    acc = Accelerator(cpu=True)
    rank, world = acc.process_index, acc.num_processes
    assert world == 2, f"expected 2 processes, got {world}"
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
    evaluated = [
        k
        for b in data.eval_loader(
            shards, "train", batch_size=4, rank=rank, world_size=world, workers=workers
        )
        for k in b["key"]
    ]
    mine = {"rank": rank, "train_len": len(train), "train": epochs, "eval": evaluated}
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if acc.is_main_process:
        with open(out, "w") as f:
            json.dump(gathered, f)
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
