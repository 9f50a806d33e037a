"""Lay a bag's instances on the 2-D patch grid of their slide, and read them back.

The grid is recovered from level-0 coordinates alone: ``column = round((x − min x) / step_x)``,
``row = round((y − min y) / step_y)``, where a step is the most common positive gap between the
sorted distinct x (resp. y) values — the tiling stride, whatever the patch size or overlap, as long
as some tiles are neighbours. Without coordinates the sequence is laid out row-major on a
near-square raster (``width = ⌈√L⌉``).

Two instances that fall into one cell (duplicate coordinates, or a grid coarsened because the
tissue is very sparse, see ``max_cells``) share it: scattering averages them and gathering gives
both the average. With one instance per cell, gather(scatter(x)) == x exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PatchGrid:
    """Placement of L instances on a (height, width) grid: ``cells`` (L,) int64 row-major cell index."""

    cells: torch.Tensor
    height: int
    width: int

    @property
    def n_cells(self) -> int:
        return self.height * self.width


def infer_step(values: torch.Tensor) -> float:
    """Most common positive gap between the sorted distinct ``values`` (1.0 when there is none).

    Ties go to the smaller gap. Gaps are rounded to 1e-3 so float coordinates still agree.
    """
    distinct = torch.unique(values.detach().double())
    gaps = torch.round(torch.diff(distinct) * 1000) / 1000
    gaps = gaps[gaps > 0]
    if gaps.numel() == 0:
        return 1.0
    gap_values, counts = torch.unique(gaps, return_counts=True)
    return float(gap_values[counts.argmax()])


def grid_from_coords(coords: torch.Tensor, max_cells: int | None = None) -> PatchGrid:
    """coords (L, 2) level-0 (x, y) → PatchGrid (rows follow y, columns follow x).

    If the grid would have more than ``max_cells`` cells, it is coarsened by the smallest integer
    factor that fits (neighbouring patches then share a cell).
    """
    coords = coords.detach().double()
    index = []
    for axis in (0, 1):
        values = coords[:, axis]
        index.append(torch.round((values - values.min()) / infer_step(values)).long())
    column, row = index
    height, width = int(row.max()) + 1, int(column.max()) + 1
    if max_cells is not None and height * width > max_cells:
        factor = math.ceil(math.sqrt(height * width / max_cells))
        while math.ceil(height / factor) * math.ceil(width / factor) > max_cells:
            factor += 1
        row, column = row // factor, column // factor
        height, width = int(row.max()) + 1, int(column.max()) + 1
    return PatchGrid(cells=row * width + column, height=height, width=width)


def raster_grid(length: int, device: torch.device | str | None = None) -> PatchGrid:
    """The sequence 0..L-1 row-major on a ⌈L / ⌈√L⌉⌉ × ⌈√L⌉ grid (for bags without coordinates)."""
    width = math.ceil(math.sqrt(length))
    height = math.ceil(length / width)
    return PatchGrid(cells=torch.arange(length, device=device), height=height, width=width)


def scatter_to_grid(x: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
    """x (L, d) → (d, height, width); empty cells are 0, shared cells hold the mean."""
    cells = grid.cells.to(x.device)
    flat = x.new_zeros(grid.n_cells, x.shape[1]).index_add(0, cells, x)
    counts = torch.bincount(cells, minlength=grid.n_cells)
    if int(counts.max()) > 1:
        flat = flat / counts.clamp(min=1).to(x.dtype)[:, None]
    return flat.t().reshape(x.shape[1], grid.height, grid.width)


def gather_from_grid(grid_values: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
    """(d, height, width) → (L, d): each instance reads its cell."""
    flat = grid_values.reshape(grid_values.shape[0], -1)
    return flat[:, grid.cells.to(flat.device)].t()
