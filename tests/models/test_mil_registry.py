"""Every registered aggregator: forward + backward on CPU for any bag length, with or without coords,
and the permutation behaviour each model documents."""

from __future__ import annotations

import pytest
import torch

from wsi_pipeline.models.mil import MILOutput, create_aggregator, list_aggregators

from .small_models import grid_coords, make_small

IN_DIM = 24
N_CLASSES = 3
MAMBA_MODELS = ("mambamil", "bimamba_mil", "mamba_mil", "gmmamba", "fmamil", "mammil", "twodmamba")


def test_issue_5_models_are_registered():
    assert set(MAMBA_MODELS) | {"abmil", "transmil", "mean", "max"} <= set(list_aggregators())
    with pytest.raises(KeyError, match="unknown aggregator"):
        create_aggregator("no_such_model", IN_DIM, 2)


def first_linear(model: torch.nn.Module) -> torch.nn.Linear:
    return next(m for m in model.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("with_coords", [False, True], ids=["no_coords", "coords"])
@pytest.mark.parametrize("length", [1, 7, 5000])
@pytest.mark.parametrize("name", list_aggregators())
def test_forward_backward_any_length(name, length, with_coords):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = make_small(name, IN_DIM, N_CLASSES)
    features = torch.randn(1, length, IN_DIM, requires_grad=True)
    coords = grid_coords(length, 80, generator)[None] if with_coords else None
    out = model(features, coords)
    assert isinstance(out, MILOutput)
    assert out.logits.shape == (1, N_CLASSES)
    assert out.instance_scores.shape == (1, length)
    if out.instance_logits is not None:
        assert out.instance_logits.shape == (1, length, N_CLASSES)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.instance_scores).all()
    out.logits.square().sum().backward()
    assert features.grad is not None and torch.isfinite(features.grad).all()
    first = first_linear(model)
    assert first.in_features == IN_DIM
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", MAMBA_MODELS)
def test_batch_of_two_equal_length_bags_matches_single_bags(name):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = make_small(name, IN_DIM, N_CLASSES).eval()
    features = torch.randn(2, 30, IN_DIM)
    coords = torch.stack([grid_coords(30, 8, generator), grid_coords(30, 8, generator)])
    with torch.no_grad():
        batched = model(features, coords)
        single = [model(features[b:b + 1], coords[b:b + 1]) for b in range(2)]
    torch.testing.assert_close(batched.logits, torch.cat([s.logits for s in single]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched.instance_scores, torch.cat([s.instance_scores for s in single]),
                               rtol=1e-4, atol=1e-5)


def shuffled_outputs(name: str, with_coords: bool = False):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = make_small(name, IN_DIM, N_CLASSES).eval()
    features = torch.randn(1, 60, IN_DIM)
    coords = grid_coords(60, 10, generator)[None]
    permutation = torch.randperm(60, generator=generator)
    with torch.no_grad():
        original = model(features, coords if with_coords else None)
        shuffled = model(features[:, permutation], coords[:, permutation] if with_coords else None)
    return original, shuffled, permutation


@pytest.mark.parametrize("name", ["abmil", "mean", "max"])
def test_permutation_invariant_baselines(name):
    original, shuffled, permutation = shuffled_outputs(name)
    torch.testing.assert_close(shuffled.logits, original.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shuffled.instance_scores, original.instance_scores[:, permutation],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["mambamil", "bimamba_mil", "mamba_mil", "gmmamba", "mammil"])
@pytest.mark.parametrize("with_coords", [False, True], ids=["no_coords", "coords"])
def test_sequence_models_depend_on_instance_order(name, with_coords):
    original, shuffled, _ = shuffled_outputs(name, with_coords)
    assert not torch.allclose(shuffled.logits, original.logits, rtol=1e-4, atol=1e-5)


def test_fmamil_with_coords_scans_in_grid_order_so_bag_order_does_not_matter():
    original, shuffled, permutation = shuffled_outputs("fmamil", with_coords=True)
    torch.testing.assert_close(shuffled.logits, original.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(shuffled.instance_logits, original.instance_logits[:, permutation],
                               rtol=1e-4, atol=1e-5)
    # Without coordinates the raster is the bag order, so a shuffle changes the result.
    original, shuffled, _ = shuffled_outputs("fmamil", with_coords=False)
    assert not torch.allclose(shuffled.logits, original.logits, rtol=1e-4, atol=1e-5)
