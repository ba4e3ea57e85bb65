"""Parameter groups (no decay on norms/biases, discriminative lr) and lr schedules."""

import math

import pytest

from histodist.config import ModelConfig, OptimConfig
from histodist.models import build_model, head_parameters
from histodist.training.optim import build_optimizer, build_scheduler, lr_at, param_groups


def test_no_weight_decay_on_norms_and_biases_and_backbone_scale():
    model = build_model(ModelConfig(model="resnet18"), num_classes=2)
    cfg = OptimConfig(lr=0.1, weight_decay=0.05, backbone_lr_scale=0.1)
    groups = param_groups(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    head = {id(p) for p in head_parameters(model)}
    seen = 0
    for g in groups:
        for p in g["params"]:
            seen += 1
            name = names[id(p)]
            no_decay = p.ndim == 1  # BN weights/biases, conv/linear biases
            assert g["weight_decay"] == (0.0 if no_decay else 0.05), name
            assert g["lr"] == pytest.approx(0.1 if id(p) in head else 0.01), name
    assert seen == len(names)


def test_layer_decay_groups_scale_lr_by_depth():
    model = build_model(ModelConfig(model="resnet18"), num_classes=2)
    groups = param_groups(model, OptimConfig(lr=1.0, layer_decay=0.5))
    lrs = sorted({round(g["lr"], 6) for g in groups})
    assert lrs[-1] == 1.0 and lrs[0] < 0.1 and len(lrs) > 3


def test_sgd_nesterov_and_adamw():
    model = build_model(ModelConfig(model="small-cnn"), num_classes=2)
    sgd = build_optimizer(model, OptimConfig(optimizer="sgd", momentum=0.9, nesterov=True))
    assert sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    adamw = build_optimizer(model, OptimConfig())
    assert type(adamw).__name__ == "AdamW"


def test_cosine_with_warmup_and_onecycle_shapes():
    cfg = OptimConfig(schedule="cosine", min_lr_ratio=0.01)
    f = [lr_at(s, 100, cfg, warmup=10) for s in range(100)]
    assert all(a < b for a, b in zip(f[:10], f[1:11], strict=True))  # linear warmup rises
    assert f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))  # then decays
    assert lr_at(100, 100, cfg, warmup=10) == pytest.approx(0.01)
    one = OptimConfig(schedule="onecycle", min_lr_ratio=0.01)
    g = [lr_at(s, 100, one, warmup=0) for s in range(101)]
    assert g[0] == pytest.approx(1 / 25) and max(g) == pytest.approx(1.0)
    assert g.index(max(g)) == 30 and g[-1] == pytest.approx(1e-4)


def test_scheduler_steps_every_group_from_its_own_peak():
    model = build_model(ModelConfig(model="resnet18"), num_classes=2)
    cfg = OptimConfig(lr=1.0, backbone_lr_scale=0.1, schedule="cosine", min_lr_ratio=0.0)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=10, warmup_steps=0)
    for _ in range(5):
        opt.step()
        sched.step()
    lrs = sorted({round(g["lr"], 6) for g in opt.param_groups})
    half = 0.5 * (1 + math.cos(math.pi * 0.5))
    assert lrs == [pytest.approx(0.1 * half), pytest.approx(half)]


def test_linear_lr_scaling_follows_the_global_batch():
    from histodist.config import OptimConfig
    from histodist.training.optim import global_batch, scaled_lr

    cfg = OptimConfig(lr=1e-3, batch_size=64, accum_steps=2, lr_scaling="linear")
    assert global_batch(cfg, 4) == 512
    assert scaled_lr(cfg, 4) == pytest.approx(1e-3 * 512 / 256)
    assert scaled_lr(OptimConfig(lr=1e-3, batch_size=64, accum_steps=2), 4) == 1e-3


def test_cpu_threads_auto_shares_the_usable_cores_between_local_processes(monkeypatch):
    import os

    import torch

    from histodist.training.distributed import set_cpu_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3}, raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert set_cpu_threads(0, torch.device("cpu")) == 2 == torch.get_num_threads()
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
        assert set_cpu_threads(0, torch.device("cpu")) == 1
        assert set_cpu_threads(3, torch.device("cpu")) == 3 == torch.get_num_threads()
        torch.set_num_threads(1)  # GPU runs: auto leaves torch's setting alone
        assert set_cpu_threads(0, torch.device("cuda")) == 1
    finally:
        torch.set_num_threads(before)
