"""PNG overlay: the heatmap blended on the slide thumbnail, with a labelled colour bar below it.

Layout: the thumbnail (its own size and aspect ratio) at the top-left, then a white panel with the
colour bar, tick labels and a title. The image region is recorded in the PNG's text chunks
(`heatmap_region` = "x,y,w,h"), with the slide id, normalisation and colormap.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from ..io import atomic_path
from .colormaps import get_colormap, lut_index
from .scoremap import ScoreMap, sample_nearest

BAR_PANEL_MIN_WIDTH_PX = 360


def blend_on_thumbnail(thumbnail: np.ndarray, smap: ScoreMap, colormap: str, alpha: float) -> np.ndarray:
    """(H, W, 3) uint8 thumbnail of the whole slide -> same size with the colourised map blended
    in at opacity `alpha` where patches exist (elsewhere the thumbnail is untouched)."""
    th, tw = thumbnail.shape[:2]
    w0, h0 = smap.level0_wh
    # Centre of each thumbnail pixel in level-0 px, then the nearest map pixel.
    xs = ((np.arange(tw) + 0.5) * (w0 / tw)).astype(np.int64)
    ys = ((np.arange(th) + 0.5) * (h0 / th)).astype(np.int64)
    values = sample_nearest(smap.values, smap.downsample, xs, ys)
    valid = ~np.isnan(values)
    colours = get_colormap(colormap)[lut_index(values)]
    a = np.float32(alpha)
    blended = ((1 - a) * thumbnail + a * colours + 0.5).astype(np.uint8)
    return np.where(valid[..., None], blended, thumbnail)


def _font(size_px: int):
    try:
        return ImageFont.load_default(size=size_px)
    except TypeError:  # Pillow < 10.1: bitmap font, fixed size
        return ImageFont.load_default()


def colour_bar_panel(width_px: int, colormap: str, ticks: list[tuple[float, str]], title: str,
                     scale: float = 1.0) -> np.ndarray:
    """(h, width_px, 3) uint8 white panel: title, horizontal colour bar, ticks at positions in
    [0, 1] labelled with their text."""
    font = _font(max(10, int(round(13 * scale))))
    margin = int(round(16 * scale))
    bar_h = int(round(18 * scale))
    title_h = int(round(20 * scale))
    label_h = int(round(20 * scale))
    height = margin + title_h + bar_h + int(round(6 * scale)) + label_h + margin // 2
    panel = Image.new("RGB", (width_px, height), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    draw.text((margin, margin // 2), title, fill=(0, 0, 0), font=font)
    x0, x1 = margin + int(round(12 * scale)), width_px - margin - int(round(12 * scale))
    y0 = margin // 2 + title_h
    lut = get_colormap(colormap)
    ramp = lut[lut_index(np.linspace(0.0, 1.0, max(2, x1 - x0)))]
    panel.paste(Image.fromarray(np.repeat(ramp[None], bar_h, axis=0)), (x0, y0))
    draw.rectangle([x0 - 1, y0 - 1, x0 + ramp.shape[0], y0 + bar_h], outline=(0, 0, 0))
    for pos, text in ticks:
        x = x0 + pos * (ramp.shape[0] - 1)
        draw.line([x, y0 + bar_h, x, y0 + bar_h + int(round(5 * scale))], fill=(0, 0, 0))
        left, _, right, _ = draw.textbbox((0, 0), text, font=font)
        tx = min(max(x - (right - left) / 2, 2), width_px - (right - left) - 2)
        draw.text((tx, y0 + bar_h + int(round(6 * scale))), text, fill=(0, 0, 0), font=font)
    return np.asarray(panel)


def write_overlay_png(path: str | os.PathLike, thumbnail: np.ndarray, smap: ScoreMap, *,
                      colormap: str, alpha: float, ticks: list[tuple[float, str]], title: str,
                      text: dict | None = None) -> tuple[int, int]:
    """Blend, add the colour bar panel below, write the PNG atomically; returns (width, height)."""
    blended = blend_on_thumbnail(thumbnail, smap, colormap, alpha)
    th, tw = blended.shape[:2]
    width = max(tw, BAR_PANEL_MIN_WIDTH_PX)
    scale = max(1.0, width / 800)
    panel = colour_bar_panel(width, colormap, ticks, title, scale=scale)
    canvas = np.full((th + panel.shape[0], width, 3), 255, dtype=np.uint8)
    canvas[:th, :tw] = blended
    canvas[th:] = panel
    info = PngImagePlugin.PngInfo()
    info.add_text("heatmap_region", f"0,0,{tw},{th}")
    for key, value in (text or {}).items():
        info.add_text(str(key), str(value))
    with atomic_path(path) as tmp:
        # compress_level 3: a third of level 6's time for ~10 % more bytes on a noisy thumbnail.
        Image.fromarray(canvas).save(tmp, pnginfo=info, compress_level=3)
    return canvas.shape[1], canvas.shape[0]
