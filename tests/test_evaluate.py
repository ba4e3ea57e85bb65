"""histodist.evaluate on tiny shards of real PCam patches and on the same images as files."""

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from runkit import IMAGE_SIZE, tiny_run, untrained_run
from shardkit import pcam_images
from sklearn.metrics import roc_auc_score
from trainkit import accelerate_cpu_env, free_port

from histodist import evaluate


@pytest.fixture(scope="module")
def setup(pcam_jpeg, tmp_path_factory):
    return tiny_run(pcam_jpeg, tmp_path_factory.getbasetemp())


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _direct_probs(run_dir, paths):
    """P(class 1) computed without histodist.inference.core: PIL decode, the model, softmax."""
    from histodist.augment import eval_transform
    from histodist.training.checkpoint import load_run_model

    model, _, _ = load_run_model(run_dir)
    man = json.loads((run_dir / "manifest.json").read_text())
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy())
                     .permute(2, 0, 1) for p in paths])  # fmt: skip
    x = eval_transform(out_size=IMAGE_SIZE, mean=man["mean"], std=man["std"])(x)
    with torch.no_grad():
        return model(x).softmax(1)[:, 1].numpy()


def test_evaluate_valid_split_outputs_are_right(setup, pcam_jpeg, capsys):
    run_dir, shards = setup
    # fp32: the probabilities are compared with the model's own at 1e-5 (bf16 rounds at 1e-2)
    assert evaluate.main(["--run", str(run_dir), "--split", "valid", "--workers", "0",
                          "--bootstrap", "100", "--no-progress", "--precision", "fp32"]) == 0  # fmt: skip
    out = run_dir / "eval-valid"
    for name in ("metrics.json", "predictions.csv", "roc.png", "confusion.png",
                 "reliability.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    rows = _read_csv(out / "predictions.csv")
    images = pcam_images(pcam_jpeg, "valid", 10)
    # Exactly the split, each sample once, labels from the shards.
    assert sorted(r["key"] for r in rows) == sorted(p.stem for p, _ in images)
    truth = {p.stem: str(y) for p, y in images}
    assert all(r["label"] == truth[r["key"]] for r in rows)
    # Probabilities match the model applied directly to the decoded files.
    by_key = {r["key"]: float(r["prob_1"]) for r in rows}
    direct = _direct_probs(run_dir, [p for p, _ in images])
    assert [by_key[p.stem] for p, _ in images] == pytest.approx(direct, abs=1e-5)
    # The reported metrics are those of the written predictions.
    m = json.loads((out / "metrics.json").read_text())
    y = np.array([int(r["label"]) for r in rows])
    p1 = np.array([float(r["prob_1"]) for r in rows])
    assert m["patch"]["n"] == 20 and m["num_predictions"] == 20
    assert m["patch"]["auc"] == pytest.approx(roc_auc_score(y, p1))
    assert m["patch"]["accuracy"] == pytest.approx(((p1 >= 0.5) == y).mean())
    lo, hi = m["patch"]["auc_ci95"]
    assert lo <= m["patch"]["auc"] <= hi
    # shardkit gives every sample the group g<label>: two groups, mean of their patches.
    assert m["group_mean"]["num_groups"] == 2 and m["youden_chosen_on"] == "self"
    assert "balanced_accuracy" in capsys.readouterr().out


def test_test_split_takes_youden_threshold_from_valid(setup):
    run_dir, _ = setup
    args = ["--run", str(run_dir), "--workers", "0", "--bootstrap", "0", "--no-progress"]
    assert evaluate.main(args + ["--split", "valid", "--tta", "2"]) == 0
    assert evaluate.main(args + ["--tta", "2"]) == 0  # default split: test
    valid = json.loads((run_dir / "eval-valid" / "metrics.json").read_text())
    test = json.loads((run_dir / "eval-test" / "metrics.json").read_text())
    assert test["youden_chosen_on"].startswith("valid") and test["patch"]["n"] == 16
    t = valid["patch"]["at_youden"]["threshold"]
    assert test["patch"]["at_youden"]["threshold"] == t


def test_input_folder_gives_the_same_figures_as_shards(setup, pcam_jpeg, tmp_path):
    run_dir, _ = setup
    for path, label in pcam_images(pcam_jpeg, "valid", 10):
        (tmp_path / "imgs" / str(label)).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, tmp_path / "imgs" / str(label))
    args = ["--run", str(run_dir), "--workers", "0", "--bootstrap", "50", "--no-progress"]
    assert evaluate.main(args + ["--split", "valid", "--out", str(tmp_path / "a")]) == 0
    assert evaluate.main(args + ["--input", str(tmp_path / "imgs"),
                                 "--out", str(tmp_path / "b")]) == 0  # fmt: skip
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())["patch"]
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())["patch"]
    for k in ("n", "accuracy", "auc", "balanced_accuracy", "f1", "nll", "ece"):
        assert a[k] == pytest.approx(b[k], abs=1e-5), k


@pytest.mark.slow
def test_two_process_accelerate_launch_scores_every_sample_once(setup, tmp_path):
    run_dir, _ = setup
    common = ["--run", str(run_dir), "--split", "valid", "--workers", "0", "--bootstrap", "50",
              "--no-progress"]  # fmt: skip
    assert evaluate.main(common + ["--out", str(tmp_path / "one")]) == 0
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
           "2", "--num_machines", "1", "--main_process_port", str(free_port()),
           "-m", "histodist.evaluate", *common, "--out", str(tmp_path / "two")]  # fmt: skip
    proc = subprocess.run(
        cmd, env=accelerate_cpu_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    keys = [r["key"] for r in _read_csv(tmp_path / "two" / "predictions.csv")]
    assert len(keys) == len(set(keys)) == 20
    for k in ("n", "accuracy", "auc", "auc_ci95", "nll", "ece"):
        assert two["patch"][k] == pytest.approx(one["patch"][k], abs=1e-6), k


def test_multiclass_csv_input_with_lesion_groups(pcam_jpeg, tmp_path):
    """HAM10000-like: 3 classes, images of various sizes, lesion ids in a CSV."""
    classes = ["bcc", "mel", "nv"]
    run_dir = untrained_run(tmp_path / "run", classes)
    rows = ["path,label,group"]
    for i, (path, _) in enumerate(pcam_images(pcam_jpeg, "valid", 6)):
        img = Image.open(path).resize((60 + 10 * (i % 3), 45 + 5 * (i % 2)))  # sizes vary
        img.save(tmp_path / f"img{i}.png")
        rows.append(f"img{i}.png,{classes[i % 3]},lesion{i // 2}")
    (tmp_path / "meta.csv").write_text("\n".join(rows) + "\n")
    assert evaluate.main(["--run", str(run_dir), "--input", str(tmp_path / "meta.csv"),
                          "--workers", "0", "--no-progress"]) == 0  # fmt: skip
    m = json.loads((run_dir / "eval-input-meta" / "metrics.json").read_text())
    assert set(m["patch"]["per_class"]) == set(classes)
    assert [c["support"] for c in m["patch"]["per_class"].values()] == [4, 4, 4]
    assert np.array(m["patch"]["confusion"]).shape == (3, 3)
    assert np.array(m["patch"]["confusion"]).sum() == 12
    assert m["group_mean"]["num_groups"] == 6 and "weighted_f1" in m["group_max"]
    rows = _read_csv(run_dir / "eval-input-meta" / "predictions.csv")
    group = {r["key"]: r["group"] for r in rows}
    assert [group[f"img{i}"] for i in (0, 1, 2, 11)] == ["lesion0", "lesion0", "lesion1", "lesion5"]
    assert (run_dir / "eval-input-meta" / "confusion.png").is_file()
