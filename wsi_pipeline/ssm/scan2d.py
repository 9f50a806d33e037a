"""2-D selective scan (2DMamba, Zhang et al., CVPR 2025): rows, then columns, with the same Ā.

For every channel d and state n, on a (H, W) grid, with Ā = exp(Δ·A), B̄x = Δ·B·x:

    hh[i, j] = Ā[i, j] · hh[i, j-1] + B̄x[i, j]          (pass 1: along each row, left to right)
    h[i, j]  = Ā[i, j] · h[i-1, j]  + hh[i, j]          (pass 2: along each column, top to bottom)
    y[i, j]  = Σ_n C[i, j, n] · h[i, j, n] + D · x[i, j];   out = y · SiLU(z)

which is what 2DMamba's CUDA kernel computes (inclusive row scan, then column scan, Ā re-read) and
what its PyTorch fallback (``PScan_2D``) documents. That fallback's forward does not compute it: its
column down-sweep reads ``A`` (already overwritten by the row stage's products) where it should
read ``A_raw``; tests/ssm/test_scan2d.py transliterates it and shows both the error and the fix.

- :func:`selective_scan_2d_ref`: the recurrence cell by cell (the test oracle; slow).
- :func:`selective_scan_2d`: the fast path, exact up to rounding, on any device through torch ops:
  pass 1 is our 1-D :func:`~wsi_pipeline.ssm.scan.selective_scan` over the H rows as a batch, with
  every (d, n) pair a channel of state size 1 (input x·B[n], B = C = 1), so on CPU it runs the
  fused C kernel and on a GPU mamba-ssm's kernel where installed; pass 2 steps down the H rows, each
  step one vectorised update of a whole row of states (W·d·N values), with the output contraction
  over n folded into the same step, so the column states are never stacked.

Shapes: u, delta, z (B, d, H, W); B, C (B, N, H, W) (input-dependent, as in 2DMamba); A (d, N).
Memory: pass 1 holds d·N·H·W values a few times (input, Δ, states); so does pass 2's autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wsi_pipeline.ssm.scan import selective_scan


def _step_sizes(delta, delta_bias, delta_softplus):
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None, None]
    return F.softplus(delta) if delta_softplus else delta


def selective_scan_2d_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The 2-D recurrence, one cell at a time (module docstring); returns (B, d, H, W)."""
    delta = _step_sizes(delta, delta_bias, delta_softplus)
    batch, dim, height, width = u.shape
    row = [[None] * width for _ in range(height)]     # hh, (batch, d, N) per cell
    col = [[None] * width for _ in range(height)]     # h
    out = u.new_zeros(batch, dim, height, width)
    for i in range(height):
        for j in range(width):
            decay = torch.exp(delta[:, :, i, j, None] * A)                                # (batch, d, N)
            drive = delta[:, :, i, j, None] * B[:, None, :, i, j] * u[:, :, i, j, None]
            row[i][j] = drive if j == 0 else decay * row[i][j - 1] + drive
            col[i][j] = row[i][j] if i == 0 else decay * col[i - 1][j] + row[i][j]
            y = (col[i][j] * C[:, None, :, i, j]).sum(-1)
            out[:, :, i, j] = y + (D[None] * u[:, :, i, j] if D is not None else 0)
    return out * F.silu(z) if z is not None else out


def selective_scan_2d(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, backend=None):
    """Fast 2-D selective scan, same contract as :func:`selective_scan_2d_ref`; differentiable."""
    delta = _step_sizes(delta, delta_bias, delta_softplus)
    batch, dim, height, width = u.shape
    dstate = A.shape[1]
    # Pass 1: rows as sequences, (d, n) pairs as channels of state size 1. Laid out step-major
    # ((rows, W, d·N) memory viewed as (rows, d·N, W)), the layout the 1-D scan reads without a copy.
    rows = batch * height
    drive = torch.einsum("bdhw,bnhw->bhwdn", u, B).reshape(rows, width, dim * dstate).transpose(1, 2)
    steps = delta.permute(0, 2, 3, 1)[..., None].expand(-1, -1, -1, -1, dstate)
    steps = steps.reshape(rows, width, dim * dstate).transpose(1, 2)
    ones = u.new_ones(rows, width, 1).transpose(1, 2)      # B = C = 1, (rows, 1, W)
    along_rows = selective_scan(drive, steps, A.reshape(dim * dstate, 1), ones, ones, backend=backend)
    along_rows = along_rows.transpose(1, 2).reshape(batch, height, width, dim, dstate)
    # Pass 2: down the columns, one row of states per step.
    c_cells = C.permute(0, 2, 3, 1)                                          # (B, H, W, N)
    d_cells = delta.permute(0, 2, 3, 1)                                      # (B, H, W, d)
    state = None
    ys = []
    for i in range(height):
        if state is None:
            state = along_rows[:, i]
        else:
            state = torch.exp(d_cells[:, i, :, :, None] * A) * state + along_rows[:, i]
        ys.append(torch.einsum("bwdn,bwn->bdw", state, c_cells[:, i]))
    out = torch.stack(ys, dim=2)                                             # (B, d, H, W)
    if D is not None:
        out = out + D[None, :, None, None] * u
    return out * F.silu(z) if z is not None else out
