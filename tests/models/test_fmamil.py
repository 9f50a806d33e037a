"""FMaMIL stage 1: patch-grid placement, the spectral filter, CAM outputs."""

from __future__ import annotations

import pytest
import torch

from wsi_pipeline.models.mil.fmamil import FrequencyEncoding, SpectralFilter2d
from wsi_pipeline.models.mil.patch_grid import (
    gather_from_grid,
    grid_from_coords,
    infer_step,
    raster_grid,
    scatter_to_grid,
)

from .small_models import grid_coords, make_small


def test_step_is_the_most_common_gap_and_grid_follows_coords():
    # Patches every 512 px with a few tissue gaps, offset from the origin.
    columns = torch.tensor([0, 1, 2, 5, 6, 9])
    rows = torch.tensor([0, 0, 3, 3, 4, 1])
    coords = torch.stack([columns * 512 + 1000, rows * 512 + 300], dim=1)
    assert infer_step(coords[:, 0]) == 512.0
    grid = grid_from_coords(coords)
    assert (grid.height, grid.width) == (5, 10)
    assert grid.cells.tolist() == (rows * 10 + columns).tolist()
    assert infer_step(torch.tensor([7.0, 7.0])) == 1.0       # one column: no gap to infer


@pytest.mark.parametrize("length, side", [(1, 1), (7, 3), (300, 40)])
def test_scatter_then_gather_returns_the_features(length, side):
    generator = torch.Generator().manual_seed(0)
    coords = grid_coords(length, side, generator, step_px=224)
    x = torch.randn(length, 5)
    for grid in (grid_from_coords(coords), raster_grid(length)):
        torch.testing.assert_close(gather_from_grid(scatter_to_grid(x, grid), grid), x, rtol=0, atol=0)
        assert scatter_to_grid(x, grid).shape == (5, grid.height, grid.width)
    assert (raster_grid(7).height, raster_grid(7).width) == (3, 3)


def test_shared_cells_average_and_sparse_grids_are_coarsened():
    coords = torch.tensor([[0, 0], [0, 0], [256, 0]])
    x = torch.tensor([[1.0], [3.0], [5.0]])
    grid = grid_from_coords(coords)
    assert gather_from_grid(scatter_to_grid(x, grid), grid).flatten().tolist() == [2.0, 2.0, 5.0]
    far = torch.tensor([[0, 0], [256, 0], [256 * 999, 256 * 999]])
    coarse = grid_from_coords(far, max_cells=100)
    assert coarse.n_cells <= 100 and len(set(coarse.cells.tolist())) == 2


@pytest.mark.parametrize("height, width", [(1, 1), (3, 3), (5, 8), (17, 4)])
def test_identity_filter_leaves_features_unchanged(height, width):
    torch.manual_seed(0)
    encoding = FrequencyEncoding(6, filter_size=8, filter_init="identity")
    length = height * width
    coords = torch.stack(torch.meshgrid(torch.arange(width), torch.arange(height), indexing="xy"), -1)
    coords = coords.reshape(-1, 2)[torch.randperm(length)] * 256
    x = torch.randn(length, 6)
    grid = grid_from_coords(coords)
    assert (grid.height, grid.width) == (height, width)
    torch.testing.assert_close(encoding.spectral(x, grid), x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(encoding(x, grid), 2 * x, rtol=1e-5, atol=1e-5)


def test_learned_filter_mixes_neighbours_and_is_trainable():
    torch.manual_seed(0)
    spectral = SpectralFilter2d(4, filter_size=8)
    grid_values = torch.zeros(4, 9, 9)
    grid_values[:, 4, 4] = 1.0                              # an impulse spreads to other cells
    out = spectral(grid_values)
    assert out.shape == grid_values.shape
    assert (out[:, 4, 4] != 0).any() and (out.abs().sum() - out[:, 4, 4].abs().sum()) > 0
    out.square().sum().backward()
    assert spectral.weight.grad.abs().sum() > 0
    assert spectral.complex_weight(9, 5).shape == (4, 9, 5)


def test_cams_and_instance_scores():
    torch.manual_seed(0)
    model = make_small("fmamil", 12, 3, instance_score="cam").eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = model(torch.randn(1, 50, 12), grid_coords(50, 9, generator)[None])
        single = model(torch.randn(1, 1, 12))
    cam = out.instance_logits[..., -1]
    expected = (cam - cam.min()) / (cam.max() - cam.min())
    torch.testing.assert_close(out.instance_scores, expected)
    assert out.instance_scores.min() == 0 and out.instance_scores.max() == 1
    # Slide logits are an attention-weighted mean of the CAMs: inside their per-class range.
    assert (out.logits >= out.instance_logits.amin(1) - 1e-6).all()
    assert (out.logits <= out.instance_logits.amax(1) + 1e-6).all()
    torch.testing.assert_close(single.logits, single.instance_logits[:, 0])
    assert single.instance_scores.tolist() == [[0.0]]


def test_instance_scores_are_the_attention_by_default():
    """Heatmaps of fmamil show its attention unless instance_score="cam"; same weights, same logits."""
    torch.manual_seed(0)
    model = make_small("fmamil", 12, 2).eval()
    torch.manual_seed(0)
    cam_model = make_small("fmamil", 12, 2, instance_score="cam").eval()
    seen = []
    model.attention.register_forward_hook(lambda module, args, output: seen.append(output[1]))
    x = torch.randn(1, 30, 12)
    coords = grid_coords(30, 6, torch.Generator().manual_seed(1))[None]
    with torch.no_grad():
        out, ref = model(x, coords), cam_model(x, coords)
    torch.testing.assert_close(out.instance_scores, seen[0])
    torch.testing.assert_close(out.instance_scores.sum(dim=1), torch.ones(1))
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.instance_logits, ref.instance_logits)
    assert not torch.allclose(out.instance_scores, ref.instance_scores)
    with pytest.raises(ValueError, match="instance_score"):
        make_small("fmamil", 12, 2, instance_score="gradcam")


class _PassThrough(torch.nn.Module):
    def forward(self, h, grid):
        return h


def test_final_norm_false_keeps_each_instances_magnitude_for_the_cams():
    """As mambamil's option: with the final LayerNorm h and 3·h get the same CAM; without it the CAM
    head sees the magnitude. Only the norm's 2·d parameters go, and the state reloads by name."""
    torch.manual_seed(0)
    with_norm = make_small("fmamil", 12, 2, layer_scale=0.0).eval()
    torch.manual_seed(0)
    without = make_small("fmamil", 12, 2, layer_scale=0.0, final_norm=False).eval()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    width = with_norm.norm.normalized_shape[0]
    assert count(with_norm) - count(without) == 2 * width and isinstance(without.norm, torch.nn.Identity)
    direction = torch.randn(width)
    bag = torch.stack([direction, 3.0 * direction, torch.randn(width)])[None]
    for model in (with_norm, without):
        model.embed = torch.nn.Identity()        # layer_scale 0: the Mamba layers pass h through
        model.frequency = _PassThrough()         # and the frequency encoding too
    with torch.no_grad():
        cams_norm = with_norm(bag).instance_logits[0]
        cams_plain = without(bag).instance_logits[0]
    torch.testing.assert_close(cams_norm[0], cams_norm[1], rtol=1e-4, atol=1e-5)
    assert (cams_plain[0] - cams_plain[1]).abs().max() > 1e-3
    make_small("fmamil", 12, 2, final_norm=False).load_state_dict(
        make_small("fmamil", 12, 2, final_norm=False).state_dict())
