"""Evaluation reports and figures over gathered predictions (numpy in, plain Python out).

Everything here is a pure function of ``probs`` (float (N, C), rows sum to 1) and ``labels``
(int (N,)) held on the CPU as numpy arrays; the CLIs gather them across ranks first. The
headline numbers (accuracy, balanced accuracy, AUC, F1, sensitivity, specificity, per-class
precision/recall/F1) are histodist.metrics', the definitions training's validation uses; this
module adds what a report needs besides: the bootstrap interval of the AUC, Youden's
threshold, NLL, calibration, group-level aggregation, and the figures. Figures use
matplotlib's Agg backend so nothing needs a display.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from histodist import metrics as M
from histodist.fileio import atomic_path

ECE_BINS = 15  # the usual choice since Guo et al. 2017; enough bins for ~1k samples


def youden_threshold(p_pos: np.ndarray, labels: np.ndarray) -> float:
    """Threshold on P(class 1) maximising sensitivity + specificity - 1 (Youden's J).

    Choose it on the validation split and apply it to the test split; on a split with one
    class only, J is undefined and 0.5 is returned.
    """
    from sklearn.metrics import roc_curve

    if len(np.unique(labels)) < 2:
        return 0.5
    fpr, tpr, thr = roc_curve(labels, p_pos)
    best = int(np.argmax(tpr - fpr))
    return float(min(thr[best], 1.0))  # sklearn's first threshold is +inf


def bootstrap_auc_ci(
    p_pos: np.ndarray,
    labels: np.ndarray,
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) confidence interval of the ROC AUC.

    Resamples cases with replacement from a seeded generator, so the interval is reproducible;
    resamples holding a single class are skipped. Returns (nan, nan) when none is usable.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    aucs = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        y = labels[idx]
        if y.min() == y.max():
            continue
        aucs.append(M.roc_auc(p_pos[idx], y))
    if not aucs:
        return math.nan, math.nan
    lo, hi = np.percentile(aucs, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error (L1, equal-width bins).

    Binary: of P(class 1) against the fraction of positives; multi-class: of the top-label
    confidence against accuracy (torchmetrics' definitions).
    """
    import torch
    from torchmetrics.functional.classification import (
        binary_calibration_error,
        multiclass_calibration_error,
    )

    p = torch.as_tensor(np.ascontiguousarray(probs), dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.long)
    if p.shape[1] == 2:
        return float(binary_calibration_error(p[:, 1].contiguous(), y, n_bins=n_bins))
    return float(multiclass_calibration_error(p, y, num_classes=p.shape[1], n_bins=n_bins))


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (probabilities clipped at 1e-12)."""
    p_true = probs[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(p_true, 1e-12, 1.0)).mean())


def reliability_bins(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean confidence, observed frequency, count) per bin, as ``calibration_error`` bins them."""
    if probs.shape[1] == 2:
        conf, hit = probs[:, 1], (labels == 1).astype(float)
    else:
        conf, hit = probs.max(1), (probs.argmax(1) == labels).astype(float)
    edges = np.linspace(0, 1, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, conf, n_bins) / count
        freq = np.bincount(idx, hit, n_bins) / count
    return mean_conf, freq, count


def _at_threshold(p_pos: np.ndarray, labels: np.ndarray, t: float) -> dict[str, float]:
    """Sensitivity and specificity of ``p_pos >= t`` (NaN for a class absent from labels)."""
    pred = p_pos >= t
    pos, neg = labels == 1, labels == 0
    sens = float(pred[pos].mean()) if pos.any() else math.nan
    spec = float((~pred[neg]).mean()) if neg.any() else math.nan
    return {"threshold": float(t), "sensitivity": sens, "specificity": spec}


def binary_metrics(
    probs: np.ndarray,
    labels: np.ndarray,
    *,
    youden: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Binary report: histodist.metrics.summary (accuracy, AUC, balanced accuracy, F1,
    sensitivity and specificity at 0.5) with the AUC's 95% CI, NLL, ECE, sens/spec at 0.5 and
    at Youden's threshold, and the confusion matrix.

    ``youden``: threshold chosen on the validation split; computed on this set when None.
    """
    p_pos = probs[:, 1]
    two = len(np.unique(labels)) == 2
    lo, hi = bootstrap_auc_ci(p_pos, labels, n_boot=n_boot, seed=seed) if two else (math.nan,) * 2
    t = youden_threshold(p_pos, labels) if youden is None else youden
    m = M.summary(probs, labels)
    return {
        "n": int(len(labels)),
        **m,
        "auc_ci95": [lo, hi],
        "nll": nll(probs, labels),
        "ece": calibration_error(probs, labels),
        "at_0.5": {
            "threshold": 0.5,
            "sensitivity": m["sensitivity"],
            "specificity": m["specificity"],
        },  # fmt: skip
        "at_youden": {
            **_at_threshold(p_pos, labels, t),
            "chosen_on": "self" if youden is None else "given",
        },
        "confusion": M.confusion(probs, labels).tolist(),
    }


def multiclass_metrics(probs: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict:
    """Multi-class report: histodist.metrics.summary (accuracy, balanced accuracy, AUC and F1
    averaged over the classes present, weighted F1), per-class P/R/F1, NLL, ECE, confusion."""
    c = M.per_class(probs, labels)
    return {
        "n": int(len(labels)),
        **M.summary(probs, labels),
        "nll": nll(probs, labels),
        "ece": calibration_error(probs, labels),
        "per_class": {
            name: {
                "precision": float(c["precision"][k]),
                "recall": float(c["recall"][k]),
                "f1": float(c["f1"][k]),
                "support": int(c["support"][k]),
            }
            for k, name in enumerate(classes)
        },
        "confusion": c["confusion"].tolist(),
    }


def classification_report(
    probs: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    *,
    youden: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """``binary_metrics`` for two classes, ``multiclass_metrics`` otherwise."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(classes) == 2:
        return binary_metrics(probs, labels, youden=youden, n_boot=n_boot, seed=seed)
    return multiclass_metrics(probs, labels, classes)


def aggregate_groups(
    probs: np.ndarray, labels: np.ndarray, groups: Sequence[str | None], how: str = "mean"
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Patient / lesion / slide-level predictions from patch-level ones.

    ``how``: "mean" averages the patches' probabilities; "max" takes, per class, the largest
    and renormalises (binary: the slide is as positive as its most positive patch). The group
    label is the largest patch label for two classes (a slide with any tumour patch is
    positive) and the most frequent one otherwise. Rows whose group is None are left out.
    Returns (ids sorted, probs (G, C), labels (G,)).
    """
    if how not in ("mean", "max"):
        raise ValueError(f"group aggregation must be 'mean' or 'max', not {how!r}")
    rows: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        if g is not None and g != "":
            rows.setdefault(str(g), []).append(i)
    ids = sorted(rows)
    c = probs.shape[1]
    out_p = np.zeros((len(ids), c))
    out_y = np.zeros(len(ids), dtype=np.int64)
    for j, g in enumerate(ids):
        idx = np.asarray(rows[g])
        p = probs[idx]
        out_p[j] = p.mean(0) if how == "mean" else p.max(0) / p.max(0).sum()
        y = labels[idx]
        out_y[j] = y.max() if c == 2 else np.bincount(y, minlength=c).argmax()
    return ids, out_p, out_y


def format_table(metrics: dict, title: str = "") -> str:
    """A short fixed-width table of the headline numbers of a report."""
    keys = [
        "n",
        "accuracy",
        "balanced_accuracy",
        "auc",
        "f1",
        "weighted_f1",
        "nll",
        "ece",
    ]
    lines = [title] if title else []
    for k in keys:
        if k not in metrics:
            continue
        v = metrics[k]
        text = f"{v:d}" if isinstance(v, int) else f"{v:.4f}"
        if k == "auc" and "auc_ci95" in metrics:
            lo, hi = metrics["auc_ci95"]
            text += f"  [95% CI {lo:.4f}, {hi:.4f}]"
        lines.append(f"  {k:<18} {text}")
    for name in ("at_0.5", "at_youden"):
        if name in metrics:
            m = metrics[name]
            lines.append(
                f"  sens/spec {name:<8} {m['sensitivity']:.4f} / {m['specificity']:.4f}"
                f"  (t={m['threshold']:.3f})"
            )
    return "\n".join(lines)


# -- figures ----------------------------------------------------------------------------------


def figure():
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters; set before pyplot is imported
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write through a temporary name so a crash never leaves half a PNG."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    return path


def plot_roc(probs: np.ndarray, labels: np.ndarray, classes: Sequence[str], path) -> Path:
    """ROC curve (binary) or one-vs-rest curves per class (multi-class)."""
    from sklearn.metrics import roc_curve

    plt = figure()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    targets = [1] if len(classes) == 2 else range(len(classes))
    for k in targets:
        y = labels == k
        if y.all() or not y.any():
            continue
        fpr, tpr, _ = roc_curve(y, probs[:, k])
        ax.plot(fpr, tpr, label=f"{classes[k]} (AUC {M.roc_auc(probs[:, k], y):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    ax.legend(loc="lower right", fontsize=8)
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def plot_confusion(confusion: Sequence[Sequence[int]], classes: Sequence[str], path) -> Path:
    """Confusion matrix (rows true, columns predicted) with counts written in the cells."""
    plt = figure()
    cm = np.asarray(confusion)
    size = 2.5 + 0.6 * len(classes)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(
            j,
            i,
            str(v),
            ha="center",
            va="center",
            color="white" if v > cm.max() / 2 else "black",
            fontsize=9,
        )
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=45)
    ax.set_yticks(ticks, classes)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix")
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def plot_reliability(probs: np.ndarray, labels: np.ndarray, path, n_bins: int = ECE_BINS) -> Path:
    """Reliability diagram: observed frequency against mean confidence per bin, with counts."""
    plt = figure()
    conf, freq, count = reliability_bins(probs, labels, n_bins)
    ok = count > 0
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    ax.plot(conf[ok], freq[ok], "o-", label=f"model (ECE {calibration_error(probs, labels):.3f})")
    ax2 = ax.twinx()
    ax2.bar((np.arange(n_bins) + 0.5) / n_bins, count, width=1 / n_bins, alpha=0.2, color="grey")
    ax2.set_ylabel("samples per bin")
    what = "P(class 1)" if probs.shape[1] == 2 else "top-label confidence"
    ax.set(xlabel=what, ylabel="observed frequency", title="reliability", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=8)
    out = save_figure(fig, path)
    plt.close(fig)
    return out


# -- W&B ------------------------------------------------------------------------------------


def log_wandb(
    mode: str,
    *,
    project: str,
    entity: str | None,
    name: str,
    job_type: str,
    metrics: dict,
    images: dict[str, Path] | None = None,
    config: dict | None = None,
    run_dir: Path | None = None,
) -> None:
    """Log a flat view of ``metrics`` and PNGs to a new W&B run (main process only; wandb is
    imported here so it is never needed when disabled). Files go under WANDB_DIR when set,
    else beside the training run's in ``run_dir``."""
    from histodist.training.tracking import offline_line, quiet_settings, resolve_wandb_mode

    mode, why = resolve_wandb_mode(mode)
    if mode == "disabled":
        return
    import wandb

    where = None if os.environ.get("WANDB_DIR") or run_dir is None else str(run_dir)
    run = wandb.init(project=project, entity=entity, name=name, job_type=job_type, mode=mode,
                     config=config, dir=where, reinit="finish_previous",
                     settings=quiet_settings(mode))  # fmt: skip
    if mode == "offline":
        print(offline_line(run, why))
    run.log({**flatten(metrics), **{k: wandb.Image(str(p)) for k, p in (images or {}).items()}})
    run.finish()


def flatten(d: dict, prefix: str = "") -> dict[str, float]:
    """{"a": {"b": 1}} -> {"a/b": 1}; numbers only (lists such as confusion matrices dropped)."""
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[key] = v
    return out
