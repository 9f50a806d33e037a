"""Sequence-chunked recompute of a pre-norm Mamba mixer, for bags too long to hold one layer's
activations (issue 18: a 1M-instance bag on one GPU).

:func:`chunked_mixer` computes ``mixer(norm(x))`` for a :class:`~.mamba_block.BranchedMambaBlock`
(or a plain :class:`~.mamba_block.MambaBlock`) without ever holding a whole-sequence activation of
the mixer. Each scan branch walks its own scan order in pieces of ``chunk`` steps: the piece's rows
of ``x`` are gathered, normalised and projected (in_proj), convolved with the last ``d_conv - 1``
conv inputs of the piece before prepended, scanned from the piece before's last state, projected
back (out_proj, which is linear, so projecting each branch and adding is projecting their sum) and
added into the output rows. Forward keeps only ``x`` and, per piece, the carried state
(B, d_inner, N) and conv tail (B, d_conv - 1, d_inner). Backward walks the pieces in reverse,
recomputes each from its carries with autograd on, and back-propagates the output's gradient plus
the gradients that the next piece sent to the carries; so the gradient flows through the carried
state and conv inputs as in the unchunked layer, and the results are the same up to float rounding
(tests/ssm/test_chunked.py).

Peak memory beyond the layer's input, output and their gradients: one piece's activations (about
``chunk`` x 60 KiB at d_model 512) plus the carries, independent of L. Time: one more forward of
the mixer (as ``torch.utils.checkpoint``), plus re-gathering and re-normalising the rows per branch.

The scan takes an initial state only in the ``native`` / ``ref`` backends (mamba-ssm's kernel has
no such input), so on a GPU the pieces run the native scan (:func:`~.scan.selective_scan`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsi_pipeline.ssm.conv1d import causal_conv1d_steps
from wsi_pipeline.ssm.mamba_block import BranchedMambaBlock, MambaBlock
from wsi_pipeline.ssm.orders import Identity


def supports_chunking(mixer: nn.Module) -> bool:
    """Whether :func:`chunked_mixer` can run ``mixer``."""
    return isinstance(mixer, (BranchedMambaBlock, MambaBlock))


def chunked_mixer(norm: nn.Module, mixer: nn.Module, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """``mixer(norm(x))`` for x (B, L, d_model), recomputed piece by piece in backward (module docstring).

    norm: a per-position module (the layer's LayerNorm); mixer: BranchedMambaBlock or MambaBlock;
    chunk: steps per piece (>= 1).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if isinstance(mixer, BranchedMambaBlock):
        branches = list(zip(mixer.orders, mixer.branches))
    elif isinstance(mixer, MambaBlock):
        branches = [(Identity(), mixer)]
    else:
        raise TypeError(f"chunked_mixer runs BranchedMambaBlock or MambaBlock, got {type(mixer).__name__}")
    params = tuple(p for p in (*norm.parameters(), *mixer.parameters()) if p.requires_grad)
    spec = _Spec(norm, mixer.in_proj, mixer.out_proj, branches, int(chunk), params)
    return _ChunkedMixer.apply(x, spec, *params)


class _Spec:
    """The modules of one chunked mixer call (passed through autograd.Function as a plain object)."""

    def __init__(self, norm, in_proj, out_proj, branches, chunk, params):
        self.norm, self.in_proj, self.out_proj = norm, in_proj, out_proj
        self.branches, self.chunk, self.params = branches, chunk, params


def _piece(spec, branch, rows, real, state, tail):
    """One piece of one branch: rows (B, n, d_model) of x in scan order, ``real`` (n,) False where the
    order pads. Returns (out (B, n, d_model), last state, conv tail) for the next piece."""
    xz = spec.in_proj(spec.norm(rows))                       # (B, n, 2 * d_inner), step-major
    if real is not None:    # the order pads after in_proj (MambaMIL's SRMamba): padded rows are zeros
        xz = xz * real.to(xz.dtype)[None, :, None]
    u, z = xz.chunk(2, dim=-1)
    batch, kernel, d_inner = rows.shape[0], branch.d_conv, branch.d_inner
    if tail is None:
        tail = xz.new_zeros(batch, kernel - 1, d_inner)
    conv_in = torch.cat([tail, u], dim=1)                    # the previous piece's last K-1 inputs first
    conv = causal_conv1d_steps(conv_in, branch.conv1d.weight.squeeze(1), branch.conv1d.bias, "silu")
    if state is None:
        state = xz.new_zeros(batch, d_inner, branch.d_state, dtype=torch.promote_types(xz.dtype, torch.float32))
    y, last_state = branch.ssm(conv[:, kernel - 1:].transpose(1, 2), z.transpose(1, 2), initial_state=state,
                               return_last_state=True)
    out = F.linear(y.transpose(1, 2), spec.out_proj.weight)  # out_proj's bias is added once, not per branch
    # A copy: a view would keep the whole piece's conv input alive in the carries kept for backward.
    return out, last_state, conv_in[:, conv_in.shape[1] - (kernel - 1):].clone()


def _pieces(order, seqlen, chunk, device):
    """Per piece: (rows of x to gather, mask of the real ones or None when all are)."""
    index = order.forward_index(seqlen).to(device)
    pieces = []
    for lo in range(0, index.numel(), chunk):
        positions = index[lo:lo + chunk]
        real = positions < seqlen
        pieces.append((positions, None) if bool(real.all()) else (positions.clamp(max=seqlen - 1), real))
    return pieces


class _ChunkedMixer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec, *params):
        seqlen = x.shape[1]
        out = x.new_zeros(x.shape)
        if spec.out_proj.bias is not None:
            out += spec.out_proj.bias
        carries = []
        with torch.no_grad():
            for order, branch in spec.branches:
                state = tail = None
                kept = []
                for rows, real in _pieces(order, seqlen, spec.chunk, x.device):
                    kept.append((state, tail))
                    y, state, tail = _piece(spec, branch, x.index_select(1, rows), real, state, tail)
                    if real is None:
                        out.index_add_(1, rows, y)
                    else:
                        out.index_add_(1, rows[real], y[:, real])
                carries.append(kept)
        ctx.spec, ctx.carries = spec, carries
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        spec, seqlen = ctx.spec, x.shape[1]
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        grad_params = [None] * len(spec.params)
        for (order, branch), carries in zip(spec.branches, ctx.carries):
            grad_state = grad_tail = None
            for (rows, real), (state, tail) in zip(reversed(_pieces(order, seqlen, spec.chunk, x.device)),
                                                   reversed(carries)):
                with torch.enable_grad():
                    # The piece's rows as a leaf of their own: its gradient is (B, n, d_model), scattered
                    # below, instead of a whole-sequence gradient per piece.
                    x_rows = x.detach().index_select(1, rows).requires_grad_(grad_x is not None)
                    state_in = state.detach().requires_grad_() if state is not None else None
                    tail_in = tail.detach().requires_grad_() if tail is not None else None
                    y, state_out, tail_out = _piece(spec, branch, x_rows, real, state_in, tail_in)
                grad_y = grad_out.index_select(1, rows)
                if real is not None:    # padded rows are dropped from the output: no gradient
                    grad_y = grad_y * real.to(grad_y.dtype)[None, :, None]
                outputs, grads = [y], [grad_y]
                for output, grad in ((state_out, grad_state), (tail_out, grad_tail)):
                    if grad is not None:
                        outputs.append(output)
                        grads.append(grad)
                inputs = [t for t in (x_rows, state_in, tail_in) if t is not None and t.requires_grad]
                got = torch.autograd.grad(outputs, inputs + list(spec.params), grads, allow_unused=True)
                by_input = {id(t): g for t, g in zip(inputs, got)}
                if grad_x is not None and by_input.get(id(x_rows)) is not None:
                    grad_x.index_add_(1, rows, by_input[id(x_rows)])
                grad_state = by_input.get(id(state_in))
                grad_tail = by_input.get(id(tail_in))
                for i, g in enumerate(got[len(inputs):]):
                    if g is not None:
                        grad_params[i] = g if grad_params[i] is None else grad_params[i] + g
        bias = spec.out_proj.bias
        for i, p in enumerate(spec.params):
            if p is bias:
                grad_params[i] = grad_out.sum((0, 1)) if grad_params[i] is None else grad_params[i] + grad_out.sum((0, 1))
        return (grad_x, None, *grad_params)
