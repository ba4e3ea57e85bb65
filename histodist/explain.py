"""Grad-CAM heatmaps of a trained run over its worst or random images, as one PNG grid.

    python -m histodist.explain --run runs/NAME --split valid [--top-losses 16 | --random 16]

Each cell shows the image and its heatmap overlay (for the predicted class, or --target true),
titled with the key, the true label and the predicted probability. Written to
runs/NAME/explain-<split>-<top-losses|random>.png and logged to W&B when enabled.

A MIL head explains a whole slide: its attention (or tile probabilities for mean / max
pooling) over the slide's thumbnail, with the most-attended tiles beneath
(histodist.inference.mil_slides):

    python -m histodist.explain --run runs/MIL --slide slides/a.svs [--out a.png]
    python -m histodist.explain --run runs/MIL --slide <slide id> [--shards EMB] [--src DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch

from histodist.errors import UsageError, integer, positive, run_cli
from histodist.inference import core as inference
from histodist.inference import report
from histodist.inference.gradcam import gradcam
from histodist.metrics import predicted_class


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="histodist.explain", description=__doc__.split("\n")[0])
    inference.add_run_flags(p, device=True, wandb=True)
    p.add_argument("--shards", help="shard folder or URL (default: the run's)")
    p.add_argument("--split", help="shard split (default: the run's valid split)")
    p.add_argument("--input", nargs="+", help="image folders / CSVs / files instead of shards")
    pick = p.add_mutually_exclusive_group()
    pick.add_argument(
        "--top-losses", type=integer(1), metavar="N", help="the N largest losses (16)"
    )
    pick.add_argument("--random", type=integer(1), metavar="N", help="N random images (seeded)")
    p.add_argument("--seed", type=int, default=0, help="seed of --random")
    p.add_argument("--target", choices=("pred", "true"), default="pred",
                   help="class whose evidence the heatmap shows")  # fmt: skip
    p.add_argument("--out", help="PNG path (default: RUN/explain-<split>-<mode>.png, "
                   "RUN/explain-<slide id>.png)")  # fmt: skip
    s = p.add_argument_group("slides (MIL runs)")
    s.add_argument("--slide", help="a slide file, or the id of a slide of the embedding set "
                   "--shards (default: the run's)")  # fmt: skip
    s.add_argument("--src", help="the folder of the set's slide files (default: the one the "
                   "set records)")  # fmt: skip
    s.add_argument("--emb", help="keep a slide file's embeddings in this folder (a re-run "
                   "reuses them; default: a temporary folder)")  # fmt: skip
    s.add_argument("--assume-mpp", type=positive, metavar="UM",
                   help="level-0 µm/px of a slide whose file has none")  # fmt: skip
    s.add_argument("--top", type=integer(1), default=8, help="most-attended tiles shown (8)")
    inference.add_batch_flags(p, 128, "images per batch")
    return p


def _score(batch: dict, mode: str, seed: int) -> torch.Tensor:
    """Per-sample ranking score: the cross-entropy loss, or a seeded hash of the key (a random
    choice that does not depend on the order batches arrive in)."""
    if mode == "random":
        h = [int(hashlib.sha256(f"{seed}:{k}".encode()).hexdigest()[:12], 16) for k in batch["key"]]
        return torch.tensor(h, dtype=torch.float64)
    p_true = batch["probs"].gather(1, batch["label"].clamp_min(0).view(-1, 1))[:, 0]
    return -p_true.double().clamp_min(1e-12).log()


def select(results, n: int, mode: str, seed: int = 0) -> dict:
    """Keep the n highest-scoring samples of a stream of ``iter_predictions`` batches (with
    images). Returns {"image", "label", "probs", "key", "score"} sorted by score."""
    best: dict | None = None
    for r in results:
        if mode == "top-losses" and (r["label"] < 0).any():
            raise inference.InputError("--top-losses needs labelled images; use --random")
        ok = ~torch.isnan(r["probs"]).any(1)
        cur = {"image": r["image"][ok], "label": r["label"][ok], "probs": r["probs"][ok],
               "key": [k for k, g in zip(r["key"], ok.tolist(), strict=True) if g]}  # fmt: skip
        cur["score"] = _score(cur, mode, seed)
        if best is not None:
            cur = {k: best[k] + cur[k] if k == "key" else torch.cat([best[k], cur[k]])
                   for k in cur}  # fmt: skip
        top = cur["score"].argsort(descending=True)[:n].tolist()
        best = {k: [v[i] for i in top] if k == "key" else v[top] for k, v in cur.items()}
    if best is None or not best["key"]:
        raise inference.InputError("no readable images to explain")
    return best


def heatmaps(run: inference.Run, picked: dict, target: str, device) -> torch.Tensor:
    """Grad-CAM (N, H, W) in [0, 1] at the images' own size; with a centre-cropped run the
    map covers the crop the model saw and is 0 outside it."""
    from histodist.augment import centre_crop

    x = run.transform()(picked["image"].to(device))
    cls = picked["label"] if target == "true" else predicted_class(picked["probs"])
    cls = cls.to(device)
    cam, _ = gradcam(run.model.to(device).eval(), x, cls.clamp_min(0))
    full = torch.zeros(cam.shape[0], *picked["image"].shape[-2:], device=cam.device)
    seen = centre_crop(full, run.crop)  # a view: the crop's place in the full image
    seen.copy_(torch.nn.functional.interpolate(cam[:, None], size=seen.shape[-2:],
                                               mode="bilinear")[:, 0])  # fmt: skip
    return full.cpu()


def plot_grid(picked: dict, cams: torch.Tensor, classes: list[str], path: Path, title: str):
    """Rows of (image, overlay) pairs, four pairs per row; atomic PNG write."""
    plt = report.figure()
    n, per_row = len(picked["key"]), 4
    rows = -(-n // per_row)
    fig, axes = plt.subplots(rows, 2 * per_row, figsize=(2 * per_row * 1.6, rows * 1.9),
                             squeeze=False)  # fmt: skip
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        img = picked["image"][i].permute(1, 2, 0).numpy()
        y, p = int(picked["label"][i]), picked["probs"][i]
        k = 1 if len(classes) == 2 else int(p.argmax())
        a, b = axes[i // per_row, 2 * (i % per_row)], axes[i // per_row, 2 * (i % per_row) + 1]
        a.imshow(img)
        b.imshow(img)
        b.imshow(cams[i].numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
        true = classes[y] if y >= 0 else "?"
        a.set_title(f"{picked['key'][i][:14]}\ntrue {true}", fontsize=7)
        b.set_title(f"p({classes[k]})={float(p[k]):.2f}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    out = report.save_figure(fig, path)
    plt.close(fig)
    return out


def explain_slide(run: inference.Run, args, device: str) -> int:
    """--slide: the head's tile scores over one slide (histodist.inference.mil_slides)."""
    from histodist.inference import mil_slides

    inputs = mil_slides.SlideInputs.from_args(args, device)
    with mil_slides.work_folder(args.emb) as work:
        out = mil_slides.explain_slide(run, args.slide, work, inputs, shards=args.shards,
                                       src=args.src, top=args.top,
                                       out=Path(args.out) if args.out else None)  # fmt: skip
    print(f"wrote {out}")
    return 0


def run_explain(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    run = inference.load_run(args.run, args.checkpoint)
    if args.slide:
        return explain_slide(run, args, device)
    if run.is_bags:
        raise UsageError(
            f"{args.run}: a MIL head ({run.cfg.model.model}) has no pixels for Grad-CAM; "
            "draw its attention over a slide with --slide PATH (or a slide id of its set)"
        )
    mode, n = ("random", args.random) if args.random else ("top-losses", args.top_losses or 16)
    if args.input:
        items = inference.list_inputs(args.input, run.classes)
        loader, name = inference.file_batches(run, items, batch_size=args.batch_size,
                                              workers=args.workers), "input"  # fmt: skip
    else:
        name = args.split or run.cfg.data.valid_split
        loader = inference.shard_batches(run, args.shards or run.cfg.data.shards, name,
                                         batch_size=args.batch_size, workers=args.workers)  # fmt: skip
    # --precision applies to the ranking pass; Grad-CAM's gradients are computed in fp32.
    amp, choice = inference.autocast_for(args.precision, device)
    print(choice.describe(), file=sys.stderr)
    it = inference.iter_predictions(run, loader, device=device, keep_images=True, autocast=amp,
                                    progress=not args.no_progress, total=len(loader))  # fmt: skip
    picked = select(it, n, mode, args.seed)
    cams = heatmaps(run, picked, args.target, device)
    out = Path(args.out) if args.out else run.run_dir / f"explain-{name}-{mode}.png"
    title = f"{run.run_dir.name}: Grad-CAM ({args.target} class), {mode} of {name}"
    plot_grid(picked, cams, run.classes, out, title)
    print(f"wrote {out} ({len(picked['key'])} images, {mode})")
    log = run.cfg.log
    report.log_wandb(args.wandb or log.wandb, project=log.project, entity=log.entity,
                     name=f"{run.run_dir.name}-explain", job_type="explain", metrics={},
                     images={f"explain/{mode}": out}, run_dir=run.run_dir)  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("explain", run_explain, args, extra=(FileNotFoundError,))


if __name__ == "__main__":
    sys.exit(main())
