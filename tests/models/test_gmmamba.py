"""GMMamba: deterministic, cached, never-empty coordinate groups; masking; instance scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_pipeline.models.mil import coord_groups
from wsi_pipeline.models.mil.coord_groups import GroupCache, contiguous_groups, kmeans_groups

from .small_models import grid_coords, make_small

IN_DIM = 12


def assert_partition(groups, length):
    assert all(len(g) > 0 for g in groups)
    assert all(np.all(np.diff(g) > 0) for g in groups)          # bag order inside each group
    assert np.array_equal(np.sort(np.concatenate(groups)), np.arange(length))


def test_kmeans_groups_are_deterministic_and_spatial():
    generator = torch.Generator().manual_seed(0)
    coords = grid_coords(900, 40, generator).numpy()
    first, second = kmeans_groups(coords, 10), kmeans_groups(coords.copy(), 10)
    assert len(first) == 10
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert_partition(first, 900)
    # Two far-apart tissue pieces are two groups.
    blob = np.random.default_rng(0).integers(0, 20, size=(50, 2)) * 256
    two_pieces = np.concatenate([blob, blob + 100_000])
    groups = kmeans_groups(two_pieces, 2)
    assert sorted(map(tuple, groups)) == [tuple(range(50)), tuple(range(50, 100))]


def test_kmeans_groups_are_the_references_sklearn_clusters():
    """The reference (titizheng/GMMamba datasets/pre_input_data.py, grouping.coords_grouping):
    KMeans(n_clusters, random_state=0, n_init="auto").fit(coords); group i = np.argwhere(labels == i)."""
    from sklearn.cluster import KMeans

    coords = grid_coords(300, 30, torch.Generator().manual_seed(1)).numpy()
    labels = KMeans(n_clusters=10, random_state=0, n_init="auto").fit(coords).labels_
    reference = [np.argwhere(labels == i).squeeze() for i in range(len(set(labels)))]
    groups = kmeans_groups(coords, 10, seed=0)
    assert len(groups) == 10 and all(np.array_equal(g, r) for g, r in zip(groups, reference))
    assert not all(np.array_equal(g, r) for g, r in zip(kmeans_groups(coords, 10, seed=3), reference))


def test_input_proj_false_feeds_features_as_they_are():
    torch.manual_seed(0)
    model = make_small("gmmamba", 16, 2, input_proj=False, group_cache=GroupCache()).eval()
    assert isinstance(model.embed, torch.nn.Identity)
    assert not any(name.startswith("embed") for name, _ in model.named_parameters())
    with torch.no_grad():
        out = model(torch.randn(1, 20, 16), grid_coords(20, 6, torch.Generator().manual_seed(0))[None])
    assert out.logits.shape == (1, 2)
    with pytest.raises(ValueError, match="input_proj=False .* in_dim \\(12\\) must equal d_model \\(16\\)"):
        make_small("gmmamba", 12, 2, input_proj=False)


def test_groups_are_never_empty_with_duplicates_or_short_bags():
    duplicates = np.array([[0, 0], [256, 0], [0, 256]] * 7)
    groups = kmeans_groups(duplicates, 10)
    assert len(groups) == 3
    assert_partition(groups, 21)
    assert len(kmeans_groups(np.array([[5, 5]]), 10)) == 1
    short = kmeans_groups(np.array([[0, 0], [256, 0], [512, 0], [768, 0]]), 10)
    assert len(short) == 4
    assert_partition(contiguous_groups(7, 10), 7)
    assert [len(g) for g in contiguous_groups(10, 3)] == [4, 3, 3]


def test_cache_avoids_reclustering(monkeypatch):
    calls = []
    original = coord_groups.kmeans_groups

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(coord_groups, "kmeans_groups", counting)
    cache = GroupCache()
    torch.manual_seed(0)
    model = make_small("gmmamba", IN_DIM, 2, group_cache=cache)
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(1, 50, IN_DIM)
    coords = grid_coords(50, 10, generator)[None]
    for _ in range(3):                                     # three "epochs" of one slide
        model(features, coords).logits.sum().backward()
    model(features, coords.float())                        # same coordinates as float: same key
    assert len(calls) == 1 and cache.misses == 1 and cache.hits == 3
    other = grid_coords(50, 10, generator)[None]
    model(features, other)
    assert len(calls) == 2 and len(cache) == 2


def test_cache_is_bounded():
    cache = GroupCache(max_instances=100)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        cache.groups(grid_coords(40, 10, generator).numpy(), 3)
    assert len(cache) == 2


def test_masking_keeps_at_least_one_instance_and_scores_masked_instances_zero():
    torch.manual_seed(0)
    model = make_small("gmmamba", IN_DIM, 2, mask_ratio=0.5, n_groups=5, group_cache=GroupCache()).eval()
    generator = torch.Generator().manual_seed(0)
    coords = grid_coords(40, 10, generator)[None]
    with torch.no_grad():
        out = model(torch.randn(1, 40, IN_DIM), coords)
    groups = model.groups(40, coords[0])
    expected_dropped = sum(max(1, int(0.5 * len(g))) if len(g) > 1 else 0 for g in groups)
    assert int((out.instance_scores == 0).sum()) == expected_dropped
    torch.testing.assert_close(out.instance_scores.sum(), torch.tensor(1.0))
    assert model.imm.n_dropped(1) == 0 and model.imm.n_dropped(2) == 1 and model.imm.n_dropped(10) == 5
    # One instance per group (n_groups = L): nothing can be dropped, everything scores.
    model.n_groups = 40
    with torch.no_grad():
        out = model(torch.randn(1, 40, IN_DIM), coords)
    assert (out.instance_scores > 0).all()
    torch.testing.assert_close(out.instance_scores.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("mask_score_grad", [True, False])
def test_mask_score_gradient_is_straight_through_only_when_asked(mask_score_grad):
    torch.manual_seed(0)
    model = make_small("gmmamba", IN_DIM, 2, mask_score_grad=mask_score_grad, group_cache=GroupCache())
    features = torch.randn(1, 30, IN_DIM)
    model.eval()
    with torch.no_grad():
        reference = model(features).logits
    out = model(features)
    torch.testing.assert_close(out.logits, reference)      # the factor is exactly 1 in the forward pass
    out.logits.sum().backward()
    grad = model.imm.mask_score[0].weight.grad
    assert (grad is not None and grad.abs().sum() > 0) == mask_score_grad


def test_groups_without_coords_are_contiguous_chunks():
    model = make_small("gmmamba", IN_DIM, 2, n_groups=3)
    groups = model.groups(10, None)
    assert [g.tolist() for g in groups] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
