"""Fold ensembles as the inference stages use them (heatmap, segment, predict): what an ensemble is
(its checkpoint hashes), one loaded copy per model folder and batch, and per-patch scores.

The scoring rule is written once here: per-patch class probabilities are the softmax of the
ensemble's mean instance logits (models that give them, e.g. fmamil); the instance score is the
mean of the folds' min-max normalised instance scores (`inference.ensemble_predict`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import PipelineError
from ..io import sha256_file


def checkpoint_hashes(model_dir: str | Path) -> dict[str, str]:
    """sha256 of every file under model_dir/fold_*/ (relative path -> hash): what the ensemble is."""
    model_dir = Path(model_dir)
    files = sorted(p for p in model_dir.glob("fold_*/**/*") if p.is_file())
    return {p.relative_to(model_dir).as_posix(): sha256_file(p) for p in files}


def checkpoints_digest(hashes: dict[str, str]) -> str:
    """One short hash of `checkpoint_hashes` ("" for no files), as the segment CAM files record it."""
    if not hashes:
        return ""
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:16]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, C) logits, in float64."""
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class PatchScores:
    classes: list[str]
    instance: np.ndarray                # (N,) ensemble instance score in [0, 1]
    class_probs: np.ndarray | None      # (N, C) per-patch class probabilities; None without logits
    slide_probs: np.ndarray             # (C,) the ensemble's slide probabilities


class EnsembleCache:
    """Per batch: each model folder's checkpoint hashes and loaded ensemble, once (one per cohort).

    `device` is a device name from the config ("auto", "cpu", "cuda:N"), resolved when the first
    ensemble is loaded, so torch loads only when some item needs scores."""

    def __init__(self, device: str = "auto", what: str = "train.device", *, load=None, predict=None):
        # load(model_dir) -> [(model, meta)] and predict(models, features, coords) -> EnsembleOutput
        # default to checkpoints.load_ensemble on `device` and inference.ensemble_predict.
        self.device, self.what = device, what
        self._load, self._predict = load, predict
        self._hashes: dict[Path, dict[str, str]] = {}
        self._models: dict[Path, list] = {}

    def hashes(self, model_dir: Path) -> dict[str, str]:
        model_dir = Path(model_dir)
        if model_dir not in self._hashes:
            self._hashes[model_dir] = checkpoint_hashes(model_dir) if model_dir.is_dir() else {}
        return self._hashes[model_dir]

    def models(self, model_dir: Path) -> list:
        """[(model, meta), ...] of the folds in `model_dir` (`checkpoints.load_ensemble`)."""
        model_dir = Path(model_dir)
        if model_dir not in self._models:
            if self._load is None:
                from ..devices import resolve_device
                from .checkpoints import load_ensemble

                device = resolve_device(self.device, self.what)
                self._load = lambda folder: load_ensemble(folder, device=device)
            models = self._load(model_dir)
            if not models:
                raise PipelineError(f"no models loaded from {model_dir}")
            self._models[model_dir] = models
        return self._models[model_dir]

    def score(self, model_dir: Path, features: np.ndarray, coords: np.ndarray) -> PatchScores:
        return ensemble_patch_scores(self.models(model_dir), features, coords, predict=self._predict)


def ensemble_patch_scores(models: list, features: np.ndarray, coords: np.ndarray, *,
                          predict=None) -> PatchScores:
    """Run the fold ensemble on one bag -> per-patch instance scores and class probabilities.

    Raises ValueError when the ensemble gives a score count other than the bag's patch count."""
    if predict is None:
        from .inference import ensemble_predict as predict

    out = predict(models, features, coords)
    n = len(features)
    instance = np.asarray(out.instance_scores, dtype=np.float64).reshape(-1)
    if len(instance) != n:
        raise ValueError(f"ensemble gave {len(instance)} instance scores for {n} patches")
    classes = [str(c) for c in out.classes]
    class_probs = None
    if getattr(out, "instance_logits", None) is not None:
        logits = np.asarray(out.instance_logits, dtype=np.float64).reshape(n, -1)
        if logits.shape[1] == len(classes) and len(classes) > 1:
            class_probs = softmax(logits)
    return PatchScores(classes, instance, class_probs,
                       np.asarray(out.probs, dtype=np.float64).reshape(-1))
