"""Deep Zoom tiles of a slide, read with the project's reader (wsi_pipeline.slides).

Deep Zoom level L of an image W x H is the image scaled by 2^(L - max_level), max_level =
ceil(log2(max(W, H))), cut into `tile_size` squares with `overlap` px shared by neighbours (the
Deep Zoom / OpenSeadragon convention, as OpenSlide's DeepZoomGenerator). Each tile is read from the
coarsest slide level that does not upsample and area-resized to its Deep Zoom size.
Bad coordinates are `TileRequestError` (the server's 4xx), never a read outside the image.
"""

from __future__ import annotations

import io
import math
import threading

import numpy as np
from PIL import Image

TILE_SIZE = 254
OVERLAP = 1
MAX_READ_PX = 4096 * 4096   # one tile never reads more slide pixels than this


class TileRequestError(ValueError):
    """A tile that does not exist (level, column or row out of range)."""


class DeepZoom:
    def __init__(self, slide, tile_size: int = TILE_SIZE, overlap: int = OVERLAP, quality: int = 85):
        self.slide = slide
        self.tile_size, self.overlap, self.quality = int(tile_size), int(overlap), int(quality)
        self.width, self.height = (int(v) for v in slide.dimensions)
        self.max_level = max(0, math.ceil(math.log2(max(self.width, self.height))))
        self._lock = threading.Lock()   # one read at a time per slide handle

    def dzi(self) -> str:
        return ('<?xml version="1.0" encoding="UTF-8"?>'
                '<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="jpeg" '
                f'Overlap="{self.overlap}" TileSize="{self.tile_size}">'
                f'<Size Width="{self.width}" Height="{self.height}"/></Image>')

    def level_size(self, level: int) -> tuple[int, int]:
        scale = 2 ** (self.max_level - level)
        return max(1, math.ceil(self.width / scale)), max(1, math.ceil(self.height / scale))

    def tile_grid(self, level: int) -> tuple[int, int]:
        w, h = self.level_size(level)
        return math.ceil(w / self.tile_size), math.ceil(h / self.tile_size)

    def tile_box(self, level: int, col: int, row: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the tile in the Deep Zoom level's pixels."""
        if not 0 <= level <= self.max_level:
            raise TileRequestError(f"level {level} outside 0..{self.max_level}")
        cols, rows = self.tile_grid(level)
        if not (0 <= col < cols and 0 <= row < rows):
            raise TileRequestError(f"tile {col}_{row} outside the {cols}x{rows} tiles of level {level}")
        w, h = self.level_size(level)
        ts, ov = self.tile_size, self.overlap
        x0, y0 = col * ts - (ov if col else 0), row * ts - (ov if row else 0)
        return x0, y0, min(w, (col + 1) * ts + ov), min(h, (row + 1) * ts + ov)

    def tile_rgb(self, level: int, col: int, row: int) -> np.ndarray:
        x0, y0, x1, y1 = self.tile_box(level, col, row)
        scale = 2 ** (self.max_level - level)           # level-0 px per Deep Zoom px
        slide = self.slide
        # Level-0 footprint, clipped to the image (the last column/row is partial).
        lx0, ly0 = x0 * scale, y0 * scale
        lx1, ly1 = min(self.width, x1 * scale), min(self.height, y1 * scale)
        candidates = [lv for lv, d in enumerate(slide.level_downsamples) if d <= scale * 1.0001] or [0]
        level_s = max(candidates, key=lambda lv: slide.level_downsamples[lv])
        down = slide.level_downsamples[level_s]
        rw = max(1, math.ceil((lx1 - lx0) / down))
        rh = max(1, math.ceil((ly1 - ly0) / down))
        while rw * rh > MAX_READ_PX and level_s + 1 < slide.level_count:   # a sparse pyramid
            level_s += 1
            down = slide.level_downsamples[level_s]
            rw, rh = max(1, math.ceil((lx1 - lx0) / down)), max(1, math.ceil((ly1 - ly0) / down))
        with self._lock:
            pixels = slide.read_region((int(lx0), int(ly0)), level_s, (rw, rh))
        out = (x1 - x0, y1 - y0)
        if (rw, rh) != out:
            pixels = np.asarray(Image.fromarray(pixels).resize(out, Image.Resampling.BOX
                                                              if rw >= out[0] else Image.Resampling.BILINEAR))
        return pixels

    def tile_jpeg(self, level: int, col: int, row: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(self.tile_rgb(level, col, row)).save(buf, format="JPEG", quality=self.quality)
        return buf.getvalue()
