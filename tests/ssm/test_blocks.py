"""Causal conv1d, MambaBlock and the multi-order blocks on CPU."""

import math

import pytest
import torch
import torch.nn.functional as F

from wsi_pipeline.ssm import (
    BranchedMambaBlock,
    Identity,
    MambaBlock,
    MultiOrderMamba,
    Reverse,
    Stride,
    causal_conv1d,
    ss2d_orders,
    use_backend,
)

MAMBA_PARAMETER_NAMES = {
    "in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias",
    "A_log", "D", "out_proj.weight",
}


def test_causal_conv1d_matches_nn_conv1d_and_is_causal():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 5, 20), torch.randn(5, 4), torch.randn(5)
    conv = torch.nn.Conv1d(5, 5, 4, groups=5, padding=3)
    with torch.no_grad():
        conv.weight.copy_(weight.unsqueeze(1))
        conv.bias.copy_(bias)
    out = causal_conv1d(x, weight, bias, activation="silu")
    torch.testing.assert_close(out, F.silu(conv(x)[..., :20]))
    changed = x.clone()
    changed[..., 12:] += 1.0
    assert torch.equal(causal_conv1d(changed, weight, bias)[..., :12], causal_conv1d(x, weight, bias)[..., :12])


@pytest.mark.parametrize("seqlen", [1, 3, 20])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_step_major_causal_conv_matches_conv1d_with_gradients(seqlen, activation):
    # Step-major x (a (B, L, D) tensor viewed as (B, D, L), as in_proj makes it) takes the shifted
    # multiply-add path; values and every gradient must equal F.conv1d's (fp64, so exactly up to rounding).
    gen = torch.Generator().manual_seed(seqlen)
    steps = torch.randn(2, seqlen, 5, generator=gen, dtype=torch.float64).requires_grad_()
    weight = torch.randn(5, 4, generator=gen, dtype=torch.float64).requires_grad_()
    bias = torch.randn(5, generator=gen, dtype=torch.float64).requires_grad_()
    x = steps.transpose(1, 2)
    assert x.stride(1) == 1
    out = causal_conv1d(x, weight, bias, activation=activation)
    assert out.transpose(1, 2).is_contiguous()   # returned step-major, the scan's layout
    expected = F.conv1d(x.contiguous(), weight.unsqueeze(1), bias, padding=3, groups=5)[..., :seqlen]
    expected = F.silu(expected) if activation else expected
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, (steps, weight, bias), grad)
    want = torch.autograd.grad(expected, (steps, weight, bias), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_mamba_block_has_mamba_parameters_and_init():
    block = MambaBlock(d_model=40, d_state=8, expand=2, dt_min=0.001, dt_max=0.1)
    assert set(block.state_dict()) == MAMBA_PARAMETER_NAMES
    assert block.dt_rank == math.ceil(40 / 16)
    assert block.in_proj.weight.shape == (160, 40) and block.x_proj.weight.shape == (3 + 16, 80)
    dt = F.softplus(block.dt_proj.bias)
    assert dt.min() >= 0.001 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    torch.testing.assert_close(-torch.exp(block.A_log), -torch.arange(1.0, 9.0).repeat(80, 1))
    assert torch.equal(block.D, torch.ones(80))


def test_mamba_block_runs_forward_and_backward_on_cpu():
    torch.manual_seed(0)
    block = MambaBlock(d_model=16)
    x = torch.randn(2, 50, 16, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, param in block.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


def test_mamba_block_is_causal():
    torch.manual_seed(0)
    block = MambaBlock(d_model=16)
    x = torch.randn(1, 30, 16)
    changed = x.clone()
    changed[:, 20:] = torch.randn(1, 10, 16)
    torch.testing.assert_close(block(changed)[:, :20], block(x)[:, :20])


def test_mamba_block_native_matches_ref_backend():
    torch.manual_seed(0)
    block = MambaBlock(d_model=16, backend="native")
    x = torch.randn(2, 40, 16)
    native = block(x)
    with use_backend("ref"):
        block.backend = None
        ref = block(x)
    torch.testing.assert_close(native, ref, rtol=6e-4, atol=2e-3)


def test_branched_block_with_one_identity_branch_is_a_mamba_block():
    torch.manual_seed(0)
    block = MambaBlock(d_model=16)
    branched = BranchedMambaBlock(d_model=16, orders=[Identity()])
    remapped = {k if k.split(".")[0] in ("in_proj", "out_proj") else f"branches.0.{k}": v
                for k, v in block.state_dict().items()}
    branched.load_state_dict(remapped)
    x = torch.randn(2, 25, 16)
    torch.testing.assert_close(branched(x), block(x))


@pytest.mark.parametrize("orders", [[Identity(), Stride(4)], [Identity(), Reverse()]], ids=["SRMamba", "BiMamba"])
def test_branched_block_sums_branches_scanned_in_their_order(orders):
    """Published SRMamba / BiMamba maths: shared in_proj, each branch scans (x, z) reordered (zero
    padding after in_proj), outputs put back in sequence order and summed, then one out_proj."""
    torch.manual_seed(0)
    block = BranchedMambaBlock(d_model=16, orders=orders)
    x = torch.randn(2, 23, 16, requires_grad=True)
    y = block(x)
    xz = block.in_proj(x).transpose(1, 2)
    x_f, z_f = xz.chunk(2, dim=1)
    forward_branch = block.branches[0](x_f, z_f)
    if isinstance(orders[1], Stride):
        padded = F.pad(xz, (0, 1))  # 23 -> 24, a multiple of rate 4
        strided = padded.view(2, 64, 6, 4).transpose(2, 3).reshape(2, 64, 24)
        x_s, z_s = strided.chunk(2, dim=1)
        other = block.branches[1](x_s, z_s).view(2, 32, 4, 6).transpose(2, 3).reshape(2, 32, 24)[..., :23]
    else:
        x_b, z_b = xz.flip(-1).chunk(2, dim=1)
        other = block.branches[1](x_b, z_b).flip(-1)
    expected = block.out_proj((forward_branch + other).transpose(1, 2))
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    assert all(p.grad is not None for p in block.parameters())


def test_branched_block_default_is_srmamba_with_rate_10():
    block = BranchedMambaBlock(d_model=16)
    assert [type(o).__name__ for o in block.orders] == ["Identity", "Stride"] and block.orders[1].rate == 10
    assert block(torch.randn(1, 33, 16)).shape == (1, 33, 16)


def test_multi_order_shared_block_on_identity_orders_sums_copies():
    torch.manual_seed(0)
    model = MultiOrderMamba(16, orders=[Identity(), Identity()], share_params=True)
    x = torch.randn(1, 12, 16)
    torch.testing.assert_close(model(x), 2 * model.blocks[0](x))


def test_multi_order_ss2d_grid_fwd_bwd_and_mean_merge():
    torch.manual_seed(0)
    orders = ss2d_orders(3, 4)
    summed = MultiOrderMamba(16, orders=orders, share_params=False, merge="sum")
    assert len(summed.blocks) == 4
    mean = MultiOrderMamba(16, orders=orders, share_params=False, merge="mean")
    mean.load_state_dict(summed.state_dict())
    x = torch.randn(2, 12, 16, requires_grad=True)
    torch.testing.assert_close(mean(x), summed(x) / 4)
    summed(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="merge"):
        MultiOrderMamba(16, orders=orders, merge="max")
