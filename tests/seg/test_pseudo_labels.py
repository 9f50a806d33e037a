"""CAM maps from patch scores, and pseudo-labels from CAM thresholds."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_pipeline.segmentation import (PatchCams, SlideGrid, cam_map, load_patch_cams, make_pseudo_labels,
                                       save_patch_cams)

NAN = np.nan


def test_pseudo_labels_on_a_hand_made_cam():
    cam = np.array([[0.9, 0.7, 0.5, 0.3],
                    [0.1, NAN, 0.6, 0.95]], dtype=np.float32)
    tissue = np.array([[1, 1, 1, 1],
                       [1, 1, 1, 0]], dtype=bool)
    labels = make_pseudo_labels(cam, cam_low=0.3, cam_high=0.7, tissue=tissue, soft_weight=0.25)
    np.testing.assert_allclose(labels.target, [[1.0, 1.0, 0.5, 0.0],
                                               [0.0, 0.0, 0.75, 0.0]], atol=1e-6)
    # Confident pixels weigh 1, the soft band soft_weight, tissue without a CAM 0, glass 1 (target 0
    # even where the CAM says lesion).
    np.testing.assert_allclose(labels.weight, [[1.0, 1.0, 0.25, 1.0],
                                               [1.0, 0.0, 0.25, 1.0]])
    assert labels.target.dtype == np.float32 and labels.weight.dtype == np.float32


def test_pseudo_labels_negative_slide_and_no_tissue_mask():
    cam = np.array([[0.9, NAN], [0.2, 0.5]], dtype=np.float32)
    neg = make_pseudo_labels(cam, cam_low=0.3, cam_high=0.7, negative=True)
    assert (neg.target == 0).all() and (neg.weight == 1).all()
    # Without a tissue mask, "tissue" is where the CAM is defined; elsewhere is background.
    lab = make_pseudo_labels(cam, cam_low=0.3, cam_high=0.7, soft_weight=0.5)
    np.testing.assert_allclose(lab.target, [[1.0, 0.0], [0.0, 0.5]])
    np.testing.assert_allclose(lab.weight, [[1.0, 1.0], [1.0, 0.5]])
    # Equal thresholds: no soft band.
    hard = make_pseudo_labels(np.array([[0.5, 0.49]]), cam_low=0.5, cam_high=0.5)
    np.testing.assert_allclose(hard.target, [[1.0, 0.0]])
    with pytest.raises(ValueError, match="cam_low <= cam_high"):
        make_pseudo_labels(cam, cam_low=0.8, cam_high=0.2)


def test_cam_map_constant_inside_patches_nan_outside():
    grid = SlideGrid(downsample=10, level0_wh=(400, 300), slide_mpp=0.5)       # 30 x 40 px
    coords = np.array([[x, y] for y in (0, 100) for x in (0, 100, 200)])      # 3 x 2 patches of 100
    cam = cam_map(coords, np.full(len(coords), 0.4), 100, grid)
    assert cam.shape == (30, 40)
    np.testing.assert_allclose(cam[:20, :30], 0.4, atol=1e-6)
    assert np.isnan(cam[20:]).all() and np.isnan(cam[:, 30:]).all()


def test_cam_map_is_bilinear_between_patch_centres():
    grid = SlideGrid(downsample=10, level0_wh=(200, 100), slide_mpp=0.5)
    coords = np.array([[0, 0], [100, 0]])
    cam = cam_map(coords, np.array([0.0, 1.0]), 100, grid)
    # Centres at x = 50 and 150: flat outside them, linear between; grid pixel c sits at 10c + 5.
    x = np.arange(20) * 10 + 5
    expected = np.clip((x - 50) / 100, 0, 1)
    np.testing.assert_allclose(cam[3], expected, atol=1e-6)
    np.testing.assert_allclose(cam[:, 7], cam[0, 7])          # constant down the column


def test_cam_map_with_a_missing_neighbour_and_tiling_jitter():
    grid = SlideGrid(downsample=1, level0_wh=(300, 200), slide_mpp=0.5)
    # Tiling rounds positions (stride 99.6 -> 0, 100, 199): an L of three patches, one missing.
    coords = np.array([[0, 0], [100, 0], [0, 100]])
    cam = cam_map(coords, np.array([0.2, 0.6, 1.0]), 100, grid)
    assert np.isnan(cam[150, 150])                              # the missing patch
    # Within the top-left patch's lower-right quadrant the missing node is dropped, not read as 0.
    assert cam[99, 99] > 0.2 and np.isfinite(cam).sum() == 3 * 100 * 100


def test_cam_map_rejects_bad_input():
    grid = SlideGrid(downsample=4, level0_wh=(64, 64), slide_mpp=1.0)
    with pytest.raises(ValueError, match="NaN"):
        cam_map(np.array([[0, 0]]), np.array([np.nan]), 16, grid)
    with pytest.raises(ValueError, match="2 CAM scores for 1"):
        cam_map(np.array([[0, 0]]), np.array([0.1, 0.2]), 16, grid)
    assert np.isnan(cam_map(np.zeros((0, 2)), np.zeros(0), 16, grid)).all()


def test_cam_file_round_trip(tmp_path):
    cams = PatchCams(np.array([[0, 0], [224, 0]]), [0.25, 1.0], 224, lesion_class="tumor", source="test")
    save_patch_cams(tmp_path / "a.npz", cams)
    back = load_patch_cams(tmp_path / "a.npz")
    np.testing.assert_array_equal(back.coords, cams.coords)
    np.testing.assert_array_equal(back.scores, cams.scores)
    assert (back.patch_size_level0, back.lesion_class, back.source) == (224.0, "tumor", "test")
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        PatchCams(np.array([[0, 0]]), [1.5], 224)
