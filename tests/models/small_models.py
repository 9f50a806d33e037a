"""Small configurations of every registered aggregator, so model tests run fast on 2 CPU cores."""

from __future__ import annotations

import torch

from wsi_pipeline.models.mil import create_aggregator

SSM_SMALL = {"d_model": 16, "d_state": 4, "expand": 1}
SMALL_CONFIGS = {
    "abmil": {"hidden_dim": 32, "attention_dim": 16},
    "transmil": {"dim": 32, "heads": 4},
    "mean": {"hidden_dim": 32},
    "max": {"hidden_dim": 32},
    "mambamil": {**SSM_SMALL, "rate": 10},
    "mambamil_3d": {**SSM_SMALL, "rate": 10},
    "bimamba_mil": SSM_SMALL,
    "mamba_mil": SSM_SMALL,
    "gmmamba": {**SSM_SMALL, "n_groups": 4, "n_heads": 4, "attention_dim": 16},
    "fmamil": {**SSM_SMALL, "filter_size": 8, "attention_dim": 16},
    "mammil": {"d_model": 16, "d_state": 4, "expand": 1, "headdim": 8, "attention_dim": 16, "active_layers": 1},
    "twodmamba": {**SSM_SMALL, "attention_dim": 16},
}


def make_small(name: str, in_dim: int, n_classes: int, **overrides) -> torch.nn.Module:
    """A small instance of aggregator ``name`` (registered names without an entry use their defaults)."""
    return create_aggregator(name, in_dim, n_classes, **{**SMALL_CONFIGS.get(name, {}), **overrides})


def grid_coords(n_instances: int, side: int, generator: torch.Generator, step_px: int = 256) -> torch.Tensor:
    """(n, 2) distinct level-0 (x, y) coordinates drawn from a side × side patch grid."""
    cells = torch.randperm(side * side, generator=generator)[:n_instances]
    return torch.stack([cells % side, cells // side], dim=1) * step_px
