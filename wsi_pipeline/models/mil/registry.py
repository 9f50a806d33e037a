"""MIL aggregator registry (timm-style): `@register_aggregator("name")` + `create_aggregator`.

Every aggregator maps one bag to slide logits and per-instance scores:
    forward(features (B, L, D), coords (B, L, 2) level-0 px or None) -> MILOutput
B is 1 in training (bags differ in length); models must accept any L ≥ 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass
class MILOutput:
    logits: torch.Tensor                       # (B, n_classes)
    instance_scores: torch.Tensor              # (B, L): attention (softmax-normalised) or CAM for heatmaps
    instance_logits: torch.Tensor | None = None  # (B, L, n_classes): per-class CAMs where a model has them
    aux_loss: torch.Tensor | None = None       # scalar added to the training loss, if a model needs one


_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_aggregator(name: str):
    def decorate(builder: Callable[..., nn.Module]):
        if name in _REGISTRY:
            raise ValueError(f"aggregator {name!r} registered twice")
        _REGISTRY[name] = builder
        return builder
    return decorate


def list_aggregators() -> list[str]:
    return sorted(_REGISTRY)


def create_aggregator(name: str, in_dim: int, n_classes: int, **cfg) -> nn.Module:
    """Build aggregator `name` for `in_dim`-d instance features and `n_classes` classes."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown aggregator {name!r}; registered: {', '.join(list_aggregators())}")
    return _REGISTRY[name](in_dim=in_dim, n_classes=n_classes, **cfg)
