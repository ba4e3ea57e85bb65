"""`python -m histodist.bench all`: every suite (shard, loader, train) in one run, one report.

Runs the suites one after the other on the same machine and data, writes their figures into
one JSON file (--json) and prints one summary table after each suite's own tables. Options not
listed here go to the train suite (`python -m histodist.bench train --help`), e.g. --model,
--image-size, --precision, --device, --tta-budget-s. --quick runs every suite CI-sized.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

from histodist.bench.common import machine_info, table, write_json
from histodist.samples import TEAM_PCAM, bench_images

SUITES = ("shard", "loader", "train")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="python -m histodist.bench all",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--suites", default=",".join(SUITES), help="comma list of suites to run")
    p.add_argument("--data", default=bench_images(),
                   help="images as <split>/<class>/*.jpg (train, valid; default: "
                   f"{TEAM_PCAM}, else examples/pcam-mini)")  # fmt: skip
    p.add_argument("--shards", default="shards/pcam-sample", help="the same images as shards")
    p.add_argument("--workers", type=int, default=2, help="loader workers (all suites)")
    p.add_argument("--json", default="bench-results/report.json", help="where to write the report")
    p.add_argument("--quick", action="store_true", help="CI-sized run of every suite")
    p.add_argument("--shard-args", default="", help='extra options for the shard suite, e.g. '
                   '"--limit 1000"')  # fmt: skip
    p.add_argument("--loader-args", default="", help='extra options for the loader suite, e.g. '
                   '"--num-batches 10"')  # fmt: skip
    args, rest = p.parse_known_args(argv)
    unknown = [s for s in args.suites.split(",") if s not in SUITES]
    if unknown:
        p.error(f"--suites: unknown {unknown}; choose from {', '.join(SUITES)}")
    return args, rest


def suite_argv(name: str, args: argparse.Namespace, rest: list[str], out: Path) -> list[str]:
    """Command line for one suite: shared data and worker options, CI-sized when --quick."""
    if name == "shard":
        argv = ["--src", args.data, "--workers", ",".join(sorted({"1", str(args.workers)}))]
        argv += ["--limit", "40"] if args.quick else []
        argv += shlex.split(args.shard_args)
    elif name == "loader":
        argv = ["--shards", args.shards, "--image-folder", str(Path(args.data) / "train"),
                "--workers", str(args.workers)]  # fmt: skip
        quick = ["--batch-size", "16", "--num-batches", "2", "--warmup", "1", "--repeats", "1",
                 "--shuffle-buffer", "16", "--skip-encodings"]  # fmt: skip
        argv += quick if args.quick else []
        argv += shlex.split(args.loader_args)
    else:
        argv = ["--shards", args.shards, "--data", args.data]
        argv += ["--workers", str(args.workers), *(["--quick"] if args.quick else []), *rest]
    return [*argv, "--json", str(out)]


def run_suite(name: str, argv: list[str], out: Path) -> dict:
    """Run histodist.bench.<name>.main(argv) in this process; its JSON, plus wall time."""
    print(f"\n=== histodist.bench {name} {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    rc = importlib.import_module(f"histodist.bench.{name}").main(argv)
    if rc:
        raise RuntimeError(f"histodist.bench {name} exited with {rc}")
    res = json.loads(out.read_text())
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    res["argv"] = argv
    return res


def summary_rows(report: dict) -> list[dict]:
    """The headline figures of the three suites, one row each: (suite, figure, value)."""
    rows: list[dict] = []

    def add(suite: str, figure: str, value) -> None:
        rows.append({"suite": suite, "figure": figure, "value": value})

    s = report["suites"]
    for name, fn in (("shard", _shard_rows), ("loader", _loader_rows), ("train", _train_rows)):
        if name not in s:
            continue
        try:
            fn(s[name], add)
        except KeyError as e:  # a suite changed its JSON: keep the report, flag the row
            add(name, f"summary incomplete: no key {e} in the suite's JSON", None)
    return rows


def _shard_rows(sh: dict, add) -> None:
    for r in sh.get("throughput", []):
        add("shard", f"images/s, folder -> shards, {r['workers']} worker(s)", r["images_per_s"])
    for r in sh.get("encodings", []):
        add("shard", f"bytes/image, {r['source']} {r['encoding']}", r["bytes_per_image"])


def _loader_rows(ld: dict, add) -> None:
    a, b, b2, c = (ld[k]["images_per_s"] for k in
                   ("a_shards_uint8", "b_shards_uint8_augment_cpu",
                    "b2_shards_flips_normalize_cpu", "c_imagefolder_pil"))  # fmt: skip
    add("loader", "images/s, shards -> uint8 batches", a)
    add("loader", "images/s, shards -> batches + preset augmentation (CPU)", b)
    add("loader", "images/s, shards -> batches + flips + normalise (CPU)", b2)
    add("loader", "images/s, ImageFolder + PIL flips + normalise baseline", c)
    add("loader", "shards / baseline: uint8, flips (like for like), preset",
        f"{a / c:.2f}, {b2 / c:.2f}, {b / c:.2f}")  # fmt: skip


def _train_rows(tr: dict, add) -> None:
    t = tr["throughput"]
    for key, label in (("a_ceiling", "(a) ceiling"), ("b_histodist", "(b) histodist"),
                       ("b2_histodist_flips", "(b2) histodist, flips only"),
                       ("c_baseline", "(c) baseline")):  # fmt: skip
        if key not in t:
            continue
        r = t[key]
        add("train", f"images/s, {label}", r["images_per_s"])
        add(
            "train",
            f"ms/step data wait / rest, {label}",
            f"{r['data_wait_ms']} / {r['compute_ms']}",
        )
        mem = f"{r['main_rss_mb']} / {r['worker_rss_mb']}"
        add("train", f"peak RSS MB main / per worker, {label}", mem)
        if "device_peak_mb" in r:
            add("train", f"peak device memory MB, {label}", r["device_peak_mb"])
    for key, sp in t["time_split"].items():
        label = key.split("_", 1)[0].join("()")
        add("train", f"step time % data wait / augment / rest, {label}",
            f"{sp['data_wait_pct']} / {sp['augment_pct']} / {sp['rest_pct']}")  # fmt: skip
    add("train", "pipeline efficiency b/a", t["pipeline_efficiency_b_over_a"])
    add("train", "b/c", t["b_over_c"])
    if "b2_over_c" in t:
        add(
            "train", "b2/a, b2/c (like for like: flips only)", f"{t['b2_over_a']}, {t['b2_over_c']}"
        )
    tta = tr.get("time_to_accuracy")
    if tta:
        for k in ("histodist", "baseline"):
            r = tta[k]
            add("train", f"s to AUC {tta['target_auc']}, {k} (best AUC)",
                f"{r['seconds_to_target'] or 'not reached'} ({r['best_auc']})")  # fmt: skip


def run(args: argparse.Namespace, rest: list[str]) -> dict:
    report: dict = {"machine": machine_info(), "quick": args.quick, "suites": {}}
    with tempfile.TemporaryDirectory(prefix="histodist-bench-all-") as tmp:
        for name in args.suites.split(","):
            out = Path(tmp) / f"{name}.json"
            report["suites"][name] = run_suite(name, suite_argv(name, args, rest, out), out)
    report["machine"]["load_avg_end"] = machine_info()["load_avg"]
    report["summary"] = summary_rows(report)
    return report


def main(argv: list[str] | None = None) -> int:
    args, rest = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        report = run(args, rest)
    except (RuntimeError, OSError) as e:
        print(f"histodist.bench all: error: {e}", file=sys.stderr)
        return 1
    m = report["machine"]
    where = m.get("gpu") or f"{m['cpus']} CPUs"
    print(f"\n=== histodist benchmark summary ({where}, load {m['load_avg'][0]} at start, "
          f"{m['load_avg_end'][0]} at end)")  # fmt: skip
    print(table(report["summary"], ["suite", "figure", "value"]))
    write_json(args.json, report)
    print(f"report: {args.json}")
    return 0
