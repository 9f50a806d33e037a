"""Scan orders are exact permutations (plus zero padding) that invert; 3-D orders also inside Mamba blocks."""

import pytest
import torch

from wsi_pipeline.ssm import BranchedMambaBlock, MultiOrderMamba
from wsi_pipeline.ssm.orders import (Identity, Raster2D, Raster3D, Reverse, SliceStride, Stride, raster3d_orders,
                                     segmamba_orders, ss2d_orders)

ORDERS_3D = [*(Raster3D(2, 2, 3, d) for d in Raster3D.DIRECTIONS), SliceStride(2, 2, 3), SliceStride(3, 2, 2),
             SliceStride(12, 1, 1, reverse=True), SliceStride(1, 3, 4)]
ORDERS = [Identity(), Reverse(), Stride(1), Stride(3), Stride(10), *ss2d_orders(3, 4), *ORDERS_3D]


@pytest.mark.parametrize("order", ORDERS, ids=repr)
@pytest.mark.parametrize("dim", [1, -1])
def test_apply_then_undo_is_identity(order, dim):
    x = torch.randn(2, 12, 5) if dim == 1 else torch.randn(2, 5, 12)
    scanned = order.apply(x, dim=dim)
    assert scanned.shape[dim] == order.padded_length(12)
    assert torch.equal(order.undo(scanned, 12, dim=dim), x)


@pytest.mark.parametrize("order", ORDERS, ids=repr)
def test_forward_index_is_a_permutation_matching_apply(order):
    index = order.forward_index(12)
    padded = order.padded_length(12)
    assert torch.equal(torch.sort(index).values, torch.arange(padded))
    x = torch.arange(12.0).view(1, 12)
    expected = torch.cat([x, torch.zeros(1, padded - 12)], dim=1)[:, index]
    assert torch.equal(order.apply(x), expected)
    assert torch.equal(order.inverse_index(12)[index], torch.arange(padded))


def test_stride_pads_with_zeros_and_interleaves_like_mambamil():
    # MambaMIL: pad to a multiple of rate, then "b (k w) d -> b (w k) d" with w = rate.
    x = torch.arange(1.0, 6.0).view(1, 5)
    assert Stride(2).apply(x).tolist() == [[1.0, 3.0, 5.0, 2.0, 4.0, 0.0]]
    assert Stride(2).undo(Stride(2).apply(x), 5).tolist() == x.tolist()


def test_raster_directions_on_a_grid():
    grid = torch.arange(6.0).view(1, 6)  # row-major 2 x 3: [[0, 1, 2], [3, 4, 5]]
    scans = {o.direction: o.apply(grid).flatten().tolist() for o in ss2d_orders(2, 3)}
    assert scans == {
        "row": [0, 1, 2, 3, 4, 5],
        "row_rev": [5, 4, 3, 2, 1, 0],
        "col": [0, 3, 1, 4, 2, 5],
        "col_rev": [5, 2, 4, 1, 3, 0],
    }


def test_invalid_orders_are_rejected():
    with pytest.raises(ValueError, match="rate"):
        Stride(0)
    with pytest.raises(ValueError, match="direction"):
        Raster2D(2, 3, "diagonal")
    with pytest.raises(ValueError, match="needs a sequence of 6"):
        Raster2D(2, 3).apply(torch.zeros(1, 7))


# -- 3-D orders ----------------------------------------------------------------------------------
# A 2 x 2 x 3 (depth, height, width) volume flattened (z, y, x)-major:
#   z = 0: [[0, 1, 2], [3, 4, 5]]      z = 1: [[6, 7, 8], [9, 10, 11]]
VOLUME_SCANS = {
    "zyx": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],      # slice by slice, rows
    "zxy": [0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11],      # slice by slice, columns
    "yxz": [0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11],      # one in-slice position through both slices
    "yzx": [0, 1, 2, 6, 7, 8, 3, 4, 5, 9, 10, 11],      # one image row of both slices, then the next
    "xyz": [0, 6, 3, 9, 1, 7, 4, 10, 2, 8, 5, 11],
    "xzy": [0, 3, 6, 9, 1, 4, 7, 10, 2, 5, 8, 11],
}


def test_raster3d_directions_on_a_volume():
    volume = torch.arange(12.0).view(1, 12)
    scans = {d: Raster3D(2, 2, 3, d).apply(volume).flatten().tolist() for d in Raster3D.DIRECTIONS}
    expected = {**VOLUME_SCANS, **{f"{d}_rev": scan[::-1] for d, scan in VOLUME_SCANS.items()}}
    assert scans == expected
    assert len(Raster3D.DIRECTIONS) == 12


def segmamba_interslice(xz: torch.Tensor, n_slices: int) -> torch.Tensor:
    """SegMamba's inter-slice reordering of (B, C, L): chunk into slices, stack, flatten."""
    return torch.stack(xz.chunk(n_slices, dim=-1), dim=-1).flatten(-2)


def segmamba_interslice_back(out: torch.Tensor, n_slices: int) -> torch.Tensor:
    """SegMamba's restore of the inter-slice branch output to the (z, y, x) order."""
    batch, channels, length = out.shape
    return out.reshape(batch, channels, length // n_slices, n_slices).permute(0, 1, 3, 2).flatten(-2)


@pytest.mark.parametrize("shape", [(2, 2, 3), (3, 4, 5), (1, 3, 4), (5, 1, 1)])
def test_slice_stride_is_segmambas_interslice_scan(shape):
    depth, height, width = shape
    x = torch.randn(2, 3, depth * height * width)
    order = SliceStride(depth, height, width)
    scanned = order.apply(x, dim=-1)
    assert torch.equal(scanned, segmamba_interslice(x, depth))
    assert torch.equal(order.undo(scanned, x.shape[-1], dim=-1), segmamba_interslice_back(scanned, depth))
    # On a full volume it is MambaMIL's Stride with one slice per stride, and Raster3D "yxz".
    assert torch.equal(scanned, Stride(height * width).apply(x, dim=-1))
    assert torch.equal(order.forward_index(x.shape[-1]), Raster3D(*shape, "yxz").forward_index(x.shape[-1]))
    assert torch.equal(SliceStride(*shape, reverse=True).apply(x, dim=-1), scanned.flip(-1))


def test_one_slice_volume_scans_are_the_2d_scans():
    for direction_3d, direction_2d in (("zyx", "row"), ("zxy", "col"), ("zyx_rev", "row_rev"), ("zxy_rev", "col_rev")):
        volume_scan = Raster3D(1, 3, 4, direction_3d).forward_index(12)
        assert torch.equal(volume_scan, Raster2D(3, 4, direction_2d).forward_index(12))


def test_3d_orders_never_pad_and_refuse_a_sequence_of_the_wrong_length():
    for order in [*raster3d_orders(2, 2, 3), SliceStride(2, 2, 3)]:
        assert order.padded_length(12) == 12
        assert order.apply(torch.ones(1, 12)).shape == (1, 12)
        with pytest.raises(ValueError, match=r"\(2x2x3\) needs a sequence of 12, got 13"):
            order.apply(torch.zeros(1, 13))
    # Stride, unlike SliceStride, pads an incomplete last slice with zeros.
    assert Stride(6).apply(torch.arange(1.0, 10.0).view(1, 9)).tolist() == [[1, 7, 2, 8, 3, 9, 4, 0, 5, 0, 6, 0]]


def test_invalid_3d_orders_are_rejected():
    with pytest.raises(ValueError, match="direction"):
        Raster3D(2, 2, 3, "zzx")
    with pytest.raises(ValueError, match="direction"):
        Raster3D(2, 2, 3, "zyx_back")
    with pytest.raises(ValueError, match=">= 1"):
        SliceStride(0, 2, 3)


def test_order_sets():
    assert [o.direction for o in raster3d_orders(2, 3, 4)] == ["zyx", "zxy", "yxz", "zyx_rev", "zxy_rev", "yxz_rev"]
    assert [o.direction for o in segmamba_orders(2, 3, 4)] == ["zyx", "zyx_rev", "yxz"]
    assert isinstance(segmamba_orders(2, 3, 4)[2], SliceStride)


def test_multi_order_mamba_over_3d_scans_fwd_bwd():
    torch.manual_seed(0)
    model = MultiOrderMamba(16, orders=raster3d_orders(2, 3, 4), d_state=4)
    x = torch.randn(2, 24, 16, requires_grad=True)
    y = model(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_mamba_block_on_slice_stride_matches_segmambas_interslice_branch():
    """One MambaBlock over SliceStride == SegMamba: reorder (B, C, L) by slices, scan, restore."""
    torch.manual_seed(0)
    model = MultiOrderMamba(16, orders=[SliceStride(3, 2, 2)], d_state=4)
    x = torch.randn(2, 12, 16)
    scanned = segmamba_interslice(x.transpose(1, 2), 3).transpose(1, 2)
    expected = segmamba_interslice_back(model.blocks[0](scanned).transpose(1, 2), 3).transpose(1, 2)
    assert torch.allclose(model(x), expected, atol=1e-6)
    # The scan order matters: the same block over the plain raster order gives another result.
    assert not torch.allclose(model(x), model.blocks[0](x), atol=1e-4)


def test_branched_block_with_segmambas_three_scans_fwd_bwd():
    torch.manual_seed(0)
    block = BranchedMambaBlock(16, orders=segmamba_orders(2, 3, 4), d_state=4)
    assert len(block.branches) == 3
    x = torch.randn(1, 24, 16, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(branch.A_log.grad is not None and branch.A_log.grad.abs().sum() > 0 for branch in block.branches)



def test_explicit_order_applies_its_permutation_and_undoes_it():
    from wsi_pipeline.ssm import Explicit

    index = torch.tensor([2, 0, 3, 1])
    x = torch.arange(8.0).view(1, 4, 2)
    for order, expected in ((Explicit(index), [2, 0, 3, 1]), (Explicit(index, reverse=True), [1, 3, 0, 2])):
        scanned = order.apply(x)
        assert scanned[0, :, 0].div(2).long().tolist() == expected
        assert torch.equal(order.undo(scanned, 4), x)
    with pytest.raises(ValueError, match="permutation"):
        Explicit([0, 0, 1])
    with pytest.raises(ValueError, match="sequence of 5"):
        Explicit(index).apply(torch.zeros(1, 5, 2))
