"""The heatmap as a pyramidal TIFF on the slide's own geometry, streamed tile by tile.

The file has the slide's level-0 width and height and its mpp, so OpenSlide, tiffslide and QuPath
put every heatmap pixel over the same tissue as the slide. The heatmap itself is coarse (one colour
per map pixel of `downsample` level-0 px): each tile is upsampled from the small colour map as it is
written, so memory is the map plus a few tiles, whatever the slide's size — a 100k × 100k slide
writes ~40k level-0 tiles without ever holding the 30 GB level-0 image.

Page layout and descriptions follow `wsi_pipeline.slides.tiff_writer.write_aperio_tiff` (Aperio SVS:
page 0 full resolution tiled, page 1 stripped thumbnail, pages 2.. tiled lower levels; `MPP = `
in the description), which takes whole arrays; this writer is its streaming counterpart. Tiles are
deflate-compressed: lossless, so colours are exactly the colormap's, and piecewise-constant
heatmap tiles compress to a few hundred bytes.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import tifffile

from ..io import atomic_path
from .scoremap import sample_nearest

THUMBNAIL_MAX_PX = 768
ENCODE_BUFFER_BYTES = 32 * 2**20


def pyramid_factors(level0_wh: tuple[int, int], factor: int = 4, min_size_px: int = 256) -> list[int]:
    """Downsample of each level: 1, then ×`factor` while the next level's shorter side stays
    >= `min_size_px` (the rule `tiff_writer.build_pyramid` uses)."""
    w, h = level0_wh
    factors = [1]
    while min(w, h) // (factors[-1] * factor) >= min_size_px:
        factors.append(factors[-1] * factor)
    return factors


def _tiles(colour_map: np.ndarray, downsample: int, level_wh: tuple[int, int], level_factor: int,
           tile_px: int) -> Iterator[np.ndarray]:
    """Row-major tiles of one level; level pixel x samples the map at level-0 x·f + f/2."""
    lw, lh = level_wh
    half = level_factor // 2
    uniform_cache: dict[bytes, np.ndarray] = {}
    for ty in range(0, lh, tile_px):
        ys = np.arange(ty, min(ty + tile_px, lh), dtype=np.int64) * level_factor + half
        for tx in range(0, lw, tile_px):
            xs = np.arange(tx, min(tx + tile_px, lw), dtype=np.int64) * level_factor + half
            cols = np.clip(xs // downsample, 0, colour_map.shape[1] - 1)
            rows = np.clip(ys // downsample, 0, colour_map.shape[0] - 1)
            block = colour_map[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
            first = block[0, 0]
            if (block == first).all():
                # Background and tiles inside one map pixel: one shared array per colour.
                key = first.tobytes() + bytes([len(ys) == tile_px, len(xs) == tile_px])
                tile = uniform_cache.get(key)
                if tile is None:
                    tile = np.empty((len(ys), len(xs), 3), dtype=np.uint8)
                    tile[:] = first
                    if len(uniform_cache) < 64:
                        uniform_cache[key] = tile
                yield tile
            else:
                yield sample_nearest(colour_map, downsample, xs, ys)


def write_heatmap_tiff(
    path: str | os.PathLike,
    colour_map: np.ndarray,
    downsample: int,
    level0_wh: tuple[int, int],
    mpp: float,
    *,
    tile_px: int = 256,
    app_mag: float | None = None,
    description_fields: dict | None = None,
    min_level_px: int = 256,
) -> list[tuple[int, int]]:
    """Write `colour_map` ((h, w, 3) uint8, one pixel per `downsample` level-0 px) as an
    Aperio-layout pyramidal TIFF of exactly `level0_wh` pixels at `mpp` µm/px, atomically.

    Returns the (width, height) of every level written, finest first.
    """
    colour_map = np.ascontiguousarray(colour_map, dtype=np.uint8)
    if colour_map.ndim != 3 or colour_map.shape[2] != 3:
        raise ValueError(f"colour_map must be (h, w, 3) uint8, got {colour_map.shape}")
    if not mpp > 0:
        raise ValueError(f"mpp must be > 0, got {mpp}")
    if tile_px % 16:
        raise ValueError(f"tile_px must be a multiple of 16 (TIFF), got {tile_px}")
    w0, h0 = (int(v) for v in level0_wh)
    factors = pyramid_factors((w0, h0), min_size_px=min_level_px)
    levels = [(w0 // f, h0 // f) for f in factors]

    fields = []
    if app_mag is not None:
        fields.append(f"AppMag = {app_mag:g}")
    # Enough digits that the reader's mpp equals the slide's (tiff_writer rounds to 4 decimals).
    fields.append(f"MPP = {mpp:.10g}")
    for key, value in (description_fields or {}).items():
        fields.append(f"{key} = {str(value).replace('|', '/')}")
    tail = "|" + "|".join(fields)
    head = "Aperio Image Library wsi-pipeline heatmap \r\n"
    px_per_cm = 1e4 / mpp
    resolution = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}

    thumb_factor = max(1, int(np.ceil(max(w0, h0) / THUMBNAIL_MAX_PX)))
    tw, th = max(1, w0 // thumb_factor), max(1, h0 // thumb_factor)
    thumb = sample_nearest(colour_map, downsample,
                           np.arange(tw, dtype=np.int64) * thumb_factor + thumb_factor // 2,
                           np.arange(th, dtype=np.int64) * thumb_factor + thumb_factor // 2)

    raw_bytes = sum(w * h * 3 for w, h in levels)
    # buffersize bounds the tiles tifffile gathers for its encoder threads (default 512 MB).
    common = dict(dtype=np.uint8, tile=(tile_px, tile_px), photometric="rgb", compression="zlib",
                  metadata=None, buffersize=ENCODE_BUFFER_BYTES)
    with atomic_path(path) as tmp:
        # BigTIFF when the uncompressed image could pass 4 GB offsets; OpenSlide reads both.
        with tifffile.TiffWriter(tmp, bigtiff=raw_bytes > 2**31) as tw_:
            tw_.write(_tiles(colour_map, downsample, (w0, h0), 1, tile_px), shape=(h0, w0, 3),
                      description=f"{head}{w0}x{h0} [0,0 {w0}x{h0}] ({tile_px}x{tile_px}) "
                                  f"ADOBE_DEFLATE/RGB{tail}",
                      **resolution, **common)
            tw_.write(thumb, photometric="rgb", compression="zlib", metadata=None,
                      description=f"{head}{w0}x{h0} -> {tw}x{th}{tail}")
            for f, (lw, lh) in zip(factors[1:], levels[1:]):
                tw_.write(_tiles(colour_map, downsample, (lw, lh), f, tile_px), shape=(lh, lw, 3),
                          description=f"{head}{w0}x{h0} -> {lw}x{lh}{tail}", **common)
    return levels
