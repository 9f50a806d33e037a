"""Bags: one slide's patch features (+ coords) read from its features.h5, checked for training.

A bag that cannot be trained on is a `SlideError` naming the slide: missing or unreadable file,
no patches, non-finite features.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SlideError
from ..features.features_h5 import read_features_h5
from ..sources import COORD_DIMS


@dataclass
class Bag:
    """One labelled slide in memory. `label` is the class index into the cohort's class list."""
    slide_id: str
    patient_id: str
    label: int
    features: np.ndarray   # (N, D) float32, or the file's stored dtype when read by a BagSource
    coords: np.ndarray     # (N, k) int64: k = 2 level-0 px (x, y) of slides, k = 3 voxels (i, j, k) of volumes
    features_hash: str     # the features.h5 `config_hash` attr ("" where absent): part of the fold hash
    provenance: dict | None = None  # what the features were made from (provenance.features_provenance)


def load_bag(path: str | Path, slide_id: str | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read and check one features.h5 → (features (N, D) float32, coords (N, k) int64, attrs),
    k = 2 (slides) or 3 (volumes), as the file's `coord_dims` attr says.

    `slide_id` (default: the file name's stem) names the slide in errors.
    """
    features, coords, attrs = read_bag(path, slide_id)
    return features.astype(np.float32, copy=False), coords, attrs


def read_bag(path: str | Path, slide_id: str | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """`load_bag` with the features in their stored dtype (float16 files stay float16 until the
    device): what the bag source, predict and segment read."""
    path = Path(path)
    slide_id = slide_id or path.stem
    if not path.is_file():
        raise SlideError(slide_id, f"no features file at {path} (run the extract stage first)")
    try:
        features, coords, attrs = read_features_h5(path, dtype=None)
    except (OSError, KeyError, ValueError) as exc:
        raise SlideError(slide_id, f"unreadable features file {path}: {exc}") from None
    coord_dims = int(attrs.get("coord_dims", 2))
    if (features.ndim != 2 or coord_dims not in COORD_DIMS
            or coords.shape != (features.shape[0], coord_dims)):
        raise SlideError(slide_id, f"{path}: features {features.shape} and coords {coords.shape} "
                                   f"(coord_dims {coord_dims}) do not form a bag "
                                   f"(need (N, D) and (N, k), k = 2 or 3)")
    if features.shape[0] == 0:
        raise SlideError(slide_id, f"{path}: no patches (empty bag)")
    finite = np.isfinite(features)
    if not finite.all():
        bad_rows = int((~finite.all(axis=1)).sum())
        raise SlideError(slide_id, f"{path}: non-finite features (NaN or inf) in {bad_rows} of "
                                   f"{features.shape[0]} patches")
    return features, coords, attrs
