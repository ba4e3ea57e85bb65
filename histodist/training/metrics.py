"""Validation metrics over the gathered evaluation set, computed with torchmetrics.

Everything here takes tensors already gathered from every rank (see gather_varlen), so the
numbers describe exactly the validation split, not one rank's share of it.
"""

from __future__ import annotations

import math

import torch
from torchmetrics.functional import classification as C


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, ROC AUC, balanced accuracy, F1 (binary: class 1; multi-class: macro) and, for
    two classes, sensitivity (recall of class 1) and specificity (recall of class 0).

    probs: float (N, C) class probabilities, rows summing to 1; labels: int64 (N,) in [0, C).
    Any device. AUC is NaN when the labels hold a single class.
    """
    probs, labels = probs.detach().float().cpu(), labels.detach().long().cpu()
    if probs.ndim != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f"probs (N, C) and labels (N,) expected, got {probs.shape} {labels.shape}")
    n_cls = probs.shape[1]
    pred = probs.argmax(1)
    out = {
        "accuracy": (pred == labels).float().mean().item(),
        "balanced_accuracy": C.multiclass_recall(
            pred, labels, num_classes=n_cls, average="macro"
        ).item(),
    }
    single_class = labels.unique().numel() < 2
    if n_cls == 2:
        p1 = probs[:, 1]
        out["auc"] = math.nan if single_class else C.binary_auroc(p1, labels).item()
        out["sensitivity"] = C.binary_recall(pred, labels).item()
        out["specificity"] = C.binary_specificity(pred, labels).item()
        out["f1"] = C.binary_f1_score(pred, labels).item()
    else:
        out["auc"] = (
            math.nan
            if single_class
            else C.multiclass_auroc(probs, labels, num_classes=n_cls, average="macro").item()
        )
        out["f1"] = C.multiclass_f1_score(pred, labels, num_classes=n_cls, average="macro").item()
    return out


def confusion(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """int64 (C, C) confusion matrix, rows = true class, columns = predicted class."""
    n = probs.shape[1]
    task = "binary" if n == 2 else "multiclass"
    if task == "binary":
        return C.binary_confusion_matrix(probs[:, 1].cpu(), labels.cpu()).long()
    return C.multiclass_confusion_matrix(probs.cpu(), labels.cpu(), num_classes=n).long()


def gather_varlen(accelerator, t: torch.Tensor) -> torch.Tensor:
    """All-gather tensors whose first dimension differs per rank; returns the concatenation over
    ranks in rank order (on every rank), without padding rows. Same dtype/device as `t`."""
    if accelerator.num_processes == 1:
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = accelerator.gather(n).tolist()
    padded = accelerator.pad_across_processes(t.contiguous(), dim=0)
    gathered = accelerator.gather(padded)
    width = padded.shape[0]
    return torch.cat([gathered[r * width : r * width + s] for r, s in enumerate(sizes)])


def is_better(value: float, best: float | None) -> bool:
    """Higher is better; NaN never wins (a diverged model is never saved as best)."""
    if value is None or math.isnan(value) or math.isinf(value):
        return False
    return best is None or value > best
