"""MambaMIL on CPU: the cost of the selective scan (vs the same model without it) and peak memory
with and without activation checkpointing, for issue 18.

    python benchmarks/bench_scan_fused.py ratio --length 10000 [--passes 3]
    python benchmarks/bench_scan_fused.py memory --lengths 10000 30000 100000 [--checkpoint none 0]
        [--chunk 8192]

``ratio``: one process, one MambaMIL (in_dim 1024, d_model 512, its defaults otherwise); forward +
backward passes alternate between the model with the scan and the same model with the scan replaced by
``u * silu(z)`` (bench_mil's ``mambamil_noscan``), so both see the same machine load; the fastest pass
of each is reported, in wall time and in process CPU time (``time.process_time``; with one thread the
CPU time is what the pass costs when other jobs take the core away part of the time). Alternating
matters on a shared machine: bench_mil measures the two in separate processes minutes apart.

``memory``: every (length, checkpoint_above) in a fresh subprocess; peak RSS rise
(``ru_maxrss``) over one training forward + backward, measured after the model and the bag exist,
i.e. activations, gradients and workspace. A linear fit in L extrapolates to 1M instances.
``--chunk N`` adds ``checkpoint_chunk=N`` (sequence-chunked recompute) to every checkpointed run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

IN_DIM, WIDTH = 1024, 512


def build(checkpoint_above=None, checkpoint_chunk=None):
    import torch

    from wsi_pipeline.models.mil import create_aggregator

    torch.manual_seed(0)
    # context_drop 0: the default (0.5) skips each Mamba layer on half the training passes at random,
    # which would time and measure a different model on every pass.
    cfg = {"d_model": WIDTH, "context_drop": 0.0}
    if checkpoint_above is not None:
        cfg["checkpoint_above"] = checkpoint_above
        if checkpoint_chunk is not None:
            cfg["checkpoint_chunk"] = checkpoint_chunk
    return create_aggregator("mambamil", IN_DIM, 2, **cfg)


def step(model, features):
    import torch

    out = model(features)
    torch.nn.functional.cross_entropy(out.logits, torch.tensor([1])).backward()
    model.zero_grad(set_to_none=True)


def ratio(length: int, passes: int) -> dict:
    import torch
    import torch.nn.functional as F

    import wsi_pipeline.ssm.mamba_block as mamba_block

    scan = mamba_block.selective_scan

    def no_scan(u, delta, A, B, C, D=None, z=None, **kwargs):
        return u * F.silu(z)

    model = build()
    features = torch.randn(1, length, IN_DIM)
    times = {"scan": [], "no_scan": []}
    cpu_times = {"scan": [], "no_scan": []}
    for index in range(passes + 1):
        for name, fn in (("scan", scan), ("no_scan", no_scan)):
            mamba_block.selective_scan = fn
            start, start_cpu = time.perf_counter(), time.process_time()
            step(model, features)
            if index:                      # the first round is a warm-up
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - start_cpu)
    mamba_block.selective_scan = scan
    best = {k: min(v) for k, v in times.items()}
    best_cpu = {k: min(v) for k, v in cpu_times.items()}
    return {"length": length, "threads": torch.get_num_threads(), "scan_s": best["scan"],
            "no_scan_s": best["no_scan"], "ratio": best["scan"] / best["no_scan"],
            "scan_cpu_s": best_cpu["scan"], "no_scan_cpu_s": best_cpu["no_scan"],
            "cpu_ratio": best_cpu["scan"] / best_cpu["no_scan"], "all": times, "all_cpu": cpu_times}


def memory_child(length: int, checkpoint_above, checkpoint_chunk=None) -> dict:
    import torch

    model = build(checkpoint_above, checkpoint_chunk)
    step(model, torch.randn(1, 100, IN_DIM))        # warm-up (small, so its own peak stays below the base)
    features = torch.randn(1, length, IN_DIM)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start, start_cpu = time.perf_counter(), time.process_time()
    step(model, features)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"length": length, "checkpoint_above": checkpoint_above, "checkpoint_chunk": checkpoint_chunk,
            "seconds": seconds, "cpu_seconds": cpu_seconds,
            "base_mb": base, "peak_mb": peak, "rise_mb": peak - base}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("ratio", "memory", "child"))
    parser.add_argument("--length", type=int, default=10_000)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--lengths", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    parser.add_argument("--checkpoint", nargs="+", default=["none", "0"])
    parser.add_argument("--chunk", type=int, default=None, help="checkpoint_chunk for checkpointed runs")
    args = parser.parse_args()
    if args.mode == "ratio":
        print(json.dumps(ratio(args.length, args.passes)))
    elif args.mode == "child":
        above = None if args.checkpoint[0] == "none" else int(args.checkpoint[0])
        print(json.dumps(memory_child(args.length, above, args.chunk if above is not None else None)))
    else:
        for above in args.checkpoint:
            for length in args.lengths:
                chunk = ["--chunk", str(args.chunk)] if args.chunk is not None else []
                proc = subprocess.run([sys.executable, __file__, "child", "--length", str(length),
                                       "--checkpoint", above, *chunk], capture_output=True, text=True)
                line = proc.stdout.strip().splitlines()[-1:] or [json.dumps({"error": proc.stderr[-300:]})]
                print(line[0], flush=True)


if __name__ == "__main__":
    main()
