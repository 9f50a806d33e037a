"""The viewer's overlays, made from a run's outputs (all in level-0 slide pixels):

- heatmap: the heatmap stage's GeoJSON tiles (normalised score per patch) rasterised on the map
  grid its done file records and coloured with the run's colormap: an RGBA PNG, transparent where
  no patch was scored; OpenSeadragon lays it over the slide;
- tissue outline (tiles/{id}.tissue.geojson) and lesion mask (segment/{id}.geojson): polygon rings;
- detections (detect/{model}/{id}.csv): points with their class and the class colour.
Every file is reached through `RunFiles.path`, which refuses anything resolving outside RUN.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..report.assets import polygon_rings
from ..run.names import is_safe_name


class OutsideRun(LookupError):
    """A path that resolves (symlinks followed) outside the run folder."""


class RunFiles:
    def __init__(self, run: Path):
        self.root = Path(os.path.realpath(run))

    def path(self, *parts: str) -> Path:
        """RUN/parts..., refused (OutsideRun) when a part is not a safe name or the real path
        (symlinks followed) leaves RUN; FileNotFoundError when it does not exist."""
        for p in parts:
            if not is_safe_name(p):
                raise OutsideRun(f"not a safe name: {p!r}")
        target = os.path.realpath(self.root.joinpath(*parts))
        if os.path.commonpath([str(self.root), target]) != str(self.root):
            raise OutsideRun(f"{'/'.join(parts)} resolves outside the run folder")
        if not os.path.isfile(target):
            raise FileNotFoundError("/".join(parts))
        return Path(target)

    def models(self, folder: str) -> list[str]:
        base = self.root / folder
        return sorted(p.name for p in base.iterdir() if p.is_dir() and is_safe_name(p.name)) if base.is_dir() else []


def _load_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def colormap_name(files: RunFiles) -> str:
    from ..exports import list_colormaps

    try:
        from ..run.config import load_config

        name = load_config(files.path("configs", "heatmap.yaml")).heatmap.colormap
    except Exception:  # noqa: BLE001 — no or unreadable config: the default map still reads
        name = None
    names = list_colormaps()
    return name if name in names else ("jet" if "jet" in names else names[0])


def heatmap_png(files: RunFiles, model: str, slide_id: str, level0_wh: tuple[int, int]) -> tuple[bytes, dict]:
    """(RGBA PNG bytes, {"map_width", "map_height", "downsample"}) of one slide's heatmap."""
    from ..exports import apply_colormap, score_map

    done = _load_json(files.path("heatmaps", model, f"{slide_id}.done.json"))
    collection = _load_json(files.path("heatmaps", model, f"{slide_id}.geojson"))
    key = f"{done.get('score', 'score')} ({done.get('normalize', 'rank')})"
    coords, values = [], []
    for feature in collection.get("features", []):
        ring = feature["geometry"]["coordinates"][0]
        value = feature.get("properties", {}).get("measurements", {}).get(key)
        if value is None:
            continue
        coords.append(ring[0])
        values.append(float(value))
    if not coords:
        raise LookupError(f"{slide_id}: no '{key}' measurement in the heatmap GeoJSON")
    patch = float(done["patch_size_level0"])
    smap = score_map(np.asarray(coords, dtype=np.float64), np.asarray(values), patch, level0_wh,
                     int(done.get("map_downsample") or 0) or None)
    rgb = apply_colormap(np.nan_to_num(smap.values, nan=0.0), colormap_name(files))
    rgba = np.dstack([rgb, np.where(smap.valid, 255, 0).astype(np.uint8)])
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    h, w = smap.shape
    return buf.getvalue(), {"map_width": int(w), "map_height": int(h), "downsample": int(smap.downsample)}


def polygons(files: RunFiles, *parts: str) -> list[list]:
    """The polygon rings of a GeoJSON under RUN ([[x, y], ...] per ring, level-0 px)."""
    return [[[float(x), float(y)] for x, y in ring] for ring in polygon_rings(_load_json(files.path(*parts)))]


def detections(files: RunFiles, model: str, slide_id: str) -> dict:
    """{"points": [[x, y, class index, score]], "classes": [...], "colours": [[r, g, b]]}."""
    from ..detection.outputs import PALETTE

    path = files.path("detect", model, f"{slide_id}.csv")
    classes, points = [], []
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            name = row["class"]
            if name not in classes:
                classes.append(name)
            points.append([float(row["x"]), float(row["y"]), classes.index(name), float(row["score"])])
    # The detector's class order (summary.json) gives the colours its GeoJSON uses.
    try:
        order = list(_load_json(files.path("detect", model, f"{slide_id}.summary.json")).get("counts", {}))
    except (OSError, ValueError, LookupError):
        order = []
    order += [c for c in classes if c not in order]
    colours = [list(PALETTE[order.index(c) % len(PALETTE)]) for c in classes]
    return {"points": points, "classes": classes, "colours": colours}


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        return im.size
