"""`Slide`: one interface over OpenSlide and tiffslide, with a resolution it can vouch for."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import SlideError
from .backends import BACKENDS

# Whole-level reads (tissue masks, thumbnails, segmentation grids) go through the reader in strips
# of at most about this many level pixels, each downsampled before the next is read: a 60000×60000
# single-level TIFF then needs ~100 MB, not the 10.8 GB (14.4 GB as RGBA) of one whole-level read.
STRIP_BUDGET_PX = 16 * 2**20

# Plausible microscope resolutions, µm/px. TIFF resolution tags outside this range are editor
# defaults (72 dpi ≈ 353 µm/px) rather than a scanner's calibration, and are not trusted.
_MPP_RANGE = (0.01, 50.0)


class Slide:
    """A whole-slide image. Coordinates are level-0 pixels (x, y) unless a name says otherwise.

    Open with `open_slide`. `mpp` is µm per level-0 pixel; `mpp_source` says where it came from.
    A `Source` (wsi_pipeline/sources.py): `source_id`, `ndim` 2, `shape` (width, height),
    `spacing` (mpp, mpp) in µm, `read_box` a level-0 read.
    """

    ndim = 2
    spacing_unit = "um"

    def __init__(self, backend, path: Path, slide_id: str, mpp_override: float | None = None):
        self._backend = backend
        self.path = path
        self.slide_id = slide_id
        self.backend_name = backend.name
        self.vendor = backend.vendor
        self.properties = backend.properties
        self.level_dimensions: tuple[tuple[int, int], ...] = backend.level_dimensions
        self.level_downsamples: tuple[float, ...] = backend.level_downsamples
        self.mpp, self.mpp_source = self._resolve_mpp(mpp_override)

    # -- Source protocol ---------------------------------------------------------------------
    @property
    def source_id(self) -> str:
        return self.slide_id

    @property
    def shape(self) -> tuple[int, int]:
        """(width, height) of level 0: the coordinate order (x, y)."""
        return self.level_dimensions[0]

    @property
    def spacing(self) -> tuple[float, float]:
        """(µm per pixel along x, along y); the same value twice (one resolution is vouched for)."""
        return (self.mpp, self.mpp)

    def read_box(self, start, size) -> np.ndarray:
        """Level-0 pixels of the box `start` = (x, y), `size` = (width, height): (H, W, 3) uint8."""
        return self.read_region(tuple(start), 0, tuple(size))

    # -- geometry ---------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0 in pixels."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]

    def best_level_for_mpp(self, target_mpp: float, tolerance: float = 0.02) -> int:
        """Coarsest level whose mpp is ≤ target (within `tolerance`, relative): reading there and
        downsampling never upsamples, and reads as few pixels as possible."""
        self._check_level_args(target_mpp=target_mpp)
        best = 0
        for level in range(self.level_count):
            if self.level_mpp(level) <= target_mpp * (1 + tolerance):
                best = level
        return best

    # -- pixels -----------------------------------------------------------------------------
    def read_region(self, level0_xy: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Pixels of `size` = (width, height) at `level`, top-left at level-0 `level0_xy`.

        Returns (H, W, 3) uint8 RGB; transparent areas (outside the scan) are composited on white.
        """
        self._check_level_args(level=level)
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise SlideError(self.slide_id, f"read_region size must be positive, got {size}")
        try:
            pixels = self._backend.read_pixels((int(level0_xy[0]), int(level0_xy[1])), level, (w, h))
        except Exception as exc:  # a reader's own error on a corrupt tile: name the slide
            raise SlideError(self.slide_id, f"cannot read region {tuple(level0_xy)} level {level} "
                                            f"size {size} of {self.path}: {type(exc).__name__}: {exc}") from exc
        return _to_rgb_on_white(pixels)

    def read_level(self, level: int) -> np.ndarray:
        """A whole level as (H, W, 3) uint8 RGB (only sensible for small, low-resolution levels)."""
        self._check_level_args(level=level)
        return self.read_region((0, 0), level, self.level_dimensions[level])

    def read_level_resized(self, level: int, out_wh: tuple[int, int],
                           box: tuple[float, float, float, float] | None = None) -> np.ndarray:
        """`box` (x0, y0, x1, y1 in `level` pixels, fractions allowed; default the whole level)
        area-averaged (PIL BOX) to `out_wh` = (width, height): (H, W, 3) uint8 RGB.

        Large levels are read in full-width strips of whole output rows, each resized with its exact
        fractional source box before the next is read, so memory stays near `STRIP_BUDGET_PX`
        whatever the slide's size and the result equals one whole-level read + resize.
        """
        self._check_level_args(level=level)
        lw, lh = self.level_dimensions[level]
        x0, y0, x1, y1 = (0.0, 0.0, float(lw), float(lh)) if box is None else map(float, box)
        out_w, out_h = max(1, int(out_wh[0])), max(1, int(out_wh[1]))
        if not (0 <= x0 < x1 <= lw and 0 <= y0 < y1 <= lh):
            raise SlideError(self.slide_id, f"box {box} outside level {level} ({lw}×{lh} px)")
        if lw * lh <= STRIP_BUDGET_PX:  # small level (every pyramid's coarse levels): one read
            return _box_resize(self.read_level(level), out_w, out_h, (x0, y0, x1, y1))
        row_scale = (y1 - y0) / out_h                         # level rows per output row
        rows_per_strip = max(1, int(STRIP_BUDGET_PX / (lw * max(row_scale, 1.0))))
        down = self.level_downsamples[level]
        out = np.empty((out_h, out_w, 3), dtype=np.uint8)
        for j0 in range(0, out_h, rows_per_strip):
            j1 = min(out_h, j0 + rows_per_strip)
            top, bottom = y0 + j0 * row_scale, y0 + j1 * row_scale
            r0, r1 = int(np.floor(top)), min(lh, int(np.ceil(bottom)))
            strip = self._read_level_rows(level, down, r0, r1 - r0)
            out[j0:j1] = _box_resize(strip, out_w, j1 - j0, (x0, top - r0, x1, bottom - r0))
        return out

    def read_at_mpp(self, mpp: float) -> tuple[np.ndarray, float]:
        """The whole slide resampled to about `mpp` µm/px, from the best level, read in strips.

        Returns (image (H, W, 3) uint8, exact mpp of the returned image along x).
        """
        level = self.best_level_for_mpp(mpp)
        w0, h0 = self.dimensions
        out_w = max(1, int(round(w0 * self.mpp / mpp)))
        out_h = max(1, int(round(h0 * self.mpp / mpp)))
        return self.read_level_resized(level, (out_w, out_h)), self.mpp * w0 / out_w

    def thumbnail(self, max_size_px: int = 1024) -> np.ndarray:
        """(H, W, 3) uint8 RGB whose longer side is at most `max_size_px` (read in strips)."""
        w0, h0 = self.dimensions
        scale = max(w0, h0) / max_size_px
        level = max((lv for lv in range(self.level_count) if self.level_downsamples[lv] <= scale),
                    default=0)
        out = (max(1, round(w0 / max(scale, 1))), max(1, round(h0 / max(scale, 1))))
        return self.read_level_resized(level, out)

    def _read_level_rows(self, level: int, down: float, row0: int, n_rows: int) -> np.ndarray:
        """Rows [row0, row0 + n_rows) of `level`, full width."""
        level_w = self.level_dimensions[level][0]
        # read_region takes level-0 coordinates; level rows map to them through the downsample.
        return self.read_region((0, int(round(row0 * down))), level, (level_w, n_rows))

    # -- lifecycle --------------------------------------------------------------------------
    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Slide({self.slide_id!r}, backend={self.backend_name}, vendor={self.vendor}, "
                f"dims={self.dimensions}, levels={self.level_count}, mpp={self.mpp:.4f})")

    # -- internals --------------------------------------------------------------------------
    def _check_level_args(self, level: int | None = None, target_mpp: float | None = None) -> None:
        if level is not None and not 0 <= level < self.level_count:
            raise SlideError(self.slide_id, f"level {level} out of range (slide has {self.level_count})")
        if target_mpp is not None and not target_mpp > 0:
            raise SlideError(self.slide_id, f"target mpp must be > 0, got {target_mpp}")

    def _resolve_mpp(self, override: float | None) -> tuple[float, str]:
        if override is not None:
            if not _MPP_RANGE[0] <= override <= _MPP_RANGE[1]:
                raise SlideError(self.slide_id, f"manifest mpp {override} outside plausible range {_MPP_RANGE}")
            return float(override), "manifest"
        found = mpp_from_properties(self.properties)
        if found is None:
            raise SlideError(
                self.slide_id,
                "no resolution (µm/px) in the file (checked openslide.mpp-x, aperio.MPP and TIFF "
                "resolution tags); add an 'mpp' column for this slide in the manifest")
        return found


def mpp_from_properties(props: dict) -> tuple[float, str] | None:
    """(mpp, source key) from a slide's properties, or None. Order: openslide.mpp-x (vendor
    metadata as OpenSlide normalises it), aperio.MPP, then TIFF resolution tags in cm or inch."""
    for key in ("openslide.mpp-x", "aperio.MPP"):
        value = _as_float(props.get(key))
        if value is not None and _MPP_RANGE[0] <= value <= _MPP_RANGE[1]:
            return value, key
    res = _as_float(props.get("tiff.XResolution"))
    unit = str(props.get("tiff.ResolutionUnit", "")).lower()
    um_per_unit = {"centimeter": 1e4, "inch": 25_400.0}.get(unit)
    if res and res > 0 and um_per_unit:
        value = um_per_unit / res
        if _MPP_RANGE[0] <= value <= _MPP_RANGE[1]:
            return value, "tiff.XResolution"
    return None


def _as_float(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _box_resize(image: np.ndarray, out_w: int, out_h: int,
                box: tuple[float, float, float, float]) -> np.ndarray:
    """Area-average `box` of `image` to (out_h, out_w); the image itself when nothing changes."""
    if (out_w, out_h) == (image.shape[1], image.shape[0]) and box == (0, 0, image.shape[1], image.shape[0]):
        return image
    return np.asarray(Image.fromarray(image).resize((out_w, out_h), Image.Resampling.BOX, box=box))


def _to_rgb_on_white(pixels: np.ndarray) -> np.ndarray:
    if pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise ValueError(f"expected (H, W, 3|4) pixels, got {pixels.shape}")
    if pixels.shape[2] == 3:
        return np.ascontiguousarray(pixels, dtype=np.uint8)
    if (pixels[..., 3] == 255).all():
        return np.ascontiguousarray(pixels[..., :3])
    rgb = pixels[..., :3].astype(np.float32)
    alpha = pixels[..., 3:4].astype(np.float32) / 255.0
    # Both readers hand back straight (non-premultiplied) alpha; outside the scan is glass: white.
    out = rgb * alpha + 255.0 * (1.0 - alpha)
    return (out + 0.5).astype(np.uint8)


def open_slide(path: str | os.PathLike, *, slide_id: str | None = None, backend: str = "auto",
               mpp_override: float | None = None) -> Slide:
    """Open a slide with `backend` ("auto": OpenSlide, then tiffslide where OpenSlide fails).

    Every failure is a `SlideError` naming the slide and what each backend said.
    """
    path = Path(path)
    slide_id = slide_id or path.stem
    if not path.exists():
        raise SlideError(slide_id, f"file not found: {path}")
    if not path.is_file():
        raise SlideError(slide_id, f"not a file: {path}")
    if backend == "auto":
        order = ["openslide", "tiffslide"]
    elif backend in BACKENDS:
        order = [backend]
    else:
        raise SlideError(slide_id, f"unknown backend {backend!r} (auto, openslide, tiffslide)")
    errors = []
    for name in order:
        try:
            reader = BACKENDS[name](str(path))
        except Exception as exc:  # each library raises its own types for unreadable files
            errors.append(f"{name}: {type(exc).__name__}: {str(exc).strip() or 'cannot open'}")
            continue
        if not reader.level_dimensions or min(reader.level_dimensions[0]) <= 0:
            reader.close()
            errors.append(f"{name}: no image levels")
            continue
        try:
            return Slide(reader, path, slide_id, mpp_override)
        except SlideError as exc:
            reader.close()
            if errors:
                # A backend that refused the file first may give the real reason (openslide-python's
                # unopenable.tiff: OpenSlide names its unknown compression; tiffslide opens it and
                # only lacks an mpp, which a manifest mpp would not cure).
                raise SlideError(slide_id, f"{exc.message} (only {name} opened it; "
                                           f"{'; '.join(errors)})") from None
            raise
    raise SlideError(slide_id, f"cannot open {path} as a slide ({'; '.join(errors)})")
