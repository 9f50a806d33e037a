"""Segmenter registry (timm-style): `@register_segmenter("name")` + `create_segmenter`.

Every segmenter maps an image batch to per-pixel logits of the same size:
    forward(images (B, C_in, H, W) float) -> logits (B, C_out, H, W)
for any H, W >= 1 (models pad internally to what their downsampling needs and crop back).
Inputs are normalised by the caller with the model's ``input_mean`` / ``input_std``.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_segmenter(name: str):
    def decorate(builder: Callable[..., nn.Module]):
        if name in _REGISTRY:
            raise ValueError(f"segmenter {name!r} registered twice")
        _REGISTRY[name] = builder
        return builder
    return decorate


def list_segmenters() -> list[str]:
    return sorted(_REGISTRY)


def create_segmenter(name: str, **cfg) -> nn.Module:
    """Build segmenter `name`; `cfg` are its keyword arguments (in_channels, out_channels, dims, ...)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown segmenter {name!r}; registered: {', '.join(list_segmenters())}")
    return _REGISTRY[name](**cfg)
