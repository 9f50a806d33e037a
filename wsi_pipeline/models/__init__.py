"""Models: tensors in, tensors out — models never see slides or paths. One registry mechanism
(`models.registry.Registry`) serves every kind: MIL aggregators (`models.mil`), segmenters
(`models.seg`), patch encoders (`wsi_pipeline.encoders`) and, later, detectors."""

from .registry import Entry, Registry, UnknownModelError

__all__ = ["Entry", "Registry", "UnknownModelError"]
