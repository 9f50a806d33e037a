"""Nyström self-attention (Xiong et al., AAAI 2021) in plain PyTorch, as TransMIL uses it.

Full softmax attention over a whole slide (L ≈ 10⁴ patches) needs an L×L matrix. Nyström
attention approximates softmax(QKᵀ)V with m landmarks (segment means of Q and K):

    softmax(Q K̃ᵀ) · pinv(softmax(Q̃ K̃ᵀ)) · (softmax(Q̃ Kᵀ) V)       cost O(L·m), memory O(L·m)

The pseudo-inverse is the iterative Moore–Penrose approximation of Razavi et al. (6 iterations),
and a depthwise convolution over the sequence adds a residual in the value path. Layout follows the
reference implementation TransMIL was trained with (lucidrains/nystrom-attention): the sequence is
zero-padded at the front to a multiple of m, and the padding is cut off the output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def iterative_pinv(matrix: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Approximate Moore–Penrose inverse of (..., m, m) matrices (Razavi et al. 2014).

    The start value Aᵀ / (max row sum · max column sum) makes the iteration converge for the
    row-stochastic matrices softmax produces.
    """
    abs_matrix = matrix.abs()
    max_col_sum = abs_matrix.sum(dim=-1).amax()
    max_row_sum = abs_matrix.sum(dim=-2).amax()
    z = matrix.transpose(-1, -2) / (max_col_sum * max_row_sum)
    identity = torch.eye(matrix.shape[-1], device=matrix.device, dtype=matrix.dtype)
    for _ in range(iterations):
        az = matrix @ z
        z = 0.25 * z @ (13 * identity - az @ (15 * identity - az @ (7 * identity - az)))
    return z


class NystromAttention(nn.Module):
    """Multi-head Nyström self-attention: (B, N, dim) → (B, N, dim)."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int | None = None, num_landmarks: int = 256,
                 pinv_iterations: int = 6, residual_conv_kernel: int = 33, dropout: float = 0.0):
        super().__init__()
        dim_head = dim_head or dim // heads
        self.heads, self.dim_head = heads, dim_head
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations
        self.scale = dim_head ** -0.5
        inner_dim = heads * dim_head
        self.to_qkv = nn.Linear(dim, inner_dim * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim), nn.Dropout(dropout))
        # Depthwise conv along the sequence, one filter per head: a local residual on V.
        self.residual_conv = nn.Conv2d(heads, heads, (residual_conv_kernel, 1),
                                       padding=(residual_conv_kernel // 2, 0), groups=heads, bias=False)

    def forward(self, x: torch.Tensor, return_attention_row: int | None = None):
        """x (B, N, dim) → out (B, N, dim).

        With `return_attention_row=r`, also returns the approximate attention of token r to every
        token, (B, heads, N) — one row of the N×N matrix, computed without forming the matrix.
        """
        batch, n_tokens, _ = x.shape
        m = self.num_landmarks
        pad = (-n_tokens) % m
        if pad:
            x = F.pad(x, (0, 0, pad, 0))  # front padding, as in the reference implementation
        n_padded = n_tokens + pad
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(batch, n_padded, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))
        q = q * self.scale

        # Landmarks: means of m contiguous segments of length n_padded / m.
        segment = n_padded // m
        q_landmarks = q.reshape(batch, self.heads, m, segment, self.dim_head).mean(dim=3)
        k_landmarks = k.reshape(batch, self.heads, m, segment, self.dim_head).mean(dim=3)

        kernel_1 = torch.softmax(q @ k_landmarks.transpose(-1, -2), dim=-1)            # (B, h, N, m)
        kernel_2 = torch.softmax(q_landmarks @ k_landmarks.transpose(-1, -2), dim=-1)  # (B, h, m, m)
        kernel_3 = torch.softmax(q_landmarks @ k.transpose(-1, -2), dim=-1)            # (B, h, m, N)
        kernel_2_inv = iterative_pinv(kernel_2, self.pinv_iterations)

        out = (kernel_1 @ kernel_2_inv) @ (kernel_3 @ v)                                # (B, h, N, d)
        out = out + self.residual_conv(v)
        out = out.transpose(1, 2).reshape(batch, n_padded, self.heads * self.dim_head)
        out = self.to_out(out)[:, pad:]
        if return_attention_row is None:
            return out
        row = pad + return_attention_row
        attention_row = (kernel_1[:, :, row:row + 1] @ kernel_2_inv @ kernel_3).squeeze(2)  # (B, h, N+pad)
        return out, attention_row[:, :, pad:]


def default_landmarks(dim: int) -> int:
    """TransMIL's choice: dim / 2 landmarks (256 for dim 512)."""
    return max(1, math.floor(dim / 2))
