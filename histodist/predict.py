"""Predict with a trained run over image files, folders, CSVs or a shard split.

    python -m histodist.predict --run runs/NAME --input DIR|FILES|CSV|SHARDS --out preds.csv
    python -m histodist.predict --run runs/MIL --slides DIR --out slides.csv      # a MIL head

Writes key, label (when known), one probability per class, the predicted class and the path.
With `--slides` (a MIL run) every slide under DIR is taken end to end, tissue, tiles,
embeddings with the backbone the run's embeddings were made with, then the head: one row per
slide (slide, path, prob_<class>..., pred, tiles, error); histodist.inference.mil_slides.
For the Kaggle Histopathologic Cancer Detection `test/` folder (or with --kaggle) it writes the
competition's submission instead: `id,label` with the probability of class 1. Unreadable
images are listed in a warning and kept in the CSV with an empty prediction.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from histodist.errors import UsageError, positive, run_cli
from histodist.inference import core as inference


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="histodist.predict", description=__doc__.split("\n")[0])
    inference.add_run_flags(p, device=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+",
                     help="image files, folders, CSVs (path or id column), or one shard folder")  # fmt: skip
    src.add_argument("--slides", help="a MIL run: a folder of whole-slide images (or one slide)")
    p.add_argument("--emb", help="--slides: keep the slides' embeddings in this folder (a "
                   "re-run reuses them; default: a temporary folder)")  # fmt: skip
    p.add_argument("--assume-mpp", type=positive, metavar="UM",
                   help="--slides: level-0 µm/px of slides whose file has none")  # fmt: skip
    p.add_argument("--split", default="test", help="split to predict when --input is shards")
    p.add_argument("--images", help="folder of the images a CSV names by id")
    p.add_argument("--out", required=True, help="output CSV")
    p.add_argument("--kaggle", action="store_true",
                   help="write the Kaggle HCD submission (id,label); automatic for a test/ folder")  # fmt: skip
    p.add_argument(
        "--tta", type=int, default=1, choices=tuple(inference.TTA_KS), help="dihedral TTA views"
    )
    inference.add_batch_flags(p, 256, "images per batch")
    return p


def _batches(run: inference.Run, args):
    """(loader, number of batches) over shards (a folder with manifest.json) or image files."""
    first = Path(args.input[0])
    if len(args.input) == 1 and (first / "manifest.json").is_file():
        loader = inference.shard_batches(run, str(first), args.split, batch_size=args.batch_size,
                                         workers=args.workers)  # fmt: skip
    else:
        items = inference.list_inputs(args.input, run.classes, image_dir=args.images)
        loader = inference.file_batches(run, items, batch_size=args.batch_size,
                                        workers=args.workers)  # fmt: skip
    return loader, len(loader)


def run_slides(run: inference.Run, args, device: str) -> int:
    """--slides: one row per slide of a folder, through the run's backbone and head."""
    from histodist.inference import mil_slides

    inputs = mil_slides.SlideInputs.from_args(args, device)
    with mil_slides.work_folder(args.emb) as work:
        rows = mil_slides.predict_slides(run, args.slides, work, inputs)
    mil_slides.write_slide_csv(args.out, rows, run.classes)
    bad = sum(1 for r in rows if r["error"])
    print(f"wrote {args.out}: {len(rows) - bad} slides scored, {bad} without a score")
    return 0


def run_predict(args) -> int:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    run = inference.load_run(args.run, args.checkpoint)
    if args.slides:
        return run_slides(run, args, device)
    if args.emb or args.assume_mpp:
        raise UsageError("--emb and --assume-mpp are for --slides")
    loader, n = _batches(run, args)
    amp, choice = inference.autocast_for(args.precision, device)
    print(choice.describe(), file=sys.stderr)
    it = inference.iter_predictions(run, loader, device=device, tta=args.tta, total=n,
                                    progress=not args.no_progress, autocast=amp)  # fmt: skip
    preds = inference.collect(it, len(run.classes))
    inference.warn_unreadable(preds)
    kaggle = args.kaggle or inference.is_kaggle_test(args.input)
    if kaggle and len(run.classes) != 2:
        raise inference.InputError("--kaggle needs a binary run (two classes)")
    if kaggle:
        inference.write_submission(args.out, preds)
    else:
        inference.write_predictions(args.out, preds, run.classes)
    done = len(preds) - len(preds.errors)
    print(f"wrote {args.out}: {done} predictions, {len(preds.errors)} unreadable"
          + (" (Kaggle submission format)" if kaggle else ""))  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("predict", run_predict, args, extra=(FileNotFoundError,))


if __name__ == "__main__":
    sys.exit(main())
