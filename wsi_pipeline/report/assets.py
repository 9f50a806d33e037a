"""Small images copied or drawn into RUN/report/assets/ so the report folder stands alone:
thumbnails, heatmap overlays, top-k patches, lesion mask overlays, volume montages."""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image, ImageDraw

from .collect import read_csv, read_json

log = logging.getLogger("wsi_pipeline")
THUMB_PX = 320
PATCH_PX = 72


def _save(image: Image.Image, out: Path, max_px: int) -> str:
    image = image.convert("RGB")
    image.thumbnail((max_px, max_px), Image.Resampling.BOX, reducing_gap=2.0)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG", compress_level=3)   # small images; optimize costs seconds a run
    return out.name


def shrink_copy(src: Path, out: Path, max_px: int = THUMB_PX) -> str | None:
    """`src` (an image) resized to at most `max_px` a side into `out`; its file name, or None."""
    try:
        with Image.open(src) as im:
            return _save(im, out, max_px)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("report: cannot read image %s: %s", src, exc)
        return None


def slide_thumbnail(slide_path: Path | None, fallback: Path, out: Path) -> tuple[str | None, tuple[int, int] | None]:
    """A thumbnail of the slide itself (the project's reader), else the tiling stage's QC image.
    Returns (file name, level-0 (width, height) when read from the slide)."""
    if slide_path is not None:
        from ..errors import SlideError
        from ..slides import open_slide

        try:
            with open_slide(slide_path) as slide:
                image = Image.fromarray(slide.thumbnail(THUMB_PX))
                return _save(image, out, THUMB_PX), tuple(slide.dimensions)
        except (SlideError, OSError, ValueError) as exc:
            log.warning("report: thumbnail of %s: %s", slide_path, exc)
    return shrink_copy(fallback, out), None


def topk_patches(topk_dir: Path, out_dir: Path, prefix: str) -> dict[str, list[dict]]:
    """{"top": [...], "bottom": [...]} with file (in out_dir), rank, score from the top-k index."""
    found = {"top": [], "bottom": []}
    for row in read_csv(topk_dir / "index.csv"):
        kind, name = row.get("kind"), Path(row.get("file", "")).name
        if kind not in found or not name or name != row.get("file"):
            continue
        copied = shrink_copy(topk_dir / name, out_dir / f"{prefix}.{name}", PATCH_PX)
        if copied:
            found[kind].append({"file": copied, "rank": row.get("rank"), "score": row.get("score")})
    return found


def mask_overlay(thumb: Path, geojson: Path, level0_wh: tuple[int, int] | None, out: Path) -> str | None:
    """The lesion polygons of a segment GeoJSON drawn on the thumbnail (level-0 px scaled to it)."""
    collection = read_json(geojson)
    if not isinstance(collection, dict) or level0_wh is None:
        return None
    try:
        with Image.open(thumb) as im:
            base = im.convert("RGB")
    except (OSError, ValueError):
        return None
    sx, sy = base.width / level0_wh[0], base.height / level0_wh[1]
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for ring in polygon_rings(collection):
        pts = [(float(x) * sx, float(y) * sy) for x, y in ring]
        if len(pts) >= 3:
            draw.polygon(pts, fill=(0, 200, 255, 90), outline=(0, 120, 255, 255))
    merged = Image.alpha_composite(base.convert("RGBA"), layer)
    return _save(merged, out, THUMB_PX)


def polygon_rings(collection: dict) -> list[list]:
    """Every exterior and hole ring of the (Multi)Polygon features of a GeoJSON collection."""
    rings = []
    for feature in collection.get("features", []) if isinstance(collection, dict) else []:
        geom = (feature or {}).get("geometry") or {}
        kind, coords = geom.get("type"), geom.get("coordinates") or []
        polygons = [coords] if kind == "Polygon" else coords if kind == "MultiPolygon" else []
        for polygon in polygons:
            for ring in polygon:
                if isinstance(ring, list) and all(isinstance(p, list) and len(p) >= 2 for p in ring):
                    rings.append([p[:2] for p in ring])
    return rings


def image_size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError):
        return None


__all__ = ["shrink_copy", "slide_thumbnail", "topk_patches", "mask_overlay", "polygon_rings", "image_size"]
