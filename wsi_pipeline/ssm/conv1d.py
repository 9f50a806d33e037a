"""Causal depthwise conv1d, as in Mamba's short convolution before the scan."""

from __future__ import annotations

import torch.nn.functional as F

from wsi_pipeline.ssm.backend import causal_conv1d_kernel_available, load_causal_conv1d_fn, resolve_backend

# causal-conv1d's kernel is compiled for widths 2-4 only (it raises otherwise); Mamba uses 4.
KERNEL_MIN_WIDTH, KERNEL_MAX_WIDTH = 2, 4


def causal_conv1d(x, weight, bias=None, activation=None, backend=None):
    """Depthwise causal convolution: ``out[:, d, t]`` sees ``x[:, d, t-K+1 : t+1]`` only.

    x: (B, D, L); weight: (D, K); bias: (D,) or None; activation: None or ``"silu"``.
    Returns (B, D, L). Uses the causal-conv1d kernel when the SSM backend resolves to ``"cuda"`` for
    ``x``'s device, that kernel is installed and supports the width; ``torch.nn.functional.conv1d``
    otherwise.
    """
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    kernel_width_ok = KERNEL_MIN_WIDTH <= weight.shape[-1] <= KERNEL_MAX_WIDTH
    if kernel_width_ok and resolve_backend(backend, x.device) == "cuda" and causal_conv1d_kernel_available():
        # By keyword: since causal-conv1d 1.1 the fourth positional parameter is seq_idx.
        return load_causal_conv1d_fn()(x, weight, bias=bias, activation=activation)
    seqlen, kernel = x.shape[-1], weight.shape[-1]
    # Padding K-1 on both sides and keeping the first L outputs is the causal (left-padded) conv.
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=kernel - 1, groups=x.shape[1])[..., :seqlen]
    return F.silu(out) if activation == "silu" else out
