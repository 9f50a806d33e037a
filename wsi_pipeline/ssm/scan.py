"""Mamba-1 selective scan: one public entry point, a fast chunked PyTorch scan, and its reference.

The recurrence, per batch b, channel d and state n (mamba-ssm's semantics and shapes)::

    delta  = softplus(delta + delta_bias)            (each optional)
    h_t    = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t    = <C_t, h_t> + D * u_t
    out_t  = y_t * silu(z_t)                         (when z is given)

Shapes: u, delta, z ``(B, D, L)``; A ``(D, N)``; B, C ``(B, N, L)`` (input-dependent) or ``(D, N)``;
D, delta_bias ``(D,)``; initial (h_{-1}, default 0) and last state ``(B, D, N)``. The initial state lets a
long sequence be scanned in pieces, each starting from the last state of the one before
(:mod:`wsi_pipeline.ssm.chunked`); mamba-ssm's kernel has no such input, so it is ``native``/``ref`` only. Accumulation is fp32 (fp64 when an input is fp64).

``selective_scan_native`` never materialises a ``(B, D, L, N)`` tensor: it walks the sequence in
chunks of T steps, keeps only the state at chunk boundaries for backward, and its backward re-runs each
chunk from its boundary state, then runs the adjoint recurrence backwards through the chunk — the
scheme of mamba's CUDA kernel. Within a chunk, the O(B*D*N) per-step update is the only Python-level
loop; everything else is vectorised over the chunk. State chunks are (T, B, N, D), channels as the
unit-stride axis; the per-step vector work (softplus, gating, gradient formulas) runs per block of
``CHUNKS_PER_BLOCK`` chunks; inputs are read as step-major views where their memory is step-major and
results are returned step-major (benchmarks/results/scan_fused.md). ``selective_scan_ref`` is a few
readable lines (a port of mamba-ssm's ``selective_scan_ref``) used as the oracle in tests.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from wsi_pipeline.ssm import cpu_kernel
from wsi_pipeline.ssm.backend import load_mamba_selective_scan_fn, requested_backend, resolve_backend

# Elements of one (T, B, D, N) chunk tensor. About 1M floats (4 MB) keeps the handful of chunk-sized
# temporaries of backward cache-friendly while making each vectorised op large enough to use all cores;
# measured on 2 cores, see benchmarks/results/ssm.md. The step count per chunk is clamped to
# [MIN, MAX]_CHUNK_STEPS.
CHUNK_ELEMENTS = 1 << 19
MIN_CHUNK_STEPS = 16
MAX_CHUNK_STEPS = 256
# Chunks per block: the per-step (S, B, D) vector work runs once per block of S = this * T steps
# (see _Block); 8 x 32 steps x 1024 channels is 1 MB of fp32 per block tensor.
CHUNKS_PER_BLOCK = 8


def selective_scan(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    return_last_state=False,
    backend=None,
    initial_state=None,
):
    """Selective scan with mamba-ssm's signature; the backend is chosen by :func:`resolve_backend`.

    Returns ``out`` ``(B, D, L)`` in ``u``'s dtype, or ``(out, last_state)`` with ``last_state``
    ``(B, D, N)`` in fp32 when ``return_last_state``. On the ``cuda`` backend ``last_state`` carries
    no gradient (mamba-ssm's kernel has none); use ``native`` to differentiate through it.
    ``initial_state`` ``(B, D, N)`` (default zeros) is differentiable; mamba-ssm's kernel cannot take
    one, so with it ``auto`` runs ``native`` even on a GPU and a forced ``cuda`` is an error.
    """
    name = resolve_backend(backend, u.device)
    if initial_state is not None and name == "cuda":
        if requested_backend(backend) == "cuda":
            raise RuntimeError("SSM backend 'cuda' was forced but mamba-ssm's kernel has no initial state "
                               "input; use 'native' or 'auto' for scans that start from a carried state")
        name = "native"
    if name == "cuda":
        kernel = load_mamba_selective_scan_fn()
        if torch.are_deterministic_algorithms_enabled() and torch.is_grad_enabled() and any(
                t.requires_grad for t in (u, delta, A, B, C)):
            _warn_kernel_backward_not_bitwise()
        result = kernel(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                        return_last_state=return_last_state)
        if not return_last_state:
            return result
        out, last_state = result
        if B.dim() == 2:
            # With a time-invariant B the kernel keeps the state without B's factor (it applies B at
            # the output); the returned state needs it (state-spaces/mamba PR #371, unmerged).
            last_state = last_state * B.to(last_state.dtype)
        # mamba-ssm's backward ignores the last state's gradient; detached, using it in a loss is an
        # error rather than a silently missing gradient term. The native backend differentiates it.
        return out, last_state.detach()
    scan = selective_scan_ref if name == "ref" else selective_scan_native
    return scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state)


@functools.lru_cache(maxsize=1)
def _warn_kernel_backward_not_bitwise() -> None:
    # Measured on an H100: two seeded deterministic 10-epoch runs of MambaMIL/GMMamba/FMaMIL end with
    # weights differing in the 5th significant digit, from the kernel's backward (atomic adds); TransMIL
    # and ABMIL (no scan) are bitwise identical under the same settings.
    warnings.warn(
        "deterministic algorithms are on, but mamba-ssm's selective-scan backward is not bitwise "
        "reproducible (atomic accumulation): runs agree to about 1e-5 relative, not exactly. For bitwise "
        "identical GPU runs set WSI_SSM_BACKEND=native (much slower).",
        UserWarning, stacklevel=3)


def _check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state=None):
    if A.is_complex():
        raise NotImplementedError(
            "complex A is not supported by the 'native' and 'ref' SSM backends (real A only, as in Mamba-1 "
            "models); use the 'cuda' backend (mamba-ssm) for complex A"
        )
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (B, D, L), got {tuple(u.shape)} and {tuple(delta.shape)}")
    batch, dim, seqlen = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (D, N) with D={dim}, got {tuple(A.shape)}")
    dstate = A.shape[1]
    for name, mat in (("B", B), ("C", C)):
        if mat.dim() == 4:
            raise NotImplementedError(
                f"grouped {name} of shape (B, G, N, L) is not supported by the 'native' and 'ref' backends"
            )
        if mat.shape not in ((batch, dstate, seqlen), (dim, dstate)):
            raise ValueError(
                f"{name} must be (B, N, L)={(batch, dstate, seqlen)} or (D, N)={(dim, dstate)}, got {tuple(mat.shape)}"
            )
    for name, vec in (("D", D), ("delta_bias", delta_bias)):
        if vec is not None and vec.shape != (dim,):
            raise ValueError(f"{name} must be (D,) with D={dim}, got {tuple(vec.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must match u {tuple(u.shape)}, got {tuple(z.shape)}")
    if initial_state is not None and initial_state.shape != (batch, dim, dstate):
        raise ValueError(f"initial_state must be (B, D, N)={(batch, dim, dstate)}, got {tuple(initial_state.shape)}")


def selective_scan_ref(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
    initial_state=None,
):
    """Sequential reference (mamba-ssm's ``selective_scan_ref``, real A): same contract as
    :func:`selective_scan`. Materialises ``(B, D, L, N)`` tensors and back-propagates through a Python
    loop, so it is for tests and small inputs only."""
    _check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dtype_in = u.dtype
    compute_dtype = torch.promote_types(u.dtype, torch.float32)
    u, delta, A, B, C = (t.to(compute_dtype) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].to(compute_dtype)
    if delta_softplus:
        delta = F.softplus(delta)
    delta_A = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    if B.dim() == 3:
        delta_B_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    else:
        delta_B_u = torch.einsum("bdl,dn,bdl->bdln", delta, B, u)
    if initial_state is None:
        h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1], dtype=compute_dtype)
    else:
        h = initial_state.to(compute_dtype)
    ys = []
    for i in range(u.shape[2]):
        h = delta_A[:, :, i] * h + delta_B_u[:, :, i]
        if C.dim() == 3:
            ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, i]))
        else:
            ys.append(torch.einsum("bdn,dn->bd", h, C))
    out = torch.stack(ys, dim=2)
    if D is not None:
        out = out + u * D[:, None].to(compute_dtype)
    if z is not None:
        out = out * F.silu(z.to(compute_dtype))
    out = out.to(dtype_in)
    return (out, h) if return_last_state else out


def selective_scan_native(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
    initial_state=None,
):
    """Chunked scan with a recomputing backward; same contract as :func:`selective_scan`.

    Memory beyond inputs and outputs: ``L/T`` boundary states ``(B, D, N)`` kept for backward (none
    when no gradient is needed) plus a few ``(T, B, N, D)`` chunk tensors, T from ``CHUNK_ELEMENTS``.
    Inputs whose memory is step-major (``x.transpose(1, 2)`` contiguous, as Mamba's in_proj and x_proj
    produce them) are read without a copy; ``out`` and the sequence-long gradients are returned
    step-major (``(B, L, D)`` memory viewed as ``(B, D, L)``), which is the layout out_proj reads.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if cpu_kernel.applies(u, delta, A, B, C, D, z, delta_bias, initial_state):   # opt-in, see there
        out, last_state = cpu_kernel.scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    else:
        out, last_state = _SelectiveScanNative.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                                      initial_state)
    return (out, last_state) if return_last_state else out


def chunk_steps(batch: int, dim: int, dstate: int) -> int:
    """Steps T per chunk so that a (T, B, N, D) chunk tensor holds about ``CHUNK_ELEMENTS`` values."""
    return max(MIN_CHUNK_STEPS, min(MAX_CHUNK_STEPS, CHUNK_ELEMENTS // max(1, batch * dim * dstate)))


def _steps_first(x):
    """(B, X, L) -> (L, B, X) view, unit stride along X; copies only when x is not step-major in memory."""
    view = x.permute(2, 0, 1)
    return view if view.stride(-1) == 1 else view.contiguous()


def _step_major_empty(like, dtype=None):
    """An uninitialised (B, X, L) tensor stored as (B, L, X), i.e. step-major; returns (tensor, (L, B, X) view)."""
    batch, width, seqlen = like.shape
    storage = like.new_empty((batch, seqlen, width), dtype=dtype or like.dtype)
    return storage.transpose(1, 2), storage.permute(1, 0, 2)


def _softplus(x):
    # F.softplus is not vectorised on CPU (measured 15x slower than exp on a chunk); log(1 + exp(x))
    # with the same threshold is. Below x = -17 it returns 0 instead of exp(x) < 4e-8: a step size
    # that small changes nothing the tolerance could see, and the gradient uses sigmoid(x) exactly.
    return torch.where(x > 20, x, torch.exp(x).add_(1).log_())


class _Block:
    """One block's inputs, step-major: (S, B, D) for u/delta/z, (S, B, N, 1) for variable B and C,
    (N, D) for fixed B and C. Views of the inputs where their memory allows; ``delta`` is computed.

    A block is ``CHUNKS_PER_BLOCK`` chunks: the per-step vector work (softplus, gating, the
    gradient formulas on (S, B, D)) runs once per block, the state work ((T, B, N, D)) per chunk.
    Per chunk, the (T, B, D) ops were too small to amortise their dispatch (measured: a third of the
    scan's time at T = 32, D = 1024)."""

    def __init__(self, seq, delta_bias, delta_softplus, start, stop, dtype):
        def take(x):
            return x[start:stop].to(dtype) if x is not None else None

        self.start, self.stop = start, stop
        self.u = take(seq["u"])
        self.delta_raw = take(seq["delta"])
        if delta_bias is not None:
            self.delta_raw = self.delta_raw + delta_bias.to(dtype)
        self.delta = _softplus(self.delta_raw) if delta_softplus else self.delta_raw
        self.delta_u = self.delta * self.u
        self.B = take(seq["B"]).unsqueeze(-1) if seq["B"].dim() == 3 else seq["B"]
        self.C = take(seq["C"]).unsqueeze(-1) if seq["C"].dim() == 3 else seq["C"]
        self.z = take(seq["z"])

    def chunks(self, steps):
        """(offset in the block, offset + T) of the block's chunks, in order."""
        return [(lo, min(lo + steps, self.stop - self.start)) for lo in range(0, self.stop - self.start, steps)]

    def sub(self, x, lo, hi):
        """Rows lo:hi of a per-step block tensor; fixed (N, D) B or C are returned as they are."""
        return x[lo:hi] if x.dim() == 4 else x


def _sequences(u, delta, B, C, z, dtype):
    """Step-major (L, B, X) views of the sequence inputs; fixed B/C become (N, D) in ``dtype``."""
    return {"u": _steps_first(u), "delta": _steps_first(delta), "z": _steps_first(z) if z is not None else None,
            "B": _steps_first(B) if B.dim() == 3 else B.t().to(dtype).contiguous(),
            "C": _steps_first(C) if C.dim() == 3 else C.t().to(dtype).contiguous()}


def _chunk_states(delta, delta_u, B, A_t, h0, workspace):
    """States of every step of a chunk, started from ``h0`` (B, N, D); ``A_t`` is A transposed (N, D),
    delta and delta_u (T, B, D), B (T, B, N, 1) or (N, D).

    Returns ``(H, decay)``, both (T, B, N, D) views of ``workspace[0]`` and ``workspace[1]``:
    ``H[t] = h_t`` and ``decay[t] = exp(delta_t * A)``. D is the unit-stride axis of every operand,
    so each op is a plain vectorised loop over channels (with N last, the inner loops were 16 long).
    """
    steps = delta.shape[0]
    decay = torch.mul(delta.unsqueeze(2), A_t, out=workspace[1, :steps]).exp_()
    states = torch.mul(delta_u.unsqueeze(2), B, out=workspace[0, :steps])
    # unbind once: per-step indexing would add three view constructions to every iteration.
    h, a = states.unbind(0), decay.unbind(0)
    h[0].addcmul_(a[0], h0)
    for t in range(1, len(h)):
        h[t].addcmul_(a[t], h[t - 1])
    return states, decay


def _workspace(count: int, steps: int, state):
    """``count`` (T, B, N, D) chunk buffers shaped like ``state`` (B, N, D), reused by every chunk.

    Fresh chunk-sized tensors per chunk cost more than the arithmetic on them: glibc hands blocks of a
    few MB back to the OS when freed, so every new one page-faults (measured: exp of a product 3-6 ms
    allocated vs 0.5 ms in place, for 1M floats on one core)."""
    return state.new_empty((count, steps, *state.shape))


def _into(target, dtype):
    """``target`` when a result can be written straight into it (contiguous, ``dtype``), else None.

    Writing results into the step-major outputs where they can take them saves a chunk- or
    block-sized temporary and its copy (for B = 1 and fp32, every time)."""
    return target if target.dtype == dtype and target.is_contiguous() else None


def _over_n(states, weights, target=None):
    """sum_n states[t, b, n, d] * weights -> (T, B, D); weights (T, B, N, 1) per step or (N, D) fixed.
    Written into ``target`` (T, B, D) when it takes it (:func:`_into`), else into a copy of the result.

    Per step it is one (1, N) x (N, D) product per (t, b): a batched matmul whose operands are
    contiguous (20x faster than the same contraction over a unit-stride N axis, measured)."""
    steps, batch, dstate, dim = states.shape
    direct = _into(target, states.dtype) if target is not None else None
    if weights.dim() == 4:
        rows = weights.reshape(steps * batch, 1, dstate)
        if direct is not None:
            torch.bmm(rows, states.view(steps * batch, dstate, dim), out=direct.view(steps * batch, 1, dim))
            return direct
        result = torch.bmm(rows, states.view(steps * batch, dstate, dim)).view(steps, batch, dim)
    elif direct is not None:
        return torch.sum(states * weights, 2, out=direct)
    else:
        result = (states * weights).sum(2)
    if target is not None:
        target.copy_(result)
    return result


def _over_d(states, weights, target):
    """sum_d states[t, b, n, d] * weights[t, b, d] -> ``target`` (T, B, N).

    As (1, D) x (D, N) products with the states as a transposed operand (the form einsum picks):
    (N, D) x (D, 1) matrix-vector products are 12x slower (measured)."""
    steps, batch, dstate, dim = states.shape
    rows = weights.reshape(steps * batch, 1, dim)
    columns = states.view(steps * batch, dstate, dim).transpose(1, 2)
    direct = _into(target, states.dtype)
    if direct is not None:
        torch.bmm(rows, columns, out=direct.view(steps * batch, 1, dstate))
    else:
        target.copy_(torch.bmm(rows, columns).view(steps, batch, dstate))


def _over_steps(states, weights):
    """sum_{t, b} states[t, b, n, d] * weights[t, b, d] -> (N, D), written into ``states`` first.

    (einsum turns this into a matmul batched over d that copies every operand, 100x slower.)"""
    return states.mul_(weights.unsqueeze(2)).sum((0, 1))


def _block_starts(seqlen, steps):
    """Block start steps: blocks are CHUNKS_PER_BLOCK chunks of ``steps`` (the last may be shorter)."""
    return range(0, seqlen, steps * CHUNKS_PER_BLOCK)


class _SelectiveScanNative(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
        dtype = torch.promote_types(u.dtype, torch.float32)
        batch, dim, seqlen = u.shape
        dstate = A.shape[1]
        A_t = A.to(dtype).t().contiguous()
        D_c = D.to(dtype) if D is not None else None
        seq = _sequences(u, delta, B, C, z, dtype)
        steps = chunk_steps(batch, dim, dstate)
        keep_boundaries = any(ctx.needs_input_grad)
        n_chunks = -(-seqlen // steps)
        boundaries = u.new_empty((n_chunks, batch, dstate, dim), dtype=dtype) if keep_boundaries else None
        out, out_steps = _step_major_empty(u)
        if initial_state is None:
            h = u.new_zeros((batch, dstate, dim), dtype=dtype)
        else:   # (B, D, N) -> the scan's (B, N, D) layout, a copy (the loop writes into the state chunks)
            h = initial_state.to(dtype).transpose(1, 2).contiguous()
        workspace = _workspace(2, steps, h)
        index = 0
        for start in _block_starts(seqlen, steps):
            block = _Block(seq, delta_bias, delta_softplus, start, min(start + steps * CHUNKS_PER_BLOCK, seqlen), dtype)
            y_out = out_steps[start:block.stop]
            y = _into(y_out, dtype)
            y = block.u.new_empty(block.u.shape) if y is None else y
            for lo, hi in block.chunks(steps):
                if keep_boundaries:
                    boundaries[index] = h
                index += 1
                states, _ = _chunk_states(block.delta[lo:hi], block.delta_u[lo:hi], block.sub(block.B, lo, hi),
                                          A_t, h, workspace)
                h = states[-1].clone()  # the workspace is overwritten by the next chunk
                _over_n(states, block.sub(block.C, lo, hi), y[lo:hi])
            if D_c is not None:
                y.addcmul_(block.u, D_c)
            if block.z is not None:
                y.mul_(F.silu(block.z))
            if y is not y_out:
                y_out.copy_(y)
        ctx.delta_softplus = delta_softplus
        ctx.steps = steps
        ctx.initial_state_dtype = initial_state.dtype if initial_state is not None else None
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, boundaries)
        ctx.set_materialize_grads(False)
        return out, h.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_out, grad_last_state):
        u, delta, A, B, C, D, z, delta_bias, boundaries = ctx.saved_tensors
        dtype = boundaries.dtype
        batch, dim, seqlen = u.shape
        dstate = A.shape[1]
        steps = ctx.steps
        A_t = A.to(dtype).t().contiguous()
        D_c = D.to(dtype) if D is not None else None
        variable_B, variable_C = B.dim() == 3, C.dim() == 3
        seq = _sequences(u, delta, B, C, z, dtype)
        grad_steps = _steps_first(grad_out) if grad_out is not None else None

        # Sequence-long gradients are written block by block straight into the inputs' dtype, so bf16/fp16
        # inputs never get a whole-sequence fp32 gradient copy; reductions accumulate in ``dtype``.
        # They are step-major, the layout of the projections that produced u, delta, z, B and C.
        du, du_steps = _step_major_empty(u)
        ddelta, ddelta_steps = _step_major_empty(delta)
        dz, dz_steps = _step_major_empty(z) if z is not None else (None, None)
        dA_t = A_t.new_zeros(A_t.shape)
        dB, dB_steps = _step_major_empty(B) if variable_B else (None, None)
        dC, dC_steps = _step_major_empty(C) if variable_C else (None, None)
        dB_t = None if variable_B else A_t.new_zeros(A_t.shape)
        dC_t = None if variable_C else A_t.new_zeros(A_t.shape)
        dD = torch.zeros_like(D, dtype=dtype) if D is not None else None
        ddelta_bias = torch.zeros_like(delta_bias, dtype=dtype) if delta_bias is not None else None

        # adjoint_in: dLoss/dh at the last step of the chunk coming from later steps
        # (decay_{t+1} * adjoint_{t+1}), plus the gradient of the returned last state.
        if grad_last_state is not None:
            adjoint_in = grad_last_state.transpose(1, 2).to(dtype)
        else:
            adjoint_in = u.new_zeros((batch, dstate, dim), dtype=dtype)
        workspace = _workspace(3, steps, adjoint_in)
        for start in reversed(_block_starts(seqlen, steps)):
            block = _Block(seq, delta_bias, ctx.delta_softplus, start,
                           min(start + steps * CHUNKS_PER_BLOCK, seqlen), dtype)
            stop = block.stop
            if grad_steps is not None:
                grad = grad_steps[start:stop].to(dtype)
            else:
                grad = block.u.new_zeros(block.u.shape)
            if block.z is not None:
                grad_y = F.silu(block.z).mul_(grad)  # the gradient reaching y = <C, h> + D u
                y = block.u.new_empty(block.u.shape)
            else:
                grad_y = grad
            d_delta_out = ddelta_steps[start:stop]
            d_delta = _into(d_delta_out, dtype)
            d_delta = block.u.new_empty(block.u.shape) if d_delta is None else d_delta
            w = block.u.new_empty(block.u.shape)
            chunks = block.chunks(steps)
            first_chunk = start // steps
            for number in reversed(range(len(chunks))):
                lo, hi = chunks[number]
                h0 = boundaries[first_chunk + number]
                delta_c, B_c, C_c = block.delta[lo:hi], block.sub(block.B, lo, hi), block.sub(block.C, lo, hi)
                states, decay = _chunk_states(delta_c, block.delta_u[lo:hi], B_c, A_t, h0, workspace)
                g = grad_y[lo:hi]
                if block.z is not None:
                    _over_n(states, C_c, y[lo:hi])
                if variable_C:
                    _over_d(states, g, dC_steps[start + lo:start + hi])
                else:
                    dC_t += (states * g.unsqueeze(2)).sum((0, 1))

                # Adjoint recurrence, backwards in time: adj_t = grad_t * C_t + decay_{t+1} * adj_{t+1}.
                adjoint = torch.mul(g.unsqueeze(2), C_c, out=workspace[2, : hi - lo])
                adj, a = adjoint.unbind(0), decay.unbind(0)
                adj[-1].add_(adjoint_in)
                for t in range(len(adj) - 2, -1, -1):
                    adj[t].addcmul_(a[t + 1], adj[t + 1])
                adjoint_in = a[0] * adj[0]

                # d(delta_t * A): adj_t * decay_t * h_{t-1}, with h_{-1} the boundary state.
                # decay is not needed after this, so it becomes d_log_decay in place, and the product with
                # A goes into the states' buffer (no fresh chunk-sized tensors, see _workspace).
                d_log_decay = decay.mul_(adjoint)
                d_log_decay[1:] *= states[:-1]
                d_log_decay[0] *= h0
                torch.sum(torch.mul(d_log_decay, A_t, out=states), 2, out=d_delta[lo:hi])
                del states, decay
                dA_t += _over_steps(d_log_decay, delta_c)
                del d_log_decay

                # Input term delta_t * u_t * B_t: w = sum_n adj_t * B_t feeds delta and u.
                _over_n(adjoint, B_c, w[lo:hi])
                if variable_B:
                    _over_d(adjoint, block.delta_u[lo:hi], dB_steps[start + lo:start + hi])
                else:
                    dB_t += (adjoint * block.delta_u[lo:hi].unsqueeze(2)).sum((0, 1))

            # Per-step gradient formulas, once for the whole block.
            if block.z is not None:
                if D_c is not None:
                    y.addcmul_(block.u, D_c)
                # dz = grad * y * silu'(z): SiLU's own backward kernel, one pass, straight into dz.
                dz_out = dz_steps[start:stop]
                if _into(dz_out, dtype) is not None:
                    torch.ops.aten.silu_backward.grad_input(y.mul_(grad), block.z, grad_input=dz_out)
                else:
                    dz_out.copy_(torch.ops.aten.silu_backward(y.mul_(grad), block.z))
            du_out = du_steps[start:stop]
            du_block = _into(du_out, dtype)
            du_block = torch.mul(w, block.delta, out=du_block) if du_block is not None else w * block.delta
            if D_c is not None:
                du_block.addcmul_(grad_y, D_c)
                dD += (grad_y * block.u).sum((0, 1))
            d_delta.addcmul_(w, block.u)
            if ctx.delta_softplus:
                d_delta.mul_(torch.sigmoid(block.delta_raw))
            if ddelta_bias is not None:
                ddelta_bias += d_delta.sum((0, 1))
            if du_block is not du_out:
                du_out.copy_(du_block)
            if d_delta is not d_delta_out:
                d_delta_out.copy_(d_delta)

        # After the first chunk, adjoint_in is dLoss/dh_{-1}: the initial state's gradient.
        grad_initial = None
        if ctx.initial_state_dtype is not None:
            grad_initial = adjoint_in.transpose(1, 2).to(ctx.initial_state_dtype)

        def cast(grad, like):
            return grad.to(like.dtype) if grad is not None else None

        return (
            cast(du, u),
            cast(ddelta, delta),
            cast(dA_t.t(), A),
            cast(dB if variable_B else dB_t.t(), B),
            cast(dC if variable_C else dC_t.t(), C),
            cast(dD, D),
            cast(dz, z),
            cast(ddelta_bias, delta_bias),
            None,
            grad_initial,
        )
