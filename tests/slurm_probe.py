"""histodist.train's real `main()`, paused after every optimizer step in a job's first run.

    TRAIN_MODULE=slurm_probe PROBE_STEP_PAUSE=1.5 sbatch launch/slurm/train.sbatch ...

Launched by tests/test_slurm.py through train.sbatch with tests/ on PYTHONPATH. slurmctld
checks time limits periodically (every ~30 s on Slurm 22.05), so a time-limit warning lands up
to that long after it is due; the pause keeps a tiny run training until it lands, on a fast
machine too. Only the first run pauses (SLURM_RESTART_COUNT unset or 0): the requeued run
trains at full speed.
"""

from __future__ import annotations

import os
import sys
import time

from torch.optim.optimizer import register_optimizer_step_post_hook

from histodist import train


def main() -> int:
    pause = float(os.environ.get("PROBE_STEP_PAUSE", "0"))
    if pause and int(os.environ.get("SLURM_RESTART_COUNT") or 0) == 0:
        register_optimizer_step_post_hook(lambda *_: time.sleep(pause))
    return train.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
