"""Scan orders over a bag's instance coordinates: the SSM core's raster orders on a sparse grid.

Instances of a slide (coords (L, 2): x, y) or a volume (coords (L, 3): i, j, k voxels, k the slice
axis) sit on a regular grid with cells missing (background). :func:`coords_scan_permutation`
places each instance in its grid cell (per-axis step = the tiling stride, as in :mod:`.patch_grid`),
builds the dense (depth, height, width) = (k, j, i) volume of cells, reads it with
:class:`~wsi_pipeline.ssm.Raster3D` in the requested direction and keeps the cells that hold an
instance: the instances in the order the dense 3-D scan would visit them, empty cells skipped (no
zero tokens, so the sequence length stays L). A slide is a volume of depth 1.

    "zyx"  slice by slice, each slice row by row (raster; for a slide: row-major)
    "yxz"  SegMamba's inter-slice scan: each in-slice position through all slices
    any other Raster3D direction, and "_rev" for back to front.
"""

from __future__ import annotations

import torch

from wsi_pipeline.ssm import Raster3D

from .patch_grid import infer_step


def coords_cells(coords: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """coords (L, 2|3) → (cell (L, 3) int64 as (z, y, x), (depth, height, width))."""
    if coords.ndim != 2 or coords.shape[1] not in (2, 3):
        raise ValueError(f"coords must be (L, 2) or (L, 3), got {tuple(coords.shape)}")
    coords = coords.detach().double()
    columns = []
    for axis in range(coords.shape[1]):
        values = coords[:, axis]
        columns.append(torch.round((values - values.min()) / infer_step(values)).long())
    if len(columns) == 2:
        columns.append(torch.zeros_like(columns[0]))
    x, y, z = columns
    cells = torch.stack([z, y, x], dim=1)
    depth, height, width = (int(cells[:, a].max()) + 1 for a in range(3))
    return cells, (depth, height, width)


def coords_scan_permutation(coords: torch.Tensor, direction: str = "zyx") -> torch.Tensor:
    """(L,) int64 permutation: position j of the scan reads instance ``perm[j]``.

    Instances sharing a cell keep their bag order (stable sort)."""
    cells, (depth, height, width) = coords_cells(coords)
    order = Raster3D(depth, height, width, direction)
    flat = (cells[:, 0] * height + cells[:, 1]) * width + cells[:, 2]
    scan_position = order.inverse_index(depth * height * width)[flat]
    return torch.argsort(scan_position, stable=True).to(coords.device)
