"""Dense point detection (cells, mitoses): annotations, targets, peaks, tiled whole-slide
inference, outputs (QuPath GeoJSON, CSV, MIDOG JSON, summary with hotspot), MIDOG evaluation."""

from .annotations import DEMO_CLASSES, AnnotationError, Points, read_annotations, read_demo_truth, read_truth
from .hotspot import HOTSPOT_AREA_MM2, hotspot
from .matching import MIDOG_RADIUS_UM, choose_thresholds, evaluate, match_points

__all__ = ["DEMO_CLASSES", "AnnotationError", "Points", "read_annotations", "read_demo_truth", "read_truth",
           "HOTSPOT_AREA_MM2", "hotspot", "MIDOG_RADIUS_UM", "choose_thresholds", "evaluate", "match_points"]
