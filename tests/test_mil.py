"""MIL heads on slide bags: the heads against their definitions, the DDP bag plan, the planted
signal (a task whose answer is known) through histodist.train and evaluate, exact resume, and
the heatmap drawing."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from histodist import evaluate, explain, export, mil, predict, train
from histodist.bench.mil import planted_slides, score_head, write_bag_set
from histodist.config import parse_args
from histodist.data import bags
from histodist.training import build

DIM = 16


def _bag(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, n, DIM, generator=torch.Generator().manual_seed(seed))


def _head(name: str, classes: int = 2) -> mil.MILHead:
    torch.manual_seed(0)
    return mil.build(name, dim=DIM, num_classes=classes, hidden=16, k=3).eval()


# ----------------------------------------------------------------------------- the heads
@pytest.mark.parametrize("name", mil.MIL_HEADS)
def test_heads_give_slide_logits_and_a_score_per_tile(name):
    head = _head(name)
    for n in (1, 2, 3, 5, 17):  # TransMIL pads each of these to another square
        out = head.bag(_bag(n))
        assert out.logits.shape == (1, 2) and out.scores.shape == (1, n)
        assert torch.isfinite(out.logits).all() and (out.scores >= 0).all()
        assert torch.equal(head(_bag(n)), out.logits)  # forward(x): the logits alone
        if name not in ("mean", "max"):  # attention: a distribution over the tiles
            assert out.scores.sum().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("name", mil.MIL_HEADS)
def test_tile_scores_stay_float32_under_mixed_precision(name):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _head(name).bag(_bag(40).half())
    assert out.scores.dtype == torch.float32
    if name not in ("mean", "max"):
        assert out.scores.sum().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("name", ["abmil", "clam-sb", "mean", "max"])
def test_pooling_heads_do_not_depend_on_the_order_of_the_tiles(name):
    head, x = _head(name), _bag(9)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(1))
    a, b = head.bag(x), head.bag(x[:, perm])
    assert torch.allclose(a.logits, b.logits, atol=1e-5)
    assert torch.allclose(a.scores[:, perm], b.scores, atol=1e-6)


def test_mean_and_max_pool_the_instance_logits():
    x = _bag(7)
    for name in ("mean", "max"):
        head = _head(name)
        inst = head.classifier(head.embed(x))[0]  # (N, C) instance logits
        want = inst.mean(0) if name == "mean" else inst[inst.softmax(-1)[:, 1].argmax()]
        assert torch.allclose(head(x)[0], want, atol=1e-6)
        assert torch.allclose(head.bag(x).scores[0], inst.softmax(-1)[:, 1], atol=1e-6)


def test_abmil_is_gated_attention_pooling():
    head, x = _head("abmil"), _bag(6)
    h = head.embed(x)[0]
    g = head.attention
    a = g.c(torch.tanh(g.a[0](h)) * torch.sigmoid(g.b[0](h)))[:, 0].softmax(0)  # Ilse eq. 9
    assert torch.allclose(head(x)[0], head.classifier((a[:, None] * h).sum(0)), atol=1e-6)


def _clam_reference(head: mil.CLAMSB, x: torch.Tensor, label: int) -> torch.Tensor:
    """CLAM_SB's instance loss written out as its inst_eval / inst_eval_out (one
    Linear(H, 2) per class; in-class: top k -> 1, bottom k -> 0; for more than two classes
    ("subtyping") every other class: top k -> 0, the sum divided by the number of classes)."""
    h, a = head.attend(x)
    h, a = h[0], a[0]
    classes, k = head.num_classes, min(head.k, len(a) // 2)
    w, b = head.instance.weight.view(classes, 2, -1), head.instance.bias.view(classes, 2)
    top, bottom = torch.topk(a, k)[1], torch.topk(-a, k)[1]
    total = 0.0
    for c in range(classes):
        if c == label:
            logits = torch.cat([h[top], h[bottom]]) @ w[c].T + b[c]
            total = total + F.cross_entropy(logits, torch.tensor([1] * k + [0] * k))
        elif classes > 2:
            total = total + F.cross_entropy(h[top] @ w[c].T + b[c], torch.zeros(k).long())
    return total / classes if classes > 2 else total


@pytest.mark.parametrize("classes", [2, 3])
def test_clam_instance_loss_is_clams(classes):
    head = _head("clam-sb", classes)
    for n, label in ((10, 1), (7, 0), (9, classes - 1)):
        x = _bag(n, seed=n)
        _, aux = head(x, label=torch.tensor([label]))
        assert aux.item() == pytest.approx(_clam_reference(head, x, label).item(), rel=1e-5)


@pytest.mark.parametrize("name", mil.MIL_HEADS)
def test_every_parameter_is_in_the_graph_of_every_step(name):
    """DDP (find_unused_parameters off) needs a gradient for each parameter on every rank,
    also for a negative slide of CLAM and for a one-tile padding bag."""
    head = _head(name).train()
    for n, label in ((12, 0), (12, 1), (1, 0)):
        head.zero_grad(set_to_none=True)
        logits, aux = head(_bag(n), label=torch.tensor([label]))
        (F.cross_entropy(logits, torch.tensor([label])) + aux).backward()
        assert all(p.grad is not None for p in head.parameters()), (name, n, label)


# ----------------------------------------------------------------------------- the plan
@pytest.mark.parametrize("slides,world,accum", [(7, 2, 1), (7, 2, 2), (8, 4, 3), (3, 4, 1)])
def test_epoch_plan_same_steps_every_slide_once_mean_gradient(slides, world, accum):
    plan = bags.epoch_plan(slides, world_size=world, accum_steps=accum, seed=3, epoch=1)
    steps = math.ceil(slides / world)
    assert [len(r) for r in plan] == [steps] * world
    real = sorted(i for r in plan for i, _ in r if i != bags.PAD)
    assert real == list(range(slides))
    assert all(w == 0 for r in plan for i, w in r if i == bags.PAD)
    # The loop's windows are micro-steps [j, j + accum); it divides each loss by accum and
    # DDP averages over the ranks: a window's gradient is sum(w_b g_b) / (world x accum),
    # the mean of its real bags' gradients when their weights sum to world x accum.
    for j in range(0, steps, accum):
        ws = [w for r in plan for i, w in r[j : j + accum] if i != bags.PAD]
        assert len(set(ws)) == 1 and sum(ws) == pytest.approx(world * accum)
    again = bags.epoch_plan(slides, world_size=world, accum_steps=accum, seed=3, epoch=1)
    other = bags.epoch_plan(slides, world_size=world, accum_steps=accum, seed=3, epoch=2)
    assert again == plan and (slides < 3 or other != plan)


def test_tile_sampling_is_seeded_by_seed_epoch_and_slide():
    pick = bags.sample_tiles(100, 10, seed=0, epoch=2, slide="s1")
    assert len(pick) == 10 and len(set(pick.tolist())) == 10 and (np.diff(pick) > 0).all()
    assert np.array_equal(pick, bags.sample_tiles(100, 10, seed=0, epoch=2, slide="s1"))
    assert not np.array_equal(pick, bags.sample_tiles(100, 10, seed=0, epoch=3, slide="s1"))
    assert not np.array_equal(pick, bags.sample_tiles(100, 10, seed=0, epoch=2, slide="s2"))
    assert bags.sample_tiles(10, 10, seed=0, epoch=0, slide="s1") is None
    assert bags.sample_tiles(10, 0, seed=0, epoch=0, slide="s1") is None


# ----------------------------------------------------------------------------- training
def _flags(shards, runs, name: str, *more: str) -> list[str]:
    return ["--shards", str(shards), "--runs-dir", str(runs), "--run-name", name,
            "--wandb", "disabled", "--no-progress", "--workers", "0", "--threads", "1",
            "--mil-dim", "32", "--log-every", "4", "--precision", "no", *more]  # fmt: skip


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """64 training and 48 held-out slides of 40-80 tiles of 32-d N(0, I) vectors; a positive
    slide holds 1 or 2 tiles shifted by 5 along a fixed direction."""
    kw = dict(dim=32, tiles=(40, 80), planted=(1, 2), shift=5.0)
    valid = planted_slides(48, seed=1, prefix="v", **kw)
    out = tmp_path_factory.mktemp("planted") / "bags"
    write_bag_set(out, {"train": planted_slides(64, seed=0, prefix="t", **kw), "valid": valid},
                  per_shard=1000)  # fmt: skip
    return out, {s.id: s.planted for s in valid}


def test_planted_signal_abmil_finds_the_tiles_mean_pooling_does_worse(planted, tmp_path):
    shards, truth = planted
    fig = {}
    for head in ("abmil", "mean"):
        flags = _flags(shards, tmp_path, head, "--model", head, "--epochs", "10", "--lr", "3e-3",
                       "--warmup-epochs", "0.5")  # fmt: skip
        assert train.main(flags) == 0
        fig[head] = score_head(tmp_path / head, shards, "valid", truth)
    print(f"held-out slide AUC / attention precision: {fig}")
    assert fig["abmil"]["auc"] >= 0.95 and fig["abmil"]["attention_precision"] >= 0.8
    assert fig["mean"]["auc"] <= fig["abmil"]["auc"] - 0.05

    # slide-level evaluate: the same AUC, its interval, per-slide CSV, patients (2 slides each)
    out = tmp_path / "eval"
    argv = ["--run", str(tmp_path / "abmil"), "--split", "valid", "--workers", "0",
            "--bootstrap", "200", "--no-progress", "--wandb", "disabled", "--out", str(out)]  # fmt: skip
    assert evaluate.main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["slide"]["n"] == m["expected_samples"] == 48
    assert m["slide"]["auc"] == pytest.approx(fig["abmil"]["auc"], abs=1e-4)
    lo, hi = m["slide"]["auc_ci95"]
    assert lo <= m["slide"]["auc"] <= hi and "balanced_accuracy" in m["slide"]
    assert m["group_mean"]["num_groups"] == 24 and m["group_max"]["n"] == 24
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 48 and {r["key"] for r in rows} == set(truth)
    assert all(r["group"] == f"patient-v{int(r['key'][1:]) // 2:04d}" for r in rows)
    assert evaluate.main([*argv, "--tta", "8"]) == 2  # a bag has no dihedral views


def _train_in_process(flags: list[str], stop_after: int = 0) -> str:
    """histodist.train's setup and epoch loop in this process; with `stop_after` the
    preemption flag is raised after that many training batches (a kill at a known step)."""
    p = train.setup(parse_args(flags))
    if stop_after:
        loader, seen = p.train_loader, [0]

        class Stopper:
            def __len__(self):
                return len(loader)

            def set_epoch(self, e):
                loader.set_epoch(e)

            def __iter__(self):
                for batch in loader:
                    seen[0] += 1
                    if seen[0] == stop_after:
                        p.preempt.received = "SIGTERM"
                    yield batch

        p.train_loader = Stopper()
    try:
        return train.fit(p, build.resume_state(p))
    finally:
        p.log.close()


def test_interrupted_mil_run_resumes_to_the_same_weights(tmp_path):
    """Bags of 3 to 30 tiles, --max-tiles 12 (sampled per epoch), dropout, 2-bag
    accumulation: killed mid-epoch, resumed, bitwise the uninterrupted run's weights."""
    kw = dict(dim=DIM, tiles=(3, 30), planted=(1, 2), shift=3.0)
    write_bag_set(tmp_path / "bags", {"train": planted_slides(11, seed=0, **kw),
                                      "valid": planted_slides(4, seed=1, prefix="v", **kw)},
                  per_shard=64)  # fmt: skip
    more = ["--model", "clam-sb", "--epochs", "2", "--max-tiles", "12", "--drop-rate", "0.25",
            "--accum-steps", "2", "--clam-k", "2", "--deterministic", "--seed", "5"]  # fmt: skip
    assert _train_in_process(_flags(tmp_path / "bags", tmp_path, "a", *more)) == "done"
    b = _flags(tmp_path / "bags", tmp_path, "b", *more)
    assert _train_in_process(b, stop_after=7) == "preempted"
    meta = json.loads((tmp_path / "b/checkpoints/last/meta.json").read_text())
    assert (meta["epoch"], meta["batch_in_epoch"], meta["step"]) == (0, 8, 4)  # a window ends
    assert _train_in_process([*b, "--resume"]) == "done"
    wa = load_file(str(tmp_path / "a/checkpoints/last/model.safetensors"))
    wb = load_file(str(tmp_path / "b/checkpoints/last/model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((tmp_path / "b/checkpoints/last/meta.json").read_text())["step"] == 12

    # the run folder serves predict (one row per slide) and a weights export; Grad-CAM and
    # fixed-shape graphs are refused in one line
    run_dir, out = str(tmp_path / "a"), tmp_path / "pred.csv"
    assert predict.main(["--run", run_dir, "--input", str(tmp_path / "bags"), "--split",
                         "valid", "--out", str(out), "--workers", "0", "--no-progress"]) == 0  # fmt: skip
    assert len(out.read_text().splitlines()) == 1 + 4
    assert export.main(["--run", run_dir, "--format", "safetensors"]) == 0
    side = json.loads((tmp_path / "a/export/model.safetensors.json").read_text())
    assert side["input"]["shape"] == [1, "tiles", DIM]
    assert export.main(["--run", run_dir, "--format", "onnx"]) == 2
    assert explain.main(["--run", run_dir, "--no-progress"]) == 2


def test_mil_runs_refuse_what_a_bag_cannot_take(tiny_pcam_shards, tmp_path, capsys):
    kw = dict(dim=DIM, tiles=(3, 5), planted=(1, 1), shift=3.0)
    m = write_bag_set(tmp_path / "bags", {"train": planted_slides(4, seed=0, **kw),
                                          "valid": planted_slides(2, seed=1, prefix="v", **kw)})  # fmt: skip
    cases = [
        (tiny_pcam_shards, [], "embed them first"),
        (tmp_path / "bags", ["--batch-size", "8"], "--accum-steps"),
        (tmp_path / "bags", ["--val-tta", "8"], "no views"),
        (tmp_path / "bags", ["--class-balance", "sampler"], "--class-balance loss"),
    ]
    del m["slides"]
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat/manifest.json").write_text(json.dumps(m))
    cases.append((tmp_path / "flat", [], "no per-slide index"))
    for shards, more, why in cases:
        assert train.main(_flags(shards, tmp_path, "x", "--model", "abmil", *more)) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("histodist.train: error:") and why in last, last
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- heatmaps
def test_heatmap_puts_each_tile_score_where_the_tile_lies(tmp_path):
    from PIL import Image
    from scipy.stats import rankdata

    from histodist.inference import heatmap

    thumb = np.full((60, 80, 3), 235, np.uint8)  # an 8000 x 6000 slide at 1/100
    coords = np.array([[1000 + 1500 * i, 1000 + 1500 * j] for j in range(3) for i in range(4)])
    extents = np.full(12, 1000)
    scores = np.random.default_rng(0).random(12)
    scores[[3, 7]] = scores[5]  # ties share a percentile
    values = heatmap.scaled(scores, "rank")
    assert np.allclose(values, (rankdata(scores, method="max") - 1) / 11)
    m = heatmap.score_map((60, 80), coords, extents, values, level0_size=(8000, 6000))
    for (x, y), v in zip(coords // 100, values, strict=True):
        assert np.allclose(m[y : y + 10, x : x + 10], v)  # the tile's 10 x 10 thumbnail pixels
    covered = ~np.isnan(m)
    assert covered.sum() == 12 * 100
    over = heatmap.overlay(thumb, m, cmap="turbo", alpha=0.5)
    assert (over[~covered] == thumb[~covered]).all()
    import matplotlib

    top = coords[np.argmax(values)] // 100
    want = np.round(0.5 * 235 + 0.5 * 255 * np.array(matplotlib.colormaps["turbo"](1.0)[:3]))
    assert (over[top[1] + 5, top[0] + 5] == want).all()

    read = []

    def read_tile(i: int) -> np.ndarray:
        read.append(i)
        return np.zeros((8, 8, 3), np.uint8)

    path = heatmap.save_heatmap(tmp_path / "h.png", thumb, coords, extents, scores,
                                level0_size=(8000, 6000), top=4, title="slide s1",
                                read_tile=read_tile)  # fmt: skip
    assert read == np.argsort(-scores, kind="stable")[:4].tolist()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 800
