"""Export a trained run's model for serving, with its preprocessing in a JSON beside it.

    python -m histodist.export --run runs/NAME --format onnx|torchscript|safetensors

Writes RUN/export/model.<onnx|pt|safetensors> and <that name>.json (input size, layout, mean/std,
class names, the checkpoint). The exported model takes float32 NCHW images scaled to [0, 1],
resized to the input size and normalised with mean/std, and returns logits. Parity with the
PyTorch model is checked on a batch (real images of the run's valid split when readable):
the maximum absolute difference of the logits is printed and must be under 1e-4 in fp32;
the ONNX file is also run in onnxruntime when it is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

from histodist.errors import HistodistError, UsageError, integer, run_cli
from histodist.fileio import atomic_path
from histodist.inference import core as inference

TOLERANCE = 1e-4
SUFFIX = {"onnx": "onnx", "torchscript": "pt", "safetensors": "safetensors"}


class ExportError(HistodistError, RuntimeError):
    """Export failed or the exported model disagrees with the PyTorch one."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="histodist.export", description=__doc__.split("\n")[0])
    inference.add_run_flags(p)
    p.add_argument("--format", required=True, choices=tuple(SUFFIX), help="export format")
    p.add_argument("--out", help="output folder (default: RUN/export)")
    p.add_argument("--batch", type=integer(1), default=8, help="images in the parity batch")
    p.add_argument("--opset", type=integer(7), default=18, help="ONNX opset")
    return p


def parity_batch(run: inference.Run, n: int) -> torch.Tensor:
    """Normalised float32 (n, 3, S, S): real images of the valid split when readable, else
    seeded random pixels (the check is about the graph, not the data)."""
    try:
        batches = inference.shard_batches(run, run.cfg.data.shards, run.cfg.data.valid_split,
                                          batch_size=n, workers=0)  # fmt: skip
        images = next(iter(batches))["image"]
    except Exception:  # shards moved or absent: any pixels exercise the same graph
        gen = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (n, 3, *run.load_size), dtype=torch.uint8, generator=gen)
    return run.transform()(images)


def export_torchscript(model, x: torch.Tensor, path: Path) -> torch.Tensor:
    """torch.jit.trace (the models have no data-dependent control flow); returns the reloaded
    module's logits on x."""
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # jit is deprecated, still what C++ loads
        with atomic_path(path) as tmp:
            torch.jit.trace(model, x).save(str(tmp))
        return torch.jit.load(str(path)).eval()(x)


def export_safetensors(run: inference.Run, x: torch.Tensor, path: Path) -> torch.Tensor:
    """The weights alone; reloaded into a fresh model built from the run's config."""
    from safetensors.torch import load_file, save_file

    from histodist.models import build_model

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in run.model.state_dict().items()}, str(tmp))
    fresh = build_model(run.cfg.model, num_classes=len(run.classes), image_size=run.image_size)
    fresh.load_state_dict(load_file(str(path)))
    with torch.no_grad():
        return fresh.eval()(x)


def export_onnx(model, x: torch.Tensor, path: Path, opset: int) -> torch.Tensor | None:
    """torch.onnx.export with a dynamic batch axis, in one file. Uses the torch.export-based
    exporter when onnxscript is installed, the TorchScript-based one otherwise. Returns
    onnxruntime's logits on x, or None when onnxruntime is not installed."""
    import warnings

    if not importlib.util.find_spec("onnx"):
        raise ExportError("--format onnx needs the onnx package: pip install -e '.[export]'")
    kw = {"input_names": ["input"], "output_names": ["logits"], "opset_version": opset}
    import onnx

    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if importlib.util.find_spec("onnxscript"):
            batch = torch.export.Dim("batch", min=1)
            torch.onnx.export(model, (x,), str(tmp), dynamo=True, external_data=False,
                              dynamic_shapes=({0: batch},), verbose=False, **kw)  # fmt: skip
        else:
            torch.onnx.export(model, (x,), str(tmp), dynamo=False,
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, **kw)  # fmt: skip
        onnx.checker.check_model(str(tmp))
    if not importlib.util.find_spec("onnxruntime"):
        print("onnxruntime not installed: ONNX parity not run (pip install onnxruntime)")
        return None
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])


def _embedding_input(emb: dict) -> dict:
    """The input of a head on embeddings: the vector histodist.embed writes, no preprocessing."""
    return {
        "input": {
            "name": "input",
            "shape": ["batch", emb["dim"], 1, 1],
            "dtype": "float32",
            "layout": "embedding vector as (D, 1, 1)",
        },  # fmt: skip
        "preprocess": f"the image embedding of {emb['model']} (python -m histodist.embed; "
        f"weights sha256 {emb['weights_sha256']}, preprocessing {emb['preprocessing']})",
        "embedding": emb,
    }


def preprocess_json(run: inference.Run, fmt: str, file: str, diff: float | None) -> dict:
    if run.manifest.get("embedding"):
        emb = _embedding_input(run.manifest["embedding"])
        if run.is_bags:  # a MIL head: one slide's bag of tile embeddings
            shape = [1, "tiles", run.manifest["embedding"]["dim"]]
            emb["input"].update(shape=shape, layout="a slide's tile embeddings as (1, N, D)")
        return {**_image_json(run, fmt, file, diff), **emb}
    return _image_json(run, fmt, file, diff)


def _image_json(run: inference.Run, fmt: str, file: str, diff: float | None) -> dict:
    s = run.image_size
    return {
        "format": fmt,
        "file": file,
        "input": {
            "name": "input",
            "shape": ["batch", 3, s, s],
            "dtype": "float32",
            "layout": "NCHW",
            "channels": "RGB",
        },  # fmt: skip
        "preprocess": "RGB uint8 -> /255 -> "
        + (f"centre crop keeping {run.crop:g} of each side -> " if run.crop < 1.0 else "")
        + f"resize to {s}x{s} (bilinear, antialias) -> (x - mean) / std per channel",
        "image_size": s,
        "crop": run.crop,
        "mean": list(run.mean),
        "std": list(run.std),
        "classes": run.classes,
        "output": "logits (batch, classes); softmax for probabilities",
        "model": run.cfg.model.model,
        "checkpoint": {k: run.meta.get(k) for k in ("epoch", "step", "metric", "value")},
        "parity_max_abs_diff": diff,
        "histodist_version": run.meta.get("histodist_version"),
    }


def run_export(args) -> int:
    run = inference.load_run(args.run, args.checkpoint)
    if run.is_bags and args.format != "safetensors":
        raise UsageError(
            f"--format {args.format}: {run.cfg.model.model} is a MIL head, whose graph depends "
            "on the bag's length; export --format safetensors (the weights, rebuilt with "
            "histodist.models.build_model from the run's config)"
        )
    model = run.model.float().eval()
    out = Path(args.out) if args.out else run.run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"model.{SUFFIX[args.format]}"
    x = parity_batch(run, args.batch)
    with torch.no_grad():
        ref = model(x)
    if args.format == "torchscript":
        got = export_torchscript(model, x, path)
    elif args.format == "safetensors":
        got = export_safetensors(run, x, path)
    else:
        got = export_onnx(model, x, path, args.opset)
    diff = None if got is None else float((got.float() - ref).abs().max())
    if diff is not None:
        print(f"parity on {len(x)} images: max |logit difference| = {diff:.3g} (limit {TOLERANCE})")
        if not diff < TOLERANCE:
            path.unlink(missing_ok=True)
            raise ExportError(f"{args.format} export differs from PyTorch by {diff:.3g}")
    meta = preprocess_json(run, args.format, path.name, diff)
    side = path.with_name(path.name + ".json")
    inference.atomic_write(side, lambda f: json.dump(meta, f, indent=2))
    print(f"wrote {path} and {side}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("export", run_export, args, extra=(FileNotFoundError,))


if __name__ == "__main__":
    sys.exit(main())
