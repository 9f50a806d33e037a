"""Overlap metrics of binary masks, and putting a prediction on the ground truth's grid.

Dice = 2|P ∩ T| / (|P| + |T|), IoU = |P ∩ T| / |P ∪ T|. Both are 1.0 when prediction and truth are
both empty (nothing to find, nothing found), 0.0 when exactly one is empty.
"""

from __future__ import annotations

import numpy as np


def _pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    return pred, truth


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    pred, truth = _pair(pred, truth)
    denominator = int(pred.sum()) + int(truth.sum())
    return 1.0 if denominator == 0 else 2.0 * int((pred & truth).sum()) / denominator


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    pred, truth = _pair(pred, truth)
    union = int((pred | truth).sum())
    return 1.0 if union == 0 else int((pred & truth).sum()) / union


def mask_on_grid(mask: np.ndarray, mask_downsample: float, shape: tuple[int, int],
                 downsample: float) -> np.ndarray:
    """Nearest-neighbour resampling of `mask` (one pixel per `mask_downsample` level-0 px) onto a
    grid of `shape` (h, w) with `downsample` level-0 px per pixel; both grids start at level-0 (0, 0).
    Each target pixel takes the mask pixel under its centre (clamped at the edges)."""
    mask = np.asarray(mask)
    h, w = shape
    rows = np.clip(((np.arange(h) + 0.5) * downsample // mask_downsample).astype(np.int64), 0, mask.shape[0] - 1)
    cols = np.clip(((np.arange(w) + 0.5) * downsample // mask_downsample).astype(np.int64), 0, mask.shape[1] - 1)
    return mask[rows[:, None], cols[None, :]]


def score_mask(pred: np.ndarray, pred_downsample: float, truth: np.ndarray, truth_downsample: float) -> dict:
    """Dice and IoU of `pred` against `truth`, compared on the truth's grid."""
    on_truth = mask_on_grid(pred, pred_downsample, truth.shape, truth_downsample)
    return {"dice": dice(on_truth, truth), "iou": iou(on_truth, truth)}
