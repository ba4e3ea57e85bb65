"""Metric functions on constructed sets whose answers are known."""

import json

import numpy as np
import pytest
from wandbkit import read_run, wandb_file

from histodist.inference import report


def _two(p1):
    p1 = np.asarray(p1, dtype=float)
    return np.stack([1 - p1, p1], 1)


def test_separable_binary_has_auc_one_and_tight_ci():
    labels = np.array([0] * 20 + [1] * 20)
    probs = _two(np.r_[np.linspace(0.05, 0.45, 20), np.linspace(0.55, 0.95, 20)])
    m = report.classification_report(probs, labels, ["0", "1"], n_boot=200)
    assert m["auc"] == 1.0 and m["auc_ci95"] == pytest.approx([1.0, 1.0])
    assert m["accuracy"] == 1.0 and m["balanced_accuracy"] == 1.0 and m["f1"] == 1.0
    assert m["at_0.5"]["sensitivity"] == 1.0 and m["at_0.5"]["specificity"] == 1.0
    assert m["confusion"] == [[20, 0], [0, 20]]
    json.dumps(m)  # the report is plain JSON


def test_binary_known_counts_and_youden():
    # 4 negatives, 4 positives; at 0.5: TN=3 FP=1 TP=2 FN=2.
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p1 = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.45, 0.7, 0.9])
    m = report.binary_metrics(_two(p1), labels, n_boot=0)
    assert m["confusion"] == [[3, 1], [2, 2]]
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["at_0.5"]["sensitivity"] == pytest.approx(0.5)
    assert m["at_0.5"]["specificity"] == pytest.approx(0.75)
    # Threshold 0.4 catches every positive for one false positive: J = 1 - 0.25, the maximum.
    assert report.youden_threshold(p1, labels) == pytest.approx(0.4)
    assert m["at_youden"]["sensitivity"] == 1.0 and m["at_youden"]["specificity"] == 0.75
    # A threshold given from the validation split is used as is.
    given = report.binary_metrics(_two(p1), labels, youden=0.65, n_boot=0)["at_youden"]
    assert given["threshold"] == 0.65 and given["chosen_on"] == "given"
    assert given["sensitivity"] == 0.5 and given["specificity"] == 1.0
    # AUC by hand: pairs (pos > neg) = 4+4+4+3 minus ... checked against the U statistic.
    pos, neg = p1[labels == 1], p1[labels == 0]
    u = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))
    assert m["auc"] == pytest.approx(u)


def test_bootstrap_ci_is_seeded_and_brackets_auc():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 400)
    p1 = np.clip(0.5 + 0.3 * (labels - 0.5) + rng.normal(0, 0.25, 400), 0, 1)
    a = report.bootstrap_auc_ci(p1, labels, n_boot=300, seed=3)
    b = report.bootstrap_auc_ci(p1, labels, n_boot=300, seed=3)
    auc = report.binary_metrics(_two(p1), labels, n_boot=0)["auc"]
    assert a == b and a[0] < auc < a[1] and a[1] - a[0] < 0.2


def test_ece_zero_when_calibrated_and_matches_bins():
    # In each bin the fraction of positives equals the predicted probability exactly.
    p1, labels = [], []
    for p, n_pos in [(0.1, 1), (0.3, 3), (0.5, 5), (0.7, 7), (0.9, 9)]:
        p1 += [p] * 10
        labels += [1] * n_pos + [0] * (10 - n_pos)
    probs, labels = _two(p1), np.array(labels)
    assert report.calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-6)
    # An overconfident model: says 0.9 for a coin flip -> ECE 0.4.
    assert report.calibration_error(_two([0.9] * 10), np.array([0, 1] * 5)) == pytest.approx(0.4)
    # The plotted bins give torchmetrics' number back on random data.
    rng = np.random.default_rng(0)
    p = rng.dirichlet([1, 1, 1], 300)
    y = rng.integers(0, 3, 300)
    conf, freq, count = report.reliability_bins(p, y)
    ok = count > 0
    ece = float((count[ok] / count.sum() * np.abs(conf[ok] - freq[ok])).sum())
    assert ece == pytest.approx(report.calibration_error(p, y), abs=1e-5)


def test_multiclass_known_confusion():
    classes = ["a", "b", "c"]
    labels = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    probs = np.full((6, 3), 0.1)
    probs[np.arange(6), pred] = 0.8
    m = report.classification_report(probs, labels, classes)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["per_class"]["b"] == {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2}
    assert m["per_class"]["a"]["f1"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert 0 < m["auc"] <= 1
    # NLL by definition: mean of -log p(true class).
    assert m["nll"] == pytest.approx(-np.log(probs[np.arange(6), labels]).mean())


def test_group_aggregation_mean_and_max():
    probs = _two([0.2, 0.4, 0.9, 0.1, 0.3])
    labels = np.array([0, 0, 1, 0, 0])
    groups = ["p2", "p2", "p2", "p1", None]
    ids, p, y = report.aggregate_groups(probs, labels, groups, "mean")
    assert ids == ["p1", "p2"] and y.tolist() == [0, 1]
    assert p[:, 1] == pytest.approx([0.1, 0.5])
    _, p, _ = report.aggregate_groups(probs, labels, groups, "max")
    assert p[1, 1] == pytest.approx(0.9 / (0.8 + 0.9))  # max per class, renormalised
    with pytest.raises(ValueError):
        report.aggregate_groups(probs, labels, groups, "median")


def test_plots_write_pngs(tmp_path):
    rng = np.random.default_rng(0)
    p = rng.dirichlet([1, 1, 1], 60)
    y = rng.integers(0, 3, 60)
    m = report.classification_report(p, y, ["a", "b", "c"])
    for f in (
        report.plot_roc(p, y, ["a", "b", "c"], tmp_path / "roc.png"),
        report.plot_confusion(m["confusion"], ["a", "b", "c"], tmp_path / "cm.png"),
        report.plot_reliability(p, y, tmp_path / "rel.png"),
    ):
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(x.name for x in tmp_path.glob("*.png")) == ["cm.png", "rel.png", "roc.png"]
    assert "accuracy" in report.format_table(m)


def test_log_wandb_offline_writes_a_run(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    png = report.plot_reliability(_two([0.2, 0.8]), np.array([0, 1]), tmp_path / "r.png")
    report.log_wandb("offline", project="histodist-test", entity=None, name="eval",
                     job_type="eval", metrics={"patch": {"auc": 0.9, "confusion": [[1]]}},
                     images={"reliability": png})  # fmt: skip
    run = read_run(wandb_file(tmp_path))
    out = capfd.readouterr()  # wandb's banner and footer silenced: one line, the upload command
    said = (out.out + out.err).strip().splitlines()
    assert said == [f"wandb: offline, run saved in {wandb_file(tmp_path).parent}; to upload it: "
                    f"`wandb login`, then `wandb sync {wandb_file(tmp_path).parent}` "
                    "(--wandb disabled turns W&B off)"]  # fmt: skip
    assert run.name == "eval" and run.summary["patch/auc"] == 0.9
    assert run.summary["reliability._type"] == "image-file"
    assert report.flatten({"patch": {"auc": 0.9, "at": {"t": 1}}, "x": [1]}) == {
        "patch/auc": 0.9,
        "patch/at/t": 1,
    }
    report.log_wandb("disabled", project="p", entity=None, name="n", job_type="eval", metrics={})
