"""Per-patch CAM scores -> a CAM map on a `SlideGrid`.

    coords (N, 2) level-0 top-left, scores (N,) in [0, 1], patch_size_level0 --cam_map--> (h, w) float32

Each patch's score is placed at its centre on the patch lattice (the tiling stride, estimated from
the coordinates) and the map is the bilinear interpolation between neighbouring centres, with the
weights of missing neighbours (no patch there) dropped and the rest renormalised, so the value at a
tissue edge is that of the nearest patches rather than pulled towards zero. A grid pixel gets a value
only where its centre lies inside some patch; elsewhere the map is NaN (no CAM there).

CAM file (`save_patch_cams` / `load_patch_cams`), RUN/segment/cams/{slide_id}.npz:
    coords (N, 2) int64 level-0 top-left, scores (N,) float32 in [0, 1], patch_size_level0 float64,
    lesion_class, source, model_hash (unicode scalars), format_version int64.
Any stage-1 model (or a user) can provide CAMs by writing this file; no pickles are read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..io import atomic_path
from .grid import SlideGrid


def estimate_stride(positions: np.ndarray, patch_size_level0: float) -> float:
    """Tiling stride along one axis: the smallest gap between distinct positions that is at least a
    quarter patch (tiling rounds positions to whole pixels, so gaps jitter by one pixel)."""
    unique = np.unique(np.asarray(positions, dtype=np.float64))
    gaps = np.diff(unique)
    gaps = gaps[gaps >= 0.25 * patch_size_level0]
    return float(gaps.min()) if gaps.size else float(patch_size_level0)


def _covered_spans(starts: np.ndarray, size: float, d: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Grid pixel index ranges [first, stop) whose centres (i + 0.5)·d lie in [start, start + size)."""
    first = np.ceil(starts / d - 0.5).astype(np.int64)
    stop = np.ceil((starts + size) / d - 0.5).astype(np.int64)
    return np.clip(first, 0, n), np.clip(stop, 0, n)


def patch_coverage(coords: np.ndarray, patch_size_level0: float, grid: SlideGrid) -> tuple[np.ndarray, np.ndarray]:
    """(count (h, w) int32 patches covering each grid pixel centre, index arrays used) via a 2-D
    difference array: O(N + h·w) whatever the patch size."""
    h, w = grid.shape
    d = grid.downsample
    x0, x1 = _covered_spans(coords[:, 0], patch_size_level0, d, w)
    y0, y1 = _covered_spans(coords[:, 1], patch_size_level0, d, h)
    diff = np.zeros((h + 1, w + 1), dtype=np.int64)
    np.add.at(diff, (y0, x0), 1)
    np.add.at(diff, (y0, x1), -1)
    np.add.at(diff, (y1, x0), -1)
    np.add.at(diff, (y1, x1), 1)
    return diff.cumsum(0).cumsum(1)[:h, :w].astype(np.int32), np.stack([x0, x1, y0, y1])


def cam_map(coords: np.ndarray, scores: np.ndarray, patch_size_level0: float, grid: SlideGrid) -> np.ndarray:
    """Bilinear CAM map on `grid`: (h, w) float32, NaN where no patch covers the pixel centre.

    coords: (N, 2) level-0 (x, y) top-left of each patch; scores: (N,) finite.
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(scores) != len(coords):
        raise ValueError(f"{len(scores)} CAM scores for {len(coords)} patches")
    if not np.isfinite(scores).all():
        raise ValueError("CAM scores contain NaN or infinite values")
    if not patch_size_level0 > 0:
        raise ValueError(f"patch_size_level0 must be > 0, got {patch_size_level0}")
    h, w = grid.shape
    out = np.full((h, w), np.nan, dtype=np.float32)
    if len(coords) == 0:
        return out
    p = float(patch_size_level0)
    d = grid.downsample
    stride_x = estimate_stride(coords[:, 0], p)
    stride_y = estimate_stride(coords[:, 1], p)
    origin = coords.min(axis=0)
    col = np.round((coords[:, 0] - origin[0]) / stride_x).astype(np.int64)
    row = np.round((coords[:, 1] - origin[1]) / stride_y).astype(np.int64)
    lattice_sum = np.zeros((row.max() + 1, col.max() + 1))
    lattice_n = np.zeros_like(lattice_sum)
    np.add.at(lattice_sum, (row, col), scores)
    np.add.at(lattice_n, (row, col), 1.0)
    valid = lattice_n > 0
    lattice = np.where(valid, lattice_sum / np.maximum(lattice_n, 1), 0.0)

    # Grid pixel centres in lattice units (lattice node k sits at origin + k·stride + p/2).
    lat_r = ((np.arange(h) + 0.5) * d - origin[1] - p / 2) / stride_y
    lat_c = ((np.arange(w) + 0.5) * d - origin[0] - p / 2) / stride_x
    rr, cc = np.meshgrid(lat_r, lat_c, indexing="ij")
    # "grid-constant" interpolates against zeros beyond the lattice's outer nodes; plain "constant"
    # would return cval for every point outside them (e.g. all of a one-row lattice).
    weight = ndimage.map_coordinates(valid.astype(np.float64), [rr, cc], order=1, mode="grid-constant", cval=0.0)
    summed = ndimage.map_coordinates(lattice, [rr, cc], order=1, mode="grid-constant", cval=0.0)

    coverage, (x0, x1, y0, y1) = patch_coverage(coords, p, grid)
    covered = coverage > 0
    good = covered & (weight > 1e-6)
    out[good] = (summed[good] / weight[good]).astype(np.float32)
    # Covered pixels more than one lattice step from any patch centre (tilings overlapping by more
    # than half a patch): the mean of the patches covering them.
    rest = covered & ~good
    if rest.any():
        diff = np.zeros((h + 1, w + 1))
        np.add.at(diff, (y0, x0), scores)
        np.add.at(diff, (y0, x1), -scores)
        np.add.at(diff, (y1, x0), -scores)
        np.add.at(diff, (y1, x1), scores)
        box_sum = diff.cumsum(0).cumsum(1)[:h, :w]
        out[rest] = (box_sum[rest] / coverage[rest]).astype(np.float32)
    return out


# --------------------------------------------------------------------------------------------
# The CAM file: RUN/segment/cams/{slide_id}.npz
# --------------------------------------------------------------------------------------------

CAM_FORMAT_VERSION = 1


@dataclass
class PatchCams:
    """Per-patch lesion scores of one slide: the input of stage 2.

    coords (N, 2) level-0 top-left (x, y); scores (N,) in [0, 1] (probability of the lesion class,
    or a min-max normalised score times the slide probability); patch_size_level0: patch side in level-0 px; lesion_class: the
    class the scores are for ("" unknown); source: where they came from; model_hash: identity of the
    fold ensemble that made them ("" when not made by one).
    """

    coords: np.ndarray
    scores: np.ndarray
    patch_size_level0: float
    lesion_class: str = ""
    source: str = ""
    model_hash: str = ""

    def __post_init__(self):
        self.coords = np.asarray(self.coords, dtype=np.int64).reshape(-1, 2)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        if len(self.scores) != len(self.coords):
            raise ValueError(f"{len(self.scores)} CAM scores for {len(self.coords)} patches")
        if not np.isfinite(self.scores).all() or (self.scores < 0).any() or (self.scores > 1).any():
            raise ValueError("CAM scores must be finite and in [0, 1]")
        if not float(self.patch_size_level0) > 0:
            raise ValueError(f"patch_size_level0 must be > 0, got {self.patch_size_level0}")
        self.patch_size_level0 = float(self.patch_size_level0)


def save_patch_cams(path: str | os.PathLike, cams: PatchCams) -> None:
    """Write `cams` as an .npz (no pickled objects; strings as unicode arrays), atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, coords=cams.coords, scores=cams.scores,
                     patch_size_level0=np.float64(cams.patch_size_level0),
                     lesion_class=np.str_(cams.lesion_class), source=np.str_(cams.source),
                     model_hash=np.str_(cams.model_hash), format_version=np.int64(CAM_FORMAT_VERSION))


def load_patch_cams(path: str | os.PathLike) -> PatchCams:
    """Read a CAM .npz (coords, scores, patch_size_level0 required; the rest optional)."""
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in ("coords", "scores", "patch_size_level0") if k not in data]
        if missing:
            raise ValueError(f"{path}: missing {', '.join(missing)}")

        def text(key: str) -> str:
            return str(data[key][()]) if key in data else ""

        return PatchCams(data["coords"], data["scores"], float(data["patch_size_level0"]),
                         lesion_class=text("lesion_class"), source=text("source"),
                         model_hash=text("model_hash"))
