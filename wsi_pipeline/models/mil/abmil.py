"""ABMIL: gated attention MIL (Ilse, Tomczak & Welling, ICML 2018).

    h_i = dropout(ReLU(W x_i))                       (L, hidden_dim)
    a_i = w · (tanh(V h_i) ⊙ sigmoid(U h_i))         gated attention score
    A   = softmax_i(a)                               (L,), sums to 1 over the bag
    z   = Σ_i A_i h_i  →  logits = head(z)

``attention_dropout`` (default 0, Ilse et al.) adds dropout after the tanh and the sigmoid branch, as
CLAM's ``Attn_Net_Gated`` does (p = 0.25 there; github.com/mahmoodlab/CLAM models/model_clam.py).

Permutation-invariant: reordering the instances permutes A and leaves z, hence the logits, unchanged.
Coordinates are ignored. `instance_scores` is the attention A.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import IGNORES_COORDS, MILOutput, register_aggregator

LICENSE = "Apache-2.0"  # this implementation (written here from the paper); no weights are shipped


class GatedAttentionMIL(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, hidden_dim: int = 512, attention_dim: int = 128,
                 dropout: float = 0.25, attention_dropout: float = 0.0):
        super().__init__()
        if not 0.0 <= attention_dropout < 1.0:
            raise ValueError(f"attention_dropout must be in [0, 1), got {attention_dropout}")
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention_tanh = nn.Sequential(nn.Linear(hidden_dim, attention_dim), nn.Tanh(),
                                            nn.Dropout(attention_dropout))
        self.attention_gate = nn.Sequential(nn.Linear(hidden_dim, attention_dim), nn.Sigmoid(),
                                            nn.Dropout(attention_dropout))
        self.attention_out = nn.Linear(attention_dim, 1)
        self.head = nn.Linear(hidden_dim, n_classes)

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        """features (B, L, D) → logits (B, C); instance_scores (B, L) attention, rows sum to 1."""
        h = self.embed(features)                                            # (B, L, H)
        attention_logits = self.attention_out(self.attention_tanh(h) * self.attention_gate(h))
        attention = torch.softmax(attention_logits.squeeze(-1), dim=1)      # (B, L)
        bag_embedding = torch.einsum("bl,blh->bh", attention, h)            # (B, H)
        return MILOutput(logits=self.head(bag_embedding), instance_scores=attention)


@register_aggregator("abmil", **IGNORES_COORDS, license=LICENSE,
                     reference="Ilse, Tomczak & Welling, ICML 2018; github.com/AMLab-Amsterdam/AttentionDeepMIL")
def abmil(in_dim: int, n_classes: int, **cfg) -> GatedAttentionMIL:
    return GatedAttentionMIL(in_dim, n_classes, **cfg)
