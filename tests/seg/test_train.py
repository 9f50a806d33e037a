"""Training pieces: the loss, self-correction of pseudo-labels, crop sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_pipeline.segmentation import PseudoLabels, TrainingSlide, TrainParams, segmentation_loss, self_correct
from wsi_pipeline.segmentation.train import _CropSampler


def _slide(target, tissue=None, weight=None):
    target = np.asarray(target, dtype=np.float32)
    weight = np.ones_like(target) if weight is None else np.asarray(weight, dtype=np.float32)
    tissue = np.ones(target.shape, bool) if tissue is None else np.asarray(tissue, dtype=bool)
    image = np.zeros((*target.shape, 3), dtype=np.uint8)
    return TrainingSlide("s", image, PseudoLabels(target, weight), tissue)


def test_self_correction_revises_only_confident_disagreements():
    s = _slide([[1.0, 1.0, 0.0, 0.5, 0.0, 1.0]], tissue=[[1, 1, 1, 1, 1, 0]])
    prob = np.array([[0.05, 0.5, 0.95, 0.97, 0.02, 0.01]], dtype=np.float32)
    revised = self_correct([s], [prob], confidence=0.9, blend=0.5)
    # 0: confident 0 vs label 1 -> 0.5; 1: not confident; 2: confident 1 vs 0 -> 0.5;
    # 3: confident 1 vs 0.5 (disagreement 0.5) -> 0.75; 4: agrees; 5: glass, never revised.
    expected = [[0.5, 1.0, 0.5, 0.75, 0.0, 1.0]]
    np.testing.assert_allclose(s.labels.target, expected)
    assert revised == 3
    # Rounds start from the CAM labels: the same answers give the same labels (no drift) ...
    assert self_correct([s], [prob], confidence=0.9, blend=0.5) == 3
    np.testing.assert_allclose(s.labels.target, expected)
    # ... and a revision the network is no longer sure of is undone.
    prob[0, 0] = 0.3
    assert self_correct([s], [prob], confidence=0.9, blend=0.5) == 2
    np.testing.assert_allclose(s.labels.target, [[1.0, 1.0, 0.5, 0.75, 0.0, 1.0]])
    np.testing.assert_allclose(s.cam_target, [[1.0, 1.0, 0.0, 0.5, 0.0, 1.0]])


def test_loss_prefers_the_target_and_ignores_zero_weight():
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :] = 1.0
    weight = torch.ones_like(target)
    good = segmentation_loss((target * 2 - 1) * 6, target, weight)
    bad = segmentation_loss(-(target * 2 - 1) * 6, target, weight)
    assert good < 0.05 < bad
    # Pixels of weight 0 do not count, whatever the prediction there.
    weight[..., 2:, :] = 0
    wrong_where_ignored = (target * 2 - 1) * 6
    wrong_where_ignored[..., 2:, :] = 6.0
    assert segmentation_loss(wrong_where_ignored, target, weight) == pytest.approx(
        float(segmentation_loss((target * 2 - 1) * 6, target, weight)), abs=1e-6)


def test_crop_sampler_shapes_padding_and_positive_crops():
    target = np.zeros((20, 30), np.float32)
    target[5:8, 20:24] = 1.0
    s = _slide(target)
    sampler = _CropSampler([s], crop_px=32, positive_fraction=1.0, rng=np.random.default_rng(0))
    for _ in range(10):
        image, t, w = sampler.sample()
        assert image.shape == (32, 32, 3) and t.shape == w.shape == (32, 32)
        assert t.sum() == 12                      # the whole (small) lesion is in every positive crop
        assert w.sum() == 20 * 30                 # padding beyond the slide carries no weight
    with pytest.raises(ValueError, match="correct_confidence"):
        TrainParams(correct_confidence=0.3)
