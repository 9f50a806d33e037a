"""Detector registry: point detectors, images in, centre heatmaps + sub-pixel offsets out."""

from . import mamba_centernet  # noqa: F401  (registers the Mamba CenterNet variants)
from .mamba_centernet import MambaCenterNet
from .registry import DETECTORS, create_detector, list_detectors, register_detector

__all__ = ["DETECTORS", "create_detector", "list_detectors", "register_detector", "MambaCenterNet"]
