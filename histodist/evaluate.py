"""Evaluate a trained run on a shard split or a labelled folder / CSV of images.

    python -m histodist.evaluate --run runs/NAME [--checkpoint best|last|PATH]
                                 [--split test | --shards DIR | --input DIR|CSV|FILES] [--tta 8]
    accelerate launch -m histodist.evaluate --run runs/NAME ...   # several processes / GPUs

Writes metrics.json, predictions.csv, roc.png, confusion.png and reliability.png into
runs/NAME/eval-<split>/ (eval-input-<name>/ for --input), prints a short table and logs the
same to W&B when enabled. Every rank predicts a disjoint part; the main process scores the
gathered set, which holds every sample exactly once. A MIL head's run is scored per slide
(metrics.json's "slide" report, one CSV row per slide) and per patient where known.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from histodist.errors import integer, run_cli
from histodist.inference import core as inference
from histodist.inference import report
from histodist.training.distributed import set_cpu_threads


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="histodist.evaluate", description=__doc__.split("\n")[0])
    inference.add_run_flags(p, wandb=True)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--shards", help="shard folder or URL (default: the run's)")
    src.add_argument("--input", nargs="+", help="labelled image folder(s), CSV(s) or files")
    p.add_argument("--split", help="shard split (default: test if present, else the valid split)")
    p.add_argument("--images", help="folder of the images a CSV names by id")
    p.add_argument(
        "--tta", type=int, default=1, choices=tuple(inference.TTA_KS), help="dihedral TTA views"
    )
    inference.add_batch_flags(p, None, "per process (default: the run's)")
    p.add_argument(
        "--bootstrap", type=integer(0), default=1000, help="bootstrap resamples for AUC CI"
    )
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--knn", type=integer(0), default=0, metavar="K",
                   help="runs on embedding shards: also a K-nearest-neighbour probe with the "
                   "run's training split as reference (0 = off)")  # fmt: skip
    p.add_argument("--out", help="output folder (default: RUN/eval-<split>)")
    return p


def _predict(acc, run: inference.Run, args, shards: str | None, split: str | None):
    """Gathered Predictions of this run over a shard split or args.input (all ranks)."""
    bs = args.batch_size or run.cfg.optim.batch_size
    rank, world = acc.process_index, acc.num_processes
    if shards is None:
        items = inference.list_inputs(args.input, run.classes, image_dir=args.images)
        batches = inference.file_batches(run, items, batch_size=bs, rank=rank, world_size=world,
                                         workers=args.workers)  # fmt: skip
    else:
        batches = inference.shard_batches(run, shards, split, batch_size=bs, rank=rank,
                                          world_size=world, workers=args.workers)  # fmt: skip
    amp, _ = inference.autocast_for(args.precision, acc.device)
    it = inference.iter_predictions(run, batches, device=acc.device, tta=args.tta, autocast=amp,
                                    progress=acc.is_main_process and not args.no_progress,
                                    total=len(batches))  # fmt: skip
    return inference.gather(acc, inference.collect(it, len(run.classes))).sorted()


def youden_from_valid(acc, run: inference.Run, args, shards: str | None, split: str | None):
    """(threshold, where) for binary runs: from the validation split (reusing a finished
    eval-<valid> of the same checkpoint and TTA), or None to choose it on the set itself."""
    valid = run.cfg.data.valid_split
    if len(run.classes) != 2 or shards is None or split == valid:
        return None, "self"
    done, level = run.run_dir / f"eval-{valid}" / "metrics.json", level_of(run)
    if done.is_file():
        m = json.loads(done.read_text())
        if m.get("checkpoint") == run.meta.get("step") and m.get("tta") == args.tta:
            return m[level]["at_youden"]["threshold"], f"{valid} (eval-{valid}/metrics.json)"
    from histodist.data.loader import load_manifest

    if valid not in load_manifest(shards).get("splits", {}):
        return None, "self"
    preds = _predict(acc, run, args, shards, valid)
    ok = preds.valid
    return report.youden_threshold(preds.probs[ok, 1], preds.labels[ok]), valid


def level_of(run: inference.Run) -> str:
    """What one prediction is: a slide (MIL heads) or a patch."""
    return "slide" if run.is_bags else "patch"


def score(preds: inference.Predictions, classes, *, youden, n_boot: int, seed: int,
          level: str = "patch") -> dict:  # fmt: skip
    """The report of each prediction (`level`: patch or slide) plus group-level (patient,
    slide: mean and max) reports where ids exist."""
    ok = preds.valid
    if not ok.any():
        raise inference.InputError("no labelled, readable samples to score")
    kw = {"youden": youden, "n_boot": n_boot, "seed": seed}
    probs, labels = preds.probs[ok], preds.labels[ok]
    out = {level: report.classification_report(probs, labels, classes, **kw)}
    groups = [g for g, k in zip(preds.groups, ok, strict=True) if k]
    if any(g not in (None, "") for g in groups):
        for how in ("mean", "max"):
            ids, gp, gy = report.aggregate_groups(probs, labels, groups, how)
            out[f"group_{how}"] = {"num_groups": len(ids),
                                   **report.classification_report(gp, gy, classes, **kw)}  # fmt: skip
    return out


def write_outputs(out: Path, metrics: dict, preds, classes, level: str = "patch") -> dict:
    """metrics.json, predictions.csv and the three figures; returns the figures."""
    ok = preds.valid
    probs, labels = preds.probs[ok], preds.labels[ok]
    inference.atomic_write(out / "metrics.json", lambda f: json.dump(metrics, f, indent=2))
    inference.write_predictions(out / "predictions.csv", preds, classes)
    return {
        "roc": report.plot_roc(probs, labels, classes, out / "roc.png"),
        "confusion": report.plot_confusion(
            metrics[level]["confusion"], classes, out / "confusion.png"
        ),  # fmt: skip
        "reliability": report.plot_reliability(probs, labels, out / "reliability.png"),
    }


def _source(args, run: inference.Run) -> tuple[str | None, str | None, str]:
    """(shards, split, name of the output folder) from the arguments and the run."""
    if args.input:
        return None, None, "eval-input-" + Path(args.input[0]).stem
    shards = args.shards or run.cfg.data.shards
    split = args.split
    if split is None:
        from histodist.data.loader import load_manifest

        split = "test" if "test" in load_manifest(shards).get("splits", {}) else None
        split = split or run.cfg.data.valid_split
    return shards, split, f"eval-{split}"


def _check_count(metrics: dict, shards: str, split: str, bags: bool = False) -> None:
    """Record the manifest's sample (or slide) count; warn when fewer were scored (decode
    errors, or bad shards skipped)."""
    import warnings

    from histodist.data.loader import load_manifest

    manifest = load_manifest(shards)
    if bags:
        from histodist.data.bags import slides

        expected = len(slides(manifest, split, shards))
    else:
        expected = manifest["splits"][split]["num_samples"]
    metrics["expected_samples"] = expected
    if metrics["num_predictions"] != expected:
        warnings.warn(f"{shards}:{split}: scored {metrics['num_predictions']} of {expected} "
                      "samples (unreadable samples were skipped)", stacklevel=2)  # fmt: skip


def _knn(run: inference.Run, args, shards: str | None, split: str | None) -> dict:
    """The k-NN probe's report (histodist.inference.knn), printed as a table too."""
    if not run.manifest.get("embedding") or shards is None or run.is_bags:
        raise inference.InputError(
            "--knn: needs a run of a tile-level head (linear, mlp) on embedding shards and --shards"
        )
    from histodist.inference.knn import knn_report

    rep = knn_report(run, shards, split, args.knn, n_boot=args.bootstrap, seed=args.seed)
    print(report.format_table(rep, f"{split} k-NN probe (k={args.knn})"))
    return rep


def run_eval(args, acc) -> int:
    set_cpu_threads(0, acc.device)  # not accelerate launch's 1 thread on CPU-only machines
    run = inference.load_run(args.run, args.checkpoint)
    choice = inference.autocast_for(args.precision, acc.device)[1]
    if acc.is_main_process:
        print(choice.describe(), file=sys.stderr)
    shards, split, name = _source(args, run)
    threshold, chosen_on = youden_from_valid(acc, run, args, shards, split)
    preds = _predict(acc, run, args, shards, split)
    if not acc.is_main_process:
        return 0
    inference.warn_unreadable(preds)
    level = level_of(run)
    metrics = score(preds, run.classes, youden=threshold, n_boot=args.bootstrap, seed=args.seed,
                    level=level)  # fmt: skip
    metrics.update(
        checkpoint=run.meta.get("step"),
        which=args.checkpoint,
        tta=args.tta,
        source=args.input or f"{shards}:{split}",
        youden_chosen_on=chosen_on,
        num_predictions=len(preds),
        unreadable=len(preds.errors),
        world_size=acc.num_processes,
        precision=choice.precision,
    )
    if shards is not None:
        _check_count(metrics, shards, split, bags=run.is_bags)
    if args.knn:
        metrics["knn"] = _knn(run, args, shards, split)
    out = Path(args.out) if args.out else run.run_dir / name
    figures = write_outputs(out, metrics, preds, run.classes, level)
    for lv in (level, "group_mean", "group_max"):
        if lv in metrics:
            print(report.format_table(metrics[lv], f"{name} {lv} (tta={args.tta})"))
    print(f"wrote {out}/metrics.json, predictions.csv, roc.png, confusion.png, reliability.png")
    log = run.cfg.log
    report.log_wandb(
        args.wandb or log.wandb,
        project=log.project,
        entity=log.entity,
        name=f"{run.run_dir.name}-{name}",
        job_type="eval",
        metrics=metrics,
        images=figures,
        run_dir=run.run_dir,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from accelerate import Accelerator

    acc = Accelerator()
    try:
        return run_cli("evaluate", run_eval, args, acc, extra=(FileNotFoundError,))
    finally:
        # Destroy the process group before exit: a rank leaving with gloo's threads alive can
        # abort ("terminate called without an active exception", exit -6).
        acc.end_training()


if __name__ == "__main__":
    sys.exit(main())
