"""Stage 1 — tile: slide → tissue mask → patch grid at target µm/px → coords.h5 (+ GeoJSON, QC PNG).
A volume row: scan → canonical RAS, resampled → body mask → 2.5-D instances → coords.h5 with coords
(N, 3) (the `volumes` config section; wsi_pipeline/volumes/stages.py).

Outputs per slide in RUN/tiles/: {id}.tissue.geojson and {id}.qc.png first, {id}.coords.h5 last;
all atomic, and coords.h5 is the completion marker a rerun checks: with the config hash and the
identity of the slide file it was made from (size, content fingerprint, level dimensions:
wsi_pipeline/slides/identity.py), so a slide replaced at the same path is tiled again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from wsi_pipeline.errors import SlideError
from wsi_pipeline.io import atomic_path, remove_stale_temps, write_text_atomic
from wsi_pipeline.run.config import Config
from wsi_pipeline.run.folder import RunFolder
from wsi_pipeline.run.manifest import Manifest, SlideRecord
from wsi_pipeline.slides import open_slide
from wsi_pipeline.slides.identity import SlideIdentity, slide_identity
from wsi_pipeline.tiling import tissue
from wsi_pipeline.tiling.coords_h5 import coords_h5_is_valid, read_slide_identity, write_coords_h5
from wsi_pipeline.tiling.grid import plan_geometry, tile_tissue, upsampling_needed

from .base import BATCH, CONFIG, FORCE, MANIFEST, NO_PROGRESS, SLIDES, Stage, StageReport, arg
from .batch import run_batch

STAGE = "tile"
log = logging.getLogger("wsi_pipeline")


def tile_config_hash(cfg: Config, record: SlideRecord) -> str:
    """What a coords.h5 depends on: tissue + tiling settings and the manifest's mpp override."""
    return f"{cfg.section_hash('tissue', 'tiling')}-mpp{record.mpp if record.mpp else 'file'}"


def tile_slide(record: SlideRecord, cfg: Config, run: RunFolder, *, force: bool = False) -> str:
    """Tile one slide; returns "done", or "skipped" when a valid coords.h5 for this config and this
    slide file exists. A volume row (modality CT/MR) is cut into its 2.5-D instances instead
    (wsi_pipeline/volumes/stages.py)."""
    if record.is_volume:
        from wsi_pipeline.volumes.stages import tile_volume

        return tile_volume(record, cfg, run, force=force)
    out = run.coords_h5(record.slide_id)
    config_hash = tile_config_hash(cfg, record)
    if not record.path.is_file():
        raise SlideError(record.slide_id, f"file not found: {record.path}")

    with open_slide(record.path, slide_id=record.slide_id, backend=cfg.slides.backend,
                    mpp_override=record.mpp) as slide:
        # Outputs are current only for the file they were made from: a slide replaced at the same
        # path (or a coords.h5 from before identities were recorded) is tiled again.
        identity = slide_identity(record.path, slide.level_dimensions)
        if (not force and coords_h5_is_valid(out, config_hash, slide=identity)
                and run.tissue_geojson(record.slide_id).is_file()):
            return "skipped"
        _drop_if_replaced(record, out, config_hash, identity)
        _check_no_upsampling(record, slide.mpp, slide.mpp_source, cfg)
        t = cfg.tissue
        image, _ = slide.read_at_mpp(t.mask_mpp)
        w0, h0 = slide.dimensions
        scale_xy = (w0 / image.shape[1], h0 / image.shape[0])   # level-0 px per mask px
        mask_mpp = slide.mpp * scale_xy[0]
        mask = tissue.detect_tissue(
            image, mask_mpp, saturation_threshold=t.saturation_threshold,
            min_saturation=t.min_saturation, median_kernel_um=t.median_kernel_um,
            closing_um=t.closing_um, min_tissue_area_um2=t.min_tissue_area_um2,
            min_hole_area_um2=t.min_hole_area_um2, keep_holes=t.keep_holes)
        polygons = [[ring * np.asarray(scale_xy) for ring in poly]
                    for poly in tissue.mask_to_polygons(mask, scale=1.0)]
        geometry = plan_geometry(slide.mpp, slide.level_downsamples, cfg.tiling.target_mpp,
                                 cfg.tiling.patch_size_px, cfg.tiling.overlap_px, cfg.tiling.mpp_tolerance,
                                 allow_upsampling=cfg.tiling.allow_upsampling)
        grid = tile_tissue(slide.dimensions, geometry, mask, scale_xy, cfg.tiling.min_tissue_fraction)

        run.tiles_dir.mkdir(parents=True, exist_ok=True)
        geojson = tissue.tissue_geojson(polygons)
        write_text_atomic(run.tissue_geojson(record.slide_id), json.dumps(geojson))
        qc = tissue.render_qc(image, polygons, scale_xy[0])
        qc = _draw_patches(qc, grid.coords, geometry.patch_size_level0, scale_xy)
        with atomic_path(run.qc_png(record.slide_id)) as tmp:
            Image.fromarray(qc).save(tmp)
        if len(grid.coords) == 0:
            tissue_um2 = float(mask.sum()) * mask_mpp ** 2
            raise SlideError(record.slide_id,
                             f"no patches with tissue fraction >= {cfg.tiling.min_tissue_fraction} "
                             f"(tissue found: {tissue_um2 / 1e6:.3f} mm²); see {run.qc_png(record.slide_id)}")
        write_coords_h5(out, grid, slide_id=record.slide_id, level0_wh=slide.dimensions,
                        mpp_source=slide.mpp_source, config_hash=config_hash, slide=identity)
    return "done"


def _drop_if_replaced(record: SlideRecord, out: Path, config_hash: str, identity: SlideIdentity) -> None:
    """A complete coords.h5 made from another file is removed before re-tiling, with the reason:
    if re-tiling fails it must not stay behind as this slide's completion marker."""
    if not coords_h5_is_valid(out, config_hash):
        return
    recorded = read_slide_identity(out)
    if recorded is None:
        log.warning("slide %r: re-tiling: %s records no slide identity (made by an older version)",
                    record.slide_id, out)
        return
    if identity.matches(recorded):   # --force on an unchanged slide: the old output stays until replaced
        return
    log.warning("slide %r: re-tiling: the slide file changed since it was tiled (%s)", record.slide_id,
                identity.difference(recorded))
    out.unlink(missing_ok=True)


def _check_no_upsampling(record: SlideRecord, slide_mpp: float, mpp_source: str, cfg: Config) -> None:
    """Checked before any pixel is read: a target finer than the scan is this slide's error."""
    tiling = cfg.tiling
    if tiling.allow_upsampling or not upsampling_needed(slide_mpp, tiling.target_mpp, tiling.mpp_tolerance):
        return
    raise SlideError(record.slide_id,
                     f"tiling.target_mpp {tiling.target_mpp:g} µm/px is finer than the slide's "
                     f"{slide_mpp:g} µm/px (from {mpp_source}): patches would be upsampled "
                     f"{slide_mpp / tiling.target_mpp:.3g}×; set tiling.target_mpp >= {slide_mpp:g}, "
                     f"or tiling.allow_upsampling: true to upsample on purpose")


def _draw_patches(rgb: np.ndarray, coords: np.ndarray, size_level0: int,
                  scale_xy: tuple[float, float]) -> np.ndarray:
    """Outline kept patches on the QC thumbnail (thin, yellow) so the grid can be checked by eye."""
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    sx, sy = scale_xy
    for x, y in coords:
        # Patches smaller than a thumbnail pixel (allowed upsampling) still get a one-pixel box.
        x0, y0 = x / sx, y / sy
        draw.rectangle([x0, y0, max(x0, (x + size_level0) / sx - 1), max(y0, (y + size_level0) / sy - 1)],
                       outline=(230, 200, 0))
    return np.asarray(image)


def run_tile(manifest: Manifest, cfg: Config, run_dir: str | Path, *, force: bool = False,
             progress: bool = True) -> StageReport:
    """Tile every slide in `manifest` into `run_dir`; failures are recorded, the batch goes on."""
    run = RunFolder(run_dir)
    run.tiles_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(run.tiles_dir)
    report = run_batch(STAGE, manifest, run, lambda r: tile_slide(r, cfg, run, force=force), progress=progress)
    report.outputs = {sid: str(run.coords_h5(sid)) for sid in [*report.done, *report.skipped]}
    return report


OUT = arg("--out", required=True, help="run folder")
TILE = Stage(name=STAGE, sections=("slides", "tissue", "tiling"), volume_sections=("volumes",), run=run_tile, record_root_config=True,
             help="stage 1: tissue detection and µm-exact patch coordinates",
             args=(MANIFEST, CONFIG, OUT, SLIDES, FORCE, NO_PROGRESS, *BATCH))
