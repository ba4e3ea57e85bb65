"""Run histodist.train's real `main()` in one rank and record what that rank did.

    PROBE_OUT=DIR [PROBE_KILL=<rank>:<step>] python -m cluster_probe <histodist.train flags>

Launched by tests/test_cluster.py through the launch scripts with TRAIN_MODULE=cluster_probe
and tests/ on PYTHONPATH. Writes:
- DIR/shards-rank<r>.txt: every shard URL the rank opened (appended from any process);
- DIR/rank<r>-attempt<a>.json after training: world size, exit code, the sha256 of the final
  trainable parameters (a = torchrun's restart count, 0 without torchrun).
PROBE_KILL=r:k makes rank r die abruptly (os._exit, no checkpoint, no cleanup) right after its
k-th optimizer step on the first attempt only: a crashed worker for the elastic-restart test.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from histodist import train
from histodist.data import loader as data

RANK = int(os.environ.get("RANK", "0"))
ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
OUT = Path(os.environ["PROBE_OUT"])


def record_shards() -> None:
    """Wrap histodist.data.loader's open_url (the loader's only way to a shard) to log each URL."""
    real = data.open_url

    def open_url(url, **kw):
        with open(OUT / f"shards-rank{RANK}.txt", "a") as f:
            f.write(url + "\n")
        return real(url, **kw)

    data.open_url = open_url


def arm_kill(spec: str) -> None:
    rank, step = (int(x) for x in spec.split(":"))
    if rank != RANK or ATTEMPT != 0:
        return
    steps = [0]

    def after_step(optimizer, args, kwargs) -> None:
        steps[0] += 1
        if steps[0] == step:
            (OUT / f"killed-rank{RANK}").write_text(str(step))
            os._exit(17)

    register_optimizer_step_post_hook(after_step)


def params_sha256(model: torch.nn.Module) -> str:
    """Hash of the trainable parameters. Not the buffers: BatchNorm running statistics are
    updated by each rank's own last forward pass (DDP broadcasts them before a forward)."""
    h = hashlib.sha256()
    for name, t in sorted(model.named_parameters()):
        h.update(name.encode() + t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    record_shards()
    if os.environ.get("PROBE_KILL"):
        arm_kill(os.environ["PROBE_KILL"])
    parts = []
    real_setup = train.setup

    def setup(cfg):
        parts.append(real_setup(cfg))
        return parts[-1]

    train.setup = setup  # run() looks `setup` up at call time: keep a handle on the model
    code = train.main(sys.argv[1:])
    result = {"rank": RANK, "attempt": ATTEMPT, "exit_code": code}
    if parts:
        acc = parts[-1].accelerator
        model = acc.unwrap_model(parts[-1].model)
        result.update(world_size=acc.num_processes, params_sha256=params_sha256(model))
    (OUT / f"rank{RANK}-attempt{ATTEMPT}.json").write_text(json.dumps(result))
    return code


if __name__ == "__main__":
    sys.exit(main())
