"""Validation metrics agree with scikit-learn; gathering; best-model rule."""

import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from histodist.training.metrics import classification_metrics, confusion, gather_varlen, is_better


def _probs(n, c, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(n, c, generator=g) + 1.5 * torch.nn.functional.one_hot(labels, c)
    return logits.softmax(1), labels


def test_binary_metrics_match_sklearn():
    probs, labels = _probs(500, 2, 0)
    m = classification_metrics(probs, labels)
    y, p = labels.numpy(), probs.numpy()
    pred = p.argmax(1)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p[:, 1]), abs=1e-6)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert confusion(probs, labels).tolist() == skm.confusion_matrix(y, pred).tolist()


def test_multiclass_metrics_match_sklearn():
    probs, labels = _probs(700, 7, 1)
    m = classification_metrics(probs, labels)
    y, p = labels.numpy(), probs.numpy()
    pred = p.argmax(1)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr"), abs=1e-5)
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert "sensitivity" not in m
    assert np.array_equal(confusion(probs, labels).numpy(), skm.confusion_matrix(y, pred))


def test_single_class_auc_is_nan_and_nan_never_best():
    probs, _ = _probs(10, 2, 2)
    m = classification_metrics(probs, torch.ones(10, dtype=torch.long))
    assert math.isnan(m["auc"])
    assert not is_better(math.nan, None) and not is_better(math.inf, 0.5)
    assert is_better(0.6, None) and is_better(0.6, 0.5) and not is_better(0.5, 0.5)


def test_gather_varlen_single_process_is_identity():
    class One:
        num_processes = 1

    t = torch.arange(5)
    assert gather_varlen(One(), t) is t
