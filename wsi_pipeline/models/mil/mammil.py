"""MamMIL (Fang et al., BIBM 2024; github Vison307/MamMIL): Mamba-2 over graph scan orders of the patches.

    graph   per bag (:mod:`.graph_orders`): exact 8-NN on the patch coords, minimum spanning tree with
            edge weight 1 − cos of the input features, orders = identity, DFS pre-order, DFS
            post-order, BFS (seeded root per component)
    h  = dropout(ReLU(Linear(in_dim → d_model)))(x)                                  (L, d)
    per active layer l:
        u  = MultiOrderMamba2(LayerNorm(h), 8 orders: each of the 4 forwards and reversed)
        u  = ResGraphBlock(u, kNN edges)        GENConv, softmax aggregation, learnable t
                                                (only after layers l < n_layers − 1, as upstream)
        h  = h + u
    h  = LayerNorm(h)                                       (final_norm; Identity if False)
    A  = softmax_i(w · tanh(V h_i))                          attention d → 128 → 1
    logits = Linear(Σ_i A_i h_i)

The Mamba-2 mixer (:class:`~wsi_pipeline.ssm.mamba2_block.MultiOrderMamba2`) is upstream's
``DirectMamba``: shared in_proj (z, xBC, dt), per order its own conv over xBC, dt_bias, A_log
(one scalar per head), D; gated RMSNorm (``norm_before_gate=False``) per order; the mean of the 8
order outputs goes through the shared out_proj. d_state 128, headdim 64, expand 2.

Upstream as released (models/MamMIL2.py @ 64736e1) builds ``layer_n`` = 2 Mamba layers but only
``layer_n − 1`` = 1 graph block, and loops ``zip(self.layers, self.ppeg)``: **only the first layer
runs** (the second is built, counted in the parameters, never called). ``n_layers`` is what is
built, ``active_layers`` (None: all) what runs: the "as run" preset is ``n_layers=2,
active_layers=1``, "as described" ``n_layers=2`` (both run; graph block after the first only, the
``idx < len(layers) − 1`` rule of the same loop). Dropout 0 and ReLU as in upstream's configs.

``init="reference"`` (default) is upstream's: every nn.Linear bias outside the graph blocks zeroed
(their MLP uses torch_geometric's Linear, which the ``isinstance(nn.Linear)`` init skips),
each mixer's ``out_proj.weight`` kaiming-uniform(a=√5)/√n_layers, the head trunc-normal(0.02).
``"default"`` keeps PyTorch's init.

Options that are ours (defaults = upstream): ``context_drop`` (each layer's branch skipped per bag
and training pass with this probability, as in MambaMIL; :class:`~.mil_layers.PreNormResidual`),
``final_norm``. ``bfs_seed`` seeds the BFS roots (upstream: unseeded ``random.choice``).
``ssd_impl``: ``"chunked"`` (default; the SSD matrix form in plain torch) or ``"scan"`` (our selective
scan with the heads' A and dt broadcast: mamba-ssm's reference formulation, about 3x slower on CPU at
d_state 128); equal up to rounding (tests/models/test_mammil.py).

Graphs are built from the coordinates and the features this model is given (so, in training, after
``standardize`` / ``center_per_slide``; upstream uses the raw features) and cached per bag
(:class:`~.graph_orders.GraphCache`). Without coords the bag order is taken as a line of patches
(coords (i, 0)). B > 1 runs the bags one after another. ``instance_scores`` is the attention A.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from wsi_pipeline.ssm import Explicit, Identity, Reverse
from wsi_pipeline.ssm.mamba2_block import MultiOrderMamba2

from .genconv import ResGraphBlock
from .graph_orders import DEFAULT_GRAPH_CACHE, KNN, GraphCache, PatchGraph
from .mil_layers import TanhAttentionPool
from .registry import MILOutput, check_coord_dims, register_aggregator

LICENSE = "Apache-2.0"  # this implementation (written here from the paper and code); no weights are shipped
REFERENCE = "Fang et al., BIBM 2024 (MamMIL); github.com/Vison307/MamMIL"
INIT_SCHEMES = ("reference", "default")
N_ORDERS = 4


def scan_orders(graph: PatchGraph, bidirectional: bool = True) -> list:
    """Upstream's SSM order list: for each of identity, DFS pre, DFS post, BFS: forwards, then reversed."""
    orders = []
    for k, index in enumerate(graph.orders):
        forward = Identity() if k == 0 else Explicit(torch.from_numpy(index))
        orders.append(forward)
        if bidirectional:
            orders.append(Reverse() if k == 0 else Explicit(torch.from_numpy(index), reverse=True))
    return orders


class MamMIL(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, d_model: int = 512, n_layers: int = 2,
                 active_layers: int | None = None, d_state: int = 128, d_conv: int = 4, expand: int = 2,
                 headdim: int = 64, bidirectional: bool = True, dropout: float = 0.0, graph_block: bool = True,
                 graph_dropout: float = 0.1, knn: int = KNN, bfs_seed: int = 0, attention_dim: int = 128,
                 init: str = "reference", final_norm: bool = True, context_drop: float = 0.0,
                 graph_cache: GraphCache | None = None, ssd_impl: str = "chunked"):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        active_layers = n_layers if active_layers is None else active_layers
        if not 1 <= active_layers <= n_layers:
            raise ValueError(f"active_layers must be in [1, n_layers={n_layers}], got {active_layers}")
        if init not in INIT_SCHEMES:
            raise ValueError(f"init must be one of {INIT_SCHEMES}, got {init!r}")
        if not 0.0 <= context_drop < 1.0:
            raise ValueError(f"context_drop must be in [0, 1), got {context_drop}")
        self.active_layers, self.knn, self.bfs_seed = active_layers, knn, bfs_seed
        self.bidirectional, self.context_drop = bidirectional, context_drop
        self.graph_cache = graph_cache if graph_cache is not None else DEFAULT_GRAPH_CACHE
        self.embed = nn.Sequential(nn.Linear(in_dim, d_model), nn.ReLU(), nn.Dropout(dropout))
        n_ssms = N_ORDERS * (2 if bidirectional else 1)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d_model),
                          MultiOrderMamba2(d_model, n_ssms, d_state=d_state, d_conv=d_conv, expand=expand,
                                           headdim=headdim, impl=ssd_impl))
            for _ in range(n_layers))
        # One graph block after each layer but the last, as upstream builds them.
        self.graph_blocks = nn.ModuleList(ResGraphBlock(d_model, graph_dropout) for _ in range(n_layers - 1)) \
            if graph_block else nn.ModuleList()
        self.norm = nn.LayerNorm(d_model) if final_norm else nn.Identity()
        self.attention = TanhAttentionPool(d_model, attention_dim)
        self.head = nn.Linear(d_model, n_classes)
        if init == "reference":
            self.reference_init(n_layers)

    def reference_init(self, n_layers: int) -> None:
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        graph_linears = {id(m) for m in self.graph_blocks.modules()}
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None and id(module) not in graph_linears:
                nn.init.zeros_(module.bias)
            if isinstance(module, MultiOrderMamba2):
                nn.init.kaiming_uniform_(module.out_proj.weight, a=math.sqrt(5))
                with torch.no_grad():
                    module.out_proj.weight /= math.sqrt(n_layers)

    def graph(self, features: torch.Tensor, coords: torch.Tensor | None) -> PatchGraph:
        """The kNN edges and orders of one bag: features (L, D), coords (L, 2) or None."""
        if coords is None:
            coords_np = np.stack([np.arange(features.shape[0]), np.zeros(features.shape[0])], axis=1)
        else:
            coords_np = coords.detach().cpu().numpy()
        return self.graph_cache.graph(coords_np, features.detach().float().cpu().numpy(), self.knn, self.bfs_seed)

    def forward_bag(self, features: torch.Tensor, coords: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """features (1, L, D), coords (L, 2) or None → logits (1, C), attention (1, L)."""
        graph = self.graph(features[0], coords)
        orders = scan_orders(graph, self.bidirectional)
        edges = torch.from_numpy(graph.edge_index).to(features.device)
        h = self.embed(features)
        for idx in range(self.active_layers):
            if self.training and self.context_drop > 0 and torch.rand(()) < self.context_drop:
                continue
            norm, mixer = self.layers[idx]
            u = mixer(norm(h), orders)
            if idx < len(self.graph_blocks):
                u = self.graph_blocks[idx](u, edges)
            h = h + u
        bag_embedding, attention = self.attention(self.norm(h))
        return self.head(bag_embedding), attention

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        """features (B, L, D), coords (B, L, 2) level-0 px or None → logits (B, C), instance_scores (B, L)."""
        check_coord_dims(coords, (2,), "mammil")
        results = [self.forward_bag(features[b:b + 1], None if coords is None else coords[b])
                   for b in range(features.shape[0])]
        return MILOutput(logits=torch.cat([r[0] for r in results]),
                         instance_scores=torch.cat([r[1] for r in results]))


@register_aggregator("mammil", coord_dims=(2,), uses_coords=True, out_dim="n_classes", license=LICENSE,
                     reference=REFERENCE)
def mammil(in_dim: int, n_classes: int, **cfg) -> MamMIL:
    return MamMIL(in_dim, n_classes, **cfg)
