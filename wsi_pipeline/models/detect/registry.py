"""Detector registry (timm-style): `@register_detector("name", **metadata)` + `create_detector`.

Every detector maps an image batch to per-class centre-heatmap logits plus a 2-channel sub-pixel
offset, at the input's resolution:
    forward(images (B, C_in, H, W) float) -> (B, n_classes + 2, H, W)
      [:, :n_classes]  heatmap logits (sigmoid -> probability that an object of that class is
                       centred in the pixel)
      [:, n_classes:]  (dx, dy) offset of the centre from the pixel centre, in pixels, in [-0.5, 0.5]
for any H, W >= 1. Inputs are normalised by the caller with the model's ``input_mean``/``input_std``.

Metadata every detector declares (checked at registration, see :mod:`wsi_pipeline.models.registry`):
    input_size_px  None: any H, W >= 1
    patch_size_px  side of the Mamba body's patch embedding
    out_dim        "n_classes": the heatmap has n_classes channels (+ 2 offset channels)
    license, reference
"""

from __future__ import annotations

from torch import nn

from ..registry import Registry

DETECTORS = Registry("detector", fields={"input_size_px": (int, type(None)), "patch_size_px": (int,),
                                         "out_dim": (str,)})


def register_detector(name: str, **metadata):
    """Decorator registering a builder ``(**cfg) -> nn.Module`` under ``name``."""
    return DETECTORS.register(name, **metadata)


def list_detectors() -> list[str]:
    return DETECTORS.list()


def create_detector(name: str, **cfg) -> nn.Module:
    """Build detector `name`; `cfg` are its keyword arguments (n_classes, dims, ...)."""
    return DETECTORS.create(name, **cfg)
