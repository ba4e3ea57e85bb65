"""`python -m histodist.bench train`: training-step throughput and time to accuracy.

Measured side by side in one run, same model, batch, precision, optimizer and worker count:
  (a) ceiling: the model alone, a synthetic float batch already on the device, histodist's
      own step (loop.micro_step + loop.optimizer_step) with no data and no augmentation;
  (b) histodist: shards -> data.train_loader -> to the device -> augment preset -> same step;
  (c) baseline: torchvision ImageFolder + PIL transforms (flips, ToTensor, Normalize; Resize
      when the input size differs) + DataLoader + a plain PyTorch loop;
and b/a ("pipeline efficiency"), b/c. The three are warmed up, then their timed windows are
interleaved (a b c a b c ...), so that other load on a shared machine hits them alike; images/s
is the median over windows. Per configuration: time per step spent waiting for the next batch
vs the rest (and, for (b), in augmentation), peak RSS of the main process and of each worker,
peak device memory.
Time to accuracy: (b) and (c) trained in lockstep from the same initial weights until the AUC
on a fixed validation subset (evaluated every --eval-every steps, clock paused) first reaches
--target-auc, or --tta-budget-s of training time runs out.
Figures, not tests: they depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from histodist.bench.common import (
    PeakMemory,
    machine_info,
    measure_interleaved,
    median,
    sync,
    table,
    write_json,
)
from histodist.samples import bench_images

# CI-sized mode: a tiny model on 32 px inputs, a few steps, a few seconds of time to accuracy.
QUICK = dict(model="small-cnn", image_size=32, batch_size=16, warmup=1, steps=1, repeats=2,
             tta_budget_s=1.0, eval_every=2, valid_images=32, shuffle_buffer=32, workers=1)  # fmt: skip
Step = Callable[[], tuple[int, float]]  # one training step -> (images, seconds waiting for data)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m histodist.bench train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = p.add_argument
    a("--shards", default="shards/pcam-sample", help="shard folder for (b)")
    a("--data", default=bench_images(), help="the same images as train/ and valid/ "
      "ImageFolder trees, for (c) and the validation subset")  # fmt: skip
    a("--model", default="resnet18", help="histodist model name (timm name or seed model)")
    a("--image-size", type=int, default=96, help="model input size (96 or 224)")
    a("--batch-size", type=int, default=128)
    a("--precision", default="auto", choices=("auto", "no", "bf16"),
      help="bf16 autocast or fp32 (no); auto = histodist.train's rule for this device")  # fmt: skip
    a("--workers", type=int, default=2, help="DataLoader workers for (b) and (c)")
    a("--device", default="auto", choices=("auto", "cpu", "cuda"))
    a("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    a("--augment", default="pcam", help="histodist augmentation preset for (b)")
    a("--like-for-like", action=argparse.BooleanOptionalAction, default=True,
      help="also measure (b2): histodist with the baseline's flips only")  # fmt: skip
    a("--lr", type=float, default=1e-3, help="AdamW lr, constant after a short warmup")
    a("--warmup", type=int, default=3, help="untimed steps before each measurement")
    a("--steps", type=int, default=10, help="timed steps per repeat")
    a("--repeats", type=int, default=3, help="repeats; images/s is their median")
    a("--tta-budget-s", type=float, default=600.0, help="training time per pipeline (0: skip)")
    a("--target-auc", type=float, default=0.85)
    a("--eval-every", type=int, default=25, help="steps between validations (time to accuracy)")
    a("--valid-images", type=int, default=1024, help="fixed balanced validation subset size")
    a("--shuffle-buffer", type=int, default=2000)
    a("--seed", type=int, default=0)
    a("--json", help="also write the figures to this file")
    a("--quick", action="store_true", help=f"CI-sized defaults: {QUICK}")
    if "--quick" in argv:  # smaller defaults; flags given explicitly still win
        p.set_defaults(**QUICK)
    return p.parse_args(argv)


def device_of(args: argparse.Namespace) -> torch.device:
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


# ----------------------------------------------------------------------------- histodist (b)
def histodist_parts(args: argparse.Namespace, runs_dir: str, name: str):
    """histodist's own training parts (Accelerator, prepared model, optimizer, scheduler,
    augmentation, train loader) from histodist.train.setup(), as `histodist.train` builds them."""
    from histodist import train
    from histodist.config import Config, replace

    if device_of(args).type == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"  # Accelerator() reads it: stay on the CPU
    cfg = replace(
        Config(),
        data={"shards": args.shards, "image_size": args.image_size, "num_classes": 0,
              "workers": args.workers, "shuffle_buffer": args.shuffle_buffer},
        augment={"augment": args.augment},
        model={"model": args.model, "channels_last": args.channels_last,
               "compile": getattr(args, "compile", False)},
        optim={"batch_size": args.batch_size, "lr": args.lr, "schedule": "constant",
               "warmup_epochs": 0.05},
        train={"precision": args.precision, "seed": args.seed, "runs_dir": runs_dir,
               "run_name": name, "epochs": 1000},
        log={"wandb": "disabled", "log_images": False, "progress": False},
    )  # fmt: skip
    return train.setup(cfg)


def batches(loader) -> Iterator[dict]:
    """Batches of consecutive epochs of a ShardLoader or DataLoader (never runs out)."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def histodist_step(p, source: Iterator[dict], seed: int) -> Step:
    """One step of histodist's loop: next batch, loop.micro_step (device copy, augmentation,
    forward, backward), loop.optimizer_step (clip, step, schedule)."""
    from histodist.training import loop
    from histodist.training.distributed import step_seed

    st, gen = loop.State(), torch.Generator(device=p.accelerator.device)
    p.model.train()

    def step() -> tuple[int, float]:
        t0 = time.perf_counter()
        batch = next(source)
        wait = time.perf_counter() - t0
        gen.manual_seed(step_seed(seed, st.step, 0))  # as train_one_epoch seeds each step
        window = loop.Window()
        window.add(loop.micro_step(p, batch, gen, True, 1, first=False))
        loop.optimizer_step(p, st, window)
        return len(batch["label"]), wait

    return step


def ceiling_step(p, args: argparse.Namespace) -> Step:
    """(a): the same step on one synthetic normalised batch that never leaves the device."""
    dev = p.accelerator.device
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(dev)
    y = torch.randint(0, 2, (args.batch_size,), generator=g).to(dev)
    q = dataclasses.replace(p, augment=lambda t, gen: t)  # no augmentation: the model alone
    step = histodist_step(q, iter(lambda: {"image": x, "label": y}, None), args.seed)
    return step


class TimedAugment:
    """Wraps an Augment to record its device time per call (synchronised before and after)."""

    def __init__(self, fn, device):
        self.fn, self.device, self.seconds = fn, device, []

    def __call__(self, x, gen):
        sync(self.device)
        t0 = time.perf_counter()
        out = self.fn(x, gen)
        sync(self.device)
        self.seconds.append(time.perf_counter() - t0)
        return out


# ----------------------------------------------------------------------------- baseline (c)
@dataclasses.dataclass
class Baseline:
    """The hand-written loop's pieces: same model, optimizer, schedule, loss and clipping."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: nn.Module
    loader: torch.utils.data.DataLoader
    device: torch.device
    bf16: bool
    channels_last: bool
    grad_clip: float


def baseline_loader(args, mean, std, native: int) -> torch.utils.data.DataLoader:
    """torchvision ImageFolder + PIL transforms in the workers + DataLoader, shuffled."""
    from torchvision import datasets, transforms

    tf = [transforms.Resize(args.image_size)] if args.image_size != native else []
    tf += [transforms.RandomHorizontalFlip(), transforms.RandomVerticalFlip(),
           transforms.ToTensor(), transforms.Normalize(mean, std)]  # fmt: skip
    ds = datasets.ImageFolder(str(Path(args.data) / "train"), transform=transforms.Compose(tf))
    return torch.utils.data.DataLoader(
        ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
        drop_last=True, pin_memory=torch.cuda.is_available(),
    )  # fmt: skip


def baseline_parts(args, cfg, device: torch.device) -> Baseline:
    """(c) with the model, optimizer and schedule histodist builds from the same config (same
    seed, hence the same initial weights) but none of histodist's data or loop code."""
    from histodist.data.loader import load_manifest
    from histodist.models import build_model
    from histodist.training.optim import build_optimizer, build_scheduler

    manifest = load_manifest(args.shards)
    loader = baseline_loader(args, manifest["mean"], manifest["std"], manifest["image"]["height"])
    torch.manual_seed(cfg.train.seed)  # as histodist.training.build.build_parts: identical init
    model = build_model(cfg.model, num_classes=cfg.data.num_classes, image_size=args.image_size)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    optimizer = build_optimizer(model, cfg.optim)
    per_epoch = len(loader)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps=cfg.train.epochs * per_epoch,
                                warmup_steps=round(cfg.optim.warmup_epochs * per_epoch))  # fmt: skip
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    return Baseline(model, optimizer, scheduler, criterion, loader, device,
                    cfg.train.precision == "bf16", args.channels_last, cfg.optim.grad_clip)  # fmt: skip


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def baseline_step(b: Baseline, source: Iterator) -> Step:
    """The plain PyTorch loop a user would write."""
    b.model.train()

    def step() -> tuple[int, float]:
        t0 = time.perf_counter()
        x, y = next(source)
        wait = time.perf_counter() - t0
        x, y = x.to(b.device, non_blocking=True), y.to(b.device, non_blocking=True)
        if b.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(b.device, b.bf16):
            loss = b.criterion(b.model(x).float(), y)
        loss.backward()
        if b.grad_clip > 0:
            nn.utils.clip_grad_norm_(b.model.parameters(), b.grad_clip)
        b.optimizer.step()
        b.scheduler.step()
        b.optimizer.zero_grad(set_to_none=True)
        return len(y), wait

    return step


# ----------------------------------------------------------------------------- time to accuracy
def valid_subset(folder: Path, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed, class-balanced random subset of folder/<class>/*: uint8 (n,3,H,W), int64 (n,)."""
    from torchvision.io import ImageReadMode, decode_image

    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    rng, xs, ys = random.Random(seed), [], []
    for label, cls in enumerate(classes):
        files = sorted((folder / cls).iterdir())
        for f in rng.sample(files, min(len(files), n // len(classes))):
            xs.append(decode_image(str(f), ImageReadMode.RGB))
            ys.append(label)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)


@torch.no_grad()
def valid_auc(model: nn.Module, valid, transform, device, bf16: bool, batch: int) -> float:
    """ROC AUC of `model` on the fixed subset (eval mode, then back to train mode)."""
    from histodist.metrics import auc

    x, y = valid
    model.eval()
    probs = []
    for i in range(0, len(y), batch):
        xb = transform(x[i : i + batch].to(device))
        with autocast(device, bf16):
            probs.append(model(xb).float().softmax(1))
    model.train()
    return round(auc(torch.cat(probs), y), 4)


class Race:
    """One pipeline trained until evaluate() >= target or the training-time budget is spent
    (then evaluated once more). Its clock runs during its own steps only (including the
    loader's start-up in the first one), not during evaluation. `advance()` does one step, so
    two races can run in lockstep and a change of load on a shared machine hits both alike."""

    def __init__(self, step: Step, evaluate: Callable[[], float], args, device):
        self.step, self.evaluate, self.args, self.device = step, evaluate, args, device
        self.trained, self.steps, self.curve, self.reached = 0.0, 0, [], None

    @property
    def running(self) -> bool:
        return self.reached is None and self.trained < self.args.tta_budget_s

    def advance(self) -> None:
        t0 = time.perf_counter()
        self.step()
        sync(self.device)
        self.trained += time.perf_counter() - t0
        self.steps += 1
        if self.steps % self.args.eval_every == 0:
            self._validate()
            if self.curve[-1]["auc"] >= self.args.target_auc:
                self.reached = round(self.trained, 2)

    def _validate(self) -> None:
        auc = self.evaluate()
        self.curve.append({"step": self.steps, "train_s": round(self.trained, 2), "auc": auc})

    def result(self) -> dict:
        if not self.curve or self.curve[-1]["step"] != self.steps:  # budget ran out between
            self._validate()
        aucs = [c["auc"] for c in self.curve]
        return {"seconds_to_target": self.reached, "steps": self.steps,
                "train_s": round(self.trained, 2), "best_auc": max(aucs), "last_auc": aucs[-1],
                "curve": self.curve}  # fmt: skip


# ----------------------------------------------------------------------------- suite
# The baseline's augmentation (random horizontal and vertical flips) as histodist ops, for a
# like-for-like (b2): dihedral adds a random transpose, which costs the same per sample.
FLIPS = [{"op": "dihedral"}]


def throughput(args, runs_dir: str) -> dict:
    """(a), (b), [(b2)], (c) side by side: each warmed up, then their timed windows interleaved.
    (b2) is (b) with flips only and shares (b)'s loader. Idle loaders only prefetch (workers x
    prefetch_factor batches), then wait."""
    from histodist import augment as aug

    p = histodist_parts(args, runs_dir, "throughput")
    device = p.accelerator.device
    timed = {"b_histodist": TimedAugment(p.augment, device)}
    b = baseline_parts(args, p.cfg, device)
    sources = [batches(p.train_loader), batches(b.loader)]
    configs = {
        "a_ceiling": ceiling_step(p, args),
        "b_histodist": histodist_step(
            dataclasses.replace(p, augment=timed["b_histodist"]), sources[0], args.seed
        ),
    }
    if args.like_for_like:
        flips = aug.build(FLIPS, out_size=args.image_size, mean=p.meta["mean"], std=p.meta["std"])
        timed["b2_histodist_flips"] = TimedAugment(flips, device)
        q = dataclasses.replace(p, augment=timed["b2_histodist_flips"])
        configs["b2_histodist_flips"] = histodist_step(q, sources[0], args.seed)
    configs["c_baseline"] = baseline_step(b, sources[1])
    with PeakMemory(device) as mem:
        res = measure_interleaved(configs, device=device, warmup=args.warmup,
                                  repeats=args.repeats, steps=args.steps, memory=mem)  # fmt: skip
    for source in sources:
        source.close()  # stops the loader workers
    for key, t in timed.items():
        res[key]["augment_ms"] = round(1e3 * median(t.seconds[args.warmup :]), 2)
    rate = {k: r["images_per_s"] for k, r in res.items()}
    res["pipeline_efficiency_b_over_a"] = round(rate["b_histodist"] / rate["a_ceiling"], 3)
    res["b_over_c"] = round(rate["b_histodist"] / rate["c_baseline"], 3)
    if args.like_for_like:
        res["b2_over_c"] = round(rate["b2_histodist_flips"] / rate["c_baseline"], 3)
        res["b2_over_a"] = round(rate["b2_histodist_flips"] / rate["a_ceiling"], 3)
    res["time_split"] = time_split(res)
    res["precision"] = p.cfg.train.precision  # resolved ("auto" -> bf16 or no)
    return res


def time_split(res: dict) -> dict:
    """Where a step's time goes, in % of the median step of each configuration: waiting for
    the next batch, augmentation (b only), and the rest (copy to the device, forward, backward,
    optimizer). The model-only share is the ceiling's step time over this one's."""
    out = {}
    for key in ("b_histodist", "b2_histodist_flips", "c_baseline"):
        if key not in res:
            continue
        r = res[key]
        step, aug = r["step_ms"], r.get("augment_ms", 0.0)
        out[key] = {
            "data_wait_pct": round(100 * r["data_wait_ms"] / step, 1),
            "augment_pct": round(100 * aug / step, 1),
            "rest_pct": round(100 * (step - r["data_wait_ms"] - aug) / step, 1),
            "ceiling_step_pct": round(100 * res["a_ceiling"]["step_ms"] / step, 1),
        }
    return out


def time_to_accuracy(args, runs_dir: str) -> dict:
    """(b) and (c) from the same initial weights, same validation subset and evaluation,
    trained in lockstep (one step of each in turn)."""
    p = histodist_parts(args, runs_dir, "tta")
    device, bf16 = p.accelerator.device, p.cfg.train.precision == "bf16"
    valid = valid_subset(Path(args.data) / "valid", args.valid_images, args.seed)
    net = p.accelerator.unwrap_model(p.model)
    b = baseline_parts(args, p.cfg, device)
    sources = [batches(p.train_loader), batches(b.loader)]
    races = {
        "histodist": Race(histodist_step(p, sources[0], args.seed),
                          lambda: valid_auc(net, valid, p.eval_transform, device, bf16,
                                            args.batch_size), args, device),
        "baseline": Race(baseline_step(b, sources[1]),
                         lambda: valid_auc(b.model, valid, p.eval_transform, device, bf16,
                                           args.batch_size), args, device),
    }  # fmt: skip
    while any(r.running for r in races.values()):
        for r in races.values():
            if r.running:
                r.advance()
    out = {k: r.result() for k, r in races.items()}
    for source in sources:
        source.close()
    tb, tc = out["histodist"]["seconds_to_target"], out["baseline"]["seconds_to_target"]
    return {"target_auc": args.target_auc, "budget_s": args.tta_budget_s,
            "valid_images": len(valid[1]), "eval_every": args.eval_every, **out,
            "speedup_c_over_b": round(tc / tb, 3) if tb and tc else None}  # fmt: skip


def run(args) -> dict:
    torch.manual_seed(args.seed)
    report = {"suite": "train", "machine": machine_info(), "config": vars(args).copy()}
    with tempfile.TemporaryDirectory(prefix="histodist-bench-train-") as runs_dir:
        report["throughput"] = throughput(args, runs_dir)
        report["config"]["device"] = str(device_of(args))
        report["config"]["precision_resolved"] = report["throughput"].pop("precision")
        if args.tta_budget_s > 0:
            report["time_to_accuracy"] = time_to_accuracy(args, runs_dir)
    return report


LABELS = {"a_ceiling": "(a) model alone, synthetic batch on device",
          "b_histodist": "(b) histodist: shards + device augment + loop",
          "b2_histodist_flips": "(b2) = (b) with flips only, like (c)",
          "c_baseline": "(c) baseline: ImageFolder + PIL + plain loop"}  # fmt: skip


def rows(report: dict) -> list[dict]:
    """One table row per configuration (used by this suite and by `bench all`)."""
    t = report["throughput"]
    return [{"config": LABELS[k], **t[k]} for k in LABELS if k in t]


def render(report: dict) -> str:
    cfg, t = report["config"], report["throughput"]
    m = report["machine"]
    head = (f"histodist train benchmark: {cfg['model']}, {cfg['image_size']} px, batch "
            f"{cfg['batch_size']}, precision {cfg.get('precision_resolved')} (--precision "
            f"{cfg['precision']}), {cfg['workers']} workers, "
            f"device {cfg.get('device')} ({m.get('gpu', str(m['cpus']) + ' CPUs')}, load "
            f"{m['load_avg'][0]})")  # fmt: skip
    cols = ["config", "images_per_s", "step_ms", "data_wait_ms", "compute_ms", "augment_ms",
            "main_rss_mb", "worker_rss_mb", "device_peak_mb"]  # fmt: skip
    out = [head, table(rows(report), cols), f"pipeline efficiency b/a = "
           f"{t['pipeline_efficiency_b_over_a']:.3f}, b/c = {t['b_over_c']:.3f}"]  # fmt: skip
    if "b2_over_c" in t:
        out.append(f"like for like (flips only): b2/a = {t['b2_over_a']:.3f}, "
                   f"b2/c = {t['b2_over_c']:.3f}")  # fmt: skip
    for key, s in t["time_split"].items():
        name = LABELS[key].split(" ", 1)[0]
        out.append(f"{name} step time: data wait {s['data_wait_pct']}%, augmentation "
                   f"{s['augment_pct']}%, copy + forward + backward + optimizer "
                   f"{s['rest_pct']}% (the ceiling's step is {s['ceiling_step_pct']}% of it)")  # fmt: skip
    tta = report.get("time_to_accuracy")
    if tta:
        out.append(f"time to AUC {tta['target_auc']} on {tta['valid_images']} valid images "
                   f"(budget {tta['budget_s']:.0f} s of training each):")  # fmt: skip
        trows = [{"pipeline": k, **tta[k]} for k in ("histodist", "baseline")]
        out.append(table(trows, ["pipeline", "seconds_to_target", "steps", "train_s",
                                 "best_auc", "last_auc"]))  # fmt: skip
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not (Path(args.shards) / "manifest.json").is_file() or not Path(args.data).is_dir():
        print(f"histodist.bench train: error: need shards at {args.shards} (manifest.json) and "
              f"images at {args.data}/train, /valid; pass --shards and --data", file=sys.stderr)  # fmt: skip
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("histodist.bench train: error: --device cuda but torch sees no CUDA device; "
              "use --device cpu or auto", file=sys.stderr)  # fmt: skip
        return 2
    if device_of(args).type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    report = run(args)
    print(render(report))
    if args.json:
        write_json(args.json, report)
    return 0
