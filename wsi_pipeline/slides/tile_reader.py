"""Direct tile reader: patches cut from a tiled TIFF/SVS level's decoded tiles, no region reader.

The region readers cost ~2 ms per patch (OpenSlide's cairo compositing, tiffslide re-decoding a tile
for every patch that overlaps it); decoding a 256² JPEG tile costs ~0.4 ms. Here each tile a batch
needs is read (os.pread at the offset the TIFF directory gives), decoded once by tifffile (JPEG with
its JPEGTables, deflate, LZW, uncompressed; the same codecs tiffslide uses) and patches are cut
from it. Pixels equal the region path's: outside the level is white, as `Slide.read_region`
composites OpenSlide's/tiffslide's transparent border on white (tests/test_tile_reader.py).

Only what can be matched exactly is read here; `direct_read_problem` names why anything else is not
(strip TIFFs, JPEG 2000, planar or subsampled raw data, sparse tiles, a level that is not a whole
downsample, patch corners off the level's pixel grid) and the caller keeps the region reader.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np
import tifffile

# TIFF Compression tag values decoded here (tifffile + imagecodecs, as tiffslide does).
SUPPORTED_COMPRESSION = {1: "none", 5: "lzw", 7: "jpeg", 8: "deflate", 32946: "deflate"}
_RGB, _YCBCR = 2, 6
_WHITE = 255  # outside the scanned level: what Slide.read_region composites transparency onto
# Decoded tiles kept per reading process beyond the current batch, least recently used dropped first.
# 128 MiB is ~680 RGB tiles of 256 px: a whole tile row of a 170k px wide level, so a tile row shared
# by two grid rows of patches is decoded once when one process reads them in turn (the CPU default
# of one worker); with many DataLoader workers consecutive batches go to different processes.
CACHE_BUDGET_BYTES = 128 * 2**20


def _level_pages(tif: tifffile.TiffFile) -> list:
    """Candidate pages for pyramid levels: the first series' levels (page or SubIFD pyramids)."""
    pages = []
    for series in tif.series[:1]:
        for level in series.levels:
            page = level.keyframe
            if page is not None:
                pages.append(page)
    return pages


def _page_problem(page) -> str | None:
    """Why `page` cannot be read tile by tile exactly as the region readers do (None: it can)."""
    comp, photo = int(page.compression), int(page.photometric)
    if not page.is_tiled:
        return "the level is stored in strips, not tiles"
    if comp not in SUPPORTED_COMPRESSION:
        return f"compression {comp} ({getattr(page.compression, 'name', comp)}) is not decoded here"
    if page.dtype != np.uint8 or page.samplesperpixel != 3 or int(page.planarconfig) != 1:
        return (f"pixels are {page.dtype}, {page.samplesperpixel} samples, planar config "
                f"{int(page.planarconfig)} (only interleaved 8-bit RGB)")
    if not (photo == _RGB or (photo == _YCBCR and comp == 7)):
        return f"photometric {photo} with compression {comp} (only RGB, or YCbCr inside JPEG)"
    if page.imagedepth != 1 or page.tiledepth != 1:
        return "volumetric tiles"
    counts = page.databytecounts
    if len(counts) != _tile_grid(page)[0] * _tile_grid(page)[1] or min(counts, default=0) <= 0:
        return "sparse or missing tiles"
    return None


def _tile_grid(page) -> tuple[int, int]:
    """(tiles across, tiles down)."""
    return (-(-page.imagewidth // page.tilewidth), -(-page.imagelength // page.tilelength))


def direct_read_problem(path: str | os.PathLike, level_wh: tuple[int, int], downsample: float,
                        coords_level0: np.ndarray) -> str | None:
    """Why patches at the level of size `level_wh` = (width, height) px, `downsample` from level 0,
    with level-0 top-left corners `coords_level0` (N, 2), cannot be read directly (None: they can)."""
    if abs(downsample - round(downsample)) > 1e-9:
        return f"level downsample {downsample:g} is not a whole number"
    down = int(round(downsample))
    if down > 1 and len(coords_level0) and (np.asarray(coords_level0) % down).any():
        return f"patch corners are not on the level's pixel grid (downsample {down})"
    try:
        with tifffile.TiffFile(path) as tif:
            page = _find_page(tif, level_wh)
            if page is None:
                return f"no tiled TIFF page of {level_wh[0]}×{level_wh[1]} px"
            return _page_problem(page)
    except Exception as exc:  # not a TIFF, or one tifffile cannot parse: the region reader decides
        return f"not readable as a TIFF ({type(exc).__name__}: {str(exc).strip()[:120]})"


def _find_page(tif: tifffile.TiffFile, level_wh: tuple[int, int]):
    for page in _level_pages(tif):
        if (page.imagewidth, page.imagelength) == (int(level_wh[0]), int(level_wh[1])):
            return page
    return None


class TiledLevel:
    """One pyramid level of a tiled TIFF, read tile by tile. Open it in the process that reads
    (file handles are not shared across fork). Decoded tiles stay in an LRU cache of
    `cache_budget_bytes` (beyond the current batch's, which are always kept while it is cut)."""

    def __init__(self, path: str | os.PathLike, level_wh: tuple[int, int],
                 cache_budget_bytes: int = CACHE_BUDGET_BYTES):
        self._tif = tifffile.TiffFile(path)
        try:
            page = _find_page(self._tif, level_wh)
            problem = "no tiled page of that size" if page is None else _page_problem(page)
            if problem:
                raise ValueError(f"{path}: level {level_wh[0]}×{level_wh[1]} px: {problem}")
            self._page = page
            self._decode = page.decode  # tifffile's per-page decoder (codec, JPEG tables, predictor)
            self._offsets = tuple(int(v) for v in page.dataoffsets)
            self._counts = tuple(int(v) for v in page.databytecounts)
            self.width_px, self.height_px = int(page.imagewidth), int(page.imagelength)
            self.tile_w_px, self.tile_h_px = int(page.tilewidth), int(page.tilelength)
            self._tiles_x, self._tiles_y = _tile_grid(page)
            self._fd = os.open(os.fspath(path), os.O_RDONLY)
        except BaseException:
            self._tif.close()
            raise
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_bytes = 0
        self._cache_budget_bytes = int(cache_budget_bytes)
        self.tiles_decoded = 0  # for benchmarks and tests: decodes, not cache hits

    def _tile(self, index: int, batch: dict[int, np.ndarray]) -> np.ndarray:
        tile = batch.get(index)
        if tile is None:
            tile = self._cache.get(index)
            if tile is not None:
                self._cache.move_to_end(index)
            else:
                raw = os.pread(self._fd, self._counts[index], self._offsets[index])
                if len(raw) != self._counts[index]:
                    raise OSError(f"tile {index}: file ends after {len(raw)} of {self._counts[index]} bytes")
                data = self._decode(raw, index, jpegtables=self._page.jpegtables)[0]
                if data is None:
                    raise ValueError(f"tile {index} decoded to nothing")
                tile = data.reshape(data.shape[-3:])[..., :3]  # (1, th, tw, 3) -> (th, tw, 3)
                self.tiles_decoded += 1
                self._cache[index] = tile
                self._cache_bytes += tile.nbytes
            batch[index] = tile
        return tile

    def read_patches(self, xy_level: np.ndarray, size_px: int) -> list[np.ndarray]:
        """(size, size, 3) uint8 RGB patches with top-left corners `xy_level` (N, 2) in this level's
        pixels; parts outside the level are white."""
        batch: dict[int, np.ndarray] = {}
        th, tw = self.tile_h_px, self.tile_w_px
        out = []
        for x0, y0 in np.asarray(xy_level, dtype=np.int64).tolist():
            patch = np.full((size_px, size_px, 3), _WHITE, dtype=np.uint8)
            # The part of the patch inside the level, in level pixels.
            ix0, iy0 = max(x0, 0), max(y0, 0)
            ix1, iy1 = min(x0 + size_px, self.width_px), min(y0 + size_px, self.height_px)
            for ty in range(iy0 // th, (iy1 - 1) // th + 1) if iy1 > iy0 else ():
                for tx in range(ix0 // tw, (ix1 - 1) // tw + 1) if ix1 > ix0 else ():
                    tile = self._tile(ty * self._tiles_x + tx, batch)
                    # Intersection of the patch, the level and this tile.
                    sx0, sy0 = max(ix0, tx * tw), max(iy0, ty * th)
                    sx1, sy1 = min(ix1, (tx + 1) * tw), min(iy1, (ty + 1) * th)
                    patch[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = \
                        tile[sy0 - ty * th:sy1 - ty * th, sx0 - tx * tw:sx1 - tx * tw]
            out.append(patch)
        # Evict least recently used tiles over budget; this batch's tiles are the most recent.
        while self._cache_bytes > self._cache_budget_bytes and len(self._cache) > len(batch):
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.nbytes
        return out

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None
        self._tif.close()

    def __enter__(self) -> "TiledLevel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
