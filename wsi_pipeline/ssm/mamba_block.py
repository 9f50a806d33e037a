"""Mamba-1 blocks on top of :func:`selective_scan`, plus multi-order wrappers.

- :class:`MambaBlock`: mamba-ssm's ``Mamba`` (same parameter names, init and maths, so its
  state dicts load as-is): in_proj -> causal conv + SiLU -> x_proj -> dt_proj -> scan gated by SiLU(z)
  -> out_proj. ``MambaBlock.inner(x, z)`` is the part between in_proj and out_proj.
- :class:`SSMBranch`: that inner part alone (conv1d, x_proj, dt_proj, A_log, D), the unit that
  BiMamba / SRMamba duplicate per scan order.
- :class:`BranchedMambaBlock`: one shared in_proj and out_proj, one :class:`SSMBranch` per scan order;
  the branch outputs are put back in sequence order and summed before out_proj, as MambaMIL's
  SRMamba (``[Identity(), Stride(rate)]``) and BiMamba (``[Identity(), Reverse()]``).
- :class:`MultiOrderMamba`: whole :class:`MambaBlock` s (shared or separate) run over several orders,
  outputs merged after undoing each order (e.g. SS2D-style 2-D scans).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from wsi_pipeline.ssm.conv1d import causal_conv1d
from wsi_pipeline.ssm.orders import Identity, ScanOrder, Stride
from wsi_pipeline.ssm.scan import selective_scan


class SSMBranch(nn.Module):
    """Conv -> input-dependent (dt, B, C) -> selective scan, for x and z of shape (B, d_inner, L).

    Parameters are named as in mamba-ssm's ``Mamba``: ``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``.
    """

    def __init__(
        self,
        d_inner: int,
        d_state: int = 16,
        d_conv: int = 4,
        dt_rank: int = 1,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        backend: str | None = None,
    ):
        super().__init__()
        self.d_inner, self.d_state, self.d_conv, self.dt_rank = d_inner, d_state, d_conv, dt_rank
        self.backend = backend
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)

        # On the meta device (shape-only builds: a checkpoint's layout checked without memory) no
        # values are computed: meta tensors have none, and their arithmetic runs through torch's
        # Python reference kernels (seconds on first use).
        meta = self.dt_proj.weight.is_meta
        if not meta:
            # Mamba's dt init: weights keep the variance of dt_rank inputs; the bias is the inverse
            # softplus of a log-uniform dt in [dt_min, dt_max], so the initial step sizes span that range.
            dt_init_std = dt_rank**-0.5
            nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
            dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_init_floor)
            with torch.no_grad():
                self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # Model code that re-initialises Linear biases must skip this one (mamba-ssm's convention).
        self.dt_proj.bias._no_reinit = True

        # S4D-real init: A = -(1..N) for every channel, stored as log so A stays negative.
        if meta:
            self.A_log = nn.Parameter(torch.empty(d_inner, d_state))
        else:
            A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
            self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(d_inner))
        self.D._no_weight_decay = True

    def forward(self, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """x, z: (B, d_inner, L) -> gated scan output (B, d_inner, L)."""
        x = causal_conv1d(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu", backend=self.backend)
        return self.ssm(x, z)

    def ssm(self, x: torch.Tensor, z: torch.Tensor | None, initial_state: torch.Tensor | None = None,
            return_last_state: bool = False):
        """The part after the conv: x (conv output), z (B, d_inner, L) -> (B, d_inner, L), and the last
        state (B, d_inner, N) with ``return_last_state``; ``initial_state`` as in :func:`selective_scan`."""
        return project_and_scan(x, z, self.x_proj, self.dt_proj, self.A_log, self.D, self.d_state,
                                backend=self.backend, initial_state=initial_state,
                                return_last_state=return_last_state)


def project_and_scan(x: torch.Tensor, z: torch.Tensor | None, x_proj: nn.Linear, dt_proj: nn.Linear,
                     A_log: torch.Tensor, D: torch.Tensor, d_state: int, *, backend: str | None = None,
                     initial_state: torch.Tensor | None = None, return_last_state: bool = False):
    """Mamba's input-dependent (dt, B, C) from the conv output x (B, d_inner, L), then the scan gated
    by z; the parameters are passed in, so a module holding several sets under its own names (Vim's
    ``conv1d_b`` / ``x_proj_b`` / ... backward branch) runs the same code as :class:`SSMBranch`."""
    dt_rank = dt_proj.in_features
    x_dbl = x_proj(x.transpose(1, 2))  # (B, L, dt_rank + 2N)
    dt, B, C = torch.split(x_dbl, [dt_rank, d_state, d_state], dim=-1)
    # dt_proj's bias is applied inside the scan (delta_bias), before the softplus, as in Mamba.
    delta = (dt @ dt_proj.weight.t()).transpose(1, 2)  # (B, d_inner, L)
    A = -torch.exp(A_log.float())
    # delta, B, C (and z from in_proj) go in as (B, X, L) views of step-major memory, which the
    # native scan reads without a copy (mamba-ssm's kernel makes the copies it needs itself).
    return selective_scan(
        x,
        delta,
        A,
        B.transpose(1, 2),  # (B, N, L)
        C.transpose(1, 2),
        D.float(),
        z=z,
        delta_bias=dt_proj.bias.float(),
        delta_softplus=True,
        return_last_state=return_last_state,
        backend=backend,
        initial_state=initial_state,
    )


def _split_xz(xz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """in_proj's (B, L, 2*d_inner) output -> x, z as (B, d_inner, L) views of step-major memory.

    Split along the channel axis *before* transposing: the gradients then come back together by a
    concatenation along the last axis of step-major tensors, a plain copy. Split after the transpose,
    that concatenation wrote a (B, 2*d_inner, L) tensor from step-major parts, a transposing copy
    (0.3-0.5 s of a 10k MambaMIL pass, measured)."""
    x, z = xz.chunk(2, dim=-1)
    return x.transpose(1, 2), z.transpose(1, 2)


def _branch_kwargs(d_model, expand, dt_rank):
    d_inner = int(expand * d_model)
    rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
    return d_inner, rank


class MambaBlock(SSMBranch):
    """Mamba-1 mixer: (B, L, d_model) -> (B, L, d_model), d_inner = expand * d_model.

    ``backend`` None follows the global choice (:mod:`wsi_pipeline.ssm.backend`).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        backend: str | None = None,
    ):
        d_inner, rank = _branch_kwargs(d_model, expand, dt_rank)
        super().__init__(d_inner, d_state, d_conv, rank, dt_min, dt_max, dt_init_floor, conv_bias, backend)
        self.d_model = d_model
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)

    def inner(self, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """The SSM between in_proj and out_proj: x, z (B, d_inner, L) -> (B, d_inner, L)."""
        return SSMBranch.forward(self, x, z)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: (B, L, d_model) -> (B, L, d_model)."""
        x, z = _split_xz(self.in_proj(hidden_states))
        return self.out_proj(self.inner(x, z).transpose(1, 2))


class BranchedMambaBlock(nn.Module):
    """Shared in_proj/out_proj around one :class:`SSMBranch` per scan order; branch outputs summed.

    For each order, (x, z) = in_proj(input) is reordered (zero padding for :class:`Stride` is added
    after in_proj, as in MambaMIL), scanned by that order's branch, put back in sequence order,
    and the branches are summed before out_proj. ``orders=[Identity(), Stride(10)]`` is MambaMIL's
    SRMamba; ``[Identity(), Reverse()]`` is BiMamba.
    ``checkpoint_above`` (None: never): for sequences longer than this, with autograd on, each
    branch keeps only its output for backward and recomputes the rest there, so one branch's
    activations are alive at a time instead of all of them.
    (B, L, d_model) -> (B, L, d_model).
    """

    def __init__(
        self,
        d_model: int,
        orders: list[ScanOrder] | None = None,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        backend: str | None = None,
        checkpoint_above: int | None = None,
    ):
        super().__init__()
        self.checkpoint_above = checkpoint_above
        self.orders = list(orders) if orders is not None else [Identity(), Stride(10)]
        if not self.orders:
            raise ValueError("BranchedMambaBlock needs at least one scan order")
        d_inner, rank = _branch_kwargs(d_model, expand, dt_rank)
        self.d_model = d_model
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        self.branches = nn.ModuleList(
            SSMBranch(d_inner, d_state, d_conv, rank, dt_min, dt_max, dt_init_floor, conv_bias, backend)
            for _ in self.orders
        )
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: (B, L, d_model) -> (B, L, d_model)."""
        seqlen = hidden_states.shape[1]
        xz = self.in_proj(hidden_states)  # (B, L, 2*d_inner)
        total = None
        recompute = (self.checkpoint_above is not None and seqlen > self.checkpoint_above
                     and torch.is_grad_enabled())
        for order, branch in zip(self.orders, self.branches):
            if recompute:
                y = checkpoint(self._run_branch, order, branch, xz, use_reentrant=False)
            else:
                y = self._run_branch(order, branch, xz)
            total = y if total is None else total + y
        return self.out_proj(total)

    @staticmethod
    def _run_branch(order: ScanOrder, branch: SSMBranch, xz: torch.Tensor) -> torch.Tensor:
        """One scan order: (B, L, 2*d_inner) -> (B, L, d_inner), back in sequence order."""
        # Reordered along L in (B, L, C) layout, so x, z and the branch output stay step-major
        # (the scan's layout) and no (B, C, L) copy is made on the way in or out.
        x, z = _split_xz(order.apply(xz, dim=1))
        return order.undo(branch(x, z).transpose(1, 2), xz.shape[1], dim=1)


class MultiOrderMamba(nn.Module):
    """Whole :class:`MambaBlock` s run over several scan orders; outputs merged in sequence order.

    share_params: one block for all orders (e.g. SS2D-style weight sharing) or one block per order.
    merge: ``"sum"`` or ``"mean"`` of the per-order outputs. Extra keyword arguments go to
    :class:`MambaBlock`. (B, L, d_model) -> (B, L, d_model).
    """

    def __init__(
        self,
        d_model: int,
        orders: list[ScanOrder],
        share_params: bool = False,
        merge: str = "sum",
        **block_kwargs,
    ):
        super().__init__()
        if merge not in ("sum", "mean"):
            raise ValueError(f"merge must be 'sum' or 'mean', got {merge!r}")
        if not orders:
            raise ValueError("MultiOrderMamba needs at least one scan order")
        self.orders, self.share_params, self.merge = list(orders), share_params, merge
        n_blocks = 1 if share_params else len(self.orders)
        self.blocks = nn.ModuleList(MambaBlock(d_model, **block_kwargs) for _ in range(n_blocks))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: (B, L, d_model) -> (B, L, d_model)."""
        seqlen = hidden_states.shape[1]
        total = None
        for i, order in enumerate(self.orders):
            block = self.blocks[0 if self.share_params else i]
            y = order.undo(block(order.apply(hidden_states, dim=1)), seqlen, dim=1)
            total = y if total is None else total + y
        return total / len(self.orders) if self.merge == "mean" else total
