"""Patch scores as QuPath GeoJSON: one tile (or detection) per patch, with measurements and a class.

QuPath (>= 0.4) imports the file by drag-and-drop or File > Import objects: each Feature becomes a
tile object over the patch's level-0 square; `measurements` fill the measurement table (and
Measure > Show measurement maps colours tiles by any of them); `classification` sets the class,
binned by the normalised score, so the classes' colours show the heatmap at a glance.
"""

from __future__ import annotations

import json
import os
import uuid

import numpy as np

from ..io import write_text_atomic
from .colormaps import apply_colormap

OBJECT_TYPES = ("tile", "detection")
CLASS_NAMES = ("low", "medium", "high")
# Feature ids are UUIDs (as QuPath writes them), derived from slide id and position so a rerun
# writes the same file.
_ID_NAMESPACE = uuid.UUID("6a0c3f5e-0b7e-4c55-9a59-4d7f0c1f3b21")


def score_classes(normalized: np.ndarray, thresholds: tuple[float, float]) -> np.ndarray:
    """(N,) normalised scores -> (N,) class index 0 (low) / 1 (medium) / 2 (high):
    low < thresholds[0] <= medium < thresholds[1] <= high."""
    lo, hi = thresholds
    return np.digitize(np.asarray(normalized, dtype=np.float64), [lo, hi]).astype(np.int64)


def class_colours(thresholds: tuple[float, float], colormap: str) -> list[list[int]]:
    """Each class's colour: the colormap at the middle of its score bin."""
    lo, hi = thresholds
    centres = np.array([lo / 2, (lo + hi) / 2, (hi + 1) / 2])
    return [[int(c) for c in rgb] for rgb in apply_colormap(centres, colormap)]


def patch_features(coords: np.ndarray, patch_size_level0: float, measurements: dict[str, np.ndarray],
                   classes: np.ndarray, *, object_type: str = "tile",
                   class_colours_rgb: list[list[int]] | None = None,
                   class_names: tuple[str, ...] = CLASS_NAMES, id_prefix: str = "") -> dict:
    """GeoJSON FeatureCollection, one Polygon Feature per patch in level-0 pixels.

    coords (N, 2) level-0 top-left; measurements {name: (N,) finite numbers}; classes (N,) index
    into `class_names`. Each ring is closed (5 points) and runs like `tissue.mask_to_polygons`'
    exteriors (positive shoelace area in image coordinates). Plain Python types only.
    """
    if object_type not in OBJECT_TYPES:
        raise ValueError(f"object_type must be one of {OBJECT_TYPES}, got {object_type!r}")
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    n = len(coords)
    columns = {}
    for name, values in measurements.items():
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        if len(v) != n:
            raise ValueError(f"measurement {name!r}: {len(v)} values for {n} patches")
        if not np.isfinite(v).all():
            raise ValueError(f"measurement {name!r} has NaN or infinite values (invalid in JSON)")
        columns[str(name)] = v.tolist()
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    if len(classes) != n:
        raise ValueError(f"{len(classes)} classes for {n} patches")
    colours = class_colours_rgb or [[0, 0, 255], [255, 255, 0], [255, 0, 0]]
    p = float(patch_size_level0)
    if p.is_integer() and np.all(coords == np.round(coords)):
        # Integer pixel positions stay integers in the file (smaller, and exact).
        p, coords = int(p), coords.astype(np.int64)
    xs, ys = coords[:, 0].tolist(), coords[:, 1].tolist()
    names = list(columns)
    features = []
    for i in range(n):
        x, y = xs[i], ys[i]
        ring = [[x, y], [x + p, y], [x + p, y + p], [x, y + p], [x, y]]
        cls = int(classes[i])
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(_ID_NAMESPACE, f"{id_prefix}:{x:g},{y:g},{p:g}")),
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {
                "objectType": object_type,
                "classification": {"name": class_names[cls], "color": list(colours[cls])},
                "measurements": {name: columns[name][i] for name in names},
            },
        })
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | os.PathLike, collection: dict) -> None:
    """Compact JSON (tens of thousands of tiles), atomically; NaN is refused rather than written."""
    write_text_atomic(path, json.dumps(collection, separators=(",", ":"), allow_nan=False))
