"""Score maps on plain arrays: overlap averaging, normalisation, smoothing, colormaps."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_pipeline.exports import (
    apply_colormap,
    choose_downsample,
    get_colormap,
    list_colormaps,
    normalize_scores,
    score_map,
    smooth_score_map,
)
from wsi_pipeline.exports.scoremap import MAX_MAP_SIDE_PX


def test_overlapping_patches_average_by_hand():
    # Four 4x4 patches at stride 2 on a 7x7 slide: 2x2 blocks see 1, 2 or 4 patches.
    coords = np.array([[0, 0], [2, 0], [0, 2], [2, 2]])
    smap = score_map(coords, np.array([1.0, 2.0, 3.0, 4.0]), 4, (7, 7), downsample=1)
    blocks = np.array([[1.0, 1.5, 2.0], [2.0, 2.5, 3.0], [3.0, 3.5, 4.0]])
    counts = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]])
    expected = np.kron(blocks, np.ones((2, 2)))
    assert smap.values.shape == (7, 7) and smap.downsample == 1
    np.testing.assert_allclose(smap.values[:6, :6], expected)
    np.testing.assert_array_equal(smap.count[:6, :6], np.kron(counts, np.ones((2, 2), dtype=int)))
    # No patch covers the last row and column: no value there, not zero.
    assert np.isnan(smap.values[6]).all() and np.isnan(smap.values[:, 6]).all()
    assert not smap.valid[6].any()
    # At downsample 2 every map pixel is one of the 2x2 blocks.
    coarse = score_map(coords, np.array([1.0, 2.0, 3.0, 4.0]), 4, (7, 7), downsample=2)
    np.testing.assert_allclose(coarse.values[:3, :3], blocks)


def test_score_map_rejects_bad_scores():
    coords = np.array([[0, 0], [4, 0]])
    with pytest.raises(ValueError, match="NaN or infinite"):
        score_map(coords, np.array([1.0, np.nan]), 4, (8, 4))
    with pytest.raises(ValueError, match="3 scores for 2 patches"):
        score_map(coords, np.array([1.0, 2.0, 3.0]), 4, (8, 4))


def test_rank_normalisation_is_uniform_on_0_1():
    scores = np.random.default_rng(0).lognormal(size=1000)  # skewed on purpose
    ranked = normalize_scores(scores, "rank")
    np.testing.assert_allclose(np.sort(ranked), np.linspace(0, 1, 1000))
    assert np.array_equal(np.argsort(ranked), np.argsort(scores))
    hist, _ = np.histogram(ranked, bins=10, range=(0, 1))
    assert hist.min() >= 99 and hist.max() <= 101
    # Ties share their average rank; a constant slide sits mid-scale.
    np.testing.assert_allclose(normalize_scores(np.array([5.0, 1.0, 5.0, 3.0]), "rank"),
                               [5 / 6, 0, 5 / 6, 1 / 3])
    np.testing.assert_allclose(normalize_scores(np.full(4, 7.0), "rank"), 0.5)


def test_minmax_and_raw_normalisation():
    s = np.array([2.0, 4.0, 3.0])
    np.testing.assert_allclose(normalize_scores(s, "minmax"), [0.0, 1.0, 0.5])
    np.testing.assert_allclose(normalize_scores(np.array([-0.5, 0.25, 1.5]), "raw"), [0.0, 0.25, 1.0])
    with pytest.raises(ValueError, match="unknown normalisation"):
        normalize_scores(s, "zscore")


def test_smoothing_is_a_normalised_convolution():
    # An island of patches with a constant score: smoothing must not darken its edges.
    coords = np.array([[x, y] for y in range(8, 40, 8) for x in range(8, 40, 8)])
    smap = score_map(coords, np.full(len(coords), 0.8), 8, (48, 48), downsample=1)
    smooth = smooth_score_map(smap, sigma_um=4.0, slide_mpp=0.5)  # sigma 8 px
    np.testing.assert_allclose(smooth.values[smap.valid], 0.8, rtol=1e-5)
    assert np.isnan(smooth.values[~smap.valid]).all()
    # A step inside the island is blurred into intermediate values, and its mean is kept.
    step = score_map(coords, (coords[:, 0] >= 24).astype(float), 8, (48, 48), downsample=1)
    blurred = smooth_score_map(step, sigma_um=4.0, slide_mpp=0.5)
    inner = blurred.values[step.valid]
    assert 0 < inner.min() < 0.2 and 0.8 < inner.max() < 1 and ((inner > 0.3) & (inner < 0.7)).any()
    assert smooth_score_map(step, 0.0, 0.5) is step


def test_map_size_is_bounded_for_huge_slides():
    # A 100k x 100k slide at 0.25 um/px with 224 px patches at 0.5 um/px (448 level-0 px).
    d = choose_downsample((100_000, 100_000), 448)
    assert d == 56 and 100_000 / d <= MAX_MAP_SIDE_PX
    coords = np.array([[50_000, 50_000], [50_448, 50_000]])
    smap = score_map(coords, np.array([0.2, 0.9]), 448, (100_000, 100_000))
    assert max(smap.shape) <= MAX_MAP_SIDE_PX and smap.values.nbytes < 20e6
    assert smap.valid.sum() == 2 * 8 * 8  # 8 map px per patch side
    # Tiny patches on a huge slide: the cap wins over the per-patch resolution.
    assert 400_000 / choose_downsample((400_000, 300_000), 16) <= MAX_MAP_SIDE_PX


def test_colormaps_match_their_published_end_points():
    assert {"jet", "viridis", "inferno", "magma", "plasma"} <= set(list_colormaps())
    for name in list_colormaps():
        lut = get_colormap(name)
        assert lut.shape == (256, 3) and lut.dtype == np.uint8
        # Smooth: no step between neighbouring entries (a typo in a table would show here).
        assert np.abs(np.diff(lut.astype(int), axis=0)).max() <= 6
    np.testing.assert_array_equal(get_colormap("jet")[[0, -1]], [[0, 0, 128], [128, 0, 0]])
    np.testing.assert_array_equal(get_colormap("viridis")[[0, -1]], [[68, 1, 84], [253, 231, 37]])
    np.testing.assert_array_equal(get_colormap("inferno")[[0, -1]], [[0, 0, 4], [252, 255, 164]])
    out = apply_colormap(np.array([[0.0, 1.0], [0.5, 2.0]]), "viridis")
    assert out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out[1, 1], out[0, 1])  # clipped to the top
    with pytest.raises(ValueError, match="unknown colormap"):
        get_colormap("rainbow-unicorn")
