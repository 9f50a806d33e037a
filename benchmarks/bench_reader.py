"""Patch readers and encoder compile, measured in one run (issue 18 items 1-3).

Run: OMP_NUM_THREADS=2 nice -n 10 .venv/bin/python benchmarks/bench_reader.py [--n 384]
       [--encoders resnet18,stain_texture] [--compile resnet50,vit_base_patch16_224]

1. Reader alone, one process (what one DataLoader worker does): patches/s of OpenSlide and tiffslide
   (per-patch reads and the row reads PatchDataset uses) and the direct tile reader, on a generated
   8192×6144 tiled-JPEG slide and its deflate twin: 224 px patches at 0.5 µm/px (level 0 as is),
   1.0 µm/px (448 px at level 0 resized to 224: a level that does not match) and 2.0 µm/px (level 1).
   Passes alternate between readers; the median of `--passes` is reported.
2. End to end / encoder only on CPU, per reader, with small encoders (so the reader can show).
3. torch.compile: encoder-only patches/s before and after (random weights, timm, inductor on
   --compile-device: cpu fp32, or cuda bf16 + channels_last, the latter not run yet;
   on-disk caches in TORCHINDUCTOR_CACHE_DIR), with the first call's time (compile) reported apart.
Random weights everywhere: speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wsi_pipeline.demo.slides import DemoSlideSpec, write_demo_slide
from wsi_pipeline.features.patches import PatchDataset, PatchSource, extract_features, plan_reader
from wsi_pipeline.run.config import Config
from wsi_pipeline.slides import open_slide
from wsi_pipeline.tiling import tissue
from wsi_pipeline.tiling.grid import plan_geometry, tile_tissue


def patch_source(path: Path, n: int, target_mpp: float, patch_px: int = 224) -> PatchSource:
    cfg = Config()
    with open_slide(path) as slide:
        image, _ = slide.read_at_mpp(cfg.tissue.mask_mpp)
        scale = (slide.dimensions[0] / image.shape[1], slide.dimensions[1] / image.shape[0])
        mask = tissue.detect_tissue(image, slide.mpp * scale[0])
        g = plan_geometry(slide.mpp, slide.level_downsamples, target_mpp, patch_px)
        grid = tile_tissue(slide.dimensions, g, mask, scale, 0.25)
    coords = grid.coords[:n]
    return PatchSource(str(path), path.stem, "auto", None, coords, g.patch_level, g.read_size_px, patch_px)


def reader_sources(source: PatchSource) -> dict[str, tuple[PatchSource, bool]]:
    """name -> (source, batched): the readers compared."""
    with open_slide(source.slide_path) as slide:
        opened = slide.level_dimensions, slide.level_downsamples, slide.backend_name, slide.vendor
    direct, name, note = plan_reader(source, *opened)
    assert name == "direct", note
    out = {}
    for backend in ("openslide", "tiffslide"):
        src = dataclasses.replace(source, backend=backend)
        out[f"{backend} per-patch"] = (src, False)
        out[f"{backend} rows"] = (src, True)
    out["direct"] = (direct, True)
    return out


def read_rate(source: PatchSource, batched: bool, batch_size: int) -> float:
    ds = PatchDataset(source)  # fresh: opening the slide is part of a worker's cost, as in extraction
    n = len(ds)
    t0 = time.perf_counter()
    for i in range(0, n, batch_size):
        idx = list(range(i, min(n, i + batch_size)))
        if batched:
            ds.__getitems__(idx)
        else:
            [ds[k] for k in idx]
    return n / (time.perf_counter() - t0)


@torch.inference_mode()
def encoder_rate(model, batches) -> float:
    out = model(batches[0])  # warm-up
    _sync(out)
    t0 = time.perf_counter()
    for b in batches:
        out = model(b)
    _sync(out)
    return sum(len(b) for b in batches) / (time.perf_counter() - t0)


def _sync(out: torch.Tensor) -> None:
    if out.is_cuda:
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=384)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--encoders", default="resnet18,stain_texture")
    ap.add_argument("--e2e-n", type=int, default=192)
    ap.add_argument("--compile", default="resnet50,vit_base_patch16_224")
    ap.add_argument("--compile-batch", type=int, default=8)
    ap.add_argument("--compile-batches", type=int, default=4)
    ap.add_argument("--compile-device", default="cpu",
                    help="cpu (fp32), or cuda (bf16 autocast, channels_last, as extraction runs there)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: readers,e2e,compile")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores (shared, load {os.getloadavg()[0]:.1f}), "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        if "readers" not in skip:
            for compression in ("jpeg", "zlib"):
                path = Path(tmp) / f"bench_{compression}.svs"
                write_demo_slide(path, DemoSlideSpec(width_px=8192, height_px=6144, positive=True, seed=7,
                                                     compression=compression))
                for target_mpp in (0.5, 1.0, 2.0):
                    source = patch_source(path, args.n, target_mpp)
                    readers = reader_sources(source)
                    rates = {name: [] for name in readers}
                    for _ in range(args.passes):
                        for name, (src, batched) in readers.items():
                            rates[name].append(read_rate(src, batched, args.batch_size))
                    med = {k: statistics.median(v) for k, v in rates.items()}
                    base = med["openslide rows"]
                    print(f"\n{compression}, {target_mpp} µm/px: level {source.patch_level}, read "
                          f"{source.read_size_px} px -> 224, {len(source.coords)} patches, "
                          f"median of {args.passes}")
                    for name, rate in med.items():
                        print(f"  {name:20s} {rate:7.0f} patches/s  {rate / base:5.2f}x openslide rows")
        if "e2e" not in skip:
            from wsi_pipeline.encoders import create_encoder, get_spec

            path = Path(tmp) / "bench_jpeg.svs"
            if not path.exists():
                write_demo_slide(path, DemoSlideSpec(width_px=8192, height_px=6144, positive=True, seed=7))
            source = patch_source(path, args.e2e_n, 0.5)
            readers = reader_sources(source)
            items = PatchDataset(source).__getitems__(list(range(len(source.coords))))
            batches = [torch.stack(items[i:i + args.batch_size]) for i in range(0, len(items), args.batch_size)]
            print(f"\nend to end vs encoder only, CPU fp32, {len(items)} patches, batch {args.batch_size}, "
                  f"1 reader worker")
            for enc_name in args.encoders.split(","):
                encoder = create_encoder(enc_name, None if get_spec(enc_name).parameter_free else "random")
                enc = encoder_rate(encoder, batches)
                for reader in ("openslide rows", "tiffslide rows", "direct"):
                    src = readers[reader][0]
                    t0 = time.perf_counter()
                    feats = extract_features(encoder, src, batch_size=args.batch_size, num_workers=1)
                    e2e = len(feats) / (time.perf_counter() - t0)
                    print(f"  {enc_name:14s} {reader:15s} encoder only {enc:7.1f} | end to end {e2e:7.1f} "
                          f"patches/s | ratio {e2e / enc:.2f}")
    if "compile" not in skip:
        import timm

        from torch._inductor.runtime.cache_dir_utils import cache_dir

        # Inductor's on-disk caches (FX graphs, kernels) live here; set TORCHINDUCTOR_CACHE_DIR
        # before starting Python to move them. A second run of a model starts from them.
        device = torch.device(args.compile_device)
        cuda = device.type == "cuda"
        print(f"\ntorch.compile (inductor, {device}, {'bf16, channels_last' if cuda else 'fp32'}, batch "
              f"{args.compile_batch} of 224 px, {args.compile_batches} timed batches, cache {cache_dir()})")
        g = torch.Generator().manual_seed(0)
        memory_format = torch.channels_last if cuda else torch.contiguous_format
        batches = [torch.rand(args.compile_batch, 3, 224, 224, generator=g).to(device, memory_format=memory_format)
                   for _ in range(args.compile_batches)]
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
        for name in filter(None, args.compile.split(",")):
            model = timm.create_model(name, pretrained=False, num_classes=0).eval()
            model = model.to(device, memory_format=memory_format)
            with amp:
                eager = encoder_rate(model, batches)
                compiled = torch.compile(model)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    ref = model(batches[0])
                    got = compiled(batches[0])
                    _sync(got)
                first = time.perf_counter() - t0
                fast = encoder_rate(compiled, batches)
            diff = (got - ref).abs().max().item()
            print(f"  {name:22s} eager {eager:6.1f} | compiled {fast:6.1f} patches/s | {fast / eager:.2f}x | "
                  f"first call {first:5.1f} s | max |diff| {diff:.1e}")


if __name__ == "__main__":
    main()
