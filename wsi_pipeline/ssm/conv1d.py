"""Causal depthwise conv1d, as in Mamba's short convolution before the scan."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wsi_pipeline.ssm.backend import causal_conv1d_kernel_available, load_causal_conv1d_fn, resolve_backend

# causal-conv1d's kernel is compiled for widths 2-4 only (it raises otherwise); Mamba uses 4.
KERNEL_MIN_WIDTH, KERNEL_MAX_WIDTH = 2, 4


def causal_conv1d(x, weight, bias=None, activation=None, backend=None):
    """Depthwise causal convolution: ``out[:, d, t]`` sees ``x[:, d, t-K+1 : t+1]`` only.

    x: (B, D, L); weight: (D, K); bias: (D,) or None; activation: None or ``"silu"``.
    Returns (B, D, L). Uses the causal-conv1d kernel when the SSM backend resolves to ``"cuda"`` for
    ``x``'s device, that kernel is installed and supports the width. Otherwise, when ``x`` is
    step-major in memory (a ``(B, L, D)`` tensor viewed as ``(B, D, L)``, as Mamba's in_proj makes
    it), K shifted multiply-adds along L with the result step-major too (:func:`causal_conv1d_steps`);
    else ``torch.nn.functional.conv1d``.
    """
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    kernel_width_ok = KERNEL_MIN_WIDTH <= weight.shape[-1] <= KERNEL_MAX_WIDTH
    if kernel_width_ok and resolve_backend(backend, x.device) == "cuda" and causal_conv1d_kernel_available():
        # By keyword: since causal-conv1d 1.1 the fourth positional parameter is seq_idx.
        return load_causal_conv1d_fn()(x, weight, bias=bias, activation=activation)
    if x.stride(1) == 1 and x.shape[1] > 1:
        return causal_conv1d_steps(x.transpose(1, 2), weight, bias, activation).transpose(1, 2)
    seqlen, kernel = x.shape[-1], weight.shape[-1]
    # Padding K-1 on both sides and keeping the first L outputs is the causal (left-padded) conv.
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=kernel - 1, groups=x.shape[1])[..., :seqlen]
    return F.silu(out) if activation == "silu" else out


def causal_conv1d_steps(x, weight, bias=None, activation=None):
    """The same convolution on step-major x (B, L, D), channels the unit-stride axis; returns (B, L, D).

    Why: F.conv1d wants (B, D, L) memory, so with Mamba's step-major projections it copied x there,
    its output back for the scan, and the gradients both ways (on CPU those transposing copies cost
    more than the convolution, benchmarks/results/scan_round2.md). Here out[t] = bias +
    sum_k w[:, k] * x[t - K + 1 + k]: K multiply-adds of shifted (L, D) slices, every one a plain
    vectorised loop over channels; the backward is the same with the shifts reversed.
    """
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    return _StepMajorCausalConv.apply(x, weight, bias, activation == "silu")


def _shifted_conv(x, weight, bias):
    """sum_k w[:, k] * x[t - K + 1 + k] (+ bias) on (B, L, D), zero before t = 0."""
    seqlen, kernel = x.shape[1], weight.shape[1]
    out = torch.mul(x, weight[:, kernel - 1])
    for k in range(kernel - 1):
        shift = kernel - 1 - k
        if shift < seqlen:
            out[:, shift:].addcmul_(x[:, :seqlen - shift], weight[:, k])
    if bias is not None:
        out.add_(bias)
    return out


class _StepMajorCausalConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, silu):
        pre = _shifted_conv(x, weight, bias)
        ctx.silu, ctx.has_bias = silu, bias is not None
        # Saved: x (a view of the projection that produced it, which autograd keeps anyway) and the
        # pre-activation for SiLU's gradient, as F.conv1d + F.silu would keep.
        ctx.save_for_backward(x, weight, pre if silu else None)
        return F.silu(pre) if silu else pre

    @staticmethod
    def backward(ctx, grad):
        x, weight, pre = ctx.saved_tensors
        seqlen, kernel = x.shape[1], weight.shape[1]
        grad_pre = torch.ops.aten.silu_backward(grad, pre) if ctx.silu else grad
        grad_x = grad_w = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mul(grad_pre, weight[:, kernel - 1])
            for k in range(kernel - 1):
                shift = kernel - 1 - k
                if shift < seqlen:
                    grad_x[:, :seqlen - shift].addcmul_(grad_pre[:, shift:], weight[:, k])
        if ctx.needs_input_grad[1]:
            grad_w = weight.new_zeros(weight.shape)
            for k in range(kernel):
                shift = kernel - 1 - k
                if shift < seqlen:
                    grad_w[:, k] = (grad_pre[:, shift:] * x[:, :seqlen - shift]).sum((0, 1))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_pre.sum((0, 1))
        return grad_x, grad_w, grad_bias, None
