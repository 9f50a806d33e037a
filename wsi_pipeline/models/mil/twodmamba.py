"""2DMamba (Zhang et al., CVPR 2025; github AtlasAnalyticsLab/2DMamba, 2DMambaMIL/models/MambaMIL_2D.py
and mamba_simple.py @ 9fe12aa): a Mamba layer whose scan runs over the slide's 2-D patch grid.

    h    = Dropout(GELU(Linear(in_dim → d_model)))(x)                  (L, d_model)
    G    = the patch grid (H, W, d_model): each instance in its cell, empty cells the pad token
    G    = G + Mixer2D(RMSNorm(G))                                     × n_layers
    G    = LayerNorm(G)
    A    = softmax(w · tanh(V g)) over the pooled cells;  logits = Linear(Σ A g)

Mixer2D is a Mamba-1 block (in_proj, depthwise causal conv1d k=4, x_proj, dt_proj, A_log, D,
out_proj; mamba-ssm's names and init) whose conv runs over the row-major-flattened grid, as
upstream, and whose selective scan is the 2-D one (:mod:`wsi_pipeline.ssm.scan2d`: rows, then
columns, with the same Ā). Defaults are upstream's main.py: d_model 128, 1 layer, d_state 16,
expand 2, dropout 0.25, a trainable pad token (``torch.rand`` init), Xavier-normal / zero-bias init
on every Linear (``init="reference"``; it wipes dt_proj's inverse-softplus bias, as upstream).

Grid modes (``grid``):
- ``"tight"`` (default): the slide's own bounding box, cell = (x, y) offset from the slide's
  minimum divided by the tiling step (inferred from the coordinates, :mod:`.patch_grid`); the
  attention pools the slide's instances only (the pad token still fills the box's empty cells and
  feeds the scan and the conv).
- ``"upstream"``: upstream's ``reconstruct_2d_wsi``: cell = coords // ``patch_size`` (level-0 px,
  no offset) on a grid of ``max_y // patch_size + 1`` rows and ``max_x // patch_size + 1`` columns,
  ``max_x``/``max_y`` being the dataset-wide maxima of the coordinates (upstream hard-codes them per
  dataset in main.py), and the attention pools **every** cell, padding included. Not equivalent to
  ``tight``: padding above and left of the tissue feeds the states, and all of it enters the softmax.

Two instances in one cell (duplicate coordinates) share it as their mean (upstream keeps one of them,
whichever write lands last). ``instance_scores`` is the attention of each instance's cell (sums to 1
over the instances in ``tight``; over all cells in ``upstream``). Without coords the bag is laid out
row-major on a near-square raster. B > 1: each bag on its own grid, bags of equal length.
"""

from __future__ import annotations

import torch
from torch import nn

from wsi_pipeline.ssm.conv1d import causal_conv1d
from wsi_pipeline.ssm.mamba_block import MambaBlock, _split_xz
from wsi_pipeline.ssm.scan2d import selective_scan_2d

from .mil_layers import TanhAttentionPool, init_weights
from .patch_grid import PatchGrid, grid_from_coords, raster_grid
from .registry import MILOutput, check_coord_dims, register_aggregator

LICENSE = "Apache-2.0"  # this implementation (written here from the paper and code); no weights are shipped
REFERENCE = ("Zhang et al., CVPR 2025 (2DMamba); github.com/AtlasAnalyticsLab/2DMamba @ 9fe12aa "
             "(2DMambaMIL/models/MambaMIL_2D.py, mamba_simple.py)")
GRIDS = ("tight", "upstream")
PAD_TOKENS = ("trainable", "zero")


class RMSNorm(nn.Module):
    """Mamba's RMSNorm: x · rsqrt(mean(x²) + eps) · weight (no bias)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Mamba2DMixer(MambaBlock):
    """Mamba-1 block over a grid (B, H, W, d_model) -> (B, H, W, d_model) with the 2-D scan."""

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = grid.shape
        x, z = _split_xz(self.in_proj(grid.reshape(batch, height * width, -1)))      # (B, d_inner, H·W)
        # The short conv reads the grid row-major, as upstream (a cell sees the cells before it in its
        # row and, at a row start, the end of the row above).
        x = causal_conv1d(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu", backend=self.backend)
        dt, B, C = torch.split(self.x_proj(x.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = dt @ self.dt_proj.weight.t()                                           # (B, H·W, d_inner)
        # A and D in fp32 as upstream (and mamba-ssm); dt_proj's bias in the layer's dtype, as its Linear.

        def to_grid(t):   # (B, H·W, X) -> (B, X, H, W)
            return t.transpose(1, 2).reshape(batch, -1, height, width)

        y = selective_scan_2d(x.reshape(batch, -1, height, width), to_grid(delta), -torch.exp(self.A_log.float()),
                              to_grid(B), to_grid(C), self.D.float(), z=z.reshape(batch, -1, height, width),
                              delta_bias=self.dt_proj.bias, delta_softplus=True, backend=self.backend)
        return self.out_proj(y.permute(0, 2, 3, 1))


class Residual2D(nn.Module):
    """x + mixer(RMSNorm(x)), upstream's ResidualBlock."""

    def __init__(self, d_model: int, mixer: nn.Module):
        super().__init__()
        self.mixer = mixer
        self.norm = RMSNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mixer(self.norm(x))


class TwoDMambaMIL(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, d_model: int = 128, n_layers: int = 1, d_state: int = 16,
                 d_conv: int = 4, expand: float = 2, dropout: float = 0.25, attention_dim: int = 128,
                 grid: str = "tight", pad_token: str = "trainable", patch_size: int = 512,
                 max_x: int | None = None, max_y: int | None = None, init: str = "reference",
                 max_cells: int | None = None):
        super().__init__()
        if grid not in GRIDS:
            raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
        if pad_token not in PAD_TOKENS:
            raise ValueError(f"pad_token must be one of {PAD_TOKENS}, got {pad_token!r}")
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        if grid == "upstream" and (max_x is None or max_y is None or patch_size < 1):
            raise ValueError("grid 'upstream' needs max_x and max_y (the dataset-wide maximum level-0 x and y "
                             "of the patch coordinates) and a positive patch_size (level-0 px)")
        self.grid, self.patch_size, self.max_x, self.max_y, self.max_cells = grid, patch_size, max_x, max_y, max_cells
        layers = [nn.Linear(in_dim, d_model), nn.GELU()] + ([nn.Dropout(dropout)] if dropout > 0 else [])
        self.embed = nn.Sequential(*layers)
        # Upstream: trainable = Parameter(torch.rand(d)); zero = a frozen Parameter of zeros.
        self.pad_token = nn.Parameter(torch.rand(d_model) if pad_token == "trainable" else torch.zeros(d_model),
                                      requires_grad=pad_token == "trainable")
        self.layers = nn.ModuleList(
            Residual2D(d_model, Mamba2DMixer(d_model, d_state=d_state, d_conv=d_conv, expand=expand))
            for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.attention = TanhAttentionPool(d_model, attention_dim)
        self.head = nn.Linear(d_model, n_classes)
        init_weights(self, init)

    def place(self, coords: torch.Tensor | None, length: int, device) -> PatchGrid:
        """The grid of one bag: coords (L, 2) level-0 (x, y) or None."""
        if coords is None:
            return raster_grid(length, device)
        if self.grid == "tight":
            return grid_from_coords(coords, self.max_cells)
        cell = torch.div(coords.long(), self.patch_size, rounding_mode="floor")
        height, width = self.max_y // self.patch_size + 1, self.max_x // self.patch_size + 1
        bad = (cell[:, 0] < 0) | (cell[:, 0] >= width) | (cell[:, 1] < 0) | (cell[:, 1] >= height)
        if bool(bad.any()):
            first = int(bad.nonzero()[0])
            raise ValueError(f"twodmamba grid 'upstream': instance {first} at (x, y) = {coords[first].tolist()} "
                             f"lies outside the dataset-wide grid (max_x {self.max_x}, max_y {self.max_y}, "
                             f"patch_size {self.patch_size})")
        return PatchGrid(cells=cell[:, 1] * width + cell[:, 0], height=height, width=width)

    def lay_out(self, h: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
        """h (L, d) -> (H, W, d): instances in their cells (a shared cell holds their mean), the pad token elsewhere."""
        cells = grid.cells.to(h.device)
        sums = h.new_zeros(grid.n_cells, h.shape[1]).index_add(0, cells, h)
        counts = torch.bincount(cells, minlength=grid.n_cells).to(h.dtype)[:, None]
        filled = torch.where(counts > 0, sums / counts.clamp(min=1), self.pad_token.to(h.dtype).expand_as(sums))
        return filled.reshape(grid.height, grid.width, -1)

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        """features (B, L, D), coords (B, L, 2) level-0 px or None -> logits (B, C), instance_scores (B, L)."""
        check_coord_dims(coords, (2,), "twodmamba")
        h = self.embed(features)
        logits, scores = [], []
        for b in range(h.shape[0]):
            grid = self.place(coords[b] if coords is not None else None, h.shape[1], h.device)
            x = self.lay_out(h[b], grid)[None]
            for layer in self.layers:
                x = layer(x)
            cells = self.norm(x).reshape(1, grid.n_cells, -1)
            index = grid.cells.to(h.device)
            if self.grid == "upstream":
                pooled, attention = self.attention(cells)            # every cell, padding included
                scores.append(attention[0, index])
            else:
                pooled, attention = self.attention(cells[:, index])
                scores.append(attention[0])
            logits.append(self.head(pooled)[0])
        return MILOutput(logits=torch.stack(logits), instance_scores=torch.stack(scores))


@register_aggregator("twodmamba", coord_dims=(2,), uses_coords=True, out_dim="n_classes", license=LICENSE,
                     reference=REFERENCE)
def twodmamba(in_dim: int, n_classes: int, **cfg) -> TwoDMambaMIL:
    return TwoDMambaMIL(in_dim, n_classes, **cfg)
