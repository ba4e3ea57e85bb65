"""Which process of a cluster run this is, and how work is shared between them.

Every rank computes the same plan, takes its share of the shards, and writes them; the
manifest is written, once, by the first rank to find every shard finished after its own
(histodist.ingest.slides.claim; under a launcher that starts all ranks at once, rank 0 waits
for the others, so the job ends with the manifest). Launchers, in the order they are looked
for:
- torchrun / `accelerate launch`: RANK, WORLD_SIZE (all ranks run at once);
- a Slurm array (`sbatch --array=0-N[:step]`, launch/slurm/shard_wsi.sbatch):
  (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / step of SLURM_ARRAY_TASK_COUNT (tasks may
  run one after the other: nobody waits; a list such as --array=3,7 gives no position, and
  is refused);
- `srun` with several tasks: SLURM_PROCID of SLURM_NTASKS (all at once).
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Rank:
    """This process's `rank` of `world`; `together`: all ranks run at the same time."""

    rank: int = 0
    world: int = 1
    together: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_env(env: Mapping[str, str] | None = None) -> Rank:
    """The rank of this process from its launcher's environment (Rank() when none)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return _checked(int(env["RANK"]), int(env["WORLD_SIZE"]), True)
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        return _array_rank(env)
    if int(env.get("SLURM_NTASKS", 1)) > 1 and "SLURM_PROCID" in env:
        return _checked(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), True)
    return Rank()


def _array_rank(env: Mapping[str, str]) -> Rank:
    task, count = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_COUNT"])
    first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
    step = int(env.get("SLURM_ARRAY_TASK_STEP", 1))
    rank, off = divmod(task - first, step)
    if off or not 0 <= rank < count:  # a list (--array=3,7): Slurm gives no task's position
        raise ValueError(
            f"Slurm array task {task} is not one of {count} tasks {first}, {first + step}, ... "
            "(SLURM_ARRAY_TASK_MIN/STEP/COUNT): submit the array as a range, --array=0-N"
        )
    return Rank(rank, count, False)


def _checked(rank: int, world: int, together: bool) -> Rank:
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world} (launcher environment)")
    return Rank(rank, world, together)


def share(weights: Sequence[float], world: int) -> list[int]:
    """The rank of each unit: largest first to the least loaded rank (ties: lowest rank), so
    that every rank gets about the same total weight; the same on every rank."""
    owner = [0] * len(weights)
    heap = [(0.0, r) for r in range(world)]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        load, r = heapq.heappop(heap)
        owner[i] = r
        heapq.heappush(heap, (load + weights[i], r))
    return owner
