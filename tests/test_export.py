"""histodist.export: each format reloads and agrees with PyTorch; the JSON suffices to use it."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from runkit import tiny_run
from shardkit import pcam_images

from histodist import export
from histodist.inference import core as inference


@pytest.fixture(scope="module")
def run_dir(pcam_jpeg, tmp_path_factory):
    return tiny_run(pcam_jpeg, tmp_path_factory.getbasetemp())[0]


def _preprocess(paths, meta):
    """What a serving client does with only the JSON: RGB -> [0, 1] -> resize -> normalise."""
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), np.float32) / 255)
                     .permute(2, 0, 1) for p in paths])  # fmt: skip
    h, w = x.shape[-2:]
    ch, cw = round(h * meta["crop"]), round(w * meta["crop"])
    x = x[..., (h - ch) // 2 : (h - ch) // 2 + ch, (w - cw) // 2 : (w - cw) // 2 + cw]
    s = meta["image_size"]
    x = torch.nn.functional.interpolate(x, size=(s, s), mode="bilinear", antialias=True)
    mean, std = (
        torch.tensor(meta["mean"]).view(1, 3, 1, 1),
        torch.tensor(meta["std"]).view(1, 3, 1, 1),
    )
    return (x - mean) / std


@pytest.mark.parametrize("fmt", ["torchscript", "safetensors", "onnx"])
def test_export_parity_and_preprocessing(fmt, run_dir, pcam_jpeg, capsys):
    assert export.main(["--run", str(run_dir), "--format", fmt, "--batch", "4"]) == 0
    text = capsys.readouterr().out
    suffix = export.SUFFIX[fmt]
    path = run_dir / "export" / f"model.{suffix}"
    meta = json.loads(path.with_name(path.name + ".json").read_text())
    assert meta["classes"] == ["0", "1"] and meta["image_size"] == 32 and len(meta["mean"]) == 3
    assert meta["parity_max_abs_diff"] < 1e-4 and "max |logit difference|" in text
    # A batch size other than the traced one, preprocessed from the JSON alone, gives the
    # probabilities histodist.inference.core gives.
    paths = [p for p, _ in pcam_images(pcam_jpeg, "valid", 3)][:5]
    x = _preprocess(paths, meta)
    run = inference.load_run(run_dir)
    if fmt == "torchscript":
        logits = torch.jit.load(str(path))(x)
    elif fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        logits = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
    else:
        from safetensors.torch import load_file

        model = run.model
        model.load_state_dict(load_file(str(path)))
        logits = model(x)
    items = inference.list_inputs([str(p) for p in paths], run.classes)
    loader = inference.file_batches(run, items, batch_size=8, workers=0)
    want = inference.collect(inference.iter_predictions(run, loader), 2).probs
    assert logits.softmax(1).detach().numpy() == pytest.approx(want, abs=1e-4)


def test_onnx_without_onnxscript_uses_the_torchscript_exporter(run_dir, tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    find_spec = export.importlib.util.find_spec
    monkeypatch.setattr(export.importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxscript" else find_spec(name, *a))  # fmt: skip
    assert export.main(["--run", str(run_dir), "--format", "onnx", "--out", str(tmp_path)]) == 0
    meta = json.loads((tmp_path / "model.onnx.json").read_text())
    assert meta["parity_max_abs_diff"] < 1e-4


def test_onnx_without_onnx_installed_is_a_one_line_error(run_dir, tmp_path, monkeypatch, capsys):
    find_spec = export.importlib.util.find_spec
    monkeypatch.setattr(export.importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnx" else find_spec(name, *a))  # fmt: skip
    assert export.main(["--run", str(run_dir), "--format", "onnx", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install" in err and "onnx" in err
    assert not list(tmp_path.glob("model.onnx*"))


def test_a_centre_cropped_run_exports_its_crop(pcam_jpeg, tmp_path_factory):
    # trained on the centre half of each patch: the JSON says so, and a client that follows
    # it gets inference's probabilities (which differ from those without the crop)
    _, shards = tiny_run(pcam_jpeg, tmp_path_factory.getbasetemp())
    from runkit import make_run

    run_dir = make_run(tmp_path_factory.mktemp("cropped") / "run", shards, crop=0.5)
    assert export.main(["--run", str(run_dir), "--format", "torchscript", "--batch", "4"]) == 0
    path = run_dir / "export" / "model.pt"
    meta = json.loads(path.with_name("model.pt.json").read_text())
    assert meta["crop"] == 0.5 and "centre crop keeping 0.5" in meta["preprocess"]
    paths = [p for p, _ in pcam_images(pcam_jpeg, "valid", 3)][:5]
    run = inference.load_run(run_dir)
    items = inference.list_inputs([str(p) for p in paths], run.classes)
    loader = inference.file_batches(run, items, batch_size=8, workers=0)
    want = inference.collect(inference.iter_predictions(run, loader), 2).probs
    logits = torch.jit.load(str(path))(_preprocess(paths, meta))
    assert logits.softmax(1).detach().numpy() == pytest.approx(want, abs=1e-4)
    uncropped = torch.jit.load(str(path))(_preprocess(paths, {**meta, "crop": 1.0}))
    assert not np.allclose(uncropped.softmax(1).detach().numpy(), want, atol=1e-3)
