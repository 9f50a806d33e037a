"""Mamba-2 (SSD) mixers on our Mamba-1 selective scan: no new kernel.

Mamba-2's state-space layer is Mamba-1's recurrence with structure: per head h (``headdim`` P
channels) one scalar A_h and one step size dt_h for every channel and state of the head, and B, C
shared by all heads (``ngroups`` 1). So it *is* :func:`~wsi_pipeline.ssm.selective_scan` with

    A[d, n]     = A_h(d)                 (D = H·P channels, N = d_state states)
    delta[d, t] = dt_h(d)[t]             (dt_bias and the softplus per head, broadcast to channels)
    B, C        = the (B, N, L) projections every channel shares
    D[d]        = D_h(d)

which is exactly how mamba-ssm's own pure-PyTorch reference for the fused SSD layer computes it
(``ops/triton/ssd_combined.py``: ``mamba_split_conv1d_scan_ref`` → ``ssd_selective_scan`` repeats A,
dt, dt_bias, D over ``headdim`` and calls Mamba-1's ``selective_scan_fn``). The SSD chunked matmul
form is another way to the same numbers: :func:`ssd_chunked` (plain torch matrix products, our
default, far faster on CPU at d_state 128); ``impl="scan"`` runs the broadcast selective scan.

- :class:`GatedRMSNorm`: mamba-ssm's ``RMSNormGated`` (``ngroups`` 1): ``norm_before_gate=False``
  gives ``RMSNorm(y · silu(z)) · w``.
- :class:`MultiOrderMamba2`: one ``in_proj`` (z, xBC, dt), one gated norm and one ``out_proj``
  shared, one set of SSM parameters (conv over xBC, dt_bias, A_log, D) per scan order; each order's
  output (after the gated norm, back in sequence order) is averaged before ``out_proj``. MamMIL's
  ``DirectMamba`` (Vison307/MamMIL mamba/mamba_ssm/modules/direct_mamba.py) with its parameter names,
  so its state dicts load as-is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from wsi_pipeline.ssm.conv1d import causal_conv1d
from wsi_pipeline.ssm.orders import ScanOrder
from wsi_pipeline.ssm.scan import selective_scan


class GatedRMSNorm(nn.Module):
    """``RMSNorm(x · silu(z)) · weight`` (``norm_before_gate=False``) or ``RMSNorm(x) · weight · silu(z)``;
    one group over the last axis. (…, d) → (…, d)."""

    def __init__(self, dim: int, eps: float = 1e-5, norm_before_gate: bool = False):
        super().__init__()
        self.eps, self.norm_before_gate = eps, norm_before_gate
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        if z is not None and not self.norm_before_gate:
            x = x * F.silu(z)
        out = x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + self.eps) * self.weight
        if z is not None and self.norm_before_gate:
            out = out * F.silu(z)
        return out


SSD_IMPLS = ("chunked", "scan")
# Steps per chunk of the chunked SSD form: its (T, T) intra-chunk matrices cost T per step, its
# state pass (H, P, N) per chunk; 64 keeps both small (chosen, not tuned).
SSD_CHUNK = 64


def ssd_chunked(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                D: torch.Tensor, chunk: int = SSD_CHUNK) -> torch.Tensor:
    """Mamba-2's scan in its chunked matrix form (SSD), plain torch ops, differentiable by autograd.

    x (b, L, H, P), dt (b, L, H) (after bias and softplus), A (H,) negative, B, C (b, L, N) shared by
    all heads or (b, L, G, N) for G groups of H/G consecutive heads, D (H,) → y (b, L, H, P): the same
    numbers as the recurrence ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t``, ``y_t = C_t h_t + D x_t``
    (:func:`ssd_scan` with ``impl="scan"``), up to rounding. Within a chunk
    ``y_t = Σ_{s≤t} (C_t·B_s) exp(cs_t − cs_s) dt_s x_s`` (cs = the chunk's running sum of dt·A);
    across chunks the state entering each chunk is carried by a loop over chunks.
    """
    batch, length, heads, headdim = x.shape
    if B.dim() == 3:
        B, C = B[:, :, None], C[:, :, None]
    groups = B.shape[2]
    if heads % groups:
        raise ValueError(f"{heads} heads do not split into {groups} groups")
    steps = min(chunk, length)
    pad = (-length) % steps
    if pad:   # zero dt and x at the end: nothing flows back into the real steps (the scan is causal)
        x, dt, B, C = (torch.cat([t, t.new_zeros(batch, pad, *t.shape[2:])], dim=1) for t in (x, dt, B, C))
    n_chunks = x.shape[1] // steps
    per_group = heads // groups
    # Heads as (group, head in group): k below.
    x = x.reshape(batch, n_chunks, steps, groups, per_group, headdim)
    dt = dt.reshape(batch, n_chunks, steps, groups, per_group)
    B = B.reshape(batch, n_chunks, steps, groups, -1)
    C = C.reshape(batch, n_chunks, steps, groups, -1)
    A, D = A.reshape(groups, per_group), D.reshape(groups, per_group)
    cs = (dt * A).cumsum(dim=2)                                               # (b, c, T, g, k)
    causal = torch.ones(steps, steps, dtype=torch.bool, device=x.device).tril()
    gap = cs[:, :, :, None] - cs[:, :, None]                                  # (b, c, t, s, g, k)
    decay = torch.exp(gap.masked_fill(~causal[:, :, None, None], float("-inf")))
    scores = torch.einsum("bctgn,bcsgn->bctsg", C, B)[..., None] * decay * dt[:, :, None]
    y = torch.einsum("bctsgk,bcsgkp->bctgkp", scores, x)
    # What each chunk adds to the state by its last step, and how the state decays over a chunk.
    to_end = torch.exp(cs[:, :, -1:] - cs) * dt                               # (b, c, T, g, k)
    added = torch.einsum("bcsgk,bcsgkp,bcsgn->bcgkpn", to_end, x, B)
    chunk_decay = torch.exp(cs[:, :, -1])                                     # (b, c, g, k)
    state = x.new_zeros(batch, groups, per_group, headdim, B.shape[-1])
    entering = []
    for c in range(n_chunks):
        entering.append(state)
        state = chunk_decay[:, c, :, :, None, None] * state + added[:, c]
    entering = torch.stack(entering, dim=1)                                   # (b, c, g, k, P, N)
    y = y + torch.einsum("bctgn,bcgkpn,bctgk->bctgkp", C, entering, torch.exp(cs))
    y = y + D[..., None] * x
    return y.reshape(batch, n_chunks * steps, heads, headdim)[:, :length]


def ssd_scan(xBC: torch.Tensor, dt: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None,
             dt_bias: torch.Tensor, A_log: torch.Tensor, D: torch.Tensor, headdim: int, d_state: int,
             backend: str | None = None, impl: str = "chunked") -> torch.Tensor:
    """Conv + SiLU over xBC, then Mamba-2's scan (ngroups 1, no gate): xBC (B, L, d_inner + 2N),
    dt (B, L, H) → y (B, L, d_inner), step-major.

    ``impl="scan"``: :func:`selective_scan` with the heads' scalars broadcast over their channels, as
    mamba-ssm's reference does (the ``_ref`` of this pair; any backend). ``"chunked"`` (default):
    :func:`ssd_chunked`, the same numbers by matrix products (about 3x faster on CPU for MamMIL's
    layer at d_state 128, L = 1000, in one measurement on a loaded machine: BENCHMARKS.md)."""
    if impl not in SSD_IMPLS:
        raise ValueError(f"impl must be one of {SSD_IMPLS}, got {impl!r}")
    d_inner = xBC.shape[-1] - 2 * d_state
    # Parameters in at least fp32 (fp64 stays fp64, so the two impls can be compared exactly).
    dt_bias, A_log, D = (p.to(torch.promote_types(p.dtype, torch.float32)) for p in (dt_bias, A_log, D))
    xBC = causal_conv1d(xBC.transpose(1, 2), conv_weight, conv_bias, "silu", backend=backend)   # (B, C, L)
    x, B, C = torch.split(xBC, [d_inner, d_state, d_state], dim=1)
    if impl == "chunked":
        batch, _, length = x.shape
        delta = F.softplus(dt.to(dt_bias.dtype) + dt_bias)                                        # (B, L, H)
        y = ssd_chunked(x.transpose(1, 2).reshape(batch, length, -1, headdim), delta.to(x.dtype),
                        -torch.exp(A_log).to(x.dtype), B.transpose(1, 2), C.transpose(1, 2), D.to(x.dtype))
        return y.reshape(batch, length, d_inner)
    per_channel = lambda v: v.repeat_interleave(headdim, dim=0)  # noqa: E731  (H,) → (H·P,)
    A = per_channel(-torch.exp(A_log))[:, None].expand(d_inner, d_state).contiguous()
    delta = dt.transpose(1, 2).repeat_interleave(headdim, dim=1)                                   # (B, D, L)
    y = selective_scan(x, delta, A, B, C, per_channel(D), z=None, delta_bias=per_channel(dt_bias),
                       delta_softplus=True, backend=backend)
    return y.transpose(1, 2)


class MultiOrderMamba2(nn.Module):
    """Mamba-2 over several scan orders, averaged: (B, L, d_model), orders → (B, L, d_model).

    ``forward(u, orders)`` takes one :class:`~wsi_pipeline.ssm.orders.ScanOrder` per SSM (``n_ssms``
    of them; e.g. MamMIL's 4 graph orders each forwards and reversed = 8), so orders may be computed
    per bag. Per order i: ``zxbcdt[:, order]`` → conv_i + SiLU over xBC → scan with (dt_bias_i,
    A_log_i, D_i) → ``norm(y, z)`` → back in sequence order. The mean over orders goes to
    ``out_proj``. Init as mamba-ssm's Mamba2: A_h ~ U(A_init_range), dt ~ log-U[dt_min, dt_max]
    stored as inverse softplus in dt_bias, D = 1, convolutions and projections PyTorch's default.
    """

    def __init__(self, d_model: int, n_ssms: int, d_state: int = 128, d_conv: int = 4, expand: int = 2,
                 headdim: int = 64, A_init_range: tuple[float, float] = (1, 16), dt_min: float = 0.001,
                 dt_max: float = 0.1, dt_init_floor: float = 1e-4, bias: bool = False, conv_bias: bool = True,
                 norm_before_gate: bool = False, backend: str | None = None, impl: str = "chunked"):
        super().__init__()
        if impl not in SSD_IMPLS:
            raise ValueError(f"impl must be one of {SSD_IMPLS}, got {impl!r}")
        self.impl = impl
        d_inner = expand * d_model
        if d_inner % headdim:
            raise ValueError(f"expand * d_model ({d_inner}) must be a multiple of headdim ({headdim})")
        if n_ssms < 1:
            raise ValueError(f"n_ssms must be >= 1, got {n_ssms}")
        self.d_model, self.d_inner, self.d_state, self.headdim = d_model, d_inner, d_state, headdim
        self.nheads, self.n_ssms, self.backend = d_inner // headdim, n_ssms, backend
        conv_dim = d_inner + 2 * d_state
        # Order of in_proj's outputs: [z, x, B, C, dt], as Mamba2.
        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * d_state + self.nheads, bias=bias)
        self.conv1d_list = nn.ModuleList(
            nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1, bias=conv_bias)
            for _ in range(n_ssms))
        self.dt_bias_list = nn.ParameterList()
        self.A_log_list = nn.ParameterList()
        self.D_list = nn.ParameterList()
        for _ in range(n_ssms):
            dt = torch.exp(torch.rand(self.nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_init_floor)
            dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))     # inverse softplus
            A_log = nn.Parameter(torch.log(torch.empty(self.nheads).uniform_(*A_init_range)))
            D = nn.Parameter(torch.ones(self.nheads))
            for p in (dt_bias, A_log, D):
                p._no_weight_decay = True
            self.dt_bias_list.append(dt_bias)
            self.A_log_list.append(A_log)
            self.D_list.append(D)
        self.norm = GatedRMSNorm(d_inner, eps=1e-5, norm_before_gate=norm_before_gate)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)

    def branch(self, i: int, zxbcdt: torch.Tensor, order: ScanOrder) -> torch.Tensor:
        """SSM i over ``order``: (B, L, d_in_proj) → gated, normed (B, L, d_inner) in sequence order."""
        length = zxbcdt.shape[1]
        z, xBC, dt = torch.split(order.apply(zxbcdt, dim=1), [self.d_inner, self.d_inner + 2 * self.d_state,
                                                               self.nheads], dim=-1)
        conv = self.conv1d_list[i]
        y = ssd_scan(xBC, dt, conv.weight.squeeze(1), conv.bias, self.dt_bias_list[i], self.A_log_list[i],
                     self.D_list[i], self.headdim, self.d_state, self.backend, self.impl)
        return order.undo(self.norm(y, z), length, dim=1)

    def forward(self, u: torch.Tensor, orders: list[ScanOrder]) -> torch.Tensor:
        if len(orders) != self.n_ssms:
            raise ValueError(f"MultiOrderMamba2 has {self.n_ssms} SSMs, got {len(orders)} orders")
        zxbcdt = self.in_proj(u)
        if self.impl == "chunked":
            return self.out_proj(self._all_branches(zxbcdt, orders).mean(dim=1))
        total = None
        for i, order in enumerate(orders):
            y = self.branch(i, zxbcdt, order)
            total = y if total is None else total + y
        return self.out_proj(total / self.n_ssms)

    def _all_branches(self, zxbcdt: torch.Tensor, orders: list[ScanOrder]) -> torch.Tensor:
        """Every SSM at once (chunked SSD): the S orders stacked as S groups of heads, one conv over
        the S · conv_dim channels, one SSD call; the same numbers as :meth:`branch` per order, in far
        fewer (larger) ops. (B, L, d_in_proj) → (B, S, L, d_inner), each back in sequence order."""
        batch, length, _ = zxbcdt.shape
        n_ssms, d_inner, d_state, heads = self.n_ssms, self.d_inner, self.d_state, self.nheads
        if any(order.padded_length(length) != length for order in orders):
            raise ValueError("MultiOrderMamba2 takes permutations (no padded orders)")
        index = torch.stack([order.forward_index(length) for order in orders]).to(zxbcdt.device)   # (S, L)
        # Step-major (B, L, S, C) so the conv reads S·C channels per step without a copy.
        reordered = zxbcdt[:, index.t()]                                                          # (B, L, S, C)
        z, xBC, dt = torch.split(reordered, [d_inner, d_inner + 2 * d_state, heads], dim=-1)
        conv_weight = torch.cat([conv.weight.squeeze(1) for conv in self.conv1d_list])
        conv_bias = (torch.cat([conv.bias for conv in self.conv1d_list])
                     if self.conv1d_list[0].bias is not None else None)
        xBC = causal_conv1d(xBC.reshape(batch, length, -1).transpose(1, 2), conv_weight, conv_bias, "silu",
                            backend=self.backend).transpose(1, 2).reshape(batch, length, n_ssms, -1)
        x, B, C = torch.split(xBC, [d_inner, d_state, d_state], dim=-1)
        params = lambda plist: torch.stack(list(plist)).to(torch.promote_types(plist[0].dtype, torch.float32))  # noqa: E731
        dt_bias, A_log, D = params(self.dt_bias_list), params(self.A_log_list), params(self.D_list)   # (S, H)
        delta = F.softplus(dt.to(dt_bias.dtype) + dt_bias).reshape(batch, length, n_ssms * heads)
        y = ssd_chunked(x.reshape(batch, length, n_ssms * heads, self.headdim), delta.to(x.dtype),
                        -torch.exp(A_log).reshape(-1).to(x.dtype), B, C, D.reshape(-1).to(x.dtype))
        y = self.norm(y.reshape(batch, length, n_ssms, d_inner), z)                               # (B, L, S, d)
        inverse = torch.argsort(index, dim=1)                                                     # (S, L)
        return y.permute(0, 2, 1, 3).gather(2, inverse[None, :, :, None].expand(batch, -1, -1, d_inner))
