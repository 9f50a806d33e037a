"""Targets, focal loss, peaks, MIDOG matching, hotspot."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_pipeline.detection import choose_thresholds, evaluate, hotspot, match_points
from wsi_pipeline.detection.matching import pick_threshold
from wsi_pipeline.detection.peaks import find_peaks
from wsi_pipeline.detection.targets import focal_loss, gaussian_targets


def test_gaussian_targets_sigma_is_in_um_and_centre_is_one():
    xy = np.array([[10.3, 20.8]])
    h1, off, mask = gaussian_targets(xy, np.array([1]), 2, 40, 40, sigma_um=2.0, mpp=0.5)
    assert h1[1, 20, 10] == 1.0 and h1[0].max() == 0 and mask.sum() == 1
    assert np.allclose(off[:, 20, 10], [-0.2, 0.3], atol=1e-6)
    # sigma 2 µm = 4 px at 0.5 µm/px: one sigma away the value is exp(-1/2)
    centre_x = 10.3
    assert np.isclose(h1[1, 20, 14], np.exp(-((14.5 - centre_x) ** 2 + (20.5 - 20.8) ** 2) / (2 * 16)), atol=1e-6)
    # the same physical point at 1 µm/px covers a quarter of the pixels
    h2, _, _ = gaussian_targets(xy / 2, np.array([1]), 2, 20, 20, sigma_um=2.0, mpp=1.0)
    assert (h1[1] > 0.5).sum() > 3 * (h2[1] > 0.5).sum()


def test_focal_loss_is_low_for_the_target_and_high_for_its_opposite():
    heat, _, _ = gaussian_targets(np.array([[8.0, 8.0], [20, 5]]), np.array([0, 1]), 2, 32, 32, 2.0, 0.5)
    target = torch.from_numpy(heat)[None]
    good = torch.where(target == 1, 9.0, -9.0)          # sharp peaks exactly at the centres
    prior = torch.full_like(good, -2.19)
    assert focal_loss(good, target) < 0.01 < focal_loss(prior, target)
    assert focal_loss(-good, target) > 10 * focal_loss(prior, target)
    # Missing the rare class costs as much as missing the common one (per-class normalisation).
    heat3, _, _ = gaussian_targets(np.array([[8.0, 8.0], [20, 5], [25, 25], [5, 25]]), np.array([0, 0, 0, 1]),
                                   2, 32, 32, 2.0, 0.5)
    t3 = torch.from_numpy(heat3)[None]
    miss0, miss1 = torch.where(t3 == 1, 9.0, -9.0), torch.where(t3 == 1, 9.0, -9.0)
    miss0[0, 0] = -9.0
    miss1[0, 1] = -9.0
    assert torch.isclose(focal_loss(miss0, t3), focal_loss(miss1, t3), rtol=1e-3)
    # Per-class normalisation: a class with one centre weighs like a class with many.
    assert torch.isfinite(focal_loss(torch.zeros_like(good), target))


def test_peaks_subpixel_threshold_and_plateau():
    heat = torch.zeros(1, 2, 16, 16)
    heat[0, 1, 5, 7] = 0.9
    heat[0, 0, 10, 10] = heat[0, 0, 10, 11] = 0.6     # plateau: one peak, not two
    heat[0, 0, 2, 2] = 0.05                            # under threshold
    off = torch.zeros(1, 2, 16, 16)
    off[0, :, 5, 7] = torch.tensor([0.25, -0.25])
    (ixy, xy, score, cls), = find_peaks(heat, off, min_score=0.1, nms_px=1)
    assert ixy.tolist() == [[7, 5], [10, 10]] and cls.tolist() == [1, 0]
    assert np.allclose(xy[0], [7.75, 5.25]) and np.allclose(score, [0.9, 0.6])


def test_matching_radius_is_in_um_and_duplicates_are_false_positives():
    true = np.array([[0.0, 0.0], [100.0, 0.0]])
    assert match_points(np.array([[7.4, 0.0]]), true) == (1, 0, 1)
    assert match_points(np.array([[7.6, 0.0]]), true) == (0, 1, 2)
    # two predictions on one object: one TP, one FP
    assert match_points(np.array([[1.0, 0.0], [2.0, 0.0]]), true[:1]) == (1, 1, 0)
    # greedy by distance (not an optimal assignment): the closest pair (3 µm) is taken first, the
    # other prediction's only candidate is then used, it stays a false positive
    assert match_points(np.array([[3.0, 0.0], [-6.0, 0.0]]), np.array([[0.0, 0.0], [9.0, 0.0]])) == (1, 1, 1)
    # px -> µm: 14 px at 0.5 µm/px is 7 µm (a hit), at 0.6 µm/px 8.4 µm (a miss)
    assert match_points(np.array([[14.0, 0.0]]) * 0.5, true[:1]) == (1, 0, 0)
    assert match_points(np.array([[14.0, 0.0]]) * 0.6, true[:1]) == (0, 1, 1)


def test_evaluate_micro_f1_and_threshold_choice():
    txy = np.array([[0, 0], [50, 50], [100, 100]], dtype=float)
    pxy = np.array([[1, 0], [50, 51], [300, 300], [400, 400]], dtype=float)
    score = np.array([0.9, 0.8, 0.7, 0.3])
    slides = {"a": (pxy, score, np.zeros(4, dtype=int), txy, np.zeros(3, dtype=int))}
    res = evaluate(slides, ["c"], {"c": 0.5})
    assert res["classes"]["c"]["tp"] == 2 and res["classes"]["c"]["fp"] == 1 and res["classes"]["c"]["fn"] == 1
    t = choose_thresholds(slides, ["c"])["c"]
    assert 0.7 < t <= 0.8  # keeps both 0.9 and 0.8 hits, drops the 0.7 false positive
    assert t == 0.75  # the tied run 0.725..0.8: its middle, not its top edge


def test_threshold_ties_go_to_the_middle_of_the_tied_interval():
    grid = np.round(np.arange(0.05, 0.51, 0.05), 2)  # 0.05 .. 0.5
    # few validation objects: every one found from 0.05 to 0.30 (F1 1), recall falls above -> middle 0.15
    f1 = np.array([1, 1, 1, 1, 1, 1, 0.8, 0.5, 0.2, 0.0])
    assert pick_threshold(grid, f1) == 0.15  # the old rule (highest tied) gave 0.30, the recall edge
    # odd run 0.10..0.30 -> 0.20 exactly
    assert pick_threshold(grid, np.array([0.9, 1, 1, 1, 1, 1, 0.7, 0.5, 0.2, 0.0])) == 0.2
    # a single best point wins whatever the ties elsewhere
    assert pick_threshold(grid, np.array([0.5, 0.5, 0.5, 0.9, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])) == 0.2
    # two tied runs: the longer one's middle (0.35..0.45 -> 0.40), not the first or the top
    assert pick_threshold(grid, np.array([1, 0.9, 0.9, 0.9, 0.9, 0.9, 1, 1, 1, 0.9])) == 0.4
    # float noise in F1 still counts as a tie
    assert pick_threshold(grid[:3], np.array([2 / 3, 2 / 3 + 1e-12, 2 / 3])) == 0.1


def _brute_hotspot(xy, side):
    best = 0
    for x in xy[:, 0]:
        for y in xy[:, 1]:
            inside = (xy[:, 0] >= x) & (xy[:, 0] <= x + side) & (xy[:, 1] >= y) & (xy[:, 1] <= y + side)
            best = max(best, int(inside.sum()))
    return best


def test_hotspot_equals_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(1, 60))
        xy = np.concatenate([rng.uniform(0, 5000, (n, 2)), rng.normal(2000, 300, (n // 2, 2))])
        side = float(rng.uniform(200, 2000))
        count, x, y = hotspot(xy, side)
        assert count == _brute_hotspot(xy, side)
        inside = (xy[:, 0] >= x) & (xy[:, 0] <= x + side) & (xy[:, 1] >= y) & (xy[:, 1] <= y + side)
        assert inside.sum() == count
        # no random window does better
        for _ in range(200):
            rx, ry = rng.uniform(-side, 5000, 2)
            assert (((xy[:, 0] >= rx) & (xy[:, 0] <= rx + side) & (xy[:, 1] >= ry)
                     & (xy[:, 1] <= ry + side)).sum() <= count)
    assert hotspot(np.zeros((0, 2)), 10) == (0, 0.0, 0.0)


def test_rare_class_group_is_not_hidden_by_a_stronger_neighbour():
    heat = torch.zeros(1, 3, 16, 16)
    heat[0, 1, 8, 8] = 0.9          # tumour nucleus
    heat[0, 2, 8, 9] = 0.6          # mitosis beside it, weaker
    off = torch.zeros(1, 2, 16, 16)
    (_, _, _, cls), = find_peaks(heat, off, 0.3, nms_px=2)
    assert cls.tolist() == [1]
    (ixy, _, score, cls), = find_peaks(heat, off, 0.3, nms_px=2, groups=[[0, 1], [2]])
    assert cls.tolist() == [1, 2] and ixy.tolist() == [[8, 8], [9, 8]] and np.allclose(score, [0.9, 0.6])


def test_rare_group_has_its_own_suppression_radius():
    """A mitosis is a scattered clump: two maxima 4 px apart are one figure (rare radius 5), while two
    nuclei 4 px apart stay two objects (common radius 2)."""
    heat = torch.zeros(1, 3, 24, 24)
    heat[0, 0, 5, 5], heat[0, 0, 5, 9] = 0.9, 0.8          # two nuclei
    heat[0, 2, 15, 10], heat[0, 2, 15, 14] = 0.7, 0.5      # one mitosis, two chromatin maxima
    off = torch.zeros(1, 2, 24, 24)
    (ixy, _, score, cls), = find_peaks(heat, off, 0.3, nms_px=2, groups=[[0, 1], [2]])
    assert cls.tolist() == [0, 0, 2, 2]                    # one radius for all: the clump counts twice
    (ixy, _, score, cls), = find_peaks(heat, off, 0.3, nms_px=2, groups=[[0, 1], [2]], group_nms_px=[2, 5])
    assert cls.tolist() == [0, 0, 2] and ixy.tolist()[2] == [10, 15] and np.isclose(score[2], 0.7)
    with pytest.raises(ValueError, match="one radius per class group"):
        find_peaks(heat, off, 0.3, groups=[[0, 1], [2]], group_nms_px=[2])


def test_suppression_radii_must_fit_in_the_tile_margin():
    from wsi_pipeline.errors import ConfigError
    from wsi_pipeline.run.config import DetectConfig
    assert DetectConfig().rare_nms_um <= DetectConfig().max_object_um
    for name in ("nms_um", "rare_nms_um"):
        with pytest.raises(ConfigError, match=f"detect.{name}: must be <= detect.max_object_um"):
            DetectConfig(**{name: 13.0, "max_object_um": 12.0})


def test_cosine_schedule_follows_whichever_budget_is_further_spent():
    from wsi_pipeline.detection.train import cosine_factor
    assert cosine_factor(0.0, 0.0, 0.0) == 1.0 and abs(cosine_factor(1.0, 0.0, 0.0)) < 1e-12
    assert np.isclose(cosine_factor(0.5, 999.0, 0.0), 0.5)          # no wall-clock limit: steps only
    assert np.isclose(cosine_factor(0.1, 30.0, 60.0), 0.5)          # half the time gone: half annealed
    assert np.isclose(cosine_factor(0.5, 6.0, 60.0), 0.5)           # steps ahead of the clock
    assert cosine_factor(0.2, 75.0, 60.0) == 0.0                    # past the limit: fully annealed
