"""Fused CPU selective scan, on by default: one C function for the forward, one for the backward.

Why: the ``native`` scan in PyTorch makes ~21 passes over every (T, N, D) chunk per forward +
backward (each op is one pass), which bounds it at ~1 CPU-s per 10k x 1024 x 16 scan on one core.
Fused, the state stays in cache and each step is one sweep: 0.35-0.40 CPU-s for the same scan
(2.5-3x), which brings MambaMIL's CPU fwd+bwd to 1.2-1.3x the no-scan model, from 1.8-2.0x
(benchmarks/results/scan_round2.md).

Default on (issue 29 item 6); ``WSI_SSM_CPU_KERNEL=0`` (or off / false / no) forces the PyTorch
scan. The first scan in a process compiles the source below with ``$CC`` (else ``cc``) into a
private temporary directory (``tempfile``, mode 0700, under ``$TMPDIR``; removed after loading;
~0.2 s) and loads it with ctypes. Nothing is cached on disk and no path is shared, so parallel jobs
(Snakemake, SLURM arrays) starting at once never share, race on or half-read a build: each process
owns its copy (tested with concurrent builds). If it cannot be built or loaded (no compiler, a
compile error, an unwritable or noexec temp dir, a broken library), ONE warning per process says
why and the PyTorch scan runs, as it does for everything the kernel does not cover: tensors not on
the CPU, dtypes other than fp32, input-independent (2-D) B or C.

Numerics: fp32 throughout, compiled with ``-ffast-math`` (gcc vectorises the exp loops only so;
without it the scan is ~4x slower) and a Cephes-style exp (~2 ulp); it matches ``ref`` within
mamba-ssm's fp32 tolerances in every flag combination (tests/ssm/test_cpu_kernel.py), and the
PyTorch scan to ~3e-6 relative on MambaMIL-sized gradients. What fast-math could break is kept
safe: the library is linked without it (no crtfastmath.o, whose constructor would set
flush-to-zero for the whole process), and NaN is tested on the bits, not with float comparisons the
compiler may fold, so a NaN anywhere in the inputs gives NaN outputs as the PyTorch scan does (a
diverged run stays visible). Single-threaded per sequence (a bag is one sequence); deterministic.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import tempfile
import threading
import warnings

import torch

ENV_VAR = "WSI_SSM_CPU_KERNEL"
# Steps between the boundary states the forward keeps for the backward (as the PyTorch scan's chunks).
STEPS = 32
CFLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-fPIC")
# Linked in a second step without -ffast-math: gcc links crtfastmath.o into a -ffast-math link, whose
# constructor sets flush-to-zero / denormals-are-zero for the whole process when the library loads,
# which would silently change every other float computation of the run (torch's included).
LDFLAGS = ("-shared",)
# Every fallback warning names the switch (tests find the warning by it) and how to silence it.
FALLBACK_HINT = f"same results, slower; {ENV_VAR}=0 silences this"

SOURCE = r"""
#include <stdint.h>
#include <string.h>

/* NaN tests on the bits: -ffast-math lets the compiler assume no float is NaN, so a float
   comparison (x != x) could be folded away; an integer one cannot. */
static inline int32_t is_nan(float v) {
    union { float f; int32_t i; } b;
    b.f = v;
    return (b.i & 0x7fffffff) > 0x7f800000;
}

/* when ? a : b as a bit blend, so the loops stay branch-free (and vectorised) */
static inline float pick(int32_t when, float a, float b) {
    union { float f; int32_t i; } ua, ub;
    ua.f = a;
    ub.f = b;
    const int32_t m = -when;
    ub.i = (ua.i & m) | (ub.i & ~m);
    return ub.f;
}

static inline float fexp(float x) {
    const float x_in = x;
    x = x < -87.f ? -87.f : x;
    x = x > 88.f ? 88.f : x;
    float fx = x * 1.44269504088896341f + 0.5f;
    int32_t ni = (int32_t)fx;
    ni -= (fx < (float)ni);
    float n = (float)ni;
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } e;
    e.i = (ni + 127) << 23;
    return pick(is_nan(x_in), x_in, p * e.f);    /* the clamps above would turn a NaN into a number */
}

static inline float flog(float v) {   /* natural log for v >= 1 (1 + exp(x)); NaN and inf pass through */
    union { float f; int32_t i; } b;
    b.f = v;
    const int32_t special = ((b.i >> 23) & 255) == 255;
    int32_t ex = ((b.i >> 23) & 255) - 127;
    b.i = (b.i & 0x007fffff) | 0x3f800000;
    float m = b.f;
    int32_t big = m > 1.41421356f;
    m = big ? m * 0.5f : m;
    ex += big;
    float r = (m - 1.f) / (m + 1.f), r2 = r * r;
    float s = r * (2.f + r2 * (0.6666666667f + r2 * (0.4f + r2 * (0.2857142857f + r2 * (0.2222222222f
              + r2 * (0.1818181818f + r2 * 0.1538461538f))))));
    return pick(special, v, s + (float)ex * 0.69314718056f);
}

static inline float sigm(float x) { return 1.f / (1.f + fexp(-x)); }

/* delta -> dt (softplus of delta + bias), one step, D channels. */
static inline void step_dt(int64_t D, const float *dl, const float *bias, int softplus, float *dt) {
    #pragma omp simd
    for (int64_t d = 0; d < D; d++) {
        float x = dl[d] + (bias ? bias[d] : 0.f);
        float sp = flog(1.f + fexp(x));
        dt[d] = (!softplus || x > 20.f) ? x : sp;
    }
}

/* One sequence. u, delta, z, out: [L][D]; Bm, Cm: [L][N]; At: [N][D]; h: [N][D] (in: initial state,
   out: last state); bnd: [ceil(L/T)][N][D] or NULL; dt, y: [D] scratch. */
void wsi_scan_fwd(int64_t L, int64_t D, int64_t N, int64_t T, const float *u, const float *delta,
                  const float *z, const float *Bm, const float *Cm, const int64_t *ld, const float *At,
                  const float *Dv, const float *bias, int softplus, float *h, float *out, float *bnd,
                  float *dt, float *y) {
    /* ld: row strides (elements between steps) of u, delta, z, Bm, Cm */
    const int64_t lu = ld[0], ldl = ld[1], lz = ld[2], lb = ld[3], lc = ld[4];
    for (int64_t t = 0; t < L; t++) {
        if (bnd && t % T == 0) memcpy(bnd + (t / T) * N * D, h, sizeof(float) * N * D);
        const float *ut = u + t * lu;
        step_dt(D, delta + t * ldl, bias, softplus, dt);
        #pragma omp simd
        for (int64_t d = 0; d < D; d++) y[d] = Dv ? Dv[d] * ut[d] : 0.f;
        for (int64_t n = 0; n < N; n++) {
            const float b = Bm[t * lb + n], c = Cm[t * lc + n];
            float *hn = h + n * D;
            const float *an = At + n * D;
            #pragma omp simd
            for (int64_t d = 0; d < D; d++) {
                float hv = fexp(dt[d] * an[d]) * hn[d] + dt[d] * ut[d] * b;
                hn[d] = hv;
                y[d] += c * hv;
            }
        }
        float *ot = out + t * D;
        if (z) {
            const float *zt = z + t * lz;
            #pragma omp simd
            for (int64_t d = 0; d < D; d++) ot[d] = y[d] * zt[d] * sigm(zt[d]);
        } else {
            memcpy(ot, y, sizeof(float) * D);
        }
    }
}

/* Backward of wsi_scan_fwd. g: [L][D] gradient of out; adj: [N][D] (in: gradient of the last state,
   out: gradient of the initial state); bnd from the forward. Writes du, ddelta, dz ([L][D]), dB, dC
   ([L][N]); accumulates into dAt [N][D], dD [D], dbias [D]. Work: hs, dec [T][N][D]; dts [T][D]; w, ddt [D]. */
void wsi_scan_bwd(int64_t L, int64_t D, int64_t N, int64_t T, const float *u, const float *delta,
                  const float *z, const float *Bm, const float *Cm, const int64_t *ld, const float *At,
                  const float *Dv, const float *bias, int softplus, const float *bnd, const float *g, float *adj,
                  float *du, float *ddelta, float *dz, float *dB, float *dC, float *dAt, float *dD,
                  float *dbias, float *hs, float *dec, float *dts, float *w, float *ddt, float *gy) {
    const int64_t lu = ld[0], ldl = ld[1], lz = ld[2], lb = ld[3], lc = ld[4];
    int64_t n_chunks = (L + T - 1) / T;
    for (int64_t c = n_chunks - 1; c >= 0; c--) {
        int64_t lo = c * T, hi = lo + T < L ? lo + T : L;
        const float *h0 = bnd + c * N * D;
        /* recompute: dt, decay and states of the chunk */
        for (int64_t t = lo; t < hi; t++) {
            float *dt = dts + (t - lo) * D;
            step_dt(D, delta + t * ldl, bias, softplus, dt);
            const float *ut = u + t * lu;
            for (int64_t n = 0; n < N; n++) {
                const float b = Bm[t * lb + n];
                const float *an = At + n * D;
                const float *hp = (t == lo ? h0 : hs + (t - lo - 1) * N * D) + n * D;
                float *hn = hs + (t - lo) * N * D + n * D, *en = dec + (t - lo) * N * D + n * D;
                #pragma omp simd
                for (int64_t d = 0; d < D; d++) {
                    float e = fexp(dt[d] * an[d]);
                    en[d] = e;
                    hn[d] = e * hp[d] + dt[d] * ut[d] * b;
                }
            }
        }
        for (int64_t t = hi - 1; t >= lo; t--) {
            const float *dt = dts + (t - lo) * D, *ut = u + t * lu, *gt = g + t * D;
            const float *ht = hs + (t - lo) * N * D, *et = dec + (t - lo) * N * D;
            const float *hp_all = t == lo ? h0 : hs + (t - lo - 1) * N * D;
            /* gradient reaching y = <C, h> + D u, and dz */
            if (z) {
                const float *zt = z + t * lz;
                float *dzt = dz + t * D;
                /* y needs <C, h_t>: recomputed here */
                #pragma omp simd
                for (int64_t d = 0; d < D; d++) w[d] = Dv ? Dv[d] * ut[d] : 0.f;
                for (int64_t n = 0; n < N; n++) {
                    const float cc = Cm[t * lc + n];
                    const float *hn = ht + n * D;
                    #pragma omp simd
                    for (int64_t d = 0; d < D; d++) w[d] += cc * hn[d];
                }
                #pragma omp simd
                for (int64_t d = 0; d < D; d++) {
                    float s = sigm(zt[d]);
                    gy[d] = gt[d] * zt[d] * s;
                    dzt[d] = gt[d] * w[d] * s * (1.f + zt[d] * (1.f - s));
                }
            } else {
                memcpy(gy, gt, sizeof(float) * D);
            }
            #pragma omp simd
            for (int64_t d = 0; d < D; d++) { w[d] = 0.f; ddt[d] = 0.f; }
            for (int64_t n = 0; n < N; n++) {
                const float b = Bm[t * lb + n], cc = Cm[t * lc + n];
                float *an_adj = adj + n * D;
                const float *hn = ht + n * D, *en = et + n * D, *hp = hp_all + n * D, *an = At + n * D;
                float *dan = dAt + n * D;
                float sc = 0.f, sb = 0.f;
                #pragma omp simd reduction(+:sc, sb)
                for (int64_t d = 0; d < D; d++) {
                    float a = an_adj[d] + gy[d] * cc;          /* adj_t */
                    sc += hn[d] * gy[d];
                    float x = a * en[d] * hp[d];
                    ddt[d] += x * an[d];
                    dan[d] += x * dt[d];
                    w[d] += a * b;
                    sb += a * dt[d] * ut[d];
                    an_adj[d] = en[d] * a;                     /* carried to step t - 1 */
                }
                dC[t * N + n] = sc;
                dB[t * N + n] = sb;
            }
            const float *dl = delta + t * ldl;
            float *dut = du + t * D, *ddl = ddelta + t * D;
            #pragma omp simd
            for (int64_t d = 0; d < D; d++) {
                dut[d] = w[d] * dt[d];
                ddl[d] = ddt[d] + w[d] * ut[d];
            }
            if (Dv) {
                #pragma omp simd
                for (int64_t d = 0; d < D; d++) dut[d] += gy[d] * Dv[d];
            }
            if (softplus) {    /* d softplus(x)/dx = sigmoid(x), x = delta + bias */
                #pragma omp simd
                for (int64_t d = 0; d < D; d++) ddl[d] *= sigm(dl[d] + (bias ? bias[d] : 0.f));
            }
            if (Dv) {
                #pragma omp simd
                for (int64_t d = 0; d < D; d++) dD[d] += gy[d] * ut[d];
            }
            if (dbias) {
                #pragma omp simd
                for (int64_t d = 0; d < D; d++) dbias[d] += ddl[d];
            }
        }
    }
}
"""


OFF_VALUES = ("0", "off", "false", "no")


def requested() -> bool:
    """Whether the kernel is wanted: yes unless ``WSI_SSM_CPU_KERNEL`` is 0 / off / false / no."""
    return os.environ.get(ENV_VAR, "").strip().lower() not in OFF_VALUES


_LOAD_LOCK = threading.Lock()


def load():
    """The compiled library, or None (with one warning) when it cannot be built or loaded here:
    no compiler, a compile error, a temp dir that cannot be written or is mounted noexec, a
    library the loader refuses (a broken compiler's output) or that lacks the kernel's symbols.
    Any of these falls back to the PyTorch scan; it never fails the caller's training. Built once
    per process: threads scanning at once wait for the one build (and its one warning)."""
    with _LOAD_LOCK:
        return _load_once()


@functools.lru_cache(maxsize=1)
def _load_once():
    try:
        return _build_and_load()
    except Exception as exc:  # noqa: BLE001 — whatever the build or the loader raised: fall back
        warnings.warn(f"the CPU scan kernel could not be loaded: {type(exc).__name__}: {exc}; using the "
                      f"PyTorch scan ({FALLBACK_HINT})", RuntimeWarning, stacklevel=2)
        return None


load.cache_clear = _load_once.cache_clear   # forget the build (tests; a changed $CC)


def _build_and_load():
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        warnings.warn(f"the CPU scan kernel needs a C compiler (cc, gcc or $CC) and none was found; using the "
                      f"PyTorch scan ({FALLBACK_HINT})", RuntimeWarning, stacklevel=3)
        return None
    with tempfile.TemporaryDirectory(prefix="wsi_ssm_kernel_") as build:
        source, objects = os.path.join(build, "scan.c"), os.path.join(build, "scan.o")
        library = os.path.join(build, "scan.so")
        with open(source, "w") as handle:
            handle.write(SOURCE)
        error = None
        try:
            for command in ([compiler, *CFLAGS, "-c", source, "-o", objects],
                            [compiler, *LDFLAGS, objects, "-o", library]):
                proc = subprocess.run(command, capture_output=True, text=True)
                if proc.returncode != 0:
                    error = proc.stderr.strip()[-300:]
                    break
        except OSError as exc:    # e.g. $CC names no executable
            error = str(exc)
        if error is not None:
            warnings.warn(f"the CPU scan kernel did not compile ({compiler}): {error}; using the PyTorch scan "
                          f"({FALLBACK_HINT})", RuntimeWarning, stacklevel=3)
            return None
        lib = ctypes.CDLL(library)   # mapped in memory: the file can go with the directory
    p, i, c = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.wsi_scan_fwd.argtypes = [i, i, i, i] + [p] * 9 + [c] + [p] * 5
    lib.wsi_scan_fwd.restype = None
    lib.wsi_scan_bwd.argtypes = [i, i, i, i] + [p] * 9 + [c] + [p] * 17
    lib.wsi_scan_bwd.restype = None
    return lib


def applies(u, delta, A, B, C, D, z, delta_bias, initial_state) -> bool:
    """Whether the kernel is wanted (default), built, and covers these inputs (else the PyTorch scan runs)."""
    if not requested():
        return False
    tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias, initial_state) if t is not None]
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    if B.dim() != 3 or C.dim() != 3:
        return False
    return load() is not None


def _ptr(t):
    return t.data_ptr() if t is not None else None


def _steps(x):
    """(B, X, L) -> step-major (B, L, X) with unit-stride X: a view of step-major memory (as Mamba's
    projections make it, e.g. z, a half of in_proj's output), else a copy."""
    view = x.transpose(1, 2)
    return view if view.stride(2) == 1 else view.contiguous()


def _inputs(u, delta, z, B, C):
    """Step-major views of the sequence inputs and their row strides, as the C functions read them."""
    views = [_steps(t) if t is not None else None for t in (u, delta, z, B, C)]
    strides = torch.tensor([v.stride(1) if v is not None else 0 for v in views], dtype=torch.int64)
    return views, strides


def scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
    """Same contract as :func:`~wsi_pipeline.ssm.scan.selective_scan_native` for the covered inputs:
    returns (out (B, D, L) step-major, last state (B, D, N)); differentiable in every input."""
    return _KernelScan.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), initial_state)


class _KernelScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, initial_state):
        lib = load()
        batch, dim, seqlen = u.shape
        dstate = A.shape[1]
        (us, ds, zs, Bs, Cs), strides = _inputs(u, delta, z, B, C)
        A_t = A.t().contiguous()
        D_c = D.contiguous() if D is not None else None
        bias = delta_bias.contiguous() if delta_bias is not None else None
        out = u.new_empty(batch, seqlen, dim)
        keep = any(ctx.needs_input_grad)
        boundaries = u.new_empty(batch, -(-seqlen // STEPS), dstate, dim) if keep else None
        # (B, N, D), overwritten with the last state: always a fresh tensor, never the caller's.
        state = (initial_state.transpose(1, 2).clone(memory_format=torch.contiguous_format)
                 if initial_state is not None else u.new_zeros(batch, dstate, dim))
        dt, y = u.new_empty(dim), u.new_empty(dim)
        for b in range(batch):
            lib.wsi_scan_fwd(seqlen, dim, dstate, STEPS, _ptr(us[b]), _ptr(ds[b]),
                             _ptr(zs[b]) if zs is not None else None, _ptr(Bs[b]), _ptr(Cs[b]), _ptr(strides),
                             _ptr(A_t), _ptr(D_c), _ptr(bias), int(softplus), _ptr(state[b]), _ptr(out[b]),
                             _ptr(boundaries[b]) if keep else None, _ptr(dt), _ptr(y))
        ctx.softplus, ctx.has_initial = softplus, initial_state is not None
        # The inputs themselves (views of the projections autograd keeps anyway), not step-major copies.
        ctx.save_for_backward(u, delta, z, B, C, A_t, D_c, bias, boundaries)
        ctx.set_materialize_grads(False)
        return out.transpose(1, 2), state.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_out, grad_last_state):
        lib = load()
        u, delta, z, B, C, A_t, D_c, bias, boundaries = ctx.saved_tensors
        (us, ds, zs, Bs, Cs), strides = _inputs(u, delta, z, B, C)
        batch, seqlen, dim = us.shape
        dstate = A_t.shape[0]
        grad = (grad_out.transpose(1, 2).contiguous() if grad_out is not None
                else us.new_zeros(batch, seqlen, dim))
        # adjoint: in, the last state's gradient; out, the initial state's.
        # A fresh tensor: the kernel overwrites it, and the incoming gradient is not ours to change.
        adjoint = (grad_last_state.transpose(1, 2).clone(memory_format=torch.contiguous_format)
                   if grad_last_state is not None else us.new_zeros(batch, dstate, dim))
        du, ddelta = us.new_empty(batch, seqlen, dim), us.new_empty(batch, seqlen, dim)
        dz = us.new_empty(batch, seqlen, dim) if zs is not None else None
        dB, dC = us.new_empty(batch, seqlen, dstate), us.new_empty(batch, seqlen, dstate)
        dA_t = torch.zeros_like(A_t)
        dD = torch.zeros_like(D_c) if D_c is not None else None
        dbias = torch.zeros_like(bias) if bias is not None else None
        states, decays = us.new_empty(STEPS, dstate, dim), us.new_empty(STEPS, dstate, dim)
        dts, w, ddt, gy = us.new_empty(STEPS, dim), us.new_empty(dim), us.new_empty(dim), us.new_empty(dim)
        for b in range(batch):
            lib.wsi_scan_bwd(seqlen, dim, dstate, STEPS, _ptr(us[b]), _ptr(ds[b]),
                             _ptr(zs[b]) if zs is not None else None, _ptr(Bs[b]), _ptr(Cs[b]), _ptr(strides),
                             _ptr(A_t), _ptr(D_c), _ptr(bias), int(ctx.softplus), _ptr(boundaries[b]),
                             _ptr(grad[b]),
                             _ptr(adjoint[b]), _ptr(du[b]), _ptr(ddelta[b]),
                             _ptr(dz[b]) if dz is not None else None, _ptr(dB[b]), _ptr(dC[b]), _ptr(dA_t),
                             _ptr(dD), _ptr(dbias), _ptr(states), _ptr(decays), _ptr(dts), _ptr(w), _ptr(ddt),
                             _ptr(gy))
        return (du.transpose(1, 2), ddelta.transpose(1, 2), dA_t.t(), dB.transpose(1, 2), dC.transpose(1, 2),
                dD, dz.transpose(1, 2) if dz is not None else None, dbias, None,
                adjoint.transpose(1, 2) if ctx.has_initial else None)
