"""Encoder throughput per registered entry at its real size: patches/s, encoder only (no slide I/O).

Run: .venv/bin/python benchmarks/bench_encoders.py [--encoders vim4path_ti,uni] [--device cpu|cuda]
     [--precision fp32|auto|bf16|fp16] [--batch 32] [--batches 3]
Each entry is built with random weights (speed does not depend on their values) at full size, fed
uint8 batches of its authors' tile side (recommended_patch_px, else its input size) through
`Encoder.forward` (the device-side resize/crop and normalisation included), one warm-up batch, then
`--batches` timed batches. `--precision auto` is what `extract.precision: auto` runs (the entry's
recommended autocast on a GPU, fp32 on CPU). Prints a markdown table (BENCHMARKS.md's format).
Defaults: every registered entry (aliases once), CPU, fp32, batch 32: the issue's CPU table.
Mamba entries (vim4path_*) on CPU: WSI_SSM_CPU_KERNEL=1 runs their scan as the C kernel (measured on
the shared 2-core box, vim4path_ti batch 32: 164 s -> 26 s per batch); say which in the table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

from wsi_pipeline.encoders import create_encoder, get_spec
from wsi_pipeline.encoders.catalog import primary_names
from wsi_pipeline.encoders.fit import effective_precision
from wsi_pipeline.features.patches import autocast_for


def tile_px(name: str) -> int:
    spec = get_spec(name)
    return spec.recommended_patch_px or spec.input_size_px


@torch.inference_mode()
def measure(name: str, device: torch.device, precision: str, batch: int, batches: int, seed: int = 0,
            warmup_batch: int | None = None) -> dict:
    spec = get_spec(name)
    encoder = create_encoder(name, "none" if spec.parameter_free else "random", device=device)
    side = tile_px(name)
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, side, side), generator=g, dtype=torch.uint8).to(device)
    used = effective_precision(precision, name, device.type)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with autocast_for(device, used):
        # warm-up: allocator, kernels, the CPU scan's first-call setup (a smaller batch is enough
        # on a CPU, where one batch of a ViT-g at 32 patches takes minutes)
        out = encoder(images[:warmup_batch] if warmup_batch else images)
        sync()
        t0 = time.perf_counter()
        for _ in range(batches):
            out = encoder(images)
        out.float().cpu()
        sync()
        seconds = time.perf_counter() - t0
    assert out.shape == (batch, spec.out_dim), (name, tuple(out.shape))
    params = sum(p.numel() for p in encoder.parameters())
    del encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"encoder": name, "params_m": params / 1e6, "tile_px": side, "precision": used,
            "patches_s": batch * batches / seconds, "s_batch": seconds / batches}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", default=None, help="comma-separated entries (default: all registered)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "auto", "bf16", "fp16"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=3, help="timed batches after the warm-up (default 3)")
    parser.add_argument("--warmup-batch", type=int, default=None, help="patches in the warm-up batch (default: --batch)")
    args = parser.parse_args(argv)
    names = args.encoders.split(",") if args.encoders else primary_names()
    device = torch.device(args.device)
    cores = os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'CPU'}, {cores} threads"
    print(f"# encoder throughput: {where}; torch {torch.__version__}; batch {args.batch}, "
          f"{args.batches} timed batches after 1 warm-up of {args.warmup_batch or args.batch}; random weights\n")
    print("| encoder | params (M) | tile px | precision | patches/s | s/batch |")
    print("|---|---:|---:|---|---:|---:|")
    failed = 0
    for name in names:
        try:
            r = measure(name.strip(), device, args.precision, args.batch, args.batches,
                        warmup_batch=args.warmup_batch)
        except Exception as exc:  # one entry out of memory (or unbuildable) must not end the table
            failed += 1
            print(f"| {name} | - | - | - | failed: {type(exc).__name__}: {str(exc)[:80]} | - |")
            continue
        print(f"| {r['encoder']} | {r['params_m']:.1f} | {r['tile_px']} | {r['precision']} | "
              f"{r['patches_s']:.1f} | {r['s_batch']:.2f} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
