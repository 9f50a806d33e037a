"""ROC / precision-recall curves with patient-level bootstrap bands, calibration bins and the
confusion matrix at the decision rule, from out-of-fold predictions (numpy only).

Bands: `n_bootstrap` resamples of whole patients (as training/metrics.py's CI, so several slides of
one patient never count as independent evidence); each resample's curve is read on a fixed grid
(ROC: TPR at each FPR, step interpolation; PR: interpolated precision, the best precision at a
recall >= r) and the band is the 2.5th-97.5th percentile per grid point. Resamples with one class
only have no curve and are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..training.metrics import group_members, group_resample

GRID = np.linspace(0.0, 1.0, 101)


@dataclass(frozen=True)
class Curve:
    x: np.ndarray          # FPR (ROC) or recall (PR), the curve's own points
    y: np.ndarray          # TPR or precision
    grid: np.ndarray       # band grid
    low: np.ndarray | None   # band on the grid (None: no usable resample)
    high: np.ndarray | None
    n_bootstrap: int       # resamples that had both classes


def roc_points(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) from (0, 0) to (1, 1), one point per distinct threshold (ties together)."""
    y = np.asarray(y, dtype=bool)
    order = np.argsort(-np.asarray(score, dtype=np.float64), kind="stable")
    s, yy = np.asarray(score, dtype=np.float64)[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]
    tp = np.cumsum(yy)[last_of_tie]
    fp = np.cumsum(~yy)[last_of_tie]
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    tpr = np.r_[0.0, tp / max(n_pos, 1)]
    fpr = np.r_[0.0, fp / max(n_neg, 1)]
    return fpr, tpr


def pr_points(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision), recall rising, starting at recall 0 with the first point's precision."""
    y = np.asarray(y, dtype=bool)
    s = np.asarray(score, dtype=np.float64)
    order = np.argsort(-s, kind="stable")
    s, yy = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]
    tp = np.cumsum(yy)[last_of_tie].astype(np.float64)
    predicted = (last_of_tie + 1).astype(np.float64)
    recall = tp / max(int(y.sum()), 1)
    precision = tp / predicted
    return np.r_[0.0, recall], np.r_[precision[0], precision]


def average_precision(y: np.ndarray, score: np.ndarray) -> float | None:
    """Step-wise area under the PR curve (sklearn's average_precision_score); None with no positive."""
    y = np.asarray(y, dtype=bool)
    if not y.any():
        return None
    recall, precision = pr_points(y, score)
    return float(np.sum(np.diff(recall) * precision[1:]))


def _roc_on_grid(fpr: np.ndarray, tpr: np.ndarray) -> np.ndarray:
    # The highest TPR reached at FPR <= each grid point (the curve's upper step).
    idx = np.searchsorted(fpr, GRID, side="right") - 1
    return np.maximum.accumulate(tpr)[np.clip(idx, 0, len(tpr) - 1)]


def _pr_on_grid(recall: np.ndarray, precision: np.ndarray) -> np.ndarray:
    # Interpolated precision: the best precision at any recall >= r.
    best_after = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(recall, GRID, side="left")
    out = np.zeros_like(GRID)
    inside = idx < len(recall)
    out[inside] = best_after[idx[inside]]
    return out


def curves_with_bands(y, score, groups, *, n_bootstrap: int = 200, seed: int = 0) -> dict[str, Curve]:
    """{"roc": Curve, "pr": Curve} of binary labels `y` and `score` (higher: positive)."""
    y = np.asarray(y, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    members = group_members(np.asarray(groups).astype(str))
    rng = np.random.default_rng(seed)
    rocs, prs = [], []
    for _ in range(n_bootstrap if members else 0):
        idx = group_resample(rng, members)
        yy, ss = y[idx], score[idx]
        if yy.all() or not yy.any():
            continue
        rocs.append(_roc_on_grid(*roc_points(yy, ss)))
        prs.append(_pr_on_grid(*pr_points(yy, ss)))

    def band(samples):
        if not samples:
            return None, None
        a = np.asarray(samples)
        return np.percentile(a, 2.5, axis=0), np.percentile(a, 97.5, axis=0)

    fpr, tpr = roc_points(y, score)
    recall, precision = pr_points(y, score)
    return {"roc": Curve(fpr, tpr, GRID, *band(rocs), len(rocs)),
            "pr": Curve(recall, precision, GRID, *band(prs), len(prs))}


def calibration_bins(y, prob, n_bins: int = 10) -> list[dict]:
    """Equal-width probability bins that hold slides: mean predicted, observed fraction, count."""
    y = np.asarray(y, dtype=np.float64)
    prob = np.clip(np.asarray(prob, dtype=np.float64), 0.0, 1.0)
    which = np.minimum((prob * n_bins).astype(int), n_bins - 1)
    out = []
    for b in range(n_bins):
        sel = which == b
        if sel.any():
            out.append({"low": b / n_bins, "high": (b + 1) / n_bins, "n": int(sel.sum()),
                        "mean_predicted": float(prob[sel].mean()), "observed": float(y[sel].mean())})
    return out


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) counts, rows the true class, columns the predicted one."""
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return m


def binary_auc_of(roc: Curve) -> float:
    """Area under the ROC points (trapezoids: ties count half, as the Mann-Whitney AUC)."""
    return float(np.trapezoid(roc.y, roc.x)) if hasattr(np, "trapezoid") else float(np.trapz(roc.y, roc.x))
