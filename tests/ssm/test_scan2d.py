"""The 2-D selective scan (2DMamba): the fast path equals the cell-by-cell recurrence (fp64, outputs
and gradients; fp32 through the CPU kernel), the recurrence equals its closed form, and upstream's
PyTorch fallback (PScan_2D, transliterated below) computes something else: its column down-sweep
reads the row stage's overwritten A. With that one read changed to A_raw it equals the recurrence."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wsi_pipeline.ssm.scan2d import selective_scan_2d, selective_scan_2d_ref


def make_inputs(batch=2, dim=3, dstate=4, height=5, width=7, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).requires_grad_()

    return dict(u=rand(batch, dim, height, width), delta=rand(batch, dim, height, width, scale=0.5),
                A=(-0.2 - torch.rand(dim, dstate, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_(),
                B=rand(batch, dstate, height, width), C=rand(batch, dstate, height, width), D=rand(dim),
                z=rand(batch, dim, height, width), delta_bias=rand(dim, scale=0.3))


def outputs_and_grads(fn, inputs):
    inputs = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    out = fn(**inputs, delta_softplus=True)
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    grads = torch.autograd.grad((out * weight).sum(), list(inputs.values()))
    return out, dict(zip(inputs, grads))


@pytest.mark.parametrize("shape", [(5, 7), (1, 6), (6, 1), (9, 4)])
def test_fast_scan_equals_the_recurrence_fp64(shape):
    inputs = make_inputs(height=shape[0], width=shape[1], seed=sum(shape))
    fast, ref = outputs_and_grads(selective_scan_2d, inputs), outputs_and_grads(selective_scan_2d_ref, inputs)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-12, atol=1e-12)
    for name in ref[1]:
        torch.testing.assert_close(fast[1][name], ref[1][name], rtol=1e-11, atol=1e-11, msg=name)


@pytest.mark.parametrize("kernel", ["1", "0"], ids=["cpu_kernel", "pytorch_scan"])
def test_fast_scan_in_fp32_matches_the_fp64_recurrence(kernel, monkeypatch):
    """Through the CPU kernel (default) and through torch ops alone (the path a GPU without mamba-ssm runs)."""
    monkeypatch.setenv("WSI_SSM_CPU_KERNEL", kernel)
    inputs64 = make_inputs(height=6, width=11, seed=3)
    inputs32 = {k: v.detach().float() for k, v in inputs64.items()}
    fast, ref = outputs_and_grads(selective_scan_2d, inputs32), outputs_and_grads(selective_scan_2d_ref, inputs64)
    torch.testing.assert_close(fast[0].double(), ref[0], rtol=1e-4, atol=1e-5)
    for name in ref[1]:
        torch.testing.assert_close(fast[1][name].double(), ref[1][name], rtol=1e-4, atol=1e-4, msg=name)


def rows_by_recurrence(decay, drive):
    """hh[i,j] = a hh[i,j-1] + b (the row pass alone)."""
    rows = torch.zeros_like(drive)
    for j in range(drive.shape[2]):
        rows[:, :, j] = drive[:, :, j] + (decay[:, :, j] * rows[:, :, j - 1] if j else 0)
    return rows


def states_by_recurrence(decay, drive):
    """hh[i,j] = a hh[i,j-1] + b; h[i,j] = a h[i-1,j] + hh[i,j]; decay, drive (B, H, W, D, N)."""
    rows = rows_by_recurrence(decay, drive)
    states = torch.zeros_like(drive)
    for i in range(drive.shape[1]):
        states[:, i] = rows[:, i] + (decay[:, i] * states[:, i - 1] if i else 0)
    return states


def test_the_recurrence_is_its_closed_form():
    """h[i,j] = sum over (k<=i, l<=j) of (prod_{k<m<=i} a[m,j]) (prod_{l<q<=j} a[k,q]) b[k,l]: the
    row pass carries b[k,l] along row k to column j, the column pass down column j to row i."""
    gen = torch.Generator().manual_seed(5)
    decay = torch.rand(1, 4, 5, 2, 3, generator=gen, dtype=torch.float64)
    drive = torch.randn(1, 4, 5, 2, 3, generator=gen, dtype=torch.float64)
    states = states_by_recurrence(decay, drive)
    for i in range(4):
        for j in range(5):
            want = sum(decay[:, k + 1:i + 1, j].prod(1) * decay[:, k, l + 1:j + 1].prod(1) * drive[:, k, l]
                       for k in range(i + 1) for l in range(j + 1))
            torch.testing.assert_close(states[:, i, j], want, rtol=1e-12, atol=1e-12)


# -- upstream's PyTorch fallback, transliterated -----------------------------------------------------
# AtlasAnalyticsLab/2DMamba @ 9fe12aa, 2DMambaMIL/models/pscan.py: npo2, pad_npo2_2d, PScan_2D.pscan
# and the first half of PScan_2D.forward, line for line (in-place ops on views as there). `fixed`
# changes the one read this test is about: the column down-sweep's `A` -> `A_raw`.
def npo2(length):
    return 2 ** math.ceil(math.log2(length))


def pad_npo2_2d(X):
    return F.pad(X, (0, 0, 0, 0, 0, npo2(X.size(2)) - X.size(2), 0, npo2(X.size(1)) - X.size(1)), "constant", 0)


def upstream_pscan_2d_stages(A, X, fixed=False):
    BS, D, H, W, _ = A.size()
    num_steps = int(math.log2(W))
    A_raw = A.clone()
    Aa, Xa = A, X
    for _ in range(num_steps - 2):
        T = Xa.size(3)
        Aa = Aa.view(BS, D, H, T // 2, 2, -1)
        Xa = Xa.view(BS, D, H, T // 2, 2, -1)
        Xa[:, :, :, :, 1].add_(Aa[:, :, :, :, 1].mul(Xa[:, :, :, :, 0]))
        Aa[:, :, :, :, 1].mul_(Aa[:, :, :, :, 0])
        Aa = Aa[:, :, :, :, 1]
        Xa = Xa[:, :, :, :, 1]
    down_sweep_horizontal = True
    if Xa.size(3) == 4:
        Xa[:, :, :, 1].add_(Aa[:, :, :, 1].mul(Xa[:, :, :, 0]))
        Aa[:, :, :, 1].mul_(Aa[:, :, :, 0])
        Xa[:, :, :, 3].add_(Aa[:, :, :, 3].mul(Xa[:, :, :, 2] + Aa[:, :, :, 2].mul(Xa[:, :, :, 1])))
    elif Xa.size(3) == 2:
        Xa[:, :, :, 1].add_(Aa[:, :, :, 1].mul(Xa[:, :, :, 0]))
        down_sweep_horizontal = False
    else:
        down_sweep_horizontal = False
    if down_sweep_horizontal:
        Aa = A[:, :, :, 2**(num_steps - 2) - 1:W:2**(num_steps - 2)]
        Xa = X[:, :, :, 2**(num_steps - 2) - 1:W:2**(num_steps - 2)]
        Xa[:, :, :, 2].add_(Aa[:, :, :, 2].mul(Xa[:, :, :, 1]))
        Aa[:, :, :, 2].mul_(Aa[:, :, :, 1])
        for k in range(num_steps - 3, -1, -1):
            Aa = A[:, :, :, 2**k - 1:W:2**k]
            Xa = X[:, :, :, 2**k - 1:W:2**k]
            T = Xa.size(3)
            Aa = Aa.view(BS, D, H, T // 2, 2, -1)
            Xa = Xa.view(BS, D, H, T // 2, 2, -1)
            Xa[:, :, :, 1:, 0].add_(Aa[:, :, :, 1:, 0].mul(Xa[:, :, :, :-1, 1]))
            Aa[:, :, :, 1:, 0].mul_(Aa[:, :, :, :-1, 1])
    after_rows = X.clone()
    # STAGE 2: vertical
    Aa, Xa = A_raw, X
    num_steps = int(math.log2(H))
    for _ in range(num_steps - 2):
        T = Xa.size(2)
        Aa = Aa.view(BS, D, T // 2, 2, W, -1)
        Xa = Xa.view(BS, D, T // 2, 2, W, -1)
        Xa[:, :, :, 1].add_(Aa[:, :, :, 1].mul(Xa[:, :, :, 0]))
        Aa[:, :, :, 1].mul_(Aa[:, :, :, 0])
        Aa = Aa[:, :, :, 1]
        Xa = Xa[:, :, :, 1]
    down_sweep_vertical = True
    if Xa.size(2) == 4:
        Xa[:, :, 1].add_(Aa[:, :, 1].mul(Xa[:, :, 0]))
        Aa[:, :, 1].mul_(Aa[:, :, 0])
        Xa[:, :, 3].add_(Aa[:, :, 3].mul(Xa[:, :, 2] + Aa[:, :, 2].mul(Xa[:, :, 1])))
    elif Xa.size(2) == 2:
        Xa[:, :, 1].add_(Aa[:, :, 1].mul(Xa[:, :, 0]))
        down_sweep_vertical = False
    else:
        down_sweep_vertical = False
    if down_sweep_vertical:
        A_down = A_raw if fixed else A      # upstream reads A here: the row stage's products
        Aa = A_down[:, :, 2**(num_steps - 2) - 1:H:2**(num_steps - 2)]
        Xa = X[:, :, 2**(num_steps - 2) - 1:H:2**(num_steps - 2)]
        Xa[:, :, 2].add_(Aa[:, :, 2].mul(Xa[:, :, 1]))
        Aa[:, :, 2].mul_(Aa[:, :, 1])
        for k in range(num_steps - 3, -1, -1):
            Aa = A_down[:, :, 2**k - 1:H:2**k]
            Xa = X[:, :, 2**k - 1:H:2**k]
            T = Xa.size(2)
            Aa = Aa.view(BS, D, T // 2, 2, W, -1)
            Xa = Xa.view(BS, D, T // 2, 2, W, -1)
            Xa[:, :, 1:, 0].add_(Aa[:, :, 1:, 0].mul(Xa[:, :, :-1, 1]))
            Aa[:, :, 1:, 0].mul_(Aa[:, :, :-1, 1])
    return after_rows, X


def upstream_pscan_2d(A_in, X_in, fixed=False, return_rows=False):
    """PScan_2D.forward: (BS, H, W, D, N) decay and drive -> states (BS, H, W, D, N)."""
    H, W = X_in.size(1), X_in.size(2)
    if W == npo2(W) and H == npo2(H):
        A, X = A_in.clone(), X_in.clone()
    else:
        A, X = pad_npo2_2d(A_in), pad_npo2_2d(X_in)
    A = A.permute(0, 3, 1, 2, 4)
    X = X.permute(0, 3, 1, 2, 4)
    rows, X = upstream_pscan_2d_stages(A, X, fixed)
    out = X[:, :, :H, :W, :].permute(0, 2, 3, 1, 4)
    return (rows[:, :, :H, :W, :].permute(0, 2, 3, 1, 4), out) if return_rows else out


def test_upstream_pytorch_fallback_reads_an_overwritten_A_in_its_column_pass():
    gen = torch.Generator().manual_seed(0)
    for height, width in [(4, 4), (8, 8), (16, 16), (8, 64), (5, 7), (32, 32)]:
        decay = torch.rand(1, height, width, 2, 3, generator=gen, dtype=torch.float64) * 0.5 + 0.5
        drive = torch.randn(1, height, width, 2, 3, generator=gen, dtype=torch.float64)
        want = states_by_recurrence(decay, drive)
        rows, upstream = upstream_pscan_2d(decay, drive, return_rows=True)
        # Its row stage is the row recurrence ...
        torch.testing.assert_close(rows, rows_by_recurrence(decay, drive), rtol=1e-12, atol=1e-12)
        # ... its full forward is not the 2-D recurrence (wrong by O(1), not rounding) ...
        assert (upstream - want).abs().max() > 0.1, (height, width)
        # ... and reading A_raw in the column down-sweep makes it exact.
        torch.testing.assert_close(upstream_pscan_2d(decay, drive, fixed=True), want, rtol=1e-12, atol=1e-12)


def test_fixed_upstream_scan_gives_our_outputs():
    """The scan in upstream's selective_scan_2D (decay exp(ΔA), drive ΔBx, y = hs·C + D x), with the
    one-read fix, equals selective_scan_2d (ungated; upstream gates outside)."""
    inputs = {k: v.detach() for k, v in make_inputs(1, 3, 4, 6, 5, seed=7).items()}
    delta = F.softplus(inputs["delta"] + inputs["delta_bias"][None, :, None, None]).permute(0, 2, 3, 1)
    x = inputs["u"].permute(0, 2, 3, 1)
    Bc, Cc = inputs["B"].permute(0, 2, 3, 1), inputs["C"].permute(0, 2, 3, 1)
    deltaA = torch.exp(delta.unsqueeze(-1) * inputs["A"])
    BX = delta.unsqueeze(-1) * Bc.unsqueeze(3) * x.unsqueeze(-1)
    hs = upstream_pscan_2d(deltaA, BX, fixed=True)
    y = (hs @ Cc.unsqueeze(-1)).squeeze(4) + inputs["D"] * x
    ours = selective_scan_2d(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], inputs["D"],
                             delta_bias=inputs["delta_bias"], delta_softplus=True)
    torch.testing.assert_close(ours, y.permute(0, 3, 1, 2), rtol=1e-12, atol=1e-12)
