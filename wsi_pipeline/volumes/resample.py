"""Resampling between voxel grids (scipy.ndimage), with the affine kept exact.

`resample_to_spacing` changes a canonical volume's spacing (same field of view, axes unchanged);
`to_grid` carries an array from one grid onto another through both affines (used to put a heatmap
computed on the resampled grid back on the file's own grid, whatever its orientation).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .volume import Volume


def resampled_shape_affine(shape, affine: np.ndarray, target_spacing_mm) -> tuple[tuple[int, ...], np.ndarray]:
    """(new shape, new affine) covering the same extent with `target_spacing_mm` per axis; voxel
    centres of the first voxel coincide."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    target = np.broadcast_to(np.asarray(target_spacing_mm, dtype=np.float64), (3,))
    if not np.all(target > 0):
        raise ValueError(f"target spacing must be > 0 mm, got {tuple(target)}")
    new_shape = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))
    scale = target / spacing                       # old voxels per new voxel
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] * scale[None, :]
    return new_shape, new_affine


def to_grid(array: np.ndarray, array_affine: np.ndarray, out_shape, out_affine: np.ndarray,
            order: int = 1, cval: float = 0.0) -> np.ndarray:
    """`array` (on the grid `array_affine`) sampled at the voxel centres of the grid (`out_shape`,
    `out_affine`): out[v] = array[inv(array_affine) @ out_affine @ v]. Order 0 = nearest."""
    mapping = np.linalg.inv(array_affine) @ out_affine
    # Flips and permutations between grids give integer positions up to float error: snap them so
    # nearest-neighbour sampling is exact.
    matrix, offset = mapping[:3, :3], mapping[:3, 3]
    matrix = np.where(np.abs(matrix - np.round(matrix)) < 1e-6, np.round(matrix), matrix)
    offset = np.where(np.abs(offset - np.round(offset)) < 1e-6, np.round(offset), offset)
    return ndimage.affine_transform(np.asarray(array, dtype=np.float32), matrix, offset=offset,
                                    output_shape=tuple(int(n) for n in out_shape), order=order,
                                    mode="constant", cval=cval)


def resample_to_spacing(volume: Volume, target_spacing_mm, order: int = 1) -> Volume:
    """The volume on an axis-aligned grid of `target_spacing_mm` (a number or one per axis).
    Outside the original extent reads as the volume's minimum (air)."""
    new_shape, new_affine = resampled_shape_affine(volume.shape, volume.affine, target_spacing_mm)
    if new_shape == volume.shape and np.allclose(new_affine, volume.affine):
        return volume
    data = to_grid(volume.data, volume.affine, new_shape, new_affine, order=order,
                   cval=float(volume.data.min()))
    return volume.with_data(data, new_affine)
