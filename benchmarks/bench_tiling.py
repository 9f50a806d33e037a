"""Tissue detection + tiling speed, and read_region throughput per backend.

Run: .venv/bin/python benchmarks/bench_tiling.py [--slides 3]
Prints per-slide seconds for tissue+tiling (the tile stage minus writing), the vectorised grid on a
virtual 100k × 100k slide, and 224-px read_region tiles/s for OpenSlide vs tiffslide, all measured in
this one run on this machine.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from wsi_pipeline.demo.slides import DemoSlideSpec, write_demo_slide
from wsi_pipeline.run.config import Config
from wsi_pipeline.slides import open_slide
from wsi_pipeline.tiling import tissue
from wsi_pipeline.tiling.grid import plan_geometry, tile_tissue


def bench_tile_one(path: Path, cfg: Config) -> tuple[float, int]:
    t0 = time.perf_counter()
    with open_slide(path) as slide:
        image, _ = slide.read_at_mpp(cfg.tissue.mask_mpp)
        scale = (slide.dimensions[0] / image.shape[1], slide.dimensions[1] / image.shape[0])
        mask = tissue.detect_tissue(image, slide.mpp * scale[0])
        tissue.mask_to_polygons(mask)
        g = plan_geometry(slide.mpp, slide.level_downsamples, cfg.tiling.target_mpp, cfg.tiling.patch_size_px)
        grid = tile_tissue(slide.dimensions, g, mask, scale, cfg.tiling.min_tissue_fraction)
    return time.perf_counter() - t0, len(grid.coords)


def bench_reads(path: Path, backend: str, n: int = 300, size: int = 224) -> float:
    rng = np.random.default_rng(0)
    with open_slide(path, backend=backend) as slide:
        w, h = slide.dimensions
        xy = np.stack([rng.integers(0, w - size, n), rng.integers(0, h - size, n)], 1)
        slide.read_region(tuple(xy[0]), 0, (size, size))  # warm the file cache / decoder
        t0 = time.perf_counter()
        for x, y in xy:
            slide.read_region((int(x), int(y)), 0, (size, size))
        return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slides", type=int, default=3)
    args = ap.parse_args()
    cfg = Config()
    print(f"machine: {platform.machine()} {platform.processor() or ''}, python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(args.slides):
            p = Path(tmp) / f"s{i}.svs"
            write_demo_slide(p, DemoSlideSpec(width_px=8192, height_px=6144, positive=i % 2 == 1, seed=i))
            paths.append(p)
        times = [bench_tile_one(p, cfg) for p in paths]
        secs = [t for t, _ in times]
        print(f"tissue+tiling, 8192x6144 @0.5 µm/px slides: {np.mean(secs):.3f} s/slide "
              f"(min {min(secs):.3f}, max {max(secs):.3f}), patches/slide {np.mean([n for _, n in times]):.0f}")
        for backend in ("openslide", "tiffslide"):
            rates = [bench_reads(p, backend) for p in paths]
            print(f"read_region 224x224 level 0, {backend}: {np.mean(rates):.0f} tiles/s")
    # The grid on a virtual 100k × 100k slide (mask at 32 µm-ish cells): the vectorised core.
    mask = np.zeros((3125, 3125), bool)
    yy, xx = np.mgrid[0:3125, 0:3125]
    mask[((yy - 1560) / 1300.0) ** 2 + ((xx - 1560) / 1000.0) ** 2 < 1] = True
    g = plan_geometry(0.25, (1.0, 4.0, 16.0, 32.0), 0.5, 224)
    t0 = time.perf_counter()
    grid = tile_tissue((100_000, 100_000), g, mask, (32.0, 32.0), 0.25)
    t_grid = time.perf_counter() - t0
    t0 = time.perf_counter()
    tissue.mask_to_polygons(mask)
    t_poly = time.perf_counter() - t0
    print(f"100k x 100k slide: grid+tissue fraction {t_grid:.3f} s for {grid.n_grid} positions "
          f"({len(grid.coords)} kept); contour tracing of its 3125x3125 mask {t_poly:.3f} s")


if __name__ == "__main__":
    main()
