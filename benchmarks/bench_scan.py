"""Selective-scan speed and peak memory on CPU: our ``native`` and ``ref`` backends vs mambapy's parallel scan.

Run: .venv/bin/python benchmarks/bench_scan.py [--lengths 1000 10000 100000 1000000] [--threads N]

Shapes follow the issue: batch 1, d_inner 1024, d_state 16, input-dependent B and C, with z, D,
delta_bias and softplus on. For every backend and length it measures, each in a fresh subprocess:

- ``fwd``: forward under ``torch.no_grad()`` (inference);
- ``fwd+bwd``: forward with autograd, then ``out.backward(grad_out)``;

and the peak RSS of that subprocess (``ru_maxrss``), both in total and minus the baseline taken after
the inputs (and ``grad_out``) were allocated. Configurations predicted to exceed ``--max-gb`` of RSS or
``--max-minutes`` are skipped, with the reason in the table. mambapy is not a dependency: install it
for the benchmark only, ``.venv/bin/python -m pip install --target /tmp/mambapy_pkg mambapy --no-deps``,
and pass ``--mambapy-path`` if it lives elsewhere. Before timing, one subprocess checks at L = 1k that
the three backends compute the same outputs and gradients.

On a machine other processes also use, prefer ``--threads 1``, or ``OMP_WAIT_POLICY=PASSIVE`` with more
threads: torch's GNU OpenMP threads spin at every barrier, and when a core is taken by another process
each of the scan's many parallel regions waits for a descheduled thread (measured: native fwd+bwd at
L = 10k took 72 s with 2 threads under load, 2.9 s with ``OMP_WAIT_POLICY=PASSIVE``, 2.0 s with 1 thread).

The measured section of ``benchmarks/results/ssm.md`` for this thread count (between its ``bench_scan``
markers) is replaced; text outside the markers and sections of other thread counts are kept.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from wsi_pipeline.ssm.scan import chunk_steps, selective_scan_native, selective_scan_ref

BATCH, D_INNER, D_STATE = 1, 1024, 16
BACKENDS = ("native", "ref", "mambapy")
MODES = ("fwd", "fwd+bwd")
DEFAULT_LENGTHS = (1_000, 10_000, 100_000, 1_000_000)
# Supplementary: a 1M-instance bag with fwd+bwd that fits this machine (see the note in the results).
EXTRA_CONFIGS = (("native", 1_000_000, "fwd+bwd", 256),)
RESULTS_PATH = Path(__file__).parent / "results" / "ssm.md"
TOLERANCES = dict(rtol=6e-4, atol=2e-3)
GB = 1e9


def make_inputs(seqlen: int, dim: int = D_INNER, dstate: int = D_STATE, requires_grad: bool = False, seed: int = 0):
    """Inputs shaped and initialised like a Mamba-1 layer (A = -[1..N], dt in [1e-3, 1e-1])."""
    gen = torch.Generator().manual_seed(seed)
    dt = torch.exp(torch.rand(dim, generator=gen) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    inputs = dict(
        u=torch.randn(BATCH, dim, seqlen, generator=gen),
        delta=0.1 * torch.randn(BATCH, dim, seqlen, generator=gen),
        A=-torch.arange(1, dstate + 1, dtype=torch.float32).repeat(dim, 1),
        B=torch.randn(BATCH, dstate, seqlen, generator=gen),
        C=torch.randn(BATCH, dstate, seqlen, generator=gen),
        D=torch.ones(dim),
        z=torch.randn(BATCH, dim, seqlen, generator=gen),
        delta_bias=dt + torch.log(-torch.expm1(-dt)),  # inverse softplus, as mamba initialises dt_proj.bias
    )
    return {k: v.requires_grad_(requires_grad) for k, v in inputs.items()}


def _import_pscan(mambapy_path: str):
    if mambapy_path not in sys.path:
        sys.path.insert(0, mambapy_path)
    from mambapy.pscan import pscan

    return pscan


def mambapy_scan(pscan, u, delta, A, B, C, D, z, delta_bias):
    """The same function computed as mambapy's ``MambaBlock.ssm`` + gate does it on CPU: (B, L, D, N)
    ``deltaA`` and ``BX``, Blelloch ``pscan``, then ``hs @ C``. Takes and returns our (B, D, L) layout."""
    x = u.transpose(1, 2)  # (B, L, D)
    dt = F.softplus(delta + delta_bias[:, None]).transpose(1, 2)  # (B, L, D)
    delta_A = torch.exp(dt.unsqueeze(-1) * A)  # (B, L, D, N)
    BX = dt.unsqueeze(-1) * B.transpose(1, 2).unsqueeze(2) * x.unsqueeze(-1)  # (B, L, D, N)
    hs = pscan(delta_A, BX)
    y = (hs @ C.transpose(1, 2).unsqueeze(-1)).squeeze(3)  # (B, L, D)
    y = (y + D * x) * F.silu(z.transpose(1, 2))
    return y.transpose(1, 2)


def scan_fn(backend: str, mambapy_path: str):
    if backend == "native":
        return lambda **kw: selective_scan_native(**kw, delta_softplus=True)
    if backend == "ref":
        return lambda **kw: selective_scan_ref(**kw, delta_softplus=True)
    pscan = _import_pscan(mambapy_path)
    return lambda **kw: mambapy_scan(pscan, **kw)


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker(backend: str, seqlen: int, mode: str, dim: int, mambapy_path: str) -> dict:
    """One measurement; runs in its own process so ru_maxrss is this configuration's peak."""
    fn = scan_fn(backend, mambapy_path)
    backward = mode == "fwd+bwd"
    # Warm up kernels and lazy initialisation on a small input (several chunks and a partial one) that
    # takes the same code path, before the baseline.
    warm = make_inputs(211, dim, requires_grad=backward)
    with torch.set_grad_enabled(backward):
        out = fn(**warm)
    if backward:
        out.backward(torch.randn_like(out))
    del warm, out
    inputs = make_inputs(seqlen, dim, requires_grad=backward)
    grad_out = torch.randn(BATCH, dim, seqlen) if backward else None
    baseline = _maxrss_bytes()
    start = time.perf_counter()
    with torch.set_grad_enabled(backward):
        out = fn(**inputs)
    if backward:
        out.backward(grad_out)
    seconds = time.perf_counter() - start
    peak = _maxrss_bytes()
    # What the call must hand back whatever the algorithm: the output and the inputs' gradients.
    returned = out.numel() + sum(v.grad.numel() for v in inputs.values() if v.grad is not None)
    return dict(seconds=seconds, peak_gb=peak / GB, baseline_gb=baseline / GB, extra_gb=(peak - baseline) / GB,
                workspace_gb=(peak - baseline - returned * out.element_size()) / GB)


def verify(mambapy_path: str, seqlen: int = 1_000) -> dict:
    """Max |difference| of native and mambapy against ref (outputs and all gradients) at d_inner 1024."""
    grad_out = torch.randn(BATCH, D_INNER, seqlen, generator=torch.Generator().manual_seed(1))
    results = {}
    for backend in BACKENDS:
        inputs = make_inputs(seqlen, requires_grad=True)
        out = scan_fn(backend, mambapy_path)(**inputs)
        grads = torch.autograd.grad(out, list(inputs.values()), grad_out)
        results[backend] = {"out": out.detach(), **{f"d{k}": g for k, g in zip(inputs, grads)}}
    report = {}
    for backend in ("native", "mambapy"):
        diffs, close = {}, True
        for name, expected in results["ref"].items():
            actual = results[backend][name]
            diffs[name] = (actual - expected).abs().max().item()
            close &= torch.allclose(actual, expected, **TOLERANCES)
        report[backend] = dict(max_abs_diff=diffs, within_tolerance=close)
    return report


def predict(backend: str, seqlen: int, mode: str, dim: int) -> tuple[float, float, str]:
    """(GB of RSS, minutes, note) predicted for a configuration; rough upper estimates from the shapes."""
    bdl = BATCH * dim * seqlen * 4 / GB  # one fp32 (B, D, L) tensor
    bdln = bdl * D_STATE  # one fp32 (B, D, L, N) tensor
    backward = mode == "fwd+bwd"
    # inputs u, delta, z (+ grad_out) and the output; with backward, du, ddelta, dz as well.
    io = bdl * (4 + (1 + 3) * backward) + 0.6  # + ~0.6 GB for Python and torch
    elements = BATCH * dim * seqlen * D_STATE
    if backend == "native":
        steps = chunk_steps(BATCH, dim, D_STATE)
        boundaries = bdln / steps * backward
        return io + boundaries, elements / 164e6 * (0.05 + 0.15 * backward), ""
    if backend == "mambapy":
        padded = bdln * 2 ** math.ceil(math.log2(seqlen)) / seqlen
        # measured at 10k: ~5 padded (B, D, L, N) tensors forward, ~9 with backward (8.9 GB in the issue).
        return io + padded * (5 + 4 * backward), elements / 164e6 * (0.4 + 1.0 * backward), ""
    if backward:
        # Autograd through the Python loop: every step's backward of ``delta_A[:, :, i]`` materialises a
        # full (B, D, L, N) zero tensor, so backward is O(L^2) in time.
        note = "backward is O(L²): each step's select_backward writes a full (B, D, L, N) tensor"
        return io + bdln * 6, seqlen * bdln * 1.7 / 60, note
    return io + bdln * 3, elements / 164e6 * 0.1, ""


def run_one(script: Path, backend: str, seqlen: int, mode: str, dim: int, args) -> dict:
    cmd = [sys.executable, str(script), "--worker", backend, str(seqlen), mode, "--dim", str(dim),
           "--threads", str(args.threads), "--mambapy-path", args.mambapy_path]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return dict(error=f"failed (exit {proc.returncode}): {tail[0][:200]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mem_available_gb() -> float:
    match = re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text())
    return int(match.group(1)) * 1024 / GB if match else float("inf")


def machine_info(threads: int) -> list[str]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.+)", cpuinfo)
    flags = re.search(r"flags\s*:\s*(.+)", cpuinfo)
    simd = [f for f in ("avx2", "avx512f") if flags and f in flags.group(1).split()]
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    omp_env = ", ".join(f"{k}={v}" for k, v in os.environ.items() if k.startswith(("OMP_", "KMP_")))
    return [
        f"- CPU: {model.group(1).strip() if model else platform.processor()} ({', '.join(simd) or 'no avx2'}), "
        f"{os.cpu_count()} logical cores, {ram_gib:.0f} GiB RAM",
        f"- Python {platform.python_version()}, torch {torch.__version__}, torch threads {threads}, "
        f"OpenMP env: {omp_env or 'unset'}",
    ]


def _fmt(result: dict | None, key: str, digits: int = 2) -> str:
    if result is None:
        return "—"
    if "skipped" in result or "error" in result:
        return "skip" if "skipped" in result else "fail"
    return f"{result[key]:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS))
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--max-gb", type=float, default=17.0, help="skip configurations predicted above this RSS")
    ap.add_argument("--max-minutes", type=float, default=15.0, help="skip configurations predicted to run longer")
    ap.add_argument("--mambapy-path", default="/tmp/mambapy_pkg")
    ap.add_argument("--no-extra", action="store_true", help="skip the supplementary 1M fwd+bwd at d_inner 256")
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS_PATH)
    ap.add_argument("--worker", nargs=3, metavar=("BACKEND", "L", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--verify-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dim", type=int, default=D_INNER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.worker:
        backend, seqlen, mode = args.worker
        print(json.dumps(worker(backend, int(seqlen), mode, args.dim, args.mambapy_path)))
        return
    if args.verify_worker:
        print(json.dumps(verify(args.mambapy_path)))
        return

    script = Path(__file__).resolve()
    if "mambapy" in args.backends:
        try:
            _import_pscan(args.mambapy_path)
        except ImportError:
            sys.exit(f"mambapy not found under {args.mambapy_path}: "
                     f"{sys.executable} -m pip install --target {args.mambapy_path} mambapy --no-deps")
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    started = time.strftime("%Y-%m-%d %H:%M")
    lines = machine_info(args.threads)
    print("\n".join(lines), flush=True)

    verification = None
    if not args.no_verify and set(BACKENDS) <= set(args.backends):
        proc = subprocess.run([sys.executable, str(script), "--verify-worker", "--threads", str(args.threads),
                               "--mambapy-path", args.mambapy_path], capture_output=True, text=True)
        verification = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else proc.stderr
        print("verification at L=1k:", verification, flush=True)

    configs = [(b, n, m, D_INNER) for n in args.lengths for b in args.backends for m in MODES]
    if not args.no_extra:
        configs += [c for c in EXTRA_CONFIGS if c[0] in args.backends]
    results = {}
    for backend, seqlen, mode, dim in configs:
        gb, minutes, note = predict(backend, seqlen, mode, dim)
        if gb > args.max_gb:
            result = dict(skipped=f"predicted ~{gb:.0f} GB RSS > {args.max_gb:.0f} GB", predicted_gb=gb)
        elif minutes > args.max_minutes:
            result = dict(skipped=f"predicted ~{minutes:.0f} min > {args.max_minutes:.0f} min"
                          + (f"; {note}" if note else ""), predicted_gb=gb)
        elif gb + 1.0 > _mem_available_gb():
            result = dict(skipped=f"predicted ~{gb:.0f} GB RSS > {_mem_available_gb():.0f} GB available now")
        else:
            result = run_one(script, backend, seqlen, mode, dim, args)
        results[(backend, seqlen, mode, dim)] = result
        print(backend, seqlen, mode, dim, result, flush=True)
    load_after = Path("/proc/loadavg").read_text().split()[:3]

    section = render(args, lines, started, load_before, load_after, verification, results)
    print(section)
    write_section(args.out, section, args.threads)
    print(f"wrote {args.out}")


def render(args, machine_lines, started, load_before, load_after, verification, results) -> str:
    out = [_markers(args.threads)[0], f"### {args.threads} torch thread(s)", "",
           f"Measured {started} with `benchmarks/bench_scan.py` (threads={args.threads}); batch 1, "
           f"d_inner {D_INNER}, d_state {D_STATE}, input-dependent B and C, z, D, delta_bias and softplus on.",
           "", *machine_lines,
           f"- Load average (1/5/15 min) before: {' / '.join(load_before)}, after: {' / '.join(load_after)} — "
           "other processes shared the cores, so absolute times are noisy; ratios come from this one run.",
           "", "`fwd` is inference (`torch.no_grad()`); `fwd+bwd` is forward with autograd plus "
           "`out.backward(grad_out)`. Peak is the subprocess's `ru_maxrss`; Δ peak is that minus the "
           "baseline after inputs (and `grad_out`) were allocated; workspace is Δ peak minus the tensors the call "
           "must return whatever the algorithm (output and input gradients), i.e. the scan's own memory.", ""]
    out += ["| backend | L | d_inner | mode | time (s) | peak RSS (GB) | Δ peak (GB) | workspace (GB) | note |",
            "|---|---:|---:|---|---:|---:|---:|---:|---|"]
    for (backend, seqlen, mode, dim), r in results.items():
        note = r.get("skipped") or r.get("error") or ""
        out.append(f"| {backend} | {seqlen:,} | {dim} | {mode} | {_fmt(r, 'seconds')} | {_fmt(r, 'peak_gb')} | "
                   f"{_fmt(r, 'extra_gb')} | {_fmt(r, 'workspace_gb')} | {note} |")
    out += ["", "Ratios mambapy / native in this run (issue target for fwd+bwd: time ≥ 5×, "
            "native peak ≤ 1/4 of mambapy's):", ""]
    out += ["| L | mode | time ratio | peak RSS ratio | Δ peak ratio |", "|---:|---|---:|---:|---:|"]
    for seqlen in args.lengths:
        for mode in MODES:
            mine = results.get(("native", seqlen, mode, D_INNER))
            theirs = results.get(("mambapy", seqlen, mode, D_INNER))
            if not mine or not theirs or "seconds" not in mine or "seconds" not in theirs:
                continue
            out.append(f"| {seqlen:,} | {mode} | {theirs['seconds'] / mine['seconds']:.1f}× | "
                       f"{theirs['peak_gb'] / mine['peak_gb']:.1f}× | "
                       f"{theirs['extra_gb'] / max(mine['extra_gb'], 1e-3):.1f}× |")
    if verification is not None:
        out += ["", "Agreement with `ref` at L = 1k, d_inner 1024 (max |difference| over output and each gradient; "
                f"tolerance rtol {TOLERANCES['rtol']}, atol {TOLERANCES['atol']}):", ""]
        if isinstance(verification, dict):
            for backend, rep in verification.items():
                worst = max(rep["max_abs_diff"].items(), key=lambda kv: kv[1])
                out.append(f"- {backend}: within tolerance: {rep['within_tolerance']}; largest difference "
                           f"{worst[1]:.2e} ({worst[0]})")
        else:
            out.append(f"- verification failed: {verification.strip().splitlines()[-1:]}")
    out.append(_markers(args.threads)[1])
    return "\n".join(out)


def _markers(threads: int) -> tuple[str, str]:
    return f"<!-- bench_scan threads={threads}: begin -->", f"<!-- bench_scan threads={threads}: end -->"


def write_section(path: Path, section: str, threads: int) -> None:
    begin, end = _markers(threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else "# Selective scan on CPU\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
