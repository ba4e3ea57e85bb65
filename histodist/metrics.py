"""The one definition of every classification number histodist reports.

Training's validation (`val/*` in metrics.jsonl and W&B), `histodist.evaluate`, the k-NN probe
and the benchmarks all score predictions with `summary()`, so the same probabilities give the
same figures everywhere. Inputs are class probabilities (N, C) with rows summing to 1 and
integer labels (N,) in [0, C), as torch tensors or numpy arrays on any device; outputs are
plain Python floats.

Definitions (C = number of classes; "present" = classes that occur in the labels):
- predicted class: P(class 1) >= 0.5 for two classes (the threshold a report states), the
  most probable class otherwise;
- accuracy: fraction of predicted classes equal to the label;
- balanced_accuracy: mean recall over the present classes (scikit-learn's
  balanced_accuracy_score);
- auc: ROC AUC of P(class 1) for two classes; for more, the one-vs-rest AUC of each present
  class averaged over them. NaN when the labels hold one class;
- f1: F1 of class 1 for two classes; for more, F1 averaged over the present classes, and
  weighted_f1 weighted by their support. Predictions of an absent class still cost (they
  are missed samples of the classes they came from), but an absent class does not pull the
  average towards zero;
- sensitivity / specificity (two classes): recall of class 1 / of class 0 at 0.5, NaN when
  that class is absent.
Any NaN or infinite probability makes every figure NaN: a diverged model must not score (AUC
0.33 for all-NaN outputs, as the counts would give), and NaN is never the best checkpoint.
The counts come from torchmetrics' confusion matrix and the AUCs from its binary_auroc
(faster than scikit-learn's roc_auc_score: 0.25 ms against 2.2 ms for 3,000 samples, which
matters in a 1,000-resample bootstrap); only the averaging over present classes is ours.
"""

from __future__ import annotations

import math
from typing import Any

import torch

Array = Any  # torch.Tensor or numpy.ndarray

# The direction in which each reported figure improves (W&B run summaries keep that extreme):
# summary()'s figures and neg_loss rise, the losses and the calibration error fall.
HIGHER_IS_BETTER = ("accuracy", "balanced_accuracy", "auc", "f1", "weighted_f1", "sensitivity",
                    "specificity", "neg_loss")  # fmt: skip
LOWER_IS_BETTER = ("loss", "nll", "ece")


def as_tensors(probs: Array, labels: Array) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 (N, C), int64 (N,)) CPU tensors; raises ValueError on mismatched shapes."""
    p = torch.as_tensor(probs).detach().cpu().float()
    y = torch.as_tensor(labels).detach().cpu().long()
    if p.ndim != 2 or y.shape != p.shape[:1]:
        raise ValueError(f"probs (N, C) and labels (N,) expected, got {tuple(p.shape)} "
                         f"{tuple(y.shape)}")  # fmt: skip
    return p, y


def predicted_class(probs: Array) -> torch.Tensor:
    """int64 (N,): P(class 1) >= 0.5 for two classes, the argmax otherwise."""
    p = torch.as_tensor(probs)
    if p.shape[1] == 2:
        return (p[:, 1] >= 0.5).long()
    return p.argmax(1)


def confusion(probs: Array, labels: Array) -> torch.Tensor:
    """int64 (C, C) confusion matrix of the predicted classes, rows = true class."""
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    p, y = as_tensors(probs, labels)
    n = p.shape[1]
    if len(y) == 0:
        return torch.zeros(n, n, dtype=torch.long)
    return multiclass_confusion_matrix(predicted_class(p), y, num_classes=n).long()


def per_class(probs: Array, labels: Array) -> dict[str, torch.Tensor]:
    """float64 (C,) precision, recall and F1 per class, int64 (C,) support, and the int64
    (C, C) confusion matrix they come from. Precision is 0 for a class never predicted; recall
    and F1 are NaN for a class absent from the labels."""
    counts = confusion(probs, labels)
    cm = counts.double()
    tp, support, predicted = cm.diag(), cm.sum(1), cm.sum(0)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), 0.0)
    recall = torch.where(support > 0, tp / support.clamp(min=1), math.nan)
    both = precision + recall
    f1 = torch.where(both > 0, 2 * precision * recall / both.clamp(min=1e-300), 0.0)
    f1 = torch.where(support > 0, f1, math.nan)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.long(),
            "confusion": counts}  # fmt: skip


def roc_auc(scores: Array, positive: Array) -> float:
    """ROC AUC of float scores (N,) against bool/int targets (N,); NaN with one class only."""
    from torchmetrics.functional.classification import binary_auroc

    s = torch.as_tensor(scores).detach().cpu().float()
    t = torch.as_tensor(positive).detach().cpu().long()
    if t.unique().numel() < 2:
        return math.nan
    return binary_auroc(s, t, validate_args=False).item()


def auc(probs: Array, labels: Array) -> float:
    """ROC AUC of P(class 1) (two classes) or one-vs-rest AUC averaged over the present
    classes; NaN when the labels hold a single class."""
    p, y = as_tensors(probs, labels)
    present = y.unique().tolist()
    if len(present) < 2 or not torch.isfinite(p).all():
        return math.nan
    if p.shape[1] == 2:
        return roc_auc(p[:, 1], y)
    return sum(roc_auc(p[:, k], y == k) for k in present) / len(present)


def summary(probs: Array, labels: Array) -> dict[str, float]:
    """accuracy, balanced_accuracy, auc, f1 and, for two classes, sensitivity and
    specificity, or, for more, weighted_f1 (definitions in the module docstring). Empty
    input gives an empty dict."""
    p, y = as_tensors(probs, labels)
    if len(y) == 0:
        return {}
    if not torch.isfinite(p).all():  # a diverged model scores nothing (and is never "best")
        more = ("sensitivity", "specificity") if p.shape[1] == 2 else ("weighted_f1",)
        return dict.fromkeys(("accuracy", "balanced_accuracy", "auc", "f1", *more), math.nan)
    c = per_class(p, y)
    present = c["support"] > 0
    out = {
        "accuracy": (c["confusion"].trace() / len(y)).item(),
        "balanced_accuracy": c["recall"][present].mean().item(),
        "auc": auc(p, y),
    }
    if p.shape[1] == 2:
        out.update(f1=c["f1"][1].item() if present[1] else 0.0,
                   sensitivity=c["recall"][1].item(), specificity=c["recall"][0].item())  # fmt: skip
    else:
        w = c["support"][present].double()
        out.update(f1=c["f1"][present].mean().item(),
                   weighted_f1=(c["f1"][present] * w).sum().item() / w.sum().item())  # fmt: skip
    return out


def is_better(value: float | None, best: float | None) -> bool:
    """Higher is better; NaN never wins (a diverged model is never saved as best)."""
    if value is None or math.isnan(value) or math.isinf(value):
        return False
    return best is None or value > best
