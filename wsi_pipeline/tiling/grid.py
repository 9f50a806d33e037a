"""Patch grids at an exact physical resolution.

A patch is `patch_size_px` pixels at `target_mpp` µm/px, i.e. a fixed tissue area whatever the
scanner. Its level-0 footprint is `patch_size_px · target_mpp / slide_mpp` pixels; it is read at the
coarsest pyramid level that is still at least as fine as the target, then resized — never a nominal
"20×" that means 0.5 µm/px on one scanner and 0.25 on another.

Grid positions are computed from the index (x_i = round(i · stride)), not accumulated, so rounding
never drifts: every patch sits within half a level-0 pixel of its exact physical position.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PatchGeometry:
    target_mpp: float
    slide_mpp: float
    patch_size_px: int          # side at target_mpp
    overlap_px: int             # at target_mpp
    patch_size_level0: int      # side in level-0 pixels (rounded)
    stride_level0: float        # exact, level-0 pixels
    patch_level: int            # pyramid level patches are read from
    level_downsample: float     # downsample of patch_level
    read_size_px: int           # side read at patch_level, resized to patch_size_px afterwards

    @property
    def scale(self) -> float:
        """Level-0 pixels per target pixel."""
        return self.target_mpp / self.slide_mpp


def upsampling_needed(slide_mpp: float, target_mpp: float, mpp_tolerance: float = 0.02) -> bool:
    """True when patches at `target_mpp` would need pixels finer than the slide has: even level 0
    is coarser than the target beyond the tolerance (the rule that picks the patch level)."""
    return slide_mpp > target_mpp * (1 + mpp_tolerance)


def plan_geometry(slide_mpp: float, level_downsamples, target_mpp: float, patch_size_px: int,
                  overlap_px: int = 0, mpp_tolerance: float = 0.02, *,
                  allow_upsampling: bool = False) -> PatchGeometry:
    """Geometry of patches for a slide of `slide_mpp` with pyramid `level_downsamples`.

    A target finer than the slide (beyond `mpp_tolerance`) is refused unless `allow_upsampling`:
    its patches would be level-0 pixels enlarged, not more detail."""
    if not (slide_mpp > 0 and target_mpp > 0):
        raise ValueError(f"mpp must be > 0 (slide {slide_mpp}, target {target_mpp})")
    if not allow_upsampling and upsampling_needed(slide_mpp, target_mpp, mpp_tolerance):
        raise ValueError(f"target {target_mpp} µm/px is finer than the slide's {slide_mpp} µm/px "
                         f"(upsampling {slide_mpp / target_mpp:.2g}×)")
    if not 0 <= overlap_px < patch_size_px:
        raise ValueError("overlap_px must be in [0, patch_size_px)")
    scale = target_mpp / slide_mpp
    patch_size_level0 = max(1, int(round(patch_size_px * scale)))
    patch_level = 0
    for level, down in enumerate(level_downsamples):
        if slide_mpp * down <= target_mpp * (1 + mpp_tolerance):
            patch_level = level
    down = float(level_downsamples[patch_level])
    return PatchGeometry(
        target_mpp=float(target_mpp), slide_mpp=float(slide_mpp), patch_size_px=int(patch_size_px),
        overlap_px=int(overlap_px), patch_size_level0=patch_size_level0,
        stride_level0=(patch_size_px - overlap_px) * scale, patch_level=patch_level,
        level_downsample=down, read_size_px=max(1, int(round(patch_size_level0 / down))),
    )


def grid_positions(length_level0: int, geometry: PatchGeometry) -> np.ndarray:
    """Top-left level-0 positions along one axis of patches that fit entirely inside the slide."""
    span = length_level0 - geometry.patch_size_level0
    if span < 0:
        return np.zeros(0, dtype=np.int64)
    n = int(np.floor(span / geometry.stride_level0 + 1e-9)) + 1
    pos = np.round(np.arange(n) * geometry.stride_level0).astype(np.int64)
    return pos[pos <= span]


def tissue_fractions(coords: np.ndarray, patch_size_level0: int, mask: np.ndarray,
                     mask_scale_xy: tuple[float, float]) -> np.ndarray:
    """Exact area fraction of tissue under each patch.

    coords: (N, 2) level-0 top-left (x, y); mask: (h, w) bool, one cell = `mask_scale_xy` level-0
    pixels along (x, y). Uses a summed-area table, bilinearly interpolated at fractional box
    corners — exact for a piecewise-constant mask, so partly covered mask cells count by area.
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    if len(coords) == 0:
        return np.zeros(0, dtype=np.float32)
    h, w = mask.shape
    sat = np.zeros((h + 1, w + 1), dtype=np.float64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask.astype(np.float64), axis=0), axis=1)
    sx, sy = mask_scale_xy
    x0, y0 = coords[:, 0] / sx, coords[:, 1] / sy
    x1, y1 = (coords[:, 0] + patch_size_level0) / sx, (coords[:, 1] + patch_size_level0) / sy

    def integral(x, y):
        x = np.clip(x, 0, w)
        y = np.clip(y, 0, h)
        xi = np.minimum(np.floor(x).astype(np.int64), w - 1)
        yi = np.minimum(np.floor(y).astype(np.int64), h - 1)
        fx, fy = x - xi, y - yi
        return (sat[yi, xi] * (1 - fx) * (1 - fy) + sat[yi, xi + 1] * fx * (1 - fy)
                + sat[yi + 1, xi] * (1 - fx) * fy + sat[yi + 1, xi + 1] * fx * fy)

    area = integral(x1, y1) - integral(x0, y1) - integral(x1, y0) + integral(x0, y0)
    box_area = (x1 - x0) * (y1 - y0)
    return np.clip(area / box_area, 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class TileGrid:
    geometry: PatchGeometry
    coords: np.ndarray            # (N, 2) int64 level-0 top-left (x, y), row-major order
    tissue_fraction: np.ndarray   # (N,) float32
    n_grid: int                   # grid positions before the tissue filter


def tile_tissue(level0_wh: tuple[int, int], geometry: PatchGeometry, mask: np.ndarray,
                mask_scale_xy: tuple[float, float], min_tissue_fraction: float) -> TileGrid:
    """All grid patches whose tissue fraction is ≥ `min_tissue_fraction` (and > 0)."""
    xs = grid_positions(level0_wh[0], geometry)
    ys = grid_positions(level0_wh[1], geometry)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.int64)
    fraction = tissue_fractions(coords, geometry.patch_size_level0, mask, mask_scale_xy)
    keep = (fraction >= min_tissue_fraction) & (fraction > 0)
    return TileGrid(geometry, coords[keep], fraction[keep], n_grid=len(coords))
