"""Lesion mask outputs: probability map -> binary mask at the mask resolution -> GeoJSON + pyramidal TIFF.

    prob (working grid) --lesion_mask--> mask (h, w) bool on the mask grid (threshold, small pieces dropped)
    mask --lesion_geojson--> QuPath annotations "Lesion", polygons in level-0 px (tissue.mask_to_polygons)
    mask --write_mask_tiff--> pyramidal TIFF on the slide's level-0 geometry and mpp

The TIFF has the slide's full level-0 width and height (not the mask's), so OpenSlide, tiffslide and
QuPath overlay it pixel for pixel on the slide and report the slide's mpp; it is written tile by tile
from the small mask (`exports.write_heatmap_tiff`), so memory stays at the mask plus a few tiles
however large the slide, and the constant mask tiles deflate to a few hundred bytes. Pixel values:
255 (all three channels) = lesion, 0 = not lesion; each mask pixel is a d x d block of level-0 pixels.
"""

from __future__ import annotations

import os

import numpy as np
from scipy import ndimage

from ..exports.pyramid_tiff import write_heatmap_tiff
from ..tiling.tissue import mask_to_polygons, polygon_area, tissue_geojson
from .grid import SlideGrid, resample

LESION_NAME = "Lesion"
LESION_RGB = (220, 40, 40)
# 4-connected, as mask_to_polygons outlines regions.
_STRUCTURE = ndimage.generate_binary_structure(2, 1)


def lesion_mask(prob: np.ndarray, prob_grid: SlideGrid, mask_grid: SlideGrid, *, threshold: float = 0.5,
                min_area_um2: float = 0.0) -> np.ndarray:
    """(h, w) bool lesion mask on `mask_grid`: `prob` resampled bilinearly, thresholded (>=), and
    4-connected pieces smaller than `min_area_um2` dropped."""
    on_mask = resample(prob, prob_grid, mask_grid, order=1)
    mask = on_mask >= threshold
    if min_area_um2 > 0 and mask.any():
        labels, n = ndimage.label(mask, structure=_STRUCTURE)
        areas_um2 = np.bincount(labels.ravel(), minlength=n + 1) * mask_grid.mpp ** 2
        keep = areas_um2 >= min_area_um2
        keep[0] = False
        mask = keep[labels]
    return mask


def lesion_geojson(mask: np.ndarray, grid: SlideGrid, *, name: str = LESION_NAME,
                   color: tuple[int, int, int] = LESION_RGB) -> dict:
    """FeatureCollection of one QuPath annotation (Polygon with holes) per 4-connected lesion piece,
    in level-0 pixels, classified `name`; measurements area_px2 (level-0 px²) and area_um2."""
    polygons = mask_to_polygons(mask, scale=float(grid.downsample))
    collection = tissue_geojson(polygons, name=name, color=color)
    for feature, polygon in zip(collection["features"], polygons):
        feature["properties"]["measurements"]["area_um2"] = float(polygon_area(polygon) * grid.slide_mpp ** 2)
    return collection


def write_mask_tiff(path: str | os.PathLike, mask: np.ndarray, grid: SlideGrid, *,
                    app_mag: float | None = None, description_fields: dict | None = None) -> None:
    """The mask as an Aperio-layout pyramidal TIFF of the slide's level-0 size at the slide's mpp."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != grid.shape:
        raise ValueError(f"mask {mask.shape} does not match the grid {grid.shape}")
    colour = np.repeat((mask.astype(np.uint8) * 255)[..., None], 3, axis=2)
    fields = {"Content": "lesion mask (255 = lesion)", "MaskDownsample": grid.downsample}
    write_heatmap_tiff(path, colour, grid.downsample, grid.level0_wh, grid.slide_mpp, app_mag=app_mag,
                       description_fields={**fields, **(description_fields or {})})
