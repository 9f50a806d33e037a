"""The two slide readers behind `Slide`. Each returns RGB (opaque regions) or RGBA pixels and a
property dict; the `Slide` class does everything else (mpp, alpha compositing, level choice), so
both backends behave identically.
"""

from __future__ import annotations

import numpy as np


class OpenSlideBackend:
    name = "openslide"

    def __init__(self, path: str):
        import openslide  # openslide-bin ships the C library; no system package needed

        self._slide = openslide.OpenSlide(path)
        self.level_dimensions = tuple(self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.properties = dict(self._slide.properties)
        self.vendor = self.properties.get("openslide.vendor", "unknown")

    def read_pixels(self, xy0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """(H, W, 3) uint8 RGB where the region is opaque, else (H, W, 4) RGBA with alpha 0 outside
        the scanned area."""
        image = self._slide.read_region(xy0, level, size)  # PIL RGBA, straight (not premultiplied) alpha
        if image.getextrema()[3][0] == 255:
            # Fully opaque (nearly every patch): PIL drops alpha in C; a numpy strided gather plus an
            # alpha test in float was 30% of the read time.
            return np.array(image.convert("RGB"))  # writable: torch.from_numpy warns on read-only
        return np.asarray(image)

    def close(self) -> None:
        self._slide.close()


class TiffSlideBackend:
    name = "tiffslide"

    def __init__(self, path: str):
        import tiffslide

        self._slide = tiffslide.TiffSlide(path)
        self.level_dimensions = tuple(self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        props = dict(self._slide.properties)
        # Expose tiffslide's namespaced keys under OpenSlide's names so mpp lookup is one path.
        for key in ("mpp-x", "mpp-y", "objective-power", "vendor"):
            if props.get(f"tiffslide.{key}") is not None:
                props.setdefault(f"openslide.{key}", props[f"tiffslide.{key}"])
        self.properties = {k: v for k, v in props.items() if v is not None}
        self.vendor = self.properties.get("tiffslide.vendor", "unknown")
        # tifffile reads the baseline page's resolution tags; OpenSlide exposes them as tiff.*.
        try:
            page = self._slide.ts_tifffile.pages[0]
            tags = page.tags
            if "XResolution" in tags and "ResolutionUnit" in tags:
                num, den = tags["XResolution"].value
                self.properties.setdefault("tiff.XResolution", str(num / den if den else 0.0))
                unit = int(tags["ResolutionUnit"].value)
                self.properties.setdefault(
                    "tiff.ResolutionUnit", {1: "none", 2: "inch", 3: "centimeter"}.get(unit, str(unit)))
        except (AttributeError, IndexError, KeyError, TypeError, ValueError):
            pass

    def read_pixels(self, xy0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """As :meth:`OpenSlideBackend.read_pixels`."""
        rgb = np.asarray(self._slide.read_region(xy0, level, size, as_array=True))[..., :3]
        # tiffslide pads reads beyond the image with black; mark them transparent as OpenSlide does.
        down = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        x_l, y_l = int(np.floor(xy0[0] / down)), int(np.floor(xy0[1] / down))
        if x_l >= 0 and y_l >= 0 and x_l + rgb.shape[1] <= lw and y_l + rgb.shape[0] <= lh:
            # Inside the level: opaque. tiffslide may hand back a read-only buffer; callers own the result.
            return rgb if rgb.flags.writeable else rgb.copy()
        alpha = np.zeros(rgb.shape[:2], dtype=np.uint8)
        alpha[max(0, -y_l):max(0, lh - y_l), max(0, -x_l):max(0, lw - x_l)] = 255
        return np.concatenate([rgb, alpha[..., None]], axis=2)

    def close(self) -> None:
        self._slide.close()


BACKENDS = {"openslide": OpenSlideBackend, "tiffslide": TiffSlideBackend}
