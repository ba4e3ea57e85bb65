"""Run histodist.train's real setup and loop, recording what each rank trained on.

    accelerate launch ... tests/scripts/train_probe.py OUT_DIR <histodist.train flags>

Writes OUT_DIR/rank<r>.json: world size, the sample keys of every training batch per epoch
(a MIL run's padding bags, of loss weight 0, left out) and the number of batches, a checksum
of the final parameters (so a test can check the ranks agree), and where training ended
(steps, samples, lr). PROBE_STOP_AFTER=K raises the preemption flag on every rank after
its K-th training batch: a preemption at a known batch, for resume tests.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

from histodist import train
from histodist.config import parse_args
from histodist.training import build


class Recorder:
    """Wraps the training loader; records batch keys per epoch and passes batches through."""

    def __init__(self, loader, stop_after: int = 0, preempt=None):
        self.loader, self.epoch, self.keys, self.batches = loader, 0, {}, {}
        self.stop_after, self.preempt, self.seen = stop_after, preempt, 0

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.loader.set_epoch(epoch)

    def __iter__(self):
        for batch in self.loader:
            weight = batch.get("weight", [1.0] * len(batch["key"]))
            keys = [k for k, w in zip(batch["key"], weight, strict=True) if float(w) > 0]
            self.keys.setdefault(str(self.epoch), []).extend(keys)
            self.batches[str(self.epoch)] = self.batches.get(str(self.epoch), 0) + 1
            self.seen += 1
            if self.seen == self.stop_after:
                self.preempt.received = "PROBE_STOP_AFTER"
            yield batch


def main() -> None:
    out = Path(sys.argv[1])
    p = train.setup(parse_args(sys.argv[2:]))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pid{p.accelerator.process_index}").write_text(str(os.getpid()))
    p.preempt.install()
    stop = int(os.environ.get("PROBE_STOP_AFTER", "0"))
    p.train_loader = Recorder(p.train_loader, stop, p.preempt)
    st = build.resume_state(p)
    reason = train.fit(p, st)
    p.log.close()
    acc = p.accelerator
    model = acc.unwrap_model(p.model)
    h = hashlib.sha256()
    # Parameters, not buffers: BN running stats differ by each rank's last batch (DDP
    # broadcasts rank 0's buffers at the next forward; checkpoints hold rank 0's).
    for name, t in sorted(model.named_parameters()):
        h.update(name.encode() + t.detach().cpu().contiguous().numpy().tobytes())
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{acc.process_index}.json").write_text(
        json.dumps(
            {
                "world_size": acc.num_processes,
                "rank": acc.process_index,
                "reason": reason,
                "step": st.step,
                "samples": st.samples,
                "epoch": st.epoch,
                "lr": max(g["lr"] for g in p.optimizer.param_groups),
                "keys": p.train_loader.keys,
                "batches": p.train_loader.batches,
                "params_sha256": h.hexdigest(),
                "param_sum": float(sum(t.detach().double().sum() for t in model.parameters())),
            }
        )
    )


if __name__ == "__main__":
    main()
