"""histodist.metrics agrees with scikit-learn under its stated definitions; gathering; the
best-model rule."""

import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from histodist import metrics
from histodist.training.distributed import gather_varlen


def _probs(n, c, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(n, c, generator=g) + 1.5 * torch.nn.functional.one_hot(labels, c)
    return logits.softmax(1), labels


def test_binary_summary_matches_sklearn_at_threshold_half():
    probs, labels = _probs(500, 2, 0)
    m = metrics.summary(probs, labels)
    y, p = labels.numpy(), probs.numpy()
    pred = (p[:, 1] >= 0.5).astype(int)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p[:, 1]), abs=1e-6)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert metrics.confusion(probs, labels).tolist() == skm.confusion_matrix(y, pred).tolist()


def test_binary_tie_at_half_is_predicted_positive():
    probs = torch.tensor([[0.5, 0.5], [0.6, 0.4], [0.3, 0.7]])
    assert metrics.predicted_class(probs).tolist() == [1, 0, 1]
    assert metrics.predicted_class(probs.numpy()).tolist() == [1, 0, 1]


def test_multiclass_summary_matches_sklearn():
    probs, labels = _probs(700, 7, 1)
    m = metrics.summary(probs, labels)
    y, p = labels.numpy(), probs.numpy()
    pred = p.argmax(1)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr"), abs=1e-5)
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["weighted_f1"] == pytest.approx(skm.f1_score(y, pred, average="weighted"))
    assert "sensitivity" not in m
    assert np.array_equal(metrics.confusion(probs, labels).numpy(), skm.confusion_matrix(y, pred))


def test_multiclass_averages_run_over_the_classes_present():
    """A validation split without class 6, which the model still predicts sometimes: the
    averages are those over classes 0-5, and class 6's mistakes cost through their recall."""
    probs, labels = _probs(700, 7, 2)
    keep = labels != 6
    probs, labels = probs[keep], labels[keep]
    y, p = labels.numpy(), probs.numpy()
    pred = p.argmax(1)
    assert (pred == 6).any()
    present = list(range(6))
    m = metrics.summary(probs, labels)
    with pytest.warns(UserWarning):  # sklearn: y_pred contains classes not in y_true
        assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred, labels=present, average="macro"))
    ovr = [skm.roc_auc_score(y == k, p[:, k]) for k in present]
    assert m["auc"] == pytest.approx(np.mean(ovr), abs=1e-5)
    c = metrics.per_class(probs, labels)
    assert math.isnan(c["recall"][6]) and math.isnan(c["f1"][6])
    assert c["precision"][6] == 0 and c["support"][6] == 0


def test_single_class_auc_is_nan_and_nan_never_best():
    probs, _ = _probs(10, 2, 2)
    m = metrics.summary(probs, torch.ones(10, dtype=torch.long))
    assert math.isnan(m["auc"]) and math.isnan(m["specificity"])
    assert metrics.summary(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)) == {}
    assert not metrics.is_better(math.nan, None) and not metrics.is_better(math.inf, 0.5)
    assert metrics.is_better(0.6, None) and metrics.is_better(0.6, 0.5)
    assert not metrics.is_better(0.5, 0.5)


def test_non_finite_probabilities_score_nan():
    """A diverged model (NaN outputs) gets NaN everywhere, never a figure from its counts."""
    probs, labels = _probs(40, 2, 5)
    probs[3] = math.nan
    m = metrics.summary(probs, labels)
    assert set(m) == {"accuracy", "balanced_accuracy", "auc", "f1", "sensitivity", "specificity"}
    assert all(math.isnan(v) for v in m.values())
    probs, labels = _probs(40, 3, 5)
    probs[:, 0] = math.inf
    assert all(math.isnan(v) for v in metrics.summary(probs, labels).values())
    assert not metrics.is_better(metrics.summary(probs, labels)["accuracy"], 0.1)


def test_numpy_and_torch_inputs_give_the_same_numbers():
    probs, labels = _probs(300, 3, 4)
    a = metrics.summary(probs, labels)
    b = metrics.summary(probs.double().numpy(), labels.numpy())
    assert a == pytest.approx(b, abs=1e-6)


def test_gather_varlen_single_process_is_identity():
    class One:
        num_processes = 1

    t = torch.arange(5)
    assert gather_varlen(One(), t) is t
