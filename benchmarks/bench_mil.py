"""MIL aggregators on CPU: time and peak memory of one forward + backward pass per bag vs bag length.

Run: .venv/bin/python benchmarks/bench_mil.py [--lengths 1000 10000 100000] [--million auto]
     [--out benchmarks/results/mil.md]

Every (model, bag length) is measured in a fresh subprocess, so its peak resident memory
(``getrusage(RUSAGE_SELF).ru_maxrss``) belongs to that measurement alone; tracemalloc would miss
torch's allocations. Models: mambamil, gmmamba, transmil, abmil at in_dim 1024 and width 512 (their
defaults otherwise), twodmamba at its own defaults (d_model 128, 1 layer, as upstream; bags up to
30k), plus ``mambamil_noscan``: MambaMIL with the selective scan replaced by ``u * silu(z)``
(same shapes, no recurrence) — MambaMIL / no-scan is the cost of the scan itself. The scan runs as
by default (the CPU kernel where it builds; ``WSI_SSM_CPU_KERNEL=0`` measures the PyTorch scan).

Each child builds the model and a bag (features (1, L, 1024), distinct grid coordinates), runs one
warm-up pass on a 1,000-instance bag, then times forward + backward of the full bag (fastest of 3
passes up to 10k instances, one pass above, to limit the noise of a shared machine). GMMamba's
k-means grouping is computed (and cached, as in training epochs after the first) before the timed
pass; its one-off cost is reported separately. "1M" runs for mambamil only, and with ``--million
auto`` only when the 100k run extrapolates (linearly) to under 16 GB and about 5 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

IN_DIM = 1024
WIDTH = 512
MODELS = ("mambamil", "mambamil_noscan", "gmmamba", "transmil", "abmil", "mammil", "mammil_scan", "twodmamba")
# The 2-D scan holds d_inner * d_state values per grid cell (a bag of L here has ~2L cells) a few
# times over: at 100k instances ~10 GB at its default width. Longer bags are skipped (noted).
TWOD_MAX_LENGTH = 30_000
MODEL_CONFIGS = {
    # context_drop 0: its default (0.5) skips each Mamba layer on half the training passes at random,
    # so the timed pass would sometimes run no scan at all.
    "mambamil": ("mambamil", {"d_model": WIDTH, "context_drop": 0.0}),
    "mambamil_noscan": ("mambamil", {"d_model": WIDTH, "context_drop": 0.0}),
    "gmmamba": ("gmmamba", {"d_model": WIDTH}),
    "transmil": ("transmil", {"dim": WIDTH}),
    "abmil": ("abmil", {"hidden_dim": WIDTH}),
    # MamMIL (issue 29): both built layers running, d_state 128; its Mamba-2 by the chunked SSD form
    # (default) and by our selective scan with the heads' A and dt broadcast (ssd_impl "scan").
    "mammil": ("mammil", {"d_model": WIDTH}),
    "mammil_scan": ("mammil", {"d_model": WIDTH, "ssd_impl": "scan"}),
    # 2DMamba at upstream's own width (d_model 128, 1 layer; main.py), its tight grid (the bag's box).
    "twodmamba": ("twodmamba", {}),
}
MILLION_RSS_LIMIT_MB = 16 * 1024
MILLION_TIME_LIMIT_S = 300


def passes(length: int) -> int:
    """Measured passes per configuration (the fastest is reported): 3 up to 10k instances, else 1."""
    return 3 if length <= 10_000 else 1


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024    # Linux: KiB


def run_child(model_key: str, length: int) -> dict:
    """Measure one (model, length) in this process; returns the result as a dict."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    if model_key == "mambamil_noscan":
        import wsi_pipeline.ssm.mamba_block as mamba_block

        def no_scan(u, delta, A, B, C, D=None, z=None, **kwargs):
            return u * F.silu(z)

        mamba_block.selective_scan = no_scan

    from wsi_pipeline.models.mil import create_aggregator

    torch.manual_seed(0)
    name, cfg = MODEL_CONFIGS[model_key]
    model = create_aggregator(name, IN_DIM, 2, **cfg)
    rng = np.random.default_rng(0)

    def bag(n):
        side = int(np.ceil(np.sqrt(2 * n)))
        cells = rng.choice(side * side, n, replace=False)
        coords = torch.from_numpy(np.stack([cells % side, cells // side], 1) * 256)[None]
        return torch.randn(1, n, IN_DIM), coords

    def step(features, coords):
        out = model(features, coords)
        torch.nn.functional.cross_entropy(out.logits, torch.tensor([1])).backward()
        model.zero_grad(set_to_none=True)

    step(*bag(min(length, 1000)))                         # warm-up: allocator, thread pool, kernels
    features, coords = bag(length)
    kmeans_s = graph_s = None
    if name == "gmmamba":
        start = time.perf_counter()
        model.groups(length, coords[0])
        kmeans_s = time.perf_counter() - start
    if name == "mammil":   # kNN graph, spanning tree, orders: once per slide, then cached
        start = time.perf_counter()
        model.graph(features[0], coords[0])
        graph_s = time.perf_counter() - start
    rss_before = peak_rss_mb()
    times = []
    for _ in range(passes(length)):
        start = time.perf_counter()
        step(features, coords)
        times.append(time.perf_counter() - start)
    return {"model": model_key, "length": length, "seconds": min(times), "all_seconds": times,
            "peak_rss_mb": peak_rss_mb(), "delta_rss_mb": peak_rss_mb() - rss_before, "kmeans_s": kmeans_s,
            "graph_s": graph_s}


def measure(model_key: str, length: int, timeout_s: int) -> dict:
    """Run one measurement in a fresh subprocess."""
    command = [sys.executable, __file__, "--child", model_key, str(length)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"model": model_key, "length": length, "error": f"timeout after {timeout_s} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        return {"model": model_key, "length": length, "error": tail[0]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def length_label(length: int) -> str:
    return f"{length // 1_000_000}M" if length % 1_000_000 == 0 else f"{length // 1000}k"


def render(results: list[dict], machine: dict, notes: list[str]) -> str:
    lines = [
        "# MIL aggregators: one forward + backward per bag on CPU",
        "",
        f"Machine: {machine['cpus']} CPUs ({machine['processor']}), {machine['threads']} torch threads, "
        f"torch {machine['torch']}, Python {machine['python']}; {machine['date']}.",
        f"Load average (1 min) at start / end: {machine['load_start']:.2f} / {machine['load_end']:.2f}.",
        "**Timings were taken with other processes sharing these cores; treat them as rough.**",
        "",
        f"in_dim {IN_DIM}, width 512 (d_model / dim / hidden_dim), otherwise each model's defaults; "
        "fp32, one bag (B = 1), bag with coordinates; each configuration in a fresh subprocess after a "
        "1k-instance warm-up pass; time = fastest of 3 measured passes up to 10k instances, a single "
        "pass above. Peak RSS is the process high-water mark (model, bag and Python included); Δ is "
        "how much it rose during the measured passes.",
        "",
        "| model | L | fwd+bwd (s) | s per 1k instances | peak RSS (MB) | Δ RSS (MB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | {length_label(r['length'])} | — | — | — | {r['error']} |")
            continue
        lines.append(f"| {r['model']} | {length_label(r['length'])} | {r['seconds']:.2f} | "
                     f"{1000 * r['seconds'] / r['length']:.3f} | {r['peak_rss_mb']:.0f} | {r['delta_rss_mb']:.0f} |")
    ok = {(r["model"], r["length"]): r for r in results if "error" not in r}
    ratios = [(length, ok[("mambamil", length)]["seconds"] / ok[("mambamil_noscan", length)]["seconds"])
              for (model, length) in ok if model == "mambamil" and ("mambamil_noscan", length) in ok]
    if ratios:
        lines += ["", "MambaMIL vs the same model without the selective scan (goal ≤ 1.5×):", "",
                  "| L | MambaMIL / no-scan |", "|---:|---:|"]
        lines += [f"| {length_label(length)} | {ratio:.2f}× |" for length, ratio in sorted(ratios)]
    twod = [(length, ok[("twodmamba", length)]["seconds"] / ok[("mambamil", length)]["seconds"])
            for (model, length) in ok if model == "twodmamba" and ("mambamil", length) in ok]
    if twod:
        lines += ["", "2DMamba (d_model 128, 1 layer, its defaults) vs MambaMIL (d_model 512, 2 layers):", "",
                  "| L | 2DMamba / MambaMIL |", "|---:|---:|"]
        lines += [f"| {length_label(length)} | {ratio:.2f}× |" for length, ratio in sorted(twod)]
    kmeans = [r for r in ok.values() if r.get("kmeans_s") is not None]
    if kmeans:
        lines += ["", "GMMamba's k-means grouping (once per slide, then cached; not in the timings above): "
                  + ", ".join(f"{length_label(r['length'])}: {r['kmeans_s']:.2f} s" for r in kmeans) + "."]
    mammil = [(length, ok[(m, length)]["seconds"] / ok[("mambamil", length)]["seconds"], m)
              for (m, length) in ok if m.startswith("mammil") and ("mambamil", length) in ok]
    if mammil:
        lines += ["", "MamMIL vs MambaMIL (same run):", "", "| L | model | / MambaMIL |", "|---:|---|---:|"]
        lines += [f"| {length_label(length)} | {m} | {ratio:.2f}× |" for length, ratio, m in sorted(mammil)]
    graphs = [r for r in ok.values() if r.get("graph_s") is not None]
    if graphs:
        lines += ["", "MamMIL's graph and orders (once per slide, then cached; not in the timings above): "
                  + ", ".join(f"{length_label(r['length'])}: {r['graph_s']:.2f} s" for r in graphs) + "."]
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--million", choices=("auto", "yes", "no"), default="auto",
                        help="also run mambamil at L = 1M (auto: only if 100k extrapolates to fit)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per measurement")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "mil.md")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child[0], int(args.child[1]))))
        return

    import torch

    machine = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
               "load_start": os.getloadavg()[0]}
    results, notes = [], []
    for length in sorted(args.lengths):
        for model in args.models:
            if model == "twodmamba" and length > TWOD_MAX_LENGTH:
                notes.append(f"twodmamba at {length_label(length)} was not run (over {TWOD_MAX_LENGTH} instances: "
                             "the 2-D scan's per-cell states need ~0.1 MB per instance at d_model 128).")
                continue
            result = measure(model, length, args.timeout)
            results.append(result)
            print(json.dumps(result), flush=True)
    if "mambamil" in args.models and args.million != "no":
        base = next((r for r in results if r["model"] == "mambamil" and r["length"] == 100_000 and "error" not in r),
                    None)
        if args.million == "yes" or (base and base["peak_rss_mb"] * 10 < MILLION_RSS_LIMIT_MB
                                     and base["seconds"] * 10 < MILLION_TIME_LIMIT_S):
            result = measure("mambamil", 1_000_000, args.timeout)
            results.append(result)
            print(json.dumps(result), flush=True)
        elif base:
            notes.append(f"mambamil at 1M was not run: linear extrapolation of the 100k run gives "
                         f"~{base['peak_rss_mb'] * 10 / 1024:.0f} GB peak RSS and ~{base['seconds'] * 10:.0f} s "
                         f"(limits: 16 GB, {MILLION_TIME_LIMIT_S} s).")
    machine["load_end"] = os.getloadavg()[0]
    report = render(results, machine, notes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
