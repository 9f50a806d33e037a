"""Per-patch scores -> a score map on the slide's geometry.

    scores (N,), coords (N, 2) --normalize_scores-->  (N,) in [0, 1]
    coords, scores, patch_size_level0 --score_map--> ScoreMap: (h, w) float32, NaN where no patch
    ScoreMap --smooth_score_map--> same grid, Gaussian in µm, normalised convolution

A map pixel covers `downsample` × `downsample` level-0 pixels; pixel (r, c) is the level-0 square
[c·d, (c+1)·d) × [r·d, (r+1)·d). Where patches overlap the map holds the mean of their scores
(sum / count), so overlapping tiling does not brighten the overlaps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

NORMALIZE_METHODS = ("rank", "minmax", "raw")
# Map pixels per patch side by default: fine enough to show 50 % overlaps, coarse enough that a
# 100k × 100k slide's map stays a few MB.
DEFAULT_PX_PER_PATCH = 8
# Hard cap on the map's longer side (memory: (h+1)(w+1) float64 sums while rasterising).
MAX_MAP_SIDE_PX = 4096


def check_scores(scores: np.ndarray, n: int | None = None) -> np.ndarray:
    """`scores` as float64 (N,) or (N, C); raises ValueError on NaN/inf or a length mismatch."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim not in (1, 2):
        raise ValueError(f"scores must be (N,) or (N, C), got shape {s.shape}")
    if n is not None and s.shape[0] != n:
        raise ValueError(f"{s.shape[0]} scores for {n} patches")
    if not np.isfinite(s).all():
        bad = int((~np.isfinite(s.reshape(len(s), -1)).all(axis=1)).sum())
        raise ValueError(f"{bad} patch score(s) are NaN or infinite")
    return s


def normalize_scores(scores: np.ndarray, method: str = "rank") -> np.ndarray:
    """(N,) scores -> (N,) float64 for the colour scale [0, 1].

    rank:   percentile within the slide, (rank - 1) / (N - 1) with ties averaged; for distinct
            scores exactly uniform on [0, 1]. Comparable across slides and models.
    minmax: (s - min) / (max - min).
    raw:    the scores themselves, clipped to [0, 1] (for probabilities; attention weights are tiny).
    A constant (or single) score maps to 0.5 under rank and minmax.
    """
    s = check_scores(scores)
    if s.ndim != 1:
        raise ValueError(f"normalize_scores takes (N,) scores, got {s.shape}")
    if method not in NORMALIZE_METHODS:
        raise ValueError(f"unknown normalisation {method!r}; known: {', '.join(NORMALIZE_METHODS)}")
    if len(s) == 0:
        return s.copy()
    if method == "raw":
        return np.clip(s, 0.0, 1.0)
    lo, hi = float(s.min()), float(s.max())
    if hi == lo:
        return np.full_like(s, 0.5)
    if method == "minmax":
        return (s - lo) / (hi - lo)
    # Average 0-based rank of each distinct value (scipy.stats.rankdata "average", minus one,
    # without importing scipy.stats, which costs seconds).
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts + 1) / 2.0
    return mean_rank[inverse.reshape(-1)] / (len(s) - 1.0)


@dataclass(frozen=True)
class ScoreMap:
    """values (h, w) float32 (NaN: no patch); count (h, w) int32 patches per pixel; downsample:
    level-0 px per map px (integer); level0_wh: the slide's (width, height)."""

    values: np.ndarray
    count: np.ndarray
    downsample: int
    level0_wh: tuple[int, int]

    @property
    def valid(self) -> np.ndarray:
        return self.count > 0

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape

    def with_values(self, values: np.ndarray) -> "ScoreMap":
        return ScoreMap(values.astype(np.float32), self.count, self.downsample, self.level0_wh)


def choose_downsample(level0_wh: tuple[int, int], patch_size_level0: float,
                      px_per_patch: int = DEFAULT_PX_PER_PATCH,
                      max_side_px: int = MAX_MAP_SIDE_PX) -> int:
    """Integer level-0 px per map px: about `px_per_patch` map px per patch side, and a map whose
    longer side is at most `max_side_px`."""
    by_patch = max(1, int(patch_size_level0 // max(1, px_per_patch)))
    by_cap = math.ceil(max(level0_wh) / max_side_px)
    return max(by_patch, by_cap, 1)


def score_map(coords: np.ndarray, scores: np.ndarray, patch_size_level0: float,
              level0_wh: tuple[int, int], downsample: int | None = None) -> ScoreMap:
    """Rasterise per-patch `scores` (N,) at level-0 top-left `coords` (N, 2) onto a map.

    Each patch covers map pixels [round(x/d), round((x+P)/d)) (at least one pixel), so edges land
    within d/2 level-0 px of the truth. Returns the mean score per pixel over the patches covering it.
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    s = check_scores(scores, len(coords))
    if s.ndim != 1:
        raise ValueError(f"score_map takes (N,) scores, got {s.shape}")
    if not patch_size_level0 > 0:
        raise ValueError(f"patch_size_level0 must be > 0, got {patch_size_level0}")
    w0, h0 = (int(v) for v in level0_wh)
    d = int(downsample) if downsample is not None else choose_downsample((w0, h0), patch_size_level0)
    if d < 1:
        raise ValueError(f"downsample must be >= 1, got {downsample}")
    w, h = math.ceil(w0 / d), math.ceil(h0 / d)

    def span(start, length):
        a = np.clip(np.rint(start / d), 0, length).astype(np.int64)
        b = np.clip(np.rint((start + patch_size_level0) / d), 0, length).astype(np.int64)
        return a, np.minimum(np.maximum(b, a + 1), length)

    x0, x1 = span(coords[:, 0], w)
    y0, y1 = span(coords[:, 1], h)
    keep = (x1 > x0) & (y1 > y0)  # patches entirely outside the slide contribute nothing
    x0, x1, y0, y1, s = x0[keep], x1[keep], y0[keep], y1[keep], s[keep]

    # Box sums via a 2-D difference array: O(N + h·w) whatever the patch size.
    def boxes(weights):
        diff = np.zeros((h + 1, w + 1), dtype=np.float64)
        np.add.at(diff, (y0, x0), weights)
        np.add.at(diff, (y0, x1), -weights)
        np.add.at(diff, (y1, x0), -weights)
        np.add.at(diff, (y1, x1), weights)
        return np.cumsum(np.cumsum(diff, axis=0), axis=1)[:h, :w]

    total = boxes(s)
    count = np.rint(boxes(np.ones_like(s))).astype(np.int32)
    values = np.full((h, w), np.nan, dtype=np.float32)
    has = count > 0
    values[has] = (total[has] / count[has]).astype(np.float32)
    return ScoreMap(values, count, d, (w0, h0))


def smooth_score_map(smap: ScoreMap, sigma_um: float, slide_mpp: float) -> ScoreMap:
    """Gaussian smoothing with sigma in µm, as a normalised convolution: each pixel averages only
    over pixels that have patches, so the tissue edge is not pulled towards zero. Pixels without
    patches stay NaN. sigma_um <= 0 returns `smap` unchanged."""
    if not sigma_um > 0:
        return smap
    if not slide_mpp > 0:
        raise ValueError(f"slide_mpp must be > 0, got {slide_mpp}")
    sigma_px = sigma_um / (slide_mpp * smap.downsample)
    valid = smap.valid
    weights = ndimage.gaussian_filter(valid.astype(np.float32), sigma_px, mode="constant")
    summed = ndimage.gaussian_filter(np.where(valid, smap.values, 0.0).astype(np.float32), sigma_px,
                                     mode="constant")
    out = np.full(smap.shape, np.nan, dtype=np.float32)
    ok = valid & (weights > 1e-6)
    out[ok] = summed[ok] / weights[ok]
    return smap.with_values(out)


def sample_nearest(smap_image: np.ndarray, downsample: int, level0_x: np.ndarray,
                   level0_y: np.ndarray) -> np.ndarray:
    """Rows/cols of a map image (h, w, ...) at level-0 positions (nearest map pixel): result
    shape (len(y), len(x), ...)."""
    h, w = smap_image.shape[:2]
    cols = np.clip(np.asarray(level0_x, dtype=np.int64) // downsample, 0, w - 1)
    rows = np.clip(np.asarray(level0_y, dtype=np.int64) // downsample, 0, h - 1)
    r0, r1, c0, c1 = rows.min(), rows.max(), cols.min(), cols.max()
    block = smap_image[r0:r1 + 1, c0:c1 + 1]
    return block[rows - r0][:, cols - c0]
