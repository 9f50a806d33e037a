"""GPU: mamba-ssm's CUDA selective scan vs our native scan on the same GPU, and the Mamba MIL
aggregators per bag with either backend. Time (CUDA events) and peak GPU memory.

Run (on a machine with an NVIDIA GPU and the `cuda` extra installed):
    python benchmarks/bench_gpu.py [--lengths 1000 10000 100000 1000000] [--out benchmarks/results/gpu.md]

Scan shapes follow the CPU benchmark (bench_scan.py): batch 1, d_inner 1024, d_state 16,
input-dependent B and C, z, D, delta_bias, softplus; fp32. ``fwd`` is inference (no_grad), ``fwd+bwd``
forward with autograd then backward. MIL: one bag (1, L, 1024) through each model at width 512, forward
+ backward, as in bench_mil.py. Each number is the median of 5 timed runs after one warm-up; peak
memory is ``torch.cuda.max_memory_allocated`` above what the inputs already held. Before timing, the
outputs and gradients of both scan backends are compared at L = 10k.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wsi_pipeline.models.mil import create_aggregator  # noqa: E402
from wsi_pipeline.ssm import selective_scan, use_backend  # noqa: E402
from wsi_pipeline.ssm.backend import mamba_kernel_available  # noqa: E402

D_INNER, D_STATE = 1024, 16
MIL_MODELS = {
    "mambamil": {},
    "gmmamba": {},
    "fmamil": {},
    "transmil": {"dim": 512},
    "abmil": {},
}


def scan_inputs(length: int, device, requires_grad: bool):
    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device).requires_grad_(requires_grad)

    return dict(u=r(1, D_INNER, length), delta=r(1, D_INNER, length, scale=0.5),
                A=(-torch.rand(D_INNER, D_STATE, generator=g) - 0.5).to(device).requires_grad_(requires_grad),
                B=r(1, D_STATE, length), C=r(1, D_STATE, length), D=r(D_INNER), z=r(1, D_INNER, length),
                delta_bias=r(D_INNER, scale=0.1))


def timed(fn, repeats: int = 5):
    """Median ms of `repeats` runs after one warm-up, and peak bytes allocated during them."""
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated() - base


def verify_scan(device) -> str:
    results = {}
    for backend in ("cuda", "native"):
        inputs = scan_inputs(10_000, device, True)
        with use_backend(backend):
            out = selective_scan(**inputs, delta_softplus=True)
        out.backward(torch.linspace(-1, 1, out.numel(), device=device).view_as(out))
        results[backend] = (out.detach(), {k: v.grad for k, v in inputs.items()})
    out_diff = (results["cuda"][0] - results["native"][0]).abs().max().item()
    grad_diff = max(((results["cuda"][1][k] - results["native"][1][k]).abs().max()
                     / results["native"][1][k].abs().max()).item() for k in results["native"][1])
    return f"L = 10k: max |out difference| {out_diff:.2e}; max relative gradient difference {grad_diff:.2e}"


def bench_scan(lengths, device, native_max):
    rows = []
    for length in lengths:
        for backend in ("cuda", "native") if length <= native_max else ("cuda",):
            for mode in ("fwd", "fwd+bwd"):
                inputs = scan_inputs(length, device, mode == "fwd+bwd")
                grad_out = torch.randn(1, D_INNER, length, device=device) if mode == "fwd+bwd" else None

                def step():
                    with use_backend(backend):
                        if grad_out is None:
                            with torch.no_grad():
                                selective_scan(**inputs, delta_softplus=True)
                        else:
                            selective_scan(**inputs, delta_softplus=True).backward(grad_out)

                try:
                    ms, peak = timed(step, repeats=5 if length <= 100_000 else 3)
                    rows.append((length, backend, mode, f"{ms:.2f}", f"{peak / 2**20:.0f}"))
                except torch.OutOfMemoryError:
                    rows.append((length, backend, mode, "OOM", "-"))
                del inputs, grad_out
                torch.cuda.empty_cache()
        print(*rows[-4 if length <= native_max else -2:], sep="\n", flush=True)
    return rows


def bench_mil(lengths, device, native_max):
    rows = []
    for name, cfg in MIL_MODELS.items():
        backends = ("cuda", "native") if name in ("mambamil", "gmmamba", "fmamil") else ("-",)
        for length in lengths:
            for backend in backends:
                if backend == "native" and length > native_max:
                    continue
                torch.manual_seed(0)
                model = create_aggregator(name, 1024, 2, **cfg).to(device)
                features = torch.randn(1, length, 1024, device=device)
                side = int(length ** 0.5) + 1
                idx = torch.randperm(side * side)[:length]
                coords = (torch.stack([idx % side, idx // side], 1) * 256).float()[None].to(device)
                if name == "gmmamba":
                    model(features, coords)  # one-off k-means grouping, cached as after epoch 1

                def step():
                    with use_backend(None if backend == "-" else backend):
                        out = model(features, coords)
                        out.logits.sum().backward()

                try:
                    ms, peak = timed(step, repeats=5 if length <= 100_000 else 3)
                    rows.append((name, length, backend, f"{ms:.1f}", f"{peak / 2**20:.0f}"))
                except torch.OutOfMemoryError:
                    rows.append((name, length, backend, "OOM", "-"))
                print(rows[-1], flush=True)
                del model, features, coords
                torch.cuda.empty_cache()
    return rows


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[1000, 10_000, 100_000, 1_000_000])
    ap.add_argument("--mil-lengths", type=int, nargs="+", default=[1000, 10_000, 100_000])
    ap.add_argument("--native-max-length", type=int, default=100_000,
                    help="skip the native backend above this length (its chunk loop is slow on a GPU)")
    ap.add_argument("--mil-native-max-length", type=int, default=10_000)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu.md")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device")
    if not mamba_kernel_available():
        sys.exit("bench_gpu: mamba-ssm's kernel is not installed (pip install 'wsi-pipeline[cuda]')")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    head = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"fp32 (TF32 off)")
    print(head, flush=True)
    check = verify_scan(device)
    print(check, flush=True)
    scan_rows = bench_scan(args.lengths, device, args.native_max_length)
    mil_rows = bench_mil(args.mil_lengths, device, args.mil_native_max_length)
    text = "\n\n".join([
        f"# GPU benchmark\n\n{head}\n\nScan agreement (cuda vs native): {check}",
        "## Selective scan, batch 1, d_inner 1024, d_state 16\n\n"
        + table(("L", "backend", "mode", "ms", "peak MiB"), scan_rows),
        "## MIL aggregators, one bag (1, L, 1024), width 512, forward + backward\n\n"
        + table(("model", "L", "scan backend", "ms", "peak MiB"), mil_rows),
    ]) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
