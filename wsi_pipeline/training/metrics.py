"""Slide-level classification metrics with percentile-bootstrap 95% confidence intervals.

- AUC: binary — ROC AUC of the last class's probability; multiclass — one-vs-rest macro AUC
  (mean of each class's one-vs-rest AUC, as sklearn's `multi_class="ovr", average="macro"`),
  defined only when every class is present.
- balanced accuracy: mean recall over the classes present in y_true (sklearn's definition).
- F1: macro over the classes present in y_true or the predictions (sklearn's default labels).
Predictions are the argmax of the probabilities.

Written in numpy (rank-based AUC) so 1000 bootstrap resamples take well under a second; the tests
check each metric against sklearn. Bootstrap resamples where a metric is undefined (one class only,
for AUC) are skipped; the CI is the 2.5th and 97.5th percentile of the remaining values.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

METRICS = ("auc", "balanced_accuracy", "f1_macro")


def binary_auc(y_binary: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC (Mann–Whitney U with mid-ranks for ties); None if only one class is present."""
    y_binary = np.asarray(y_binary, dtype=bool)
    n_pos = int(y_binary.sum())
    n_neg = len(y_binary) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)
    return float((ranks[y_binary].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc(y_true: np.ndarray, probs: np.ndarray) -> float | None:
    """y_true (N,) class indices, probs (N, C). Binary: last class; multiclass: OvR macro."""
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = probs.shape[1]
    if n_classes == 2:
        return binary_auc(y_true == 1, probs[:, 1])
    per_class = [binary_auc(y_true == c, probs[:, c]) for c in range(n_classes)]
    if any(a is None for a in per_class):
        return None
    return float(np.mean(per_class))


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float | None:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) == 0:
        return None
    recalls = [float(np.mean(y_pred[y_true == c] == c)) for c in np.unique(y_true)]
    return float(np.mean(recalls))


def f1_macro(y_true: np.ndarray, y_pred: np.ndarray) -> float | None:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) == 0:
        return None
    scores = []
    for c in np.union1d(y_true, y_pred):
        tp = np.sum((y_pred == c) & (y_true == c))
        denom = np.sum(y_pred == c) + np.sum(y_true == c)
        scores.append(2.0 * tp / denom if denom else 0.0)
    return float(np.mean(scores))


def _all_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict:
    y_pred = probs.argmax(axis=1)
    return {"auc": auc(y_true, probs), "balanced_accuracy": balanced_accuracy(y_true, y_pred),
            "f1_macro": f1_macro(y_true, y_pred)}


def group_members(groups) -> list[np.ndarray]:
    """Row indices of each group (e.g. a patient's slides), in np.unique's order of the group ids."""
    _, index = np.unique(np.asarray(groups), return_inverse=True)
    return [np.flatnonzero(index == g) for g in range(index.max() + 1)] if len(index) else []


def group_resample(rng: np.random.Generator, members: list[np.ndarray]) -> np.ndarray:
    """One cluster-bootstrap resample: the rows of len(members) groups drawn with replacement."""
    return np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, *, n_bootstrap: int = 1000,
                           seed: int = 0, groups: np.ndarray | None = None) -> dict:
    """y_true (N,) class indices, probs (N, C) → {"n_slides", "auc", "balanced_accuracy", "f1_macro"}.

    Each metric is {"value": float | None, "ci95": [low, high] | None, "n_bootstrap": used resamples}.
    `groups` (N,) (e.g. patient ids): resample whole groups (cluster bootstrap), so several slides of
    one patient do not count as independent evidence; None resamples slides.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) != len(y_true):
        raise ValueError(f"probs {probs.shape} do not match y_true {y_true.shape}")
    point = _all_metrics(y_true, probs)
    samples = {name: [] for name in METRICS}
    if len(y_true) > 0:
        rng = np.random.default_rng(seed)
        members = None if groups is None else group_members(groups)
        for _ in range(n_bootstrap):
            if members is None:
                idx = rng.integers(0, len(y_true), len(y_true))
            else:
                idx = group_resample(rng, members)
            for name, value in _all_metrics(y_true[idx], probs[idx]).items():
                if value is not None:
                    samples[name].append(value)
    out = {"n_slides": int(len(y_true))}
    for name in METRICS:
        values = samples[name]
        ci = [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if values else None
        out[name] = {"value": point[name], "ci95": ci, "n_bootstrap": len(values)}
    return out
