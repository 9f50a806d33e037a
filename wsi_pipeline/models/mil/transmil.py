"""TransMIL (Shao et al., NeurIPS 2021): correlated MIL with a Transformer over the bag.

    fc:       (B, L, D) → (B, L, dim) Linear + ReLU
    square:   repeat the first tokens so L' = ⌈√L⌉² fills an ⌈√L⌉ × ⌈√L⌉ grid
    CLS token prepended → TransLayer → PPEG → TransLayer → LayerNorm → head(CLS)

TransLayer = x + NystromAttention(LayerNorm(x)) (8 heads, dim/2 landmarks, 6 pinv iterations).
PPEG = identity + depthwise 7×7, 5×5, 3×3 convolutions of the token grid (a positional encoding).

Not permutation-invariant: PPEG convolves tokens that are neighbours in sequence order (row-major
in a square grid, not the slide layout), and the square padding repeats the first tokens. Feed
bags in a fixed order (features.h5 order is row-major in the slide). Coordinates are ignored, as in
the paper. `instance_scores`: attention of the CLS token to each instance in the last TransLayer,
averaged over heads, with the CLS and square-padding tokens removed (B, L).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..nystrom_attention import NystromAttention, default_landmarks
from .registry import IGNORES_COORDS, MILOutput, register_aggregator

LICENSE = "Apache-2.0"  # this implementation (written here from the paper); no weights are shipped


class TransLayer(nn.Module):
    """Pre-norm Nyström attention block with a residual: (B, N, dim) → (B, N, dim)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = NystromAttention(dim, heads=heads, num_landmarks=default_landmarks(dim),
                                          pinv_iterations=6, dropout=dropout)

    def forward(self, x: torch.Tensor, return_cls_attention: bool = False):
        if not return_cls_attention:
            return x + self.attention(self.norm(x))
        out, attention_row = self.attention(self.norm(x), return_attention_row=0)
        return x + out, attention_row


class PPEG(nn.Module):
    """Pyramid position encoding generator on the (side × side) token grid; CLS passes through."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv_7 = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.conv_5 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv_3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        """x (B, 1 + side², dim) → same shape."""
        batch, _, dim = x.shape
        cls_token, tokens = x[:, :1], x[:, 1:]
        grid = tokens.transpose(1, 2).reshape(batch, dim, side, side)
        grid = grid + self.conv_7(grid) + self.conv_5(grid) + self.conv_3(grid)
        return torch.cat([cls_token, grid.flatten(2).transpose(1, 2)], dim=1)


class TransMIL(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, dim: int = 512, heads: int = 8, dropout: float = 0.1):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.layer_1 = TransLayer(dim, heads, dropout)
        self.ppeg = PPEG(dim)
        self.layer_2 = TransLayer(dim, heads, dropout)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        """features (B, L, D) → logits (B, C); instance_scores (B, L) CLS attention."""
        h = self.fc(features)                                               # (B, L, dim)
        n_instances = h.shape[1]
        side = math.ceil(math.sqrt(n_instances))
        n_fill = side * side - n_instances
        if n_fill:
            # Repeat the first tokens (cyclically, for bags shorter than the fill) to square the bag.
            fill_index = torch.arange(n_fill, device=h.device) % n_instances
            h = torch.cat([h, h[:, fill_index]], dim=1)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)  # (B, 1 + side², dim)
        h = self.layer_1(h)
        h = self.ppeg(h, side)
        h, cls_attention = self.layer_2(h, return_cls_attention=True)     # (B, heads, 1 + side²)
        logits = self.head(self.norm(h)[:, 0])
        instance_scores = cls_attention.mean(dim=1)[:, 1:1 + n_instances]
        return MILOutput(logits=logits, instance_scores=instance_scores)


@register_aggregator("transmil", **IGNORES_COORDS, license=LICENSE,
                     reference="Shao et al., NeurIPS 2021 (TransMIL); github.com/szc19990412/TransMIL")
def transmil(in_dim: int, n_classes: int, **cfg) -> TransMIL:
    return TransMIL(in_dim, n_classes, **cfg)
