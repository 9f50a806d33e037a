"""Slide-aligned raster grids: the working image, CAM map, probability map and mask all live on one.

A `SlideGrid` pixel (r, c) is the level-0 square [c·d, (c+1)·d) x [r·d, (r+1)·d), d = `downsample`
(an integer, so a grid maps onto the slide exactly and the mask TIFF can be written tile by tile on
the slide's own geometry). The grid has floor(W0 / d) x floor(H0 / d) pixels: a strip of fewer than
d level-0 pixels at the right and bottom edges is left out (it is glass on every scanner we know of,
and readers sampling the mask there get the last column / row).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class SlideGrid:
    downsample: int                 # level-0 px per grid px (integer)
    level0_wh: tuple[int, int]      # the slide's level-0 (width, height)
    slide_mpp: float                # µm per level-0 px

    @classmethod
    def for_mpp(cls, level0_wh: tuple[int, int], slide_mpp: float, target_mpp: float) -> "SlideGrid":
        """The grid nearest to `target_mpp` µm/px with an integer downsample (>= 1)."""
        if not (slide_mpp > 0 and target_mpp > 0):
            raise ValueError(f"mpp must be > 0 (slide {slide_mpp}, target {target_mpp})")
        downsample = max(1, int(round(target_mpp / slide_mpp)))
        return cls(downsample, (int(level0_wh[0]), int(level0_wh[1])), float(slide_mpp))

    @property
    def mpp(self) -> float:
        """µm per grid pixel (exact: slide mpp x integer downsample)."""
        return self.slide_mpp * self.downsample

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) in grid pixels."""
        w0, h0 = self.level0_wh
        return max(1, h0 // self.downsample), max(1, w0 // self.downsample)


def read_grid_image(slide, grid: SlideGrid) -> np.ndarray:
    """The whole slide on `grid`: (h, w, 3) uint8 RGB, area-averaged from the coarsest pyramid level
    at least as fine as the grid (the box of grid pixels is mapped exactly onto that level)."""
    level = slide.best_level_for_mpp(grid.mpp)
    h, w = grid.shape
    level_w, level_h = slide.level_dimensions[level]
    level_down = slide.level_downsamples[level]
    box_w = min(level_w, w * grid.downsample / level_down)
    box_h = min(level_h, h * grid.downsample / level_down)
    # Read in strips (bounded memory on big single-level slides), resized as they go.
    return slide.read_level_resized(level, (w, h), box=(0.0, 0.0, box_w, box_h))


def grid_centres_in(src: SlideGrid, dst: SlideGrid) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (rows (h,), cols (w,)) in `src` pixel units of `dst`'s pixel centres, where src
    pixel centres sit at integers (the convention of scipy's map_coordinates)."""
    h, w = dst.shape
    rows = (np.arange(h) + 0.5) * dst.downsample / src.downsample - 0.5
    cols = (np.arange(w) + 0.5) * dst.downsample / src.downsample - 0.5
    return rows, cols


def resample(values: np.ndarray, src: SlideGrid, dst: SlideGrid, order: int = 1) -> np.ndarray:
    """A (h, w) map on `src` resampled onto `dst` (order 1: bilinear, 0: nearest), edges clamped."""
    values = np.asarray(values)
    if values.shape != src.shape:
        raise ValueError(f"values {values.shape} do not match the source grid {src.shape}")
    if src.downsample == dst.downsample and src.shape == dst.shape:
        return values.copy()
    rows, cols = grid_centres_in(src, dst)
    if order == 0:
        r = np.clip(np.floor(rows + 0.5).astype(np.int64), 0, src.shape[0] - 1)
        c = np.clip(np.floor(cols + 0.5).astype(np.int64), 0, src.shape[1] - 1)
        return values[r[:, None], c[None, :]]
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    return ndimage.map_coordinates(values.astype(np.float32), [rr, cc], order=order, mode="nearest")
