"""GENConv (DeeperGCN, Li et al. 2020) with softmax aggregation, in plain torch, and the residual
DeepGCN block MamMIL wraps it in. No torch_geometric needed.

Follows torch_geometric 2.5.2 (the version MamMIL's README names), ``GENConv(d, d, aggr='softmax',
t=1.0, learn_t=True, num_layers=2, norm='layer')`` and ``DeepGCNLayer(conv, LayerNorm(d), ReLU,
block='res', dropout)``, for in = out channels and no edge features:

    m_ji  = ReLU(x_j) + eps                                   message along edge j → i (eps 1e-7)
    α_ji  = softmax_{j ∈ N(i)}(t · m_ji)                        per channel, over i's incoming edges
    a_i   = Σ_j α_ji m_ji                                      (0 for a node without incoming edges)
    conv  = MLP(x_i + a_i)   MLP = Linear(d, 2d), LayerNorm(2d), ReLU, Linear(2d, d)
    block = dropout(x + ReLU(LayerNorm(conv)))                  DeepGCNLayer 'res'

``t`` is a learnable scalar (the inverse temperature). Nodes are on axis -2, so x may be (L, d) or
(B, L, d) with one edge list for every bag in the batch (as PyG's ``node_dim=-2``).
"""

from __future__ import annotations

import torch
from torch import nn


def scatter_softmax_sum(messages: torch.Tensor, target: torch.Tensor, n_nodes: int,
                        t: torch.Tensor) -> torch.Tensor:
    """Σ_j softmax_j(t·m_j) m_j per target node and channel: messages (…, E, d), target (E,) → (…, n, d)."""
    logits = messages * t
    shape = list(messages.shape)
    shape[-2] = n_nodes
    index = target.view(*([1] * (messages.dim() - 2)), -1, 1).expand_as(messages)
    peak = logits.new_full(shape, float("-inf")).scatter_reduce(-2, index, logits, "amax", include_self=True)
    # Max-shifted softmax, as PyG's; the shift carries no gradient (it cancels out).
    weights = torch.exp(logits - peak.detach().gather(-2, index))
    denominator = weights.new_zeros(shape).scatter_add(-2, index, weights)
    weighted = weights.new_zeros(shape).scatter_add(-2, index, weights * messages)
    return weighted / denominator.clamp_min(torch.finfo(weights.dtype).tiny)


class GENConv(nn.Module):
    """(…, L, d), edge_index (2, E) (row 0 sources j, row 1 targets i) → (…, L, d)."""

    def __init__(self, channels: int, t: float = 1.0, learn_t: bool = True, expansion: int = 2,
                 eps: float = 1e-7):
        super().__init__()
        self.eps = eps
        self.t = nn.Parameter(torch.tensor([float(t)]), requires_grad=learn_t)
        hidden = channels * expansion
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.LayerNorm(hidden), nn.ReLU(),
                                 nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        source, target = edge_index
        messages = torch.relu(x.index_select(-2, source)) + self.eps
        aggregated = scatter_softmax_sum(messages, target, x.shape[-2], self.t)
        return self.mlp(x + aggregated)


class ResGraphBlock(nn.Module):
    """DeepGCNLayer ``block='res'``: ``dropout(x + ReLU(LayerNorm(conv(x, edges))))``."""

    def __init__(self, channels: int, dropout: float = 0.1, **conv_kwargs):
        super().__init__()
        self.conv = GENConv(channels, **conv_kwargs)
        self.norm = nn.LayerNorm(channels)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return self.dropout(x + torch.relu(self.norm(self.conv(x, edge_index))))
