"""Object density maps (objects per mm² of tissue), written through the heatmap exports: the PNG
overlay with a colour bar (exports.overlay) and the pyramidal TIFF on the slide's geometry
(exports.pyramid_tiff) that the heatmap stage writes.

    kept detections (level-0 px) + tissue mask --density_map--> ScoreMap (per mm², NaN off tissue)
    ScoreMap --write_density_exports--> {slide}.{class}.density.png / .tif

A kernel density: detections are counted on a grid of `cell_um` cells, the counts and the tissue area
of each cell are smoothed by the same Gaussian (sigma in µm), and their ratio is objects per mm² of
tissue. Dividing by smoothed tissue rather than by the kernel's area keeps a field at the tissue edge
or beside a hole from being diluted by glass. The default sigma gives a Gaussian window whose area
(2 pi sigma²) is one high-power field, 0.237 mm²: the scale a pathologist counts mitoses on.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..exports.colormaps import apply_colormap, get_colormap
from ..exports.overlay import write_overlay_png
from ..exports.pyramid_tiff import write_heatmap_tiff
from ..exports.scoremap import MAX_MAP_SIDE_PX, ScoreMap

HPF_AREA_MM2 = 0.237
HPF_SIGMA_UM = math.sqrt(HPF_AREA_MM2 / (2 * math.pi)) * 1000      # ~194 µm
DENSITY_EXPORTS = ("png", "tif")
# A map cell whose smoothed tissue is below this fraction of one cell's area shows no density: the
# ratio there is mostly noise (a crumb of tissue far from any other).
_MIN_TISSUE_CELLS = 0.05


class DensityGrid:
    """Object counts on a grid of about `cell_um` over the slide's level-0 geometry, filled batch by
    batch (`add`), so a slide's millions of nuclei never sit in memory at once."""

    def __init__(self, level0_wh: tuple[int, int], slide_mpp: float, cell_um: float = 25.0):
        if not (slide_mpp > 0 and cell_um > 0):
            raise ValueError("slide_mpp and cell_um must be > 0")
        self.level0_wh = tuple(int(v) for v in level0_wh)
        self.slide_mpp = slide_mpp
        w0, h0 = self.level0_wh
        self.downsample = max(1, int(round(cell_um / slide_mpp)), math.ceil(max(w0, h0) / MAX_MAP_SIDE_PX))
        self.shape = (math.ceil(h0 / self.downsample), math.ceil(w0 / self.downsample))
        self.counts = np.zeros(self.shape, dtype=np.float64)

    def add(self, xy_level0: np.ndarray) -> None:
        xy = np.asarray(xy_level0, dtype=np.float64).reshape(-1, 2)
        h, w = self.shape
        cols = np.clip((xy[:, 0] // self.downsample).astype(np.int64), 0, w - 1)
        rows = np.clip((xy[:, 1] // self.downsample).astype(np.int64), 0, h - 1)
        self.counts += np.bincount(rows * w + cols, minlength=h * w).reshape(h, w)

    def to_map(self, tissue_mask: np.ndarray, mask_mpp: float, sigma_um: float = HPF_SIGMA_UM) -> ScoreMap:
        """Objects per mm² of tissue (NaN off tissue). tissue_mask: (h, w) bool at `mask_mpp` µm/px
        covering the slide from its top-left corner."""
        if not (mask_mpp > 0 and sigma_um > 0):
            raise ValueError("mask_mpp and sigma_um must be > 0")
        cell_um = self.downsample * self.slide_mpp
        cell_mm2 = (cell_um / 1000.0) ** 2
        tissue = _tissue_fraction(np.asarray(tissue_mask, dtype=bool), mask_mpp, cell_um, self.shape)
        area_mm2 = ndimage.gaussian_filter(tissue * cell_mm2, sigma_um / cell_um, mode="constant")
        smoothed = ndimage.gaussian_filter(self.counts, sigma_um / cell_um, mode="constant")
        valid = (tissue > 0) & (area_mm2 > _MIN_TISSUE_CELLS * cell_mm2)
        values = np.full(self.shape, np.nan, dtype=np.float32)
        values[valid] = (smoothed[valid] / area_mm2[valid]).astype(np.float32)
        return ScoreMap(values, valid.astype(np.int32), self.downsample, self.level0_wh)


def density_map(xy_level0: np.ndarray, level0_wh: tuple[int, int], slide_mpp: float, tissue_mask: np.ndarray,
                mask_mpp: float, *, sigma_um: float = HPF_SIGMA_UM, cell_um: float = 25.0) -> ScoreMap:
    """Objects per mm² of tissue for the points `xy_level0` (N, 2) level-0 px (DensityGrid at once)."""
    grid = DensityGrid(level0_wh, slide_mpp, cell_um)
    grid.add(xy_level0)
    return grid.to_map(tissue_mask, mask_mpp, sigma_um)


def _tissue_fraction(mask: np.ndarray, mask_mpp: float, cell_um: float, shape: tuple[int, int]) -> np.ndarray:
    """Fraction of each map cell covered by tissue: mask pixels binned by their centres (the mask
    first repeated until a pixel is at most half a cell, so every cell receives some)."""
    k = max(1, math.ceil(2 * mask_mpp / cell_um))
    if k > 1:
        mask = np.repeat(np.repeat(mask, k, axis=0), k, axis=1)
    px_um = mask_mpp / k
    h, w = shape
    rows = np.minimum(((np.arange(mask.shape[0]) + 0.5) * px_um / cell_um).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(mask.shape[1]) + 0.5) * px_um / cell_um).astype(np.int64), w - 1)
    index = (rows[:, None] * w + cols[None, :]).ravel()
    tissue = np.bincount(index, weights=mask.ravel().astype(np.float64), minlength=h * w)
    total = np.bincount(index, minlength=h * w)
    return (tissue / np.maximum(total, 1)).reshape(h, w)


def write_slide_densities(candidates: Path, slide, tissue_mask: np.ndarray, mask_mpp: float, *, slide_id: str,
                          thresholds: dict[str, float], paths: dict[str, dict[str, Path]], sigma_um: float,
                          colormap: str = "jet", alpha: float = 0.5, png_max_px: int = 2048,
                          chunk: int = 100_000) -> dict[str, float]:
    """One density map per class of `paths` ({class: density_paths(...)}) from a candidates CSV,
    counting the detections the outputs keep (score >= the class's threshold), streamed in chunks.
    Returns {class: maximum objects per mm²}."""
    from .outputs import iter_candidates

    grids = {c: DensityGrid(slide.dimensions, slide.mpp) for c in paths}
    pending: dict[str, list] = {c: [] for c in paths}
    for x, y, name, score in iter_candidates(candidates):
        if name in grids and score >= thresholds[name]:
            pending[name].append((x, y))
            if len(pending[name]) >= chunk:
                grids[name].add(np.array(pending[name]))
                pending[name].clear()
    top = {}
    for c, grid in grids.items():
        grid.add(np.array(pending[c]).reshape(-1, 2))
        top[c] = write_density_exports(slide, grid.to_map(tissue_mask, mask_mpp, sigma_um), paths[c],
                                       slide_id=slide_id, class_name=c, sigma_um=sigma_um, colormap=colormap,
                                       alpha=alpha, png_max_px=png_max_px)
    return top


def density_paths(out_dir: str | os.PathLike, slide_id: str, class_name: str) -> dict[str, Path]:
    """{slide_id}.{class}.density.png / .tif in `out_dir` (names checked by the caller)."""
    return {e: Path(out_dir) / f"{slide_id}.{class_name}.density.{e}" for e in DENSITY_EXPORTS}


def write_density_exports(slide, smap: ScoreMap, paths: dict[str, Path], *, slide_id: str, class_name: str,
                          sigma_um: float, colormap: str = "jet", alpha: float = 0.5,
                          png_max_px: int = 2048) -> float:
    """Colour `smap` from 0 to its maximum (objects per mm²), write the PNG overlay and the pyramidal
    TIFF (each atomically); returns the maximum density. An empty map (no objects) is drawn at the
    low end of the scale, its bar labelled 0."""
    get_colormap(colormap)
    top = float(np.nanmax(smap.values)) if np.isfinite(smap.values).any() else 0.0
    scale = top if top > 0 else 1.0
    shown = smap.with_values(smap.values / scale)
    ticks = [(float(t), f"{t * top:.3g}") for t in np.linspace(0.0, 1.0, 5)]
    # "um", not "µm": PIL's default font has no µ.
    title = f"{slide_id}: {class_name} per mm2 of tissue, Gaussian sigma {sigma_um:.0f} um"
    description = {"Slide": slide_id, "Density": f"{class_name} per mm2 of tissue", "SigmaUm": round(sigma_um, 1),
                   "MaxPerMm2": round(top, 4), "Colormap": colormap, "Downsample": smap.downsample}
    if "png" in paths:
        write_overlay_png(paths["png"], slide.thumbnail(png_max_px), shown, colormap=colormap, alpha=alpha,
                          ticks=ticks, title=title, text={k.lower(): v for k, v in description.items()})
    if "tif" in paths:
        colours = apply_colormap(shown.values, colormap)
        colours[~shown.valid] = (255, 255, 255)
        write_heatmap_tiff(paths["tif"], colours, shown.downsample, slide.dimensions, slide.mpp,
                           description_fields=description)
    return top
