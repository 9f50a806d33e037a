"""Heatmap exports for pathologists: per-patch scores -> PNG overlay, pyramidal TIFF, QuPath
GeoJSON and top-k patch images.

    export_heatmaps(slide, coords, scores, patch_size_level0, out_dir, slide_id, cfg)

writes, in `out_dir` (each file atomically; which ones: `cfg.exports`):
    {slide_id}.png       thumbnail with the heatmap blended in + colour bar (overlay.py)
    {slide_id}.tif       colourised heatmap as a pyramidal TIFF on the slide's level-0 geometry
                         and mpp (pyramid_tiff.py)
    {slide_id}.geojson   one QuPath tile per patch with measurements and a low/medium/high class
                         (qupath.py)
    {slide_id}_topk/     k highest / lowest scoring patch images + index.csv (topk.py)
The building blocks (scoremap.py, colormaps.py) work on plain arrays.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .colormaps import apply_colormap, get_colormap, list_colormaps
from .overlay import blend_on_thumbnail, write_overlay_png
from .pyramid_tiff import write_heatmap_tiff
from .qupath import class_colours, patch_features, score_classes, write_geojson
from .scoremap import (
    ScoreMap,
    check_scores,
    choose_downsample,
    normalize_scores,
    score_map,
    smooth_score_map,
)
from .topk import select_topk, write_topk

__all__ = [
    "export_heatmaps", "HeatmapExports", "export_paths",
    "normalize_scores", "score_map", "smooth_score_map", "choose_downsample", "ScoreMap",
    "apply_colormap", "get_colormap", "list_colormaps", "blend_on_thumbnail", "write_overlay_png",
    "write_heatmap_tiff", "patch_features", "score_classes", "class_colours", "write_geojson",
    "select_topk", "write_topk",
]

# TIFF background (no patch): white, like glass in the slide.
BACKGROUND_RGB = (255, 255, 255)

_NORMALIZE_TITLES = {"rank": "percentile within slide", "minmax": "min-max scaled", "raw": "raw score"}


@dataclass
class HeatmapExports:
    """What `export_heatmaps` wrote: paths by export name, and the map it drew."""

    paths: dict[str, Path]
    score_map: ScoreMap
    normalized: np.ndarray          # (N,) primary score on the colour scale [0, 1]
    classes: np.ndarray             # (N,) 0 low, 1 medium, 2 high
    topk: list[dict] = field(default_factory=list)


def export_paths(out_dir: str | os.PathLike, slide_id: str,
                 exports=("png", "tif", "geojson", "topk")) -> dict[str, Path]:
    """Where each export of `slide_id` goes in `out_dir`."""
    out_dir = Path(out_dir)
    names = {"png": f"{slide_id}.png", "tif": f"{slide_id}.tif", "geojson": f"{slide_id}.geojson",
             "topk": f"{slide_id}_topk"}
    return {e: out_dir / names[e] for e in exports}


def colour_bar_ticks(scores: np.ndarray, normalize: str, n_ticks: int = 5) -> list[tuple[float, str]]:
    """Tick positions on [0, 1] and their labels in the units the user thinks in."""
    positions = np.linspace(0.0, 1.0, n_ticks)
    if normalize == "rank":
        return [(float(t), f"{t * 100:.0f}%") for t in positions]
    if normalize == "minmax":
        lo, hi = float(np.min(scores)), float(np.max(scores))
        return [(float(t), f"{lo + t * (hi - lo):.3g}") for t in positions]
    return [(float(t), f"{t:.3g}") for t in positions]


def _app_mag(slide) -> float | None:
    for key in ("openslide.objective-power", "aperio.AppMag"):
        try:
            return float(slide.properties[key])
        except (KeyError, TypeError, ValueError):
            continue
    return None


def export_heatmaps(slide, coords: np.ndarray, scores: np.ndarray, patch_size_level0: float,
                    out_dir: str | os.PathLike, slide_id: str, cfg, *,
                    score_names: list[str] | None = None, primary: int | str = 0,
                    patch_size_px: int | None = None, downsample: int | None = None,
                    caption: str | None = None) -> HeatmapExports:
    """Write the heatmap exports of one slide.

    Args:
        slide: an open `wsi_pipeline.slides.Slide` (geometry, mpp, thumbnail and patch pixels).
        coords: (N, 2) level-0 top-left (x, y) of each patch.
        scores: (N,) or (N, C) per-patch scores; column `primary` is mapped, every column goes
            into the GeoJSON measurements (raw values).
        patch_size_level0: patch side in level-0 px.
        cfg: a `HeatmapConfig` (normalize, smooth_um, colormap, alpha, png_max_px, top_k, exports,
            object_type, class_thresholds) or a full `Config`.
        score_names: C names (default "score", or "score_0".. for C > 1).
        patch_size_px: side of the top-k images (default min(patch_size_level0, 256)).
        downsample: level-0 px per heatmap pixel (default `choose_downsample`).
        caption: appended to the PNG title and recorded in its text chunks, e.g. the slide-level
            prediction: a within-slide normalised map looks alike on a benign and a tumour slide.
    """
    cfg = getattr(cfg, "heatmap", cfg)
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    s = check_scores(scores, len(coords))
    table = s.reshape(len(s), -1)
    if score_names is None:
        score_names = ["score"] if table.shape[1] == 1 else [f"score_{i}" for i in range(table.shape[1])]
    score_names = [str(n) for n in score_names]
    if len(score_names) != table.shape[1] or len(set(score_names)) != len(score_names):
        raise ValueError(f"need {table.shape[1]} distinct score names, got {score_names}")
    col = score_names.index(primary) if isinstance(primary, str) else int(primary)
    if len(coords) == 0:
        raise ValueError("no patches to draw")
    get_colormap(cfg.colormap)  # unknown names fail before anything is written
    primary_name = score_names[col]
    raw = table[:, col]

    normalized = normalize_scores(raw, cfg.normalize)
    smap = score_map(coords, normalized, patch_size_level0, slide.dimensions, downsample)
    smap = smooth_score_map(smap, cfg.smooth_um, slide.mpp)
    thresholds = tuple(float(t) for t in cfg.class_thresholds)
    classes = score_classes(normalized, thresholds)
    paths = export_paths(out_dir, slide_id, tuple(cfg.exports))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    # "um", not "µm": PIL's default font has no µ.
    smoothing = f", smoothed sigma {cfg.smooth_um:g} um" if cfg.smooth_um > 0 else ""
    description = {"Slide": slide_id, "Score": primary_name, "Normalize": cfg.normalize,
                   "Colormap": cfg.colormap, "Downsample": smap.downsample, "SmoothUm": cfg.smooth_um}
    if caption:
        description["Caption"] = caption

    topk_rows: list[dict] = []
    if "png" in paths:
        write_overlay_png(
            paths["png"], slide.thumbnail(cfg.png_max_px), smap, colormap=cfg.colormap, alpha=cfg.alpha,
            ticks=colour_bar_ticks(raw, cfg.normalize),
            title=f"{slide_id}: {primary_name}, {_NORMALIZE_TITLES[cfg.normalize]}{smoothing}"
                  + (f" | {caption}" if caption else ""),
            text={k.lower(): v for k, v in description.items()})
    if "tif" in paths:
        colours = apply_colormap(smap.values, cfg.colormap)
        colours[~smap.valid] = BACKGROUND_RGB
        write_heatmap_tiff(paths["tif"], colours, smap.downsample, slide.dimensions, slide.mpp,
                           app_mag=_app_mag(slide), description_fields=description)
    if "geojson" in paths:
        measurements = {name: table[:, i] for i, name in enumerate(score_names)}
        measurements[f"{primary_name} ({cfg.normalize})"] = normalized
        collection = patch_features(coords, patch_size_level0, measurements, classes,
                                    object_type=cfg.object_type,
                                    class_colours_rgb=class_colours(thresholds, cfg.colormap),
                                    id_prefix=slide_id)
        write_geojson(paths["geojson"], collection)
    if "topk" in paths:
        size_px = int(patch_size_px) if patch_size_px else int(min(round(patch_size_level0), 256))
        topk_rows = write_topk(paths["topk"], slide, coords, patch_size_level0, raw, normalized,
                               cfg.top_k, size_px)
    return HeatmapExports(paths=paths, score_map=smap, normalized=normalized, classes=classes,
                          topk=topk_rows)
