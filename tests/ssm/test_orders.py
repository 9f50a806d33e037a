"""Scan orders are exact permutations (plus zero padding) that invert."""

import pytest
import torch

from wsi_pipeline.ssm.orders import Identity, Raster2D, Reverse, Stride, ss2d_orders

ORDERS = [Identity(), Reverse(), Stride(1), Stride(3), Stride(10), *ss2d_orders(3, 4)]


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
