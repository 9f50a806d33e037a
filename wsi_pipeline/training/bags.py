"""Bags: one slide's patch features (+ coords) read from its features.h5, checked for training.

A bag that cannot be trained on is a `SlideError` naming the slide: missing or unreadable file,
no patches, non-finite features.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SlideError
from ..features_h5 import read_features_h5


@dataclass
class Bag:
    """One labelled slide in memory. `label` is the class index into the cohort's class list."""
    slide_id: str
    patient_id: str
    label: int
    features: np.ndarray   # (N, D) float32
    coords: np.ndarray     # (N, 2) int64, level-0 px (top-left of each patch)
    features_hash: str     # the features.h5 `config_hash` attr ("" where absent): part of the fold hash


def load_bag(path: str | Path, slide_id: str | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read and check one features.h5 → (features (N, D) float32, coords (N, 2) int64, attrs).

    `slide_id` (default: the file name's stem) names the slide in errors.
    """
    path = Path(path)
    slide_id = slide_id or path.stem
    if not path.is_file():
        raise SlideError(slide_id, f"no features file at {path} (run the extract stage first)")
    try:
        features, coords, attrs = read_features_h5(path)
    except (OSError, KeyError, ValueError) as exc:
        raise SlideError(slide_id, f"unreadable features file {path}: {exc}") from None
    if features.ndim != 2 or coords.shape != (features.shape[0], 2):
        raise SlideError(slide_id, f"{path}: features {features.shape} and coords {coords.shape} "
                                   f"do not form a bag (need (N, D) and (N, 2))")
    if features.shape[0] == 0:
        raise SlideError(slide_id, f"{path}: no patches (empty bag)")
    finite = np.isfinite(features)
    if not finite.all():
        bad_rows = int((~finite.all(axis=1)).sum())
        raise SlideError(slide_id, f"{path}: non-finite features (NaN or inf) in {bad_rows} of "
                                   f"{features.shape[0]} patches")
    return features, coords, attrs
