"""Slide -> RUN/tiles/{id}.coords.h5: which pixels are tissue, which patches cover it.

    tissue.py     thumbnail -> tissue mask, holes, tissue GeoJSON
    grid.py       pyramid level and read size for a target µm/px (`plan_geometry`), the patch grid
                  kept over the mask (`tile_tissue`)
    coords_h5.py  the coords file: coords (N, k) and the attributes every later stage checks

`from wsi_pipeline.tiling import plan_geometry, tile_tissue` (the path before grid.py existed) still
works: grid.py's names load from here on first use.
"""

import importlib

_GRID_NAMES = ("PatchGeometry", "TileGrid", "grid_positions", "plan_geometry", "tile_tissue",
               "tissue_fractions", "upsampling_needed")


def __getattr__(name: str):
    if name in _GRID_NAMES:
        return getattr(importlib.import_module(f"{__name__}.grid"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
