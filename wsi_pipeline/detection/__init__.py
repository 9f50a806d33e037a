"""Dense point detection (cells, mitoses): annotations, targets, peaks, tiled whole-slide
inference, outputs (QuPath GeoJSON, CSV, MIDOG JSON, summary with hotspot), MIDOG evaluation.

The names below load on first use: `wsi_pipeline.run.config` imports `detection.params`, and every
workflow job reads a config, so importing the package must not pull in scipy.spatial (~0.5 s per
job) through `matching`."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DEMO_CLASSES": "annotations", "AnnotationError": "annotations", "Points": "annotations",
    "read_annotations": "annotations", "read_demo_truth": "annotations", "read_truth": "annotations",
    "HOTSPOT_AREA_MM2": "hotspot", "hotspot": "hotspot",
    "MIDOG_RADIUS_UM": "matching", "choose_thresholds": "matching", "evaluate": "matching",
    "match_points": "matching",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
