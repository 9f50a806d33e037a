"""Every bad input is one clear PipelineError, raised before any training starts."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from stages.train import run_train
from wsi_pipeline.errors import PipelineError
from wsi_pipeline.run.folder import RunFolder
from wsi_pipeline.run.manifest import load_manifest

from .conftest import ENCODER, small_config, write_bag


def train(run_dir, manifest_path, **overrides):
    return run_train(load_manifest(manifest_path, require_labels=True), small_config(**overrides),
                     run_dir, progress=False)


def assert_nothing_trained(run_dir):
    assert not (run_dir / "mil").exists()


def relabel(manifest_path, slide_id, label):
    with open(manifest_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        if row["slide_id"] == slide_id:
            row["label"] = label
    with open(manifest_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_missing_features_lists_every_slide(cohort):
    run_dir, manifest_path = cohort
    for slide_id in ("c1-P03-S0", "c1-P07-S1"):
        RunFolder(run_dir).features_h5(ENCODER, slide_id).unlink()
    with pytest.raises(PipelineError, match=r"2 slide\(s\) without features.*c1-P03-S0, c1-P07-S1"):
        train(run_dir, manifest_path)
    assert_nothing_trained(run_dir)


def test_label_outside_classes_names_slide_label_and_classes(cohort):
    run_dir, manifest_path = cohort
    relabel(manifest_path, "c1-P04-S0", "tumour")
    with pytest.raises(PipelineError, match=r"slide 'c1-P04-S0'.*label 'tumour' is not one of the classes "
                                            r"\['neg', 'pos'\]"):
        train(run_dir, manifest_path, classes=["neg", "pos"])
    assert_nothing_trained(run_dir)


def test_cohort_too_small_names_the_class(cohort):
    run_dir, manifest_path = cohort  # 12 patients, 6 per class
    with pytest.raises(PipelineError, match=r"cohort 'c1' is too small for 7-fold.*class 'neg' has 6 "
                                            r"patient\(s\).*need >= 7 patients per class"):
        train(run_dir, manifest_path, folds=7)
    assert_nothing_trained(run_dir)


def test_single_class_cohort(cohort):
    run_dir, manifest_path = cohort
    with open(manifest_path) as fh:
        text = fh.read().replace(",pos,", ",neg,")
    manifest_path.write_text(text)
    with pytest.raises(PipelineError, match=r"cohort 'c1': only one class \('neg'\)"):
        train(run_dir, manifest_path)
    with pytest.raises(PipelineError, match=r"class 'pos' has 0 patient\(s\)"):
        train(run_dir, manifest_path, classes=["neg", "pos"])
    assert_nothing_trained(run_dir)


def test_non_finite_features_name_the_slides(cohort):
    run_dir, manifest_path = cohort
    for slide_id, value in (("c1-P02-S0", np.nan), ("c1-P05-S1", np.inf)):
        features = np.zeros((8, 16), np.float32)
        features[3, 1] = value
        write_bag(run_dir, slide_id, features)
    with pytest.raises(PipelineError, match=r"(?s)slide 'c1-P02-S0'.*non-finite.*slide 'c1-P05-S1'.*non-finite"):
        train(run_dir, manifest_path)
    assert_nothing_trained(run_dir)


def test_mixed_feature_dimensions(cohort):
    run_dir, manifest_path = cohort
    write_bag(run_dir, "c1-P02-S0", np.zeros((8, 24), np.float32))
    with pytest.raises(PipelineError, match=r"different dimensions: D=16: .*; D=24: c1-P02-S0"):
        train(run_dir, manifest_path)


def test_unknown_model_lists_registered(cohort):
    run_dir, manifest_path = cohort
    with pytest.raises(PipelineError, match=r"unknown model 'no_such_mil'; registered aggregators: .*abmil.*mean"):
        train(run_dir, manifest_path, model="no_such_mil")
    assert_nothing_trained(run_dir)


def test_model_args_that_do_not_fit(cohort):
    run_dir, manifest_path = cohort
    with pytest.raises(PipelineError, match=r"train.model_args .* do not fit aggregator 'mean'"):
        train(run_dir, manifest_path, model="mean")  # small_config's model_args are abmil's
    assert_nothing_trained(run_dir)


def test_unknown_cohort(cohort):
    run_dir, manifest_path = cohort
    with pytest.raises(PipelineError, match=r"cohort\(s\) 'c9' not in the manifest; its cohorts: c1"):
        run_train(load_manifest(manifest_path), small_config(), run_dir, cohorts=["c9"], progress=False)
