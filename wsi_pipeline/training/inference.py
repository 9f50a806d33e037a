"""Fold-ensemble inference on one bag: slide probabilities and per-patch scores for heatmaps.

Per-patch scores are combined after a per-fold min-max normalisation to [0, 1]: each fold's
`instance_scores` live on their own scale (attention sums to 1 over the bag, CAM margins are
unbounded logits), so averaging raw scores would let one fold dominate. Normalised, every fold
contributes its ranking of the patches equally. A fold whose scores are all equal (e.g. a
one-patch bag) carries no ranking and contributes 0.5 everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class EnsembleOutput:
    probs: np.ndarray                   # (C,) mean over folds of each fold's softmax probabilities
    instance_scores: np.ndarray         # (N,) mean over folds of min-max normalised instance_scores, in [0, 1]
    instance_logits: np.ndarray | None  # (N, C) mean over folds of instance_logits; None if any fold has none
    classes: list                       # class names, index-aligned with probs / instance_logits
    fold_probs: np.ndarray              # (F, C) each fold's softmax probabilities


def minmax(scores: np.ndarray) -> np.ndarray:
    """Scale to [0, 1]; constant scores (no ranking) map to 0.5."""
    scores = np.asarray(scores, dtype=np.float64)
    low, high = scores.min(), scores.max()
    if not high > low:
        return np.full_like(scores, 0.5)
    return (scores - low) / (high - low)


def _unpack(item):
    if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], dict):
        return item[0], item[1]
    return item, {}


@torch.inference_mode()
def ensemble_predict(models, features: np.ndarray, coords: np.ndarray | None) -> EnsembleOutput:
    """Run every fold model on one bag.

    models: [(model, meta), ...] as `load_ensemble` returns (bare modules also work; classes are then
    "0", "1", ...). features (N, D) float; coords (N, 2) level-0 px or None.
    """
    models = [_unpack(m) for m in models]
    if not models:
        raise ValueError("ensemble_predict: no models")
    features = np.asarray(features)  # its stored dtype up to the device, float32 there
    if not np.issubdtype(features.dtype, np.floating):
        features = features.astype(np.float32)
    if features.ndim != 2 or len(features) == 0:
        raise ValueError(f"features must be (N, D) with N >= 1, got {features.shape}")
    fold_probs, fold_scores, fold_instance_logits = [], [], []
    classes = None
    for model, meta in models:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        model.eval()
        x = torch.from_numpy(np.ascontiguousarray(features)).to(device).float()[None]  # (1, N, D)
        c = None if coords is None else torch.as_tensor(np.asarray(coords), dtype=torch.float32,
                                                          device=device)[None]  # (1, N, 2)
        out = model(x, c)
        fold_probs.append(torch.softmax(out.logits.float(), dim=-1)[0].cpu().numpy())
        fold_scores.append(minmax(out.instance_scores.float()[0].cpu().numpy()))
        fold_instance_logits.append(None if out.instance_logits is None
                                    else out.instance_logits.float()[0].cpu().numpy())
        fold_classes = list(meta.get("classes") or [str(i) for i in range(out.logits.shape[-1])])
        if classes is not None and fold_classes != classes:
            raise ValueError(f"fold models disagree on classes: {classes} vs {fold_classes}")
        classes = fold_classes
    fold_probs = np.stack(fold_probs).astype(np.float64)
    instance_logits = (None if any(il is None for il in fold_instance_logits)
                       else np.mean(np.stack(fold_instance_logits), axis=0))
    return EnsembleOutput(probs=fold_probs.mean(axis=0), instance_scores=np.mean(np.stack(fold_scores), axis=0),
                          instance_logits=instance_logits, classes=classes, fold_probs=fold_probs)
