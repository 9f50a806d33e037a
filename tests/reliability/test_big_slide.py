"""Bounded memory on big single-level slides: whole-slide reads (tissue mask, thumbnail,
segmentation grid) go through the reader in strips, downsampled as they go."""

from __future__ import annotations

import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from wsi_pipeline.slides import open_slide
from wsi_pipeline.slides import slide as slide_module
from wsi_pipeline.slides.slide import Slide


class CountingBackend:
    """A single-level slide of random pixels that records every region it is asked for."""

    name = "fake"
    vendor = "fake"

    def __init__(self, width_px: int, height_px: int, seed: int = 0):
        self.level_dimensions = ((width_px, height_px),)
        self.level_downsamples = (1.0,)
        self.properties = {}
        self.pixels = np.random.default_rng(seed).integers(0, 256, (height_px, width_px, 3), dtype=np.uint8)
        self.largest_read_px = 0

    def read_pixels(self, xy0, level, size):
        w, h = size
        self.largest_read_px = max(self.largest_read_px, w * h)
        return self.pixels[xy0[1]:xy0[1] + h, xy0[0]:xy0[0] + w].copy()

    def close(self):
        pass


def _whole_read_resize(pixels: np.ndarray, out_wh, box=None) -> np.ndarray:
    """What the readers did before strips: one whole-level read, one PIL BOX resize."""
    return np.asarray(Image.fromarray(pixels).resize(out_wh, Image.Resampling.BOX, box=box))


def test_strip_reads_stay_within_budget_and_equal_one_whole_read(monkeypatch):
    backend = CountingBackend(1500, 1100)
    slide = Slide(backend, Path("fake.tif"), "FAKE", mpp_override=0.5)
    monkeypatch.setattr(slide_module, "STRIP_BUDGET_PX", 50_000)

    image, mpp = slide.read_at_mpp(8.0)          # 16× down: 94 × 69 px
    assert image.shape == (69, 94, 3) and mpp == pytest.approx(0.5 * 1500 / 94)
    # Each strip is whole output rows (16 level rows each) of the full width: ≤ budget + one row's worth.
    assert backend.largest_read_px <= 50_000 + 1500 * 17
    expected = _whole_read_resize(backend.pixels, (94, 69))
    assert np.abs(image.astype(int) - expected).max() <= 1

    backend.largest_read_px = 0
    thumb = slide.thumbnail(200)
    assert thumb.shape == (147, 200, 3) and backend.largest_read_px <= 50_000 + 1500 * 8
    assert np.abs(thumb.astype(int) - _whole_read_resize(backend.pixels, (200, 147))).max() <= 1

    # A fractional box (as the segmentation grid asks for): same as one read + resize of that box.
    part = slide.read_level_resized(0, (70, 50), box=(0.0, 0.0, 1400.0, 1000.0))
    assert np.abs(part.astype(int) - _whole_read_resize(backend.pixels, (70, 50),
                                                        (0, 0, 1400, 1000))).max() <= 1


def test_small_pyramid_reads_are_unchanged(make_slide, monkeypatch):
    """On a real slide, strips (forced by a tiny budget) give the same mask image and thumbnail."""
    path = make_slide("strips")
    with open_slide(path) as slide:
        whole = slide.read_at_mpp(8.0)[0], slide.read_at_mpp(1.3)[0], slide.thumbnail(300)
        monkeypatch.setattr(slide_module, "STRIP_BUDGET_PX", 40_000)
        strips = slide.read_at_mpp(8.0)[0], slide.read_at_mpp(1.3)[0], slide.thumbnail(300)
    for a, b in zip(whole, strips):
        assert a.shape == b.shape and np.abs(a.astype(int) - b).max() <= 1


def write_big_tiled_tiff(path: Path, size_px: int, mpp: float = 0.5, tile_px: int = 512) -> None:
    """A single-page tiled TIFF (no pyramid), glass with a block of tissue in the middle ninth.
    Each distinct tile is compressed once and written as-is, so 60000² px take well under a second."""
    glass = zlib.compress(np.full((tile_px, tile_px, 3), 242, np.uint8).tobytes())
    tissue = zlib.compress(np.broadcast_to(np.array([200, 120, 170], np.uint8),
                                           (tile_px, tile_px, 3)).tobytes())
    n = -(-size_px // tile_px)

    def tiles():
        for j in range(n):
            for i in range(n):
                yield tissue if (n // 3 <= i < 2 * n // 3 and n // 3 <= j < 2 * n // 3) else glass

    px_per_cm = 1e4 / mpp
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(tiles(), shape=(size_px, size_px, 3), dtype=np.uint8, tile=(tile_px, tile_px),
                 compression="zlib", photometric="rgb", resolution=(px_per_cm, px_per_cm),
                 resolutionunit="CENTIMETER")


@pytest.mark.slow
def test_60000px_single_level_tiff_tiles_under_1gb(tmp_path):
    """~3-4 min on a 2-core machine (decoding 3.6 gigapixels); the old whole-level read needed 14 GB."""
    slide_path = tmp_path / "big.tif"
    write_big_tiled_tiff(slide_path, 60_000)
    with open_slide(slide_path) as slide:
        assert slide.level_count == 1 and slide.dimensions == (60_000, 60_000) and slide.mpp == 0.5
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"slide_id,path,patient_id,label,cohort\nBIG,{slide_path},P1,tumor,demo\n")
    run = tmp_path / "run"
    # The child reports its own peak RSS (ru_maxrss of RUSAGE_SELF, KiB on Linux) after the stage.
    code = ("import resource, sys; from wsi_pipeline.cli import main; "
            f"rc = main(['tile', '--manifest', {str(manifest)!r}, '--out', {str(run)!r}, '--no-progress']); "
            "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr
    peak_mb = int(result.stdout.split("PEAK_KIB")[1].split()[0]) / 1024
    assert peak_mb < 1024, f"peak RSS {peak_mb:.0f} MB"
    assert (run / "tiles" / "BIG.coords.h5").is_file()
