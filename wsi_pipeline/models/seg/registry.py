"""Segmenter registry (timm-style): `@register_segmenter("name", **metadata)` + `create_segmenter`.

Every segmenter maps an image batch to per-pixel logits of the same size:
    forward(images (B, C_in, H, W) float) -> logits (B, C_out, H, W)
for any H, W >= 1 (models pad internally to what their downsampling needs and crop back).
Inputs are normalised by the caller with the model's ``input_mean`` / ``input_std``.

Metadata every segmenter declares (checked at registration, see :mod:`wsi_pipeline.models.registry`):
    input_size_px  None: any H, W >= 1
    patch_size_px  side of the patch embedding (the first downsampling)
    out_dim        "out_channels": the logits have out_channels channels
    license, reference
"""

from __future__ import annotations

from torch import nn

from ..registry import Registry

SEGMENTERS = Registry("segmenter", fields={"input_size_px": (int, type(None)), "patch_size_px": (int,),
                                           "out_dim": (str,)})


def register_segmenter(name: str, **metadata):
    """Decorator registering a builder ``(**cfg) -> nn.Module`` under ``name``."""
    return SEGMENTERS.register(name, **metadata)


def list_segmenters() -> list[str]:
    return SEGMENTERS.list()


def create_segmenter(name: str, **cfg) -> nn.Module:
    """Build segmenter `name`; `cfg` are its keyword arguments (in_channels, out_channels, dims, ...)."""
    return SEGMENTERS.create(name, **cfg)
