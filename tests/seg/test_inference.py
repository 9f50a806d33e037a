"""Sliding-window inference with overlap blending, grids, and Dice / IoU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_pipeline.models.seg import create_segmenter
from wsi_pipeline.segmentation import (SlideGrid, blending_window, dice, iou, mask_on_grid,
                                       predict_probability_map, resample, score_mask,
                                       sliding_window_predict)
from wsi_pipeline.segmentation.inference import window_starts


@pytest.mark.parametrize("blend", ["cosine", "gaussian"])
@pytest.mark.parametrize("shape", [(97, 131), (40, 40), (20, 300)])
def test_constant_predictor_gives_the_constant_everywhere(blend, shape):
    image = np.random.default_rng(0).integers(0, 255, (*shape, 3), dtype=np.uint8)
    calls = []

    def predict(batch):
        calls.append(batch.shape)
        return np.full(batch.shape[:3], 0.37)

    out = sliding_window_predict(predict, image, window_px=32, overlap=0.5, batch_size=5, blend=blend)
    assert out.shape == shape and out.dtype == np.float32
    np.testing.assert_allclose(out, 0.37, rtol=1e-6)
    assert all(c[1:3] == (min(32, shape[0]), min(32, shape[1])) for c in calls)


def test_position_faithful_predictor_has_no_seams():
    """A predictor that returns its input reproduces the image exactly: windows are put back where
    they were read, and the blend is a weighted mean."""
    image = np.random.default_rng(1).integers(0, 255, (75, 90, 3), dtype=np.uint8)
    out = sliding_window_predict(lambda b: b[..., 0] / 255.0, image, window_px=24, overlap=0.25)
    np.testing.assert_allclose(out, image[..., 0] / 255.0, atol=1e-6)


def test_window_starts_cover_and_blending_window_shape():
    assert window_starts(100, 32, 16) == [0, 16, 32, 48, 64, 68]
    assert window_starts(20, 32, 16) == [0]
    w = blending_window(9, 16)
    assert w.shape == (9, 16) and (w > 0).all() and w.max() == pytest.approx(w[4, 7])
    assert w[0, 0] < 0.01 * w.max()
    with pytest.raises(ValueError, match="blend"):
        blending_window(4, 4, "box")


def test_predict_probability_map_with_a_segmenter():
    torch.manual_seed(0)
    model = create_segmenter("vmunet_tiny", dims=(8, 8, 8), d_state=4)
    image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    tissue = np.zeros((50, 70), dtype=bool)
    tissue[10:40, 5:60] = True
    prob = predict_probability_map(model, image, window_px=32, overlap=0.5, tissue=tissue)
    assert prob.shape == (50, 70) and (prob[~tissue] == 0).all()
    assert ((prob[tissue] > 0) & (prob[tissue] < 1)).all()
    assert model.training  # the caller's mode is restored


def test_dice_iou():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert dice(a, b) == 1.0 and iou(a, b) == 1.0
    a[:2] = True
    assert dice(a, b) == 0.0 and iou(a, b) == 0.0
    b[1:3] = True
    assert dice(a, b) == pytest.approx(0.5) and iou(a, b) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="differ in shape"):
        dice(a, b[:2])


def test_masks_move_between_grids():
    truth = np.zeros((6, 8), bool)             # 16 level-0 px per pixel
    truth[2:4, 2:6] = True
    fine = mask_on_grid(truth, 16, (24, 32), 4)   # the same region at 4 px per pixel
    assert fine.sum() == truth.sum() * 16
    assert score_mask(fine, 4, truth, 16) == {"dice": 1.0, "iou": 1.0}
    src = SlideGrid(4, (128, 96), 0.5)
    dst = SlideGrid(16, (128, 96), 0.5)
    assert src.shape == (24, 32) and dst.shape == (6, 8) and dst.mpp == 8.0
    np.testing.assert_array_equal(resample(fine.astype(np.float32), src, dst) >= 0.5, truth)
    assert SlideGrid.for_mpp((1000, 500), 0.26, 8.0).downsample == 31
