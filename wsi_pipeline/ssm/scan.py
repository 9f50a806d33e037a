"""Mamba-1 selective scan: one public entry point, a fast chunked PyTorch scan, and its reference.

The recurrence, per batch b, channel d and state n (mamba-ssm's semantics and shapes)::

    delta  = softplus(delta + delta_bias)            (each optional)
    h_t    = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t    = <C_t, h_t> + D * u_t
    out_t  = y_t * silu(z_t)                         (when z is given)

Shapes: u, delta, z ``(B, D, L)``; A ``(D, N)``; B, C ``(B, N, L)`` (input-dependent) or ``(D, N)``;
D, delta_bias ``(D,)``; last state ``(B, D, N)``. Accumulation is fp32 (fp64 when an input is fp64).

``selective_scan_native`` never materialises a ``(B, D, L, N)`` tensor: it walks the sequence in
chunks of T steps, keeps only the state at chunk boundaries for backward, and its backward re-runs each
chunk from its boundary state, then runs the adjoint recurrence backwards through the chunk — the
scheme of mamba's CUDA kernel. Within a chunk, the O(B*D*N) per-step update is the only Python-level
loop; everything else is vectorised over the chunk. ``selective_scan_ref`` is a few readable lines
(a port of mamba-ssm's ``selective_scan_ref``) used as the oracle in tests.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from wsi_pipeline.ssm.backend import load_mamba_selective_scan_fn, resolve_backend

# Elements of one (T, B, D, N) chunk tensor. About 1M floats (4 MB) keeps the handful of chunk-sized
# temporaries of backward cache-friendly while making each vectorised op large enough to use all cores;
# measured on 2 cores, see benchmarks/results/ssm.md. The step count per chunk is clamped to
# [MIN, MAX]_CHUNK_STEPS.
CHUNK_ELEMENTS = 1 << 20
MIN_CHUNK_STEPS = 16
MAX_CHUNK_STEPS = 256


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
):
    """Selective scan with mamba-ssm's signature; the backend is chosen by :func:`resolve_backend`.

    Returns ``out`` ``(B, D, L)`` in ``u``'s dtype, or ``(out, last_state)`` with ``last_state``
    ``(B, D, N)`` in fp32 when ``return_last_state``. On the ``cuda`` backend ``last_state`` carries
    no gradient (mamba-ssm's kernel has none); use ``native`` to differentiate through it.
    """
    name = resolve_backend(backend, u.device)
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
    return scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


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


def _check_inputs(u, delta, A, B, C, D, z, delta_bias):
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


def selective_scan_ref(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """Sequential reference (mamba-ssm's ``selective_scan_ref``, real A): same contract as
    :func:`selective_scan`. Materialises ``(B, D, L, N)`` tensors and back-propagates through a Python
    loop, so it is for tests and small inputs only."""
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
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
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
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
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """Chunked scan with a recomputing backward; same contract as :func:`selective_scan`.

    Memory beyond inputs and outputs: ``L/T`` boundary states ``(B, D, N)`` kept for backward (none
    when no gradient is needed) plus a few ``(T, B, D, N)`` chunk tensors, T from ``CHUNK_ELEMENTS``.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    out, last_state = _SelectiveScanNative.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (out, last_state) if return_last_state else out


def chunk_steps(batch: int, dim: int, dstate: int) -> int:
    """Steps T per chunk so that a (T, B, D, N) chunk tensor holds about ``CHUNK_ELEMENTS`` values."""
    return max(MIN_CHUNK_STEPS, min(MAX_CHUNK_STEPS, CHUNK_ELEMENTS // max(1, batch * dim * dstate)))


class _Chunk:
    """One chunk's inputs in step-major layout: (T, B, D) for u/delta/z, (T, B, 1, N) for B and C.

    Step-major layout makes ``tensor[t]`` contiguous, so the per-step update reads and writes
    contiguous (B, D, N) blocks.
    """

    def __init__(self, u, delta, B, C, z, delta_bias, delta_softplus, start, stop, dtype):
        def steps_first(x):  # (B, X, L) -> (T, B, X), contiguous
            return x[:, :, start:stop].permute(2, 0, 1).to(dtype).contiguous()

        self.u = steps_first(u)
        self.delta_raw = steps_first(delta)
        if delta_bias is not None:
            self.delta_raw = self.delta_raw + delta_bias.to(dtype)
        self.delta = F.softplus(self.delta_raw) if delta_softplus else self.delta_raw
        self.B = steps_first(B).unsqueeze(2) if B.dim() == 3 else B.to(dtype)
        self.C = steps_first(C).unsqueeze(2) if C.dim() == 3 else C.to(dtype)
        self.z = steps_first(z) if z is not None else None


def _chunk_states(chunk: _Chunk, A, h0, workspace):
    """States of every step of a chunk, started from ``h0`` (B, D, N).

    Returns ``(H, decay)``, both (T, B, D, N) views of ``workspace[0]`` and ``workspace[1]``:
    ``H[t] = h_t`` and ``decay[t] = exp(delta_t * A)``.
    """
    steps = chunk.u.shape[0]
    decay = torch.mul(chunk.delta.unsqueeze(-1), A, out=workspace[1, :steps]).exp_()
    states = torch.mul((chunk.delta * chunk.u).unsqueeze(-1), chunk.B, out=workspace[0, :steps])
    # unbind once: per-step indexing would add three view constructions to every iteration.
    h, a = states.unbind(0), decay.unbind(0)
    h[0].addcmul_(a[0], h0)
    for t in range(1, len(h)):
        h[t].addcmul_(a[t], h[t - 1])
    return states, decay


def _workspace(count: int, steps: int, state):
    """``count`` (T, B, D, N) chunk buffers shaped like ``state`` (B, D, N), reused by every chunk.

    Fresh chunk-sized tensors per chunk cost more than the arithmetic on them: glibc hands blocks of a
    few MB back to the OS when freed, so every new one page-faults (measured: exp of a product 3-6 ms
    allocated vs 0.5 ms in place, for 1M floats on one core)."""
    return state.new_empty((count, steps, *state.shape))


def _readout(states, C):
    """y_t = <C_t, h_t>: (T, B, D, N) states with C (T, B, 1, N) or (D, N) -> (T, B, D)."""
    if C.dim() == 4:
        steps, batch, dim, dstate = states.shape
        y = torch.bmm(states.view(steps * batch, dim, dstate), C.view(steps * batch, dstate, 1))
        return y.view(steps, batch, dim)
    return (states * C).sum(-1)


def _reduce_over_d(weights, states):
    """sum_d weights[t, b, d] * states[t, b, d, n] -> (T, B, N), as one batched matmul."""
    steps, batch, dim, dstate = states.shape
    out = torch.bmm(weights.reshape(steps * batch, 1, dim), states.view(steps * batch, dim, dstate))
    return out.view(steps, batch, dstate)


def _contract_state(values, A):
    """sum_n values[t, b, d, n] * A[d, n] -> (T, B, D), as one matmul batched over d.

    Same result as ``(values * A).sum(-1)`` without writing a chunk-sized product; the transposed view
    is a valid strided GEMM operand, so no copy is made (about 2x faster on CPU, measured)."""
    steps, batch, dim, dstate = values.shape
    out = torch.bmm(values.view(steps * batch, dim, dstate).transpose(0, 1), A.unsqueeze(-1))  # (D, T*B, 1)
    return out.view(dim, steps * batch).t().reshape(steps, batch, dim)


class _SelectiveScanNative(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        dtype = torch.promote_types(u.dtype, torch.float32)
        batch, dim, seqlen = u.shape
        A_c = A.to(dtype)
        D_c = D.to(dtype) if D is not None else None
        steps = chunk_steps(batch, dim, A.shape[1])
        starts = range(0, seqlen, steps)
        keep_boundaries = any(ctx.needs_input_grad)
        boundaries = u.new_empty((len(starts), batch, dim, A.shape[1]), dtype=dtype) if keep_boundaries else None
        out = u.new_empty(u.shape)
        h = u.new_zeros((batch, dim, A.shape[1]), dtype=dtype)
        workspace = _workspace(2, steps, h)
        for index, start in enumerate(starts):
            stop = min(start + steps, seqlen)
            if keep_boundaries:
                boundaries[index] = h
            chunk = _Chunk(u, delta, B, C, z, delta_bias, delta_softplus, start, stop, dtype)
            states, _ = _chunk_states(chunk, A_c, h, workspace)
            h = states[-1].clone()  # the workspace is overwritten by the next chunk
            y = _readout(states, chunk.C)
            if D_c is not None:
                y = y + chunk.u * D_c
            if chunk.z is not None:
                y = y * F.silu(chunk.z)
            out[:, :, start:stop] = y.permute(1, 2, 0)
        ctx.delta_softplus = delta_softplus
        ctx.steps = steps
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, boundaries)
        ctx.set_materialize_grads(False)
        return out, h

    @staticmethod
    def backward(ctx, grad_out, grad_last_state):
        u, delta, A, B, C, D, z, delta_bias, boundaries = ctx.saved_tensors
        dtype = boundaries.dtype
        batch, dim, seqlen = u.shape
        A_c = A.to(dtype)
        D_c = D.to(dtype) if D is not None else None
        variable_B, variable_C = B.dim() == 3, C.dim() == 3

        # Sequence-long gradients are written chunk by chunk straight into the inputs' dtype, so bf16/fp16
        # inputs never get a whole-sequence fp32 gradient copy; reductions accumulate in ``dtype``.
        du = torch.empty_like(u)
        ddelta = torch.empty_like(delta)
        dz = torch.empty_like(z) if z is not None else None
        dA = torch.zeros_like(A, dtype=dtype)
        dB = torch.empty_like(B) if variable_B else torch.zeros_like(B, dtype=dtype)
        dC = torch.empty_like(C) if variable_C else torch.zeros_like(C, dtype=dtype)
        dD = torch.zeros_like(D, dtype=dtype) if D is not None else None
        ddelta_bias = torch.zeros_like(delta_bias, dtype=dtype) if delta_bias is not None else None

        # adjoint_in: dLoss/dh at the last step of the chunk coming from later steps
        # (decay_{t+1} * adjoint_{t+1}), plus the gradient of the returned last state.
        if grad_last_state is not None:
            adjoint_in = grad_last_state.to(dtype)
        else:
            adjoint_in = u.new_zeros((batch, dim, A.shape[1]), dtype=dtype)
        starts = range(0, seqlen, ctx.steps)
        workspace = _workspace(3, ctx.steps, adjoint_in)
        for index in reversed(range(len(starts))):
            start = starts[index]
            stop = min(start + ctx.steps, seqlen)
            chunk = _Chunk(u, delta, B, C, z, delta_bias, ctx.delta_softplus, start, stop, dtype)
            h0 = boundaries[index]
            states, decay = _chunk_states(chunk, A_c, h0, workspace)

            if grad_out is not None:
                grad = grad_out[:, :, start:stop].permute(2, 0, 1).to(dtype).contiguous()
            else:
                grad = chunk.u.new_zeros(chunk.u.shape)
            if chunk.z is not None:
                y = _readout(states, chunk.C)
                if D_c is not None:
                    y = y + chunk.u * D_c
                gate = torch.sigmoid(chunk.z)
                # d silu(z)/dz = sigmoid(z) * (1 + z * (1 - sigmoid(z)))
                dz[:, :, start:stop] = (grad * y * gate * (1 + chunk.z * (1 - gate))).permute(1, 2, 0)
                grad = grad * chunk.z * gate
            du_chunk = grad * D_c if D_c is not None else torch.zeros_like(grad)
            if D_c is not None:
                dD += (grad * chunk.u).sum((0, 1))
            if variable_C:
                dC[:, :, start:stop] = _reduce_over_d(grad, states).permute(1, 2, 0)
            else:
                dC += (states * grad.unsqueeze(-1)).sum((0, 1))

            # Adjoint recurrence, backwards in time: adj_t = grad_t * C_t + decay_{t+1} * adj_{t+1}.
            adjoint = torch.mul(grad.unsqueeze(-1), chunk.C, out=workspace[2, : stop - start])
            adj, a = adjoint.unbind(0), decay.unbind(0)
            adj[-1].add_(adjoint_in)
            for t in range(len(adj) - 2, -1, -1):
                adj[t].addcmul_(a[t + 1], adj[t + 1])
            adjoint_in = a[0] * adj[0]

            # d(delta_t * A): adj_t * decay_t * h_{t-1}, with h_{-1} the boundary state.
            # decay is not needed after this, so it becomes d_log_decay in place (one chunk tensor fewer).
            d_log_decay = decay.mul_(adjoint)
            d_log_decay[1:] *= states[:-1]
            d_log_decay[0] *= h0
            del states, decay
            d_delta = _contract_state(d_log_decay, A_c)
            dA += d_log_decay.mul_(chunk.delta.unsqueeze(-1)).sum((0, 1))
            del d_log_decay

            # Input term delta_t * u_t * B_t: w = sum_n adj_t * B_t feeds delta and u.
            if variable_B:
                w = torch.bmm(adjoint.view(-1, dim, A.shape[1]), chunk.B.view(-1, A.shape[1], 1))
                w = w.view(chunk.u.shape)
                dB[:, :, start:stop] = _reduce_over_d(chunk.delta * chunk.u, adjoint).permute(1, 2, 0)
            else:
                w = (adjoint * chunk.B).sum(-1)
                dB += (adjoint * (chunk.delta * chunk.u).unsqueeze(-1)).sum((0, 1))
            d_delta += w * chunk.u
            du_chunk += w * chunk.delta
            if ctx.delta_softplus:
                d_delta = d_delta * torch.sigmoid(chunk.delta_raw)
            if ddelta_bias is not None:
                ddelta_bias += d_delta.sum((0, 1))
            du[:, :, start:stop] = du_chunk.permute(1, 2, 0)
            ddelta[:, :, start:stop] = d_delta.permute(1, 2, 0)

        def cast(grad, like):
            return grad.to(like.dtype) if grad is not None else None

        return (
            cast(du, u),
            cast(ddelta, delta),
            cast(dA, A),
            cast(dB, B),
            cast(dC, C),
            cast(dD, D),
            cast(dz, z),
            cast(ddelta_bias, delta_bias),
            None,
        )
