"""Checkpoint folders: atomic last/best, keep-last-k rotation, weights-only loading."""

import torch
from accelerate import Accelerator

from histodist.checkpoint import copy_to_best, find_checkpoint, read_meta, save_last


def test_rotation_best_copy_and_no_temp_left(tmp_path):
    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters())
    model, opt = acc.prepare(model, opt)
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        with torch.no_grad():
            model.weight.fill_(step)
        save_last(
            acc,
            root,
            {"step": step, "epoch": 0},
            keep_last=2,
            extra={"model_ema.safetensors": model.state_dict()},
        )
        if step == 20:
            copy_to_best(acc, root, {"metric": "auc", "value": 0.9})
    names = sorted(p.name for p in root.iterdir())
    assert names == ["best", "last", "step-000000020"]  # keep_last=2: last + one older
    assert read_meta(root / "last")["step"] == 30 and read_meta(root / "best")["value"] == 0.9
    assert read_meta(root / "best")["step"] == 20
    assert (root / "last" / "model_ema.safetensors").is_file()
    assert find_checkpoint(tmp_path.parent / tmp_path.name, "best") == root / "best"
    # Loading the state restores the weights of that checkpoint.
    acc.load_state(str(root / "best"))
    assert torch.all(model.weight == 20)
