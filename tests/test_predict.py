"""histodist.predict and the shared inference pieces: TTA, file inputs, CSVs, Kaggle format."""

import csv
import shutil
import warnings

import numpy as np
import pytest
import torch
from runkit import tiny_run
from shardkit import pcam_images

from histodist import predict
from histodist.augment import dihedral
from histodist.inference import core as inference


@pytest.fixture(scope="module")
def run_dir(pcam_jpeg, tmp_path_factory):
    return tiny_run(pcam_jpeg, tmp_path_factory.getbasetemp())[0]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_tta_of_a_flip_invariant_model_equals_plain_output():
    torch.manual_seed(0)
    # Global average pooling first: the output cannot depend on orientation.
    invariant = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                    torch.nn.Linear(3, 4))  # fmt: skip
    x = torch.randn(5, 3, 16, 16)
    plain = inference.tta_probs(invariant, x, 1)
    for n in (2, 4, 8):
        assert torch.allclose(inference.tta_probs(invariant, x, n), plain, atol=1e-6)
    # An orientation-sensitive model: TTA is the mean softmax over the dihedral views.
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten(),
                               torch.nn.Linear(2 * 14 * 14, 3))  # fmt: skip
    manual = torch.stack([conv(dihedral(x, k)).softmax(1) for k in range(8)]).mean(0)
    assert torch.allclose(inference.tta_probs(conv, x, 8), manual, atol=1e-6)
    assert not torch.allclose(inference.tta_probs(conv, x, 8), inference.tta_probs(conv, x, 1))
    with pytest.raises(inference.InputError):
        inference.tta_probs(conv, x, 3)


def test_n_files_give_n_predictions_and_bad_files_are_listed(run_dir, pcam_jpeg, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for path, _ in pcam_images(pcam_jpeg, "valid", 3):
        shutil.copy(path, folder)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "preds.csv"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = predict.main(["--run", str(run_dir), "--input", str(folder), "--out", str(out),
                           "--workers", "0", "--tta", "8", "--no-progress"])  # fmt: skip
    assert rc == 0
    rows = _rows(out)
    assert len(rows) == 7  # 6 images + the broken one
    bad = [r for r in rows if r["key"] == "broken"]
    assert bad[0]["prob_1"] == "" and bad[0]["pred"] == "" and bad[0]["error"]
    good = [r for r in rows if r["key"] != "broken"]
    p = np.array([[float(r["prob_0"]), float(r["prob_1"])] for r in good])
    assert np.allclose(p.sum(1), 1, atol=1e-5) and all(r["pred"] in ("0", "1") for r in good)
    assert any("broken" in str(w.message) for w in caught)


def test_kaggle_test_folder_writes_a_submission(run_dir, kaggle_mini, tmp_path):
    test = tmp_path / "test"
    shutil.copytree(kaggle_mini / "train", test)
    out = tmp_path / "submission.csv"
    assert predict.main(["--run", str(run_dir), "--input", str(test), "--out", str(out),
                         "--workers", "0", "--no-progress"]) == 0  # fmt: skip
    rows = _rows(out)
    assert list(rows[0]) == ["id", "label"]
    assert sorted(r["id"] for r in rows) == sorted(p.stem for p in test.glob("*.tif"))
    assert all(0.0 <= float(r["label"]) <= 1.0 for r in rows)


def test_csv_of_ids_and_shards_inputs(run_dir, kaggle_mini, tmp_path):
    out = tmp_path / "ids.csv"
    args = ["--run", str(run_dir), "--workers", "0", "--no-progress"]
    assert predict.main(args + ["--input", str(kaggle_mini / "train_labels.csv"),
                                "--out", str(out)]) == 0  # fmt: skip
    rows = _rows(out)
    with open(kaggle_mini / "train_labels.csv") as f:
        truth = {r["id"]: r["label"] for r in csv.DictReader(f)}
    assert {r["key"]: r["label"] for r in rows} == truth and all(r["prob_1"] for r in rows)
    # A shard folder: its split, every sample once.
    shards = run_dir.parent.parent / "tiny-shards"
    assert predict.main(args + ["--input", str(shards), "--split", "valid",
                                "--out", str(tmp_path / "s.csv")]) == 0  # fmt: skip
    assert len({r["key"] for r in _rows(tmp_path / "s.csv")}) == 20


def test_missing_input_is_a_one_line_error(run_dir, tmp_path, capsys):
    rc = predict.main(["--run", str(run_dir), "--input", str(tmp_path / "nope"),
                       "--out", str(tmp_path / "x.csv")])  # fmt: skip
    assert rc == 1 and "no such file" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()
