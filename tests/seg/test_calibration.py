"""CAM thresholds calibrated on negative slides, the CAM gate on stage-2 masks, and slide-scaled
CAMs for models without instance logits (issue 19: weak segmentation marked part of every slide)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from wsi_pipeline.run.config import Config, ConfigError, config_from_dict
from wsi_pipeline.run.manifest import load_manifest
from wsi_pipeline.segmentation import calibrate_thresholds

from .conftest import save_toy_fmamil, simulated_cams, toy_fmamil_run


def test_thresholds_rise_above_what_negative_slides_reach():
    negatives = [np.linspace(0.0, 0.8, 1001), np.full(50, 0.1)]
    t = calibrate_thresholds(negatives, cam_low=0.3, cam_high=0.7, cam_gate=0.0, quantile=0.999,
                             gate_negatives=True)
    level = np.quantile(np.concatenate(negatives), 0.999)
    assert t.negative_level == pytest.approx(level) and 0.79 < level < 0.8
    assert t.cam_high == pytest.approx(level) and t.gate == pytest.approx(level)
    assert t.cam_low == 0.3 and t.n_negative_slides == 2
    # Without gate_negatives only cam_high follows the negatives; the gate stays as configured.
    assert calibrate_thresholds(negatives, cam_low=0.3, cam_high=0.7, cam_gate=0.2, quantile=0.999).gate == 0.2
    # Negatives far below the configured thresholds change nothing.
    low = calibrate_thresholds([np.full(20, 0.05)], cam_low=0.3, cam_high=0.7, cam_gate=0.5, quantile=0.999,
                               gate_negatives=True)
    assert (low.cam_low, low.cam_high, low.gate) == (0.3, 0.7, 0.5)
    # Off, or nothing to calibrate on: the configured thresholds, marked as not calibrated.
    for scores, q in ((negatives, 0.0), ([], 0.999)):
        off = calibrate_thresholds(scores, cam_low=0.3, cam_high=0.7, cam_gate=0.0, quantile=q, gate_negatives=True)
        assert (off.cam_low, off.cam_high, off.gate, off.negative_level) == (0.3, 0.7, 0.0, None)


def test_new_segment_keys_are_validated():
    cfg = Config().segment
    assert cfg.negative_quantile == 0.999 and cfg.cam_gate == 0.0 and cfg.gate_negatives is False
    with pytest.raises(ConfigError, match="negative_quantile"):
        config_from_dict({"segment": {"negative_quantile": 1.5}})
    with pytest.raises(ConfigError, match="cam_gate"):
        config_from_dict({"segment": {"cam_gate": 1.0}})


class _MarksEverything(nn.Module):
    """A segmenter that calls every pixel lesion (what the hard demo's segmenter nearly did)."""
    input_mean = (0.5, 0.5, 0.5)
    input_std = (0.25, 0.25, 0.25)

    def forward(self, x):
        return torch.full((x.shape[0], 1, *x.shape[2:]), 6.0)


def test_gate_keeps_the_mask_where_the_cam_supports_a_lesion(seg_cohort, tmp_path):
    from wsi_pipeline.run.folder import RunFolder
    from wsi_pipeline.segmentation import CamThresholds
    from wsi_pipeline.segmentation.slide_work import load_slide_work, segment_slide

    manifest, _ = seg_cohort
    record = load_manifest(manifest).records[1]                   # the lesion slide
    cams = simulated_cams(record.path, seed=1)
    cfg = Config()
    run = RunFolder(tmp_path / "run")
    run.segment_dir.mkdir(parents=True)
    areas = {}
    for gate in (0.0, 0.6):
        work = load_slide_work(record, cams, cfg, CamThresholds(0.3, 0.7, gate, None))
        result = segment_slide(work, _MarksEverything(), cfg, run, "cpu")
        areas[gate] = result["lesion_area_um2"]
        assert result["cam_gate"] == gate
    tissue_um2 = float(work.tissue.sum()) * work.grid.mpp ** 2
    # Ungated, the mask is all tissue; gated, only the CAM's lesion region (a few patches), and a
    # lesion is still drawn there.
    assert areas[0.0] > 0.9 * tissue_um2
    assert 0 < areas[0.6] < 0.2 * areas[0.0]
    gated_cam_um2 = float((np.nan_to_num(work.cam, nan=0.0) >= 0.6).sum()) * work.grid.mpp ** 2
    assert areas[0.6] <= gated_cam_um2 + 1e-6


def test_stage_calibrates_on_the_negative_slides(seg_cohort):
    """The stage calibrates on the CAMs of the slides labelled with another class than the lesion's."""
    from stages.segment import cam_thresholds
    from wsi_pipeline.segmentation import load_patch_cams

    manifest, run = seg_cohort
    records = list(load_manifest(manifest))
    cams = {r.slide_id: load_patch_cams(run / "segment" / "cams" / f"{r.slide_id}.npz") for r in records}
    cfg = config_from_dict({"segment": {"gate_negatives": True, "negative_quantile": 1.0}})
    t = cam_thresholds(records, cams, cfg)
    negative_max = float(cams["DEMO-000"].scores.max())          # DEMO-000 is labelled normal
    assert t.n_negative_slides == 1 and t.negative_level == pytest.approx(negative_max)
    assert t.gate == pytest.approx(negative_max) and t.cam_high == max(0.7, negative_max)
    assert json.loads(json.dumps(t.as_dict())) == t.as_dict()      # recorded in JSON as is


def _abmil_fold(run, record, coords, seed):
    from wsi_pipeline.features.features_h5 import write_features_h5
    from wsi_pipeline.models.mil import create_aggregator
    from wsi_pipeline.training.checkpoints import save_fold_model

    features_path = run.features_h5("toy", record.slide_id)
    if not features_path.is_file():
        write_features_h5(features_path, np.random.default_rng(0).normal(size=(len(coords), 8)).astype(np.float32),
                          coords, {"patch_size_level0": 224, "encoder": "toy"})
    model_args = {"hidden_dim": 16, "attention_dim": 8}
    meta = {"model": "abmil", "in_dim": 8, "n_classes": 2, "classes": ["normal", "tumor"],
            "model_args": model_args, "encoder": "toy"}
    torch.manual_seed(seed)
    save_fold_model(create_aggregator("abmil", 8, 2, **model_args), run.mil_dir("abmil", record.cohort) / "fold_0",
                    meta)


def test_relative_cams_are_scaled_by_the_slide_probability(seg_cohort, tmp_path):
    """A model without instance logits (abmil): min-max scores times the ensemble's slide
    probability of the lesion class, so a slide the model calls normal gets low CAMs; CAM files
    of the old unscaled rule are made again."""
    from wsi_pipeline.run.folder import RunFolder
    from wsi_pipeline.segmentation import PatchCams, load_patch_cams, save_patch_cams
    from wsi_pipeline.segmentation.slide_work import OLD_RELATIVE_SOURCE, SLIDE_SCALED_SOURCE, CamProvider
    from wsi_pipeline.training.ensemble import EnsembleCache

    manifest, seg_run = seg_cohort
    record = load_manifest(manifest).records[1]
    coords = load_patch_cams(seg_run / "segment" / "cams" / f"{record.slide_id}.npz").coords
    run = RunFolder(tmp_path / "run")
    _abmil_fold(run, record, coords, seed=0)
    provider = CamProvider(Config(), run, "abmil", None)
    cams = provider(record)
    ensemble = EnsembleCache("cpu").models(run.mil_dir("abmil", record.cohort))
    from wsi_pipeline.training.bags import load_bag
    from wsi_pipeline.training.ensemble import ensemble_patch_scores

    features, bag_coords, _ = load_bag(run.features_h5("toy", record.slide_id), record.slide_id)
    out = ensemble_patch_scores(ensemble, features, bag_coords)
    p_tumor = float(out.slide_probs[1])
    assert cams.source == SLIDE_SCALED_SOURCE and 0 < p_tumor < 1
    assert cams.scores.max() == pytest.approx(p_tumor, abs=1e-5)     # the top patch: the slide's probability
    np.testing.assert_allclose(cams.scores, out.instance * p_tumor, atol=1e-5)

    # A CAM file from the old rule (unscaled: top patch 1.0) by the same ensemble is redone.
    old = PatchCams(cams.coords, out.instance, cams.patch_size_level0, lesion_class="tumor",
                    source=OLD_RELATIVE_SOURCE, model_hash=cams.model_hash)
    save_patch_cams(run.segment_cams(record.slide_id), old)
    again = CamProvider(Config(), run, "abmil", None)(record)
    assert again.source == SLIDE_SCALED_SOURCE and again.scores.max() < 1.0


def test_cam_score_instance_scores_for_a_model_with_logits(seg_cohort, tmp_path):
    """segment.cam_score instance_scores: fmamil's CAM file from its instance scores (attention)
    times the slide probability instead of its logits; switching the setting redoes the file."""
    from wsi_pipeline.segmentation.slide_work import CHOSEN_SCALED_SOURCE, LOGIT_SOURCE, CamProvider

    record, run, _, fold, meta = toy_fmamil_run(seg_cohort, tmp_path)
    save_toy_fmamil(fold, meta, seed=0)
    chosen = config_from_dict({"segment": {"cam_score": "instance_scores"}})
    cams = CamProvider(chosen, run, "fmamil", None)(record)
    assert cams.source == CHOSEN_SCALED_SOURCE and 0 < cams.scores.max() < 1   # top patch: the slide probability
    assert CamProvider(chosen, run, "fmamil", None)(record).source == CHOSEN_SCALED_SOURCE
    assert CamProvider(Config(), run, "fmamil", None)(record).source == LOGIT_SOURCE
    with pytest.raises(ConfigError, match="cam_score"):
        config_from_dict({"segment": {"cam_score": "gradcam"}})
