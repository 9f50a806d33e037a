"""Metrics against sklearn, and the bootstrap CIs."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from wsi_pipeline.training.metrics import auc, balanced_accuracy, classification_metrics, f1_macro


@pytest.mark.parametrize("n_classes", [2, 3, 4])
def test_metrics_match_sklearn(n_classes):
    rng = np.random.default_rng(n_classes)
    y = rng.integers(0, n_classes, 60)
    y[:n_classes] = np.arange(n_classes)
    logits = rng.normal(size=(60, n_classes)) + 1.5 * np.eye(n_classes)[y]
    logits[5:9] = logits[4]  # ties
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pred = probs.argmax(1)
    if n_classes == 2:
        expected_auc = roc_auc_score(y, probs[:, 1])
    else:
        expected_auc = roc_auc_score(y, probs, multi_class="ovr", average="macro")
    assert auc(y, probs) == pytest.approx(expected_auc)
    assert balanced_accuracy(y, pred) == pytest.approx(balanced_accuracy_score(y, pred))
    assert f1_macro(y, pred) == pytest.approx(f1_score(y, pred, average="macro"))


def test_auc_undefined_with_one_class():
    assert auc(np.zeros(5, int), np.full((5, 2), 0.5)) is None
    assert auc(np.array([0, 1, 1]), np.full((3, 3), 1 / 3)) is None  # class 2 absent (OvR undefined)


def test_bootstrap_ci_contains_estimate_and_is_seeded():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    probs1 = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.25, 80), 0.01, 0.99)
    probs = np.stack([1 - probs1, probs1], 1)
    m = classification_metrics(y, probs, n_bootstrap=300, seed=1)
    again = classification_metrics(y, probs, n_bootstrap=300, seed=1)
    assert m == again
    assert m["n_slides"] == 80
    for name in ("auc", "balanced_accuracy", "f1_macro"):
        low, high = m[name]["ci95"]
        assert low <= m[name]["value"] <= high and high - low > 0.02
        assert m[name]["n_bootstrap"] == 300


def test_bootstrap_skips_single_class_resamples():
    y = np.array([0] * 9 + [1])  # many resamples have no positive
    probs = np.stack([1 - y * 0.9, y * 0.9], 1).astype(float)
    m = classification_metrics(y, probs, n_bootstrap=200, seed=0)
    assert 0 < m["auc"]["n_bootstrap"] < 200
    assert m["balanced_accuracy"]["n_bootstrap"] == 200


def test_patient_bootstrap_is_wider_with_duplicated_slides():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 30)
    p = np.clip(0.5 + 0.2 * (y - 0.5) + rng.normal(0, 0.3, 30), 0, 1)
    # each patient's slide duplicated 4x: patient-level resampling must not shrink the CI
    y4, p4 = np.repeat(y, 4), np.repeat(p, 4)
    probs4 = np.stack([1 - p4, p4], 1)
    by_slide = classification_metrics(y4, probs4, n_bootstrap=400, seed=0)
    by_patient = classification_metrics(y4, probs4, n_bootstrap=400, seed=0, groups=np.repeat(np.arange(30), 4))
    width = lambda m: m["auc"]["ci95"][1] - m["auc"]["ci95"][0]  # noqa: E731
    assert width(by_patient) > 1.4 * width(by_slide)
