"""`python -m histodist.bench gpu`: every GPU figure of histodist in one command.

    python -m histodist.bench gpu [--shards DIR] [--json bench-results/gpu.json]
    python -m histodist.bench gpu --device cpu --shards DIR      # the CI-sized run

On a CUDA device (sized for under 8 minutes on an H100/H200; not yet timed on one), with only the package and the repository's
PCam sample (sharded into --work first when --shards is not given):
  device: name, compute capability, memory, driver, torch / CUDA / cuDNN versions;
  throughput: resnet50, bf16, channels_last, at 96 and 224 px, each without and with
      --compile: model-only images/s (histodist's own step on a synthetic batch already on
      the device) vs end-to-end images/s (shards -> loader -> device -> pcam augmentation ->
      the same step), efficiency = their ratio, the data-wait fraction, peak device memory;
  host syncs per step (end to end, no logging) counted by torch.cuda.set_sync_debug_mode
      and by intercepting the operations that synchronise (histodist.bench.syncs);
  the largest batch that fits at 224 px (doubling from --batch-size up to --max-batch);
  a real training run: `histodist.train` on the sample, the default recipe (resnet18, pcam
      preset, the resolved precision) for --train-epochs epochs, validated every
      --eval-every steps: best valid AUC and seconds to AUC 0.85;
  evaluate on the device (--precision auto) vs on the CPU in fp32: AUC within 0.002;
  export to ONNX (fp32, its own parity check) and onnxruntime vs the model on the device.
Prints one table, writes JSON (--json), and exits 1 naming each check that did not hold;
nothing is skipped silently. `--device cpu` runs the same code CI-sized (small CNN, 32 px,
a few steps): the GPU-only targets (efficiency, AUC 0.85) are reported, not checked.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from histodist.bench.common import PeakMemory, machine_info, measure_interleaved, table
from histodist.bench.common import write_json as _write_json
from histodist.samples import bench_images

TARGET_EFFICIENCY, TARGET_AUC, AUC_TOLERANCE, ONNX_TOLERANCE = 0.95, 0.85, 0.002, 1e-3
GPU = dict(model="resnet50", sizes="96,224", batch_size=256, warmup=8, steps=15, repeats=3,
           compile="no,yes", max_batch=4096, sync_steps=10, train_model="resnet18",
           train_epochs=5, train_image_size=96, eval_every=40)  # fmt: skip
CPU = dict(model="small-cnn", sizes="32", batch_size=8, warmup=1, steps=2, repeats=1,
           compile="no", max_batch=16, sync_steps=3, train_model="small-cnn", train_epochs=1,
           train_image_size=32, eval_every=4)  # fmt: skip


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m histodist.bench gpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = p.add_argument
    a("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: the CI-sized run")
    a("--shards", help="PCam sample shards (default: shard --data into --work)")
    a("--data", default=bench_images(), help="images as <split>/<class>/*.jpg")
    a("--work", help="scratch folder for shards and runs (default: a temporary folder)")
    a("--json", default="bench-results/gpu.json", help="where to write the figures")
    a("--workers", type=int, default=min(8, len(os.sched_getaffinity(0))), help="per loader")
    a("--model", help=f"throughput model (default {GPU['model']}; cpu {CPU['model']})")
    a("--sizes", help="comma list of input sizes (default 96,224; cpu 32)")
    a("--compile", help="comma list of no/yes (default no,yes; cpu no)")
    for k in ("batch_size", "warmup", "steps", "repeats", "max_batch", "sync_steps",
              "train_epochs", "train_image_size", "eval_every"):  # fmt: skip
        a("--" + k.replace("_", "-"), type=int, help=f"default {GPU[k]} (cpu {CPU[k]})")
    a("--train-model", help=f"model of the training run (default {GPU['train_model']})")
    a("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for k, v in (GPU if args.device == "cuda" else CPU).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


class Checks:
    """Named pass/fail checks; a failed one makes the command exit 1 (after the report)."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, name: str, ok: bool, detail: str) -> bool:
        self.rows.append({"check": name, "ok": bool(ok), "detail": detail})
        return bool(ok)

    @property
    def failed(self) -> list[str]:
        return [r["check"] for r in self.rows if not r["ok"]]


# ----------------------------------------------------------------------------- device
def device_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
            else None, "device": str(device)}  # fmt: skip
    if device.type != "cuda":
        info["cpu"] = machine_info()["cpus"]
        return info
    prop = torch.cuda.get_device_properties(device)
    info.update(name=prop.name, capability=f"{prop.major}.{prop.minor}",
                memory_gib=round(prop.total_memory / 2**30, 1),
                multiprocessors=prop.multi_processor_count, driver=_driver())  # fmt: skip
    return info


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else None


def shard_sample(args: argparse.Namespace, work: Path) -> str:
    """--shards, or the sample sharded with histodist.shard into work/shards (once)."""
    if args.shards:
        return args.shards
    out = work / "shards"
    if not (out / "manifest.json").is_file():
        from histodist import shard

        argv = ["--dataset", "folder", "--src", args.data, "--out", str(out),
                "--workers", str(args.workers)]  # fmt: skip
        if shard.main(argv) != 0:
            raise RuntimeError(f"histodist.shard {' '.join(argv)} failed")
    return str(out)


# ----------------------------------------------------------------------------- throughput
def parts_args(args, shards: str, size: int, compiled: bool, **over) -> argparse.Namespace:
    """The namespace histodist.bench.train.histodist_parts reads."""
    ns = dict(shards=shards, image_size=size, workers=args.workers, shuffle_buffer=2000,
              augment="pcam", model=args.model, channels_last=True, batch_size=args.batch_size,
              lr=1e-3, precision="bf16" if args.device == "cuda" else "auto", seed=args.seed,
              device=args.device, compile=compiled)  # fmt: skip
    return argparse.Namespace(**{**ns, **over})


def throughput(args, shards: str, runs: str, checks: Checks) -> list[dict]:
    """Model-only vs end to end at each size, without and with compile (see the docstring)."""
    from histodist.bench import train as bt

    rows = []
    for size in map(int, args.sizes.split(",")):
        for compiled in (c == "yes" for c in args.compile.split(",")):
            ns = parts_args(args, shards, size, compiled)
            p = bt.histodist_parts(ns, runs, f"tp-{size}-{int(compiled)}")
            source = bt.batches(p.train_loader)
            configs = {"model_only": bt.ceiling_step(p, ns),
                       "end_to_end": bt.histodist_step(p, source, args.seed)}  # fmt: skip
            with PeakMemory(p.accelerator.device) as mem:
                res = measure_interleaved(configs, device=p.accelerator.device,
                                          warmup=args.warmup, repeats=args.repeats,
                                          steps=args.steps, memory=mem)  # fmt: skip
            source.close()
            m, e = res["model_only"], res["end_to_end"]
            eff = e["images_per_s"] / m["images_per_s"]
            row = {"size": size, "compile": compiled, "precision": p.cfg.train.precision,
                   "model_img_s": m["images_per_s"], "e2e_img_s": e["images_per_s"],
                   "efficiency": round(eff, 3), "data_wait_fraction": e["data_wait_fraction"],
                   "model_peak_mb": m.get("device_peak_mb"),
                   "e2e_peak_mb": e.get("device_peak_mb")}  # fmt: skip
            rows.append(row)
            name = f"efficiency_{size}px{'_compiled' if compiled else ''}"
            detail = f"{eff:.3f} (target >= {TARGET_EFFICIENCY})"
            if args.device == "cuda":
                checks.add(name, eff >= TARGET_EFFICIENCY, detail)
            else:
                checks.add(name, eff > 0, detail + ", reported only on the CPU")
    return rows


# ----------------------------------------------------------------------------- syncs, memory
def host_syncs(args, shards: str, runs: str, checks: Checks) -> dict:
    """End-to-end steps (no logging) after one warm-up step: would-be syncs per step."""
    from histodist.bench import train as bt
    from histodist.bench.syncs import SyncCounter, cuda_sync_warnings
    from histodist.training import loop
    from histodist.training.distributed import step_seed

    size = int(args.sizes.split(",")[0])
    p = bt.histodist_parts(parts_args(args, shards, size, False), runs, "syncs")
    dev, st = p.accelerator.device, loop.State()
    gen, source, counter = torch.Generator(device=dev), bt.batches(p.train_loader), SyncCounter()

    def step(k: int) -> None:
        with counter.paused():
            batch = next(source)
        gen.manual_seed(step_seed(args.seed, k, 0))
        window = loop.Window()
        window.add(loop.micro_step(p, batch, gen, True, 1, first=False))
        loop.optimizer_step(p, st, window)

    step(0)  # constants reach the device once
    torch.cuda.synchronize(dev) if dev.type == "cuda" else None
    with counter, cuda_sync_warnings(dev) as cuda:
        for k in range(1, args.sync_steps + 1):
            counter.bucket = k
            step(k)
    source.close()
    found = sum(counter.counts.values())
    out = {"steps": args.sync_steps, "intercepted": found, "cuda_sync_debug": len(cuda),
           "what": sorted({name for _, name in counter.events} | set(cuda[:5]))}  # fmt: skip
    checks.add("host_syncs_per_step", found == 0 and not cuda,
               f"{found} intercepted, {len(cuda)} from set_sync_debug_mode over "
               f"{args.sync_steps} steps {out['what']}")  # fmt: skip
    return out


def largest_batch(args, shards: str, runs: str, checks: Checks) -> dict:
    """Doubling the model-only batch at the largest size until it does not fit (or --max-batch):
    the largest that ran, with its peak device memory."""
    from histodist.bench import train as bt

    size = max(map(int, args.sizes.split(",")))
    p = bt.histodist_parts(parts_args(args, shards, size, False), runs, "max-batch")
    dev, fits, peak, b = p.accelerator.device, 0, None, args.batch_size
    while b <= args.max_batch:
        try:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            step = bt.ceiling_step(p, parts_args(args, shards, size, False, batch_size=b))
            step(), step()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                peak = round(torch.cuda.max_memory_allocated(dev) / 2**20)
            fits, b = b, b * 2
        except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError only from torch 2.5
            break
        finally:
            p.optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache() if dev.type == "cuda" else None
    out = {"size": size, "largest_batch": fits, "peak_mb": peak,
           "cap_reached": fits * 2 > args.max_batch}  # fmt: skip
    checks.add(f"largest_batch_{size}px", fits >= args.batch_size,
               f"{fits} images fit{' (the --max-batch cap)' if out['cap_reached'] else ''}")  # fmt: skip
    return out


# ----------------------------------------------------------------------------- real run
def _cli(module: str, argv: list[str], env: dict, log: Path) -> None:
    """python -m module argv in a fresh process (its own Accelerator), output to log."""
    with open(log, "w") as fh:
        rc = subprocess.run([sys.executable, "-m", module, *argv], env=env, stdout=fh,
                            stderr=subprocess.STDOUT).returncode  # fmt: skip
    if rc != 0:
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"python -m {module} {' '.join(argv)} exited {rc}:\n{tail}")


def _env(device: str) -> dict:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    if device == "cpu":
        env.update(ACCELERATE_USE_CPU="true", CUDA_VISIBLE_DEVICES="")
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    return env


def training_run(args, shards: str, work: Path, checks: Checks) -> tuple[dict, Path]:
    """histodist.train with the default recipe; valid AUC over time from metrics.jsonl."""
    run_dir = work / "runs" / "gpu-check"
    argv = ["--dataset", "pcam", "--shards", shards, "--model", args.train_model,
            "--image-size", str(args.train_image_size), "--epochs", str(args.train_epochs),
            "--eval-every", str(args.eval_every), "--seed", str(args.seed), "--wandb",
            "disabled", "--no-progress", "--runs-dir", str(run_dir.parent), "--run-name",
            run_dir.name]  # fmt: skip
    if args.device == "cpu":  # CI-sized: tiny batches, decoding in the main process
        argv += ["--batch-size", str(args.batch_size), "--workers", "0"]
    else:
        argv += ["--workers", str(args.workers)]
    t0 = time.perf_counter()
    _cli("histodist.train", argv, _env(args.device), work / "train.log")
    wall = time.perf_counter() - t0
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    vals = [(x["time"], x["val/auc"]) for x in lines if "val/auc" in x]
    reached = next((t for t, auc in vals if auc >= TARGET_AUC), None)
    best = max(auc for _, auc in vals)
    head = (run_dir / "config.yaml").read_text().splitlines()[0]
    out = {"model": args.train_model, "epochs": args.train_epochs, "wall_s": round(wall, 1),
           "best_valid_auc": round(best, 4), "s_to_auc_0.85": reached, "precision": head,
           "validations": len(vals)}  # fmt: skip
    detail = f"best valid AUC {best:.4f}, AUC {TARGET_AUC} after {reached} s"
    if args.device == "cuda":
        checks.add("train_reaches_auc", reached is not None, detail)
    else:
        checks.add("train_runs", best == best, detail + ", reported only on the CPU")
    return out, run_dir


def evaluate_and_export(args, run_dir: Path, work: Path, checks: Checks) -> dict:
    """Evaluate on the device (auto precision) and on the CPU (fp32); export ONNX."""
    aucs = {}
    for name, device, prec in (("device", args.device, "auto"), ("cpu_fp32", "cpu", "fp32")):
        out = work / f"eval-{name}"
        _cli("histodist.evaluate", ["--run", str(run_dir), "--split", "valid", "--precision",
             prec, "--bootstrap", "10", "--no-progress", "--out", str(out), "--workers",
             str(min(args.workers, 4))], _env(device), work / f"eval-{name}.log")  # fmt: skip
        m = json.loads((out / "metrics.json").read_text())
        aucs[name] = {"auc": m["patch"]["auc"], "precision": m.get("precision")}
    diff = abs(aucs["device"]["auc"] - aucs["cpu_fp32"]["auc"])
    checks.add("evaluate_auc_matches_cpu", diff <= AUC_TOLERANCE,
               f"|{aucs['device']['auc']:.4f} ({aucs['device']['precision']}) - "
               f"{aucs['cpu_fp32']['auc']:.4f} (cpu fp32)| = {diff:.4f} <= {AUC_TOLERANCE}")  # fmt: skip
    _cli("histodist.export", ["--run", str(run_dir), "--format", "onnx"], _env(args.device),
         work / "export.log")  # fmt: skip
    onnx = onnx_vs_device(run_dir, torch.device(args.device))
    checks.add("onnx_parity", onnx["max_abs_diff"] <= ONNX_TOLERANCE,
               f"onnxruntime vs the model on {args.device} (fp32): max |logit diff| "
               f"{onnx['max_abs_diff']:.2e} <= {ONNX_TOLERANCE}")  # fmt: skip
    return {"evaluate": aucs, "auc_diff": round(diff, 5), "onnx": onnx}


def onnx_vs_device(run_dir: Path, device: torch.device) -> dict:
    """Logits of RUN/export/model.onnx in onnxruntime vs the PyTorch model on `device` in
    fp32 (TF32 off), on the export's parity batch of real valid images."""
    import onnxruntime as ort

    from histodist.export import parity_batch
    from histodist.inference import core as inference

    run = inference.load_run(run_dir, "best")
    x = parity_batch(run, 16)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            want = run.model.to(device).eval()(x.to(device)).float().cpu().numpy()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    sess = ort.InferenceSession(str(run_dir / "export" / "model.onnx"),
                                providers=["CPUExecutionProvider"])  # fmt: skip
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    return {"max_abs_diff": float(abs(got - want).max()), "batch": len(x)}


# ----------------------------------------------------------------------------- report
def run(args, work: Path) -> tuple[dict, Checks]:
    checks, dev = Checks(), torch.device(args.device)
    report: dict = {"suite": "gpu", "config": vars(args).copy(), "device": device_info(dev)}
    t0 = time.perf_counter()
    shards = shard_sample(args, work)
    runs = str(work / "bench-runs")
    for key, fn in (("throughput", throughput), ("host_syncs", host_syncs),
                    ("largest_batch", largest_batch)):  # fmt: skip
        report[key] = _guarded(key, checks, fn, args, shards, runs, checks)
        report.setdefault("seconds", {})[key] = round(time.perf_counter() - t0, 1)
    trained = _guarded("training_run", checks, training_run, args, shards, work, checks)
    if trained is not None:
        report["training_run"], run_dir = trained
        report["inference"] = _guarded("evaluate_export", checks, evaluate_and_export, args,
                                        run_dir, work, checks)  # fmt: skip
    report["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    report["checks"] = checks.rows
    return report, checks


def _guarded(name: str, checks: Checks, fn, *a):
    """fn(*a); an exception becomes a failed check named after the section (never a skip)."""
    try:
        return fn(*a)
    except Exception as e:  # noqa: BLE001 -- reported as a failed check, the run goes on
        checks.add(name, False, f"{type(e).__name__}: {str(e)[-600:]}")
        return None


def render(report: dict) -> str:
    d = report["device"]
    out = [f"histodist GPU check: {d.get('name', d['device'])} (capability "
           f"{d.get('capability', '-')}, {d.get('memory_gib', '-')} GiB, driver "
           f"{d.get('driver', '-')}), torch {d['torch']}, CUDA {d['cuda']}, cuDNN {d['cudnn']}"]  # fmt: skip
    if report.get("throughput"):
        cols = ["size", "compile", "precision", "model_img_s", "e2e_img_s", "efficiency",
                "data_wait_fraction", "model_peak_mb", "e2e_peak_mb"]  # fmt: skip
        out += [f"throughput ({report['config']['model']}, batch "
                f"{report['config']['batch_size']}, channels_last):",
                table(report["throughput"], cols)]  # fmt: skip
    for key in ("host_syncs", "largest_batch", "training_run", "inference"):
        if report.get(key):
            out.append(f"{key}: {json.dumps(report[key], default=str)}")
    out += ["checks:", table(report["checks"], ["check", "ok", "detail"])]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("histodist.bench gpu: error: torch sees no CUDA device; use --device cpu for "
              "the CPU run of the same checks", file=sys.stderr)  # fmt: skip
        return 2
    if not args.shards and not Path(args.data).is_dir():
        print(f"histodist.bench gpu: error: no --shards and no images at {args.data}; pass "
              "--shards DIR or --data DIR", file=sys.stderr)  # fmt: skip
        return 2
    with tempfile.TemporaryDirectory(prefix="histodist-bench-gpu-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        report, checks = run(args, work)
    print(render(report))
    _write_json(args.json, report)
    print(f"report: {args.json}")
    if checks.failed:
        print(f"histodist.bench gpu: FAILED checks: {', '.join(checks.failed)}", file=sys.stderr)
        return 1
    return 0
