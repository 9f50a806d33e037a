"""Mean- and max-pooling baselines: a shared instance MLP, a linear head, one pooling step.

Both are permutation-invariant (a mean or a max ignores order); coordinates are ignored.

- mean: logits = head(mean_i h_i) = mean_i head(h_i) (the head is affine), so the per-instance
  class scores head(h_i) are exact additive contributions to the slide logits.
- max:  logits[c] = max_i head(h_i)[c] — the slide is as positive as its most positive instance.

`instance_logits` (B, L, C) are the per-instance class scores. `instance_scores` (B, L) reduce them
to one number per instance for heatmaps: for two classes the margin (class 1 − class 0, evidence for
the second class); for more classes the score of the class the slide is predicted as.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import IGNORES_COORDS, MILOutput, register_aggregator

LICENSE = "Apache-2.0"  # this implementation (written here from the paper); no weights are shipped
BASELINE_REFERENCE = "MIL pooling baselines, as in github.com/isyangshu/MambaMIL models/Mean_Max_MIL.py"


def _instance_scores(instance_logits: torch.Tensor, slide_logits: torch.Tensor) -> torch.Tensor:
    """(B, L, C), (B, C) → (B, L): one heatmap score per instance (see module docstring)."""
    if instance_logits.shape[-1] == 2:
        return instance_logits[..., 1] - instance_logits[..., 0]
    if instance_logits.shape[-1] == 1:
        return instance_logits[..., 0]
    predicted = slide_logits.argmax(dim=-1)                                 # (B,)
    index = predicted[:, None, None].expand(-1, instance_logits.shape[1], 1)
    return instance_logits.gather(-1, index).squeeze(-1)


class PoolingMIL(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, mode: str, hidden_dim: int = 512, dropout: float = 0.25):
        super().__init__()
        if mode not in ("mean", "max"):
            raise ValueError(f"pooling mode must be mean or max, got {mode!r}")
        self.mode = mode
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.head = nn.Linear(hidden_dim, n_classes)

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        """features (B, L, D) → logits (B, C), instance_logits (B, L, C), instance_scores (B, L)."""
        instance_logits = self.head(self.embed(features))                   # (B, L, C)
        if self.mode == "mean":
            logits = instance_logits.mean(dim=1)
        else:
            logits = instance_logits.amax(dim=1)
        return MILOutput(logits=logits, instance_scores=_instance_scores(instance_logits, logits),
                         instance_logits=instance_logits)


@register_aggregator("mean", **IGNORES_COORDS, license=LICENSE, reference=BASELINE_REFERENCE)
def mean_pooling(in_dim: int, n_classes: int, **cfg) -> PoolingMIL:
    return PoolingMIL(in_dim, n_classes, mode="mean", **cfg)


@register_aggregator("max", **IGNORES_COORDS, license=LICENSE, reference=BASELINE_REFERENCE)
def max_pooling(in_dim: int, n_classes: int, **cfg) -> PoolingMIL:
    return PoolingMIL(in_dim, n_classes, mode="max", **cfg)
