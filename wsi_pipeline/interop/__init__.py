"""Our run's features in the layouts CLAM, TRIDENT and STAMP read (`wsi-pipeline export --to X`).

    slide = load_export_slide(features_h5, record)       # features, level-0 coords, geometry
    target = get_target("clam")                          # clam | trident | stamp
    row = target.write_slide(out, slide)                 # that tool's per-slide files
    target.write_tables(out, rows)                       # its CSVs, for the slides written

Each tool measures a patch its own way; each writer states our patch in that tool's terms so that
its reader sees the same tissue (the µm footprint, `ExportSlide.footprint_um`):
  CLAM     patch_size px read at patch_level (no resize): our read_size_px at our patch_level
  TRIDENT  patch_size px at target_magnification, level-0 side patch_size_level0; magnifications
           nominal, 10 / mpp (wsi_pipeline.tiling.coords_h5)
  STAMP    coords in µm, tile_size_um, tile_size_px (µm/px of the features = their ratio)
The layouts and the upstream reading code each follows are in the writers' modules.
"""

from __future__ import annotations

from .common import ExportOut, ExportSlide, load_export_slide
from .targets import ExportTarget, get_target, target_names

# The writers register themselves into targets.py's registry on import (this order is --to's).
from . import clam, trident, stamp  # noqa: E402,F401  (registration side effect)

TARGETS = target_names()

__all__ = ["TARGETS", "ExportOut", "ExportSlide", "ExportTarget", "get_target", "load_export_slide"]
