"""Is slide I/O hidden behind the encoder? End-to-end patches/s vs encoder-only patches/s.

Run: .venv/bin/python benchmarks/bench_extract.py [--n 256] [--encoders resnet50_trunc,vit_small_patch16]
For each encoder: the same N patches (224 px at 0.5 µm/px from a generated 8192×6144 slide) are
(a) pre-read into memory and pushed through the encoder alone, and (b) run end to end through
`extract_features` (DataLoader workers reading the slide). ratio = (b) / (a); 1.0 means the encoder
never waits for I/O. Target ≥ 0.9. Random weights: speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wsi_pipeline.demo.slides import DemoSlideSpec, write_demo_slide
from wsi_pipeline.encoders import create_encoder, get_spec
from wsi_pipeline.run.config import Config
from wsi_pipeline.features.patches import (PatchDataset, PatchSource, autocast_for, default_workers,
                                     extract_features, resolve_device)
from wsi_pipeline.slides import open_slide
from wsi_pipeline.tiling import tissue
from wsi_pipeline.tiling.grid import plan_geometry, tile_tissue


def patch_source(path: Path, n: int) -> PatchSource:
    cfg = Config()
    with open_slide(path) as slide:
        image, _ = slide.read_at_mpp(cfg.tissue.mask_mpp)
        scale = (slide.dimensions[0] / image.shape[1], slide.dimensions[1] / image.shape[0])
        mask = tissue.detect_tissue(image, slide.mpp * scale[0])
        g = plan_geometry(slide.mpp, slide.level_downsamples, 0.5, 224)
        grid = tile_tissue(slide.dimensions, g, mask, scale, 0.25)
    coords = grid.coords[:n]
    return PatchSource(str(path), path.stem, "auto", None, coords, g.patch_level, g.read_size_px, 224)


@torch.inference_mode()
def encoder_only(encoder, batches, device, precision) -> float:
    with autocast_for(device, precision):
        encoder(batches[0].to(device))  # warm-up (allocator, kernels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b in batches:
            out = encoder(b.to(device, non_blocking=True))
        out.float().cpu()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return sum(len(b) for b in batches) / (time.perf_counter() - t0)


class PerPatchReads(torch.utils.data.Dataset):
    """PatchDataset without its batched `__getitems__`: the per-patch read path, for comparison."""

    def __init__(self, source: PatchSource):
        self.inner = PatchDataset(source)

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        return self.inner[i]


def reader_only(dataset, batch_size: int) -> float:
    """Patches/s of reading + resizing alone, in this process (what one DataLoader worker does)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=0)
    t0 = time.perf_counter()
    n = sum(len(b) for b in loader)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--encoders", default="resnet50_trunc,vit_small_patch16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--repeat", type=int, default=1,
                    help="read each patch this many times (more work per run from one generated slide)")
    ap.add_argument("--slide-size", type=int, nargs=2, default=(8192, 6144), metavar=("W", "H"),
                    help="generated slide, px at 0.5 µm/px (larger for more patches on a GPU)")
    args = ap.parse_args()
    device = resolve_device(args.device)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")
          + f", torch {torch.__version__}, workers {default_workers(device)}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.svs"
        write_demo_slide(path, DemoSlideSpec(width_px=args.slide_size[0], height_px=args.slide_size[1],
                                             positive=True, seed=7))
        source = patch_source(path, args.n)
        if args.repeat > 1:
            source = dataclasses.replace(source, coords=np.tile(source.coords, (args.repeat, 1)))
        ds = PatchDataset(source)
        for backend in ("openslide", "tiffslide"):
            src = dataclasses.replace(source, backend=backend)
            per_patch = reader_only(PerPatchReads(src), args.batch_size)
            rows = reader_only(PatchDataset(src), args.batch_size)
            print(f"reader only, one process, {backend:9s}: per-patch reads {per_patch:6.0f} patches/s | "
                  f"row reads {rows:6.0f} patches/s | {rows / per_patch:.2f}x")
        items = [ds[i] for i in range(len(ds))]
        batches = [torch.stack(items[i:i + args.batch_size]) for i in range(0, len(items), args.batch_size)]
        if device.type == "cuda":
            batches = [b.pin_memory() for b in batches]
        print(f"{len(items)} patches of 224 px at 0.5 µm/px, batch {args.batch_size}")
        for name in args.encoders.split(","):
            # Random weights: speed does not depend on their values; stain_texture has none.
            encoder = create_encoder(name, None if get_spec(name).parameter_free else "random", device=device)
            if device.type == "cuda":
                encoder.to(memory_format=torch.channels_last)
            rate_enc = encoder_only(encoder, batches, device, args.precision)
            t0 = time.perf_counter()
            feats = extract_features(encoder, source, batch_size=args.batch_size, precision=args.precision)
            rate_e2e = len(feats) / (time.perf_counter() - t0)
            print(f"{name:20s} encoder-only {rate_enc:8.1f} patches/s | end-to-end {rate_e2e:8.1f} "
                  f"patches/s | ratio {rate_e2e / rate_enc:.2f}")
            assert np.isfinite(feats).all()


if __name__ == "__main__":
    main()
