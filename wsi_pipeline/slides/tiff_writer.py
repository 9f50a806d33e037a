"""Write pyramidal TIFFs in Aperio's page layout, which OpenSlide and tiffslide both open.

Layout (as Aperio SVS): page 0 = full-resolution tiled image, page 1 = small stripped thumbnail,
pages 2.. = tiled lower levels. OpenSlide reads page pyramids, not SubIFD pyramids, so levels are
top-level pages. The ImageDescription starting with "Aperio" is what both readers key on; the
`MPP = ` field carries the resolution.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tifffile

from ..io import atomic_path


def downsample_area(rgb: np.ndarray, factor: int) -> np.ndarray:
    """(H, W, C) uint8 → (H//f, W//f, C) by block averaging (area resampling, no aliasing)."""
    h, w = (rgb.shape[0] // factor) * factor, (rgb.shape[1] // factor) * factor
    blocks = rgb[:h, :w].reshape(h // factor, factor, w // factor, factor, -1)
    return (blocks.mean(axis=(1, 3), dtype=np.float32) + 0.5).astype(np.uint8)


def build_pyramid(level0: np.ndarray, factor: int = 4, min_size_px: int = 256) -> list[np.ndarray]:
    """Level 0 plus successive `factor`× reductions while the next one stays ≥ `min_size_px`."""
    levels = [level0]
    while min(levels[-1].shape[:2]) // factor >= min_size_px:
        levels.append(downsample_area(levels[-1], factor))
    return levels


def write_aperio_tiff(
    path: str | os.PathLike,
    levels: list[np.ndarray],
    mpp: float | None,
    *,
    tile_px: int = 256,
    compression: str = "jpeg",
    jpeg_quality: int = 90,
    app_mag: float | None = 20.0,
    resolution_tags: bool = False,
    describe_mpp: bool = True,
    extra_description: str = "",
) -> None:
    """Write `levels` ((H, W, 3) uint8, finest first) as an Aperio-layout pyramidal TIFF, atomically.

    mpp None writes no resolution anywhere (for testing the missing-mpp error); `describe_mpp`
    puts it in the Aperio description, `resolution_tags` in TIFF X/YResolution (pixels per cm).
    """
    level0 = levels[0]
    h0, w0 = level0.shape[:2]
    fields = []
    if app_mag is not None:
        fields.append(f"AppMag = {app_mag:g}")
    if mpp is not None and describe_mpp:
        fields.append(f"MPP = {mpp:.4f}")
    if extra_description:
        fields.append(extra_description)
    tail = "|" + "|".join(fields) if fields else ""
    comp_name = "JPEG" if compression == "jpeg" else compression.upper()
    kwargs = {"compression": compression}
    if compression == "jpeg":
        kwargs["compressionargs"] = {"level": jpeg_quality}
    resolution = {}
    if resolution_tags and mpp is not None:
        px_per_cm = 1e4 / mpp
        resolution = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}

    thumb = levels[-1]
    thumb_factor = max(1, int(np.ceil(max(thumb.shape[:2]) / 768)))
    thumb = downsample_area(thumb, thumb_factor) if thumb_factor > 1 else thumb

    bigtiff = sum(lv.nbytes for lv in levels) > 2**31
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
            desc0 = (f"Aperio Image Library wsi-pipeline \r\n{w0}x{h0} [0,0 {w0}x{h0}] "
                     f"({tile_px}x{tile_px}) {comp_name}/RGB{tail}")
            tw.write(level0, tile=(tile_px, tile_px), photometric="rgb", description=desc0,
                     metadata=None, **resolution, **kwargs)
            tw.write(thumb, photometric="rgb", compression="zlib", metadata=None,
                     description=f"Aperio Image Library wsi-pipeline \r\n{w0}x{h0} -> "
                                 f"{thumb.shape[1]}x{thumb.shape[0]}{tail}")
            for lv in levels[1:]:
                desc = (f"Aperio Image Library wsi-pipeline \r\n{w0}x{h0} -> "
                        f"{lv.shape[1]}x{lv.shape[0]}{tail}")
                tw.write(lv, tile=(tile_px, tile_px), photometric="rgb", description=desc,
                         metadata=None, **kwargs)


def write_plain_tiff(path: str | os.PathLike, rgb: np.ndarray, *, mpp: float | None = None,
                     tile_px: int | None = 256) -> None:
    """A single-level (generic) TIFF, optionally with resolution tags; atomic."""
    resolution = {}
    if mpp is not None:
        resolution = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    tile = (tile_px, tile_px) if tile_px else None
    with atomic_path(Path(path)) as tmp:
        tifffile.imwrite(tmp, rgb, tile=tile, photometric="rgb", compression="zlib",
                         metadata=None, **resolution)
