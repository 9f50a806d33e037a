"""Pixels and tissue of a slide at the detector's working resolution (µm/px)."""

from __future__ import annotations

import math

import numpy as np

from ..slides.slide import Slide, _box_resize
from ..tiling.tissue import detect_tissue


def work_size(slide: Slide, work_mpp: float) -> tuple[int, int]:
    """(width, height) of the whole slide at `work_mpp`."""
    w0, h0 = slide.dimensions
    return max(1, int(round(w0 * slide.mpp / work_mpp))), max(1, int(round(h0 * slide.mpp / work_mpp)))


def read_work_region(slide: Slide, x0: int, y0: int, width: int, height: int, work_mpp: float) -> np.ndarray:
    """(height, width, 3) uint8 RGB of the window at work pixels [x0, x0 + width) x [y0, y0 + height).

    Read from the coarsest level still at least as fine as `work_mpp`, area-averaged to it; the
    parts of the window outside the slide are white (glass), so edge windows have the shape of any
    other and the detector sees the slide edge as background.
    """
    level = slide.best_level_for_mpp(work_mpp)
    down = slide.level_downsamples[level]
    lw, lh = slide.level_dimensions[level]
    r = work_mpp / (slide.mpp * down)                 # level pixels per work pixel
    out = np.full((height, width, 3), 255, dtype=np.uint8)
    ww, wh = work_size(slide, work_mpp)
    cx0, cy0 = max(0, x0), max(0, y0)
    cx1, cy1 = min(ww, x0 + width), min(wh, y0 + height)
    if cx1 <= cx0 or cy1 <= cy0:
        return out
    bx0, by0 = cx0 * r, cy0 * r
    bx1, by1 = min(lw, cx1 * r), min(lh, cy1 * r)
    ix0, iy0 = int(math.floor(bx0)), int(math.floor(by0))
    ix1, iy1 = max(ix0 + 1, int(math.ceil(bx1))), max(iy0 + 1, int(math.ceil(by1)))
    pixels = slide.read_region((int(round(ix0 * down)), int(round(iy0 * down))), level, (ix1 - ix0, iy1 - iy0))
    pixels = _box_resize(pixels, cx1 - cx0, cy1 - cy0, (bx0 - ix0, by0 - iy0, bx1 - ix0, by1 - iy0))
    out[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] = pixels
    return out


def slide_tissue(slide: Slide, mask_mpp: float, **detect_kwargs) -> tuple[np.ndarray, float]:
    """(tissue mask (h, w) bool, its exact µm/px) from the library's tissue detector."""
    image, exact_mpp = slide.read_at_mpp(mask_mpp)
    return detect_tissue(image, exact_mpp, **detect_kwargs), exact_mpp
