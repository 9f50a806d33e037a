"""MIL aggregator registry (timm-style): `@register_aggregator("name", **metadata)` + `create_aggregator`.

Every aggregator maps one bag to slide logits and per-instance scores:
    forward(features (B, L, D), coords (B, L, k) level-0 px or None) -> MILOutput
B is 1 in training (bags differ in length); models must accept any L ≥ 1. k = 2 for slides;
an entry's ``coord_dims`` metadata lists the k it accepts (3 for volumes where the model can use
or ignore a third axis).

Metadata every aggregator declares (checked at registration, see :mod:`wsi_pipeline.models.registry`):
    coord_dims   tuple of the instance coordinate dimensions k it accepts, e.g. (2, 3)
    uses_coords  whether coordinates change its output (False: they are ignored)
    out_dim      "n_classes": the logits have n_classes columns
    license, reference
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..registry import Registry


@dataclass
class MILOutput:
    logits: torch.Tensor                       # (B, n_classes)
    instance_scores: torch.Tensor              # (B, L): attention (softmax-normalised) or CAM for heatmaps
    instance_logits: torch.Tensor | None = None  # (B, L, n_classes): per-class CAMs where a model has them
    aux_loss: torch.Tensor | None = None       # scalar added to the training loss, if a model needs one


AGGREGATORS = Registry("aggregator", fields={"coord_dims": (tuple,), "uses_coords": (bool,), "out_dim": (str,)})

# Metadata shared by the aggregators that never read coordinates: any k is accepted.
IGNORES_COORDS = {"coord_dims": (2, 3), "uses_coords": False, "out_dim": "n_classes"}


def register_aggregator(name: str, **metadata):
    """Decorator registering a builder ``(in_dim, n_classes, **cfg) -> nn.Module`` under ``name``."""
    return AGGREGATORS.register(name, **metadata)


def list_aggregators() -> list[str]:
    return AGGREGATORS.list()


def create_aggregator(name: str, in_dim: int, n_classes: int, **cfg) -> nn.Module:
    """Build aggregator `name` for `in_dim`-d instance features and `n_classes` classes."""
    return AGGREGATORS.create(name, in_dim=in_dim, n_classes=n_classes, **cfg)


def check_coord_dims(coords: torch.Tensor | None, accepted: tuple[int, ...], model: str) -> None:
    """A clear error where ``coords`` (B, L, k) has a k the model cannot use (None passes)."""
    if coords is None:
        return
    if coords.ndim != 3 or coords.shape[-1] not in accepted:
        raise ValueError(f"{model} takes coords (B, L, k) with k in {accepted}, got {tuple(coords.shape)}"
                         + (" (3-D volume coords: use an aggregator whose coord_dims include 3)"
                            if coords.ndim == 3 and coords.shape[-1] == 3 else ""))
