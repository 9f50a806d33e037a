"""Fixtures for MIL training tests: synthetic feature bags with a planted signal, written as real
features.h5 files in a run folder, plus a manifest CSV that points at them."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from wsi_pipeline.features.features_h5 import write_features_h5
from wsi_pipeline.run.config import Config, ExtractConfig, TrainConfig
from wsi_pipeline.run.folder import RunFolder

ENCODER = "test_encoder"
DIM = 16


def write_bag(run_dir: Path, slide_id: str, features: np.ndarray, coords: np.ndarray | None = None) -> Path:
    """Write one features.h5 for `slide_id` under run_dir/features/ENCODER/."""
    if coords is None:
        coords = np.stack([np.arange(len(features)) * 224, np.zeros(len(features))], axis=1)
    path = RunFolder(run_dir).features_h5(ENCODER, slide_id)
    write_features_h5(path, features, coords.astype(np.int64),
                      {"encoder": ENCODER, "out_dim": features.shape[1], "config_hash": "testhash"})
    return path


def planted_bag(rng: np.random.Generator, positive: bool, n_instances: int, dim: int = DIM,
                n_signal: int = 4, shift: float = 5.0) -> np.ndarray:
    """(N, D) float32 noise; in positive bags `n_signal` instances are shifted along a fixed axis."""
    features = rng.normal(size=(n_instances, dim)).astype(np.float32)
    if positive:
        direction = np.zeros(dim, dtype=np.float32)
        direction[0] = 1.0
        features[rng.choice(n_instances, n_signal, replace=False)] += shift * direction
    return features


def write_manifest(path: Path, rows: list[dict]) -> Path:
    dummy = path.parent / "dummy.svs"
    dummy.touch()
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["slide_id", "path", "patient_id", "label", "cohort"])
        writer.writeheader()
        for row in rows:
            writer.writerow({"path": "dummy.svs", **row})
    return path


def make_cohort(root: Path, *, n_patients: int = 12, slides_per_patient=(1, 2), cohorts=("c1",),
                labels=("neg", "pos"), seed: int = 0, shift: float = 5.0) -> tuple[Path, Path]:
    """Run folder with planted-signal bags + manifest → (run_dir, manifest_path).

    Patients alternate between labels (the last label carries the signal; with >2 labels class i
    shifts along axis i); each patient has 1 or 2 slides.
    """
    rng = np.random.default_rng(seed)
    run_dir = root / "run"
    rows = []
    for cohort in cohorts:
        for p in range(n_patients):
            label_idx = p % len(labels)
            n_slides = slides_per_patient[p % len(slides_per_patient)]
            for s in range(n_slides):
                slide_id = f"{cohort}-P{p:02d}-S{s}"
                n_inst = int(rng.integers(16, 33))
                if len(labels) == 2:
                    features = planted_bag(rng, label_idx == 1, n_inst, shift=shift)
                else:
                    features = rng.normal(size=(n_inst, DIM)).astype(np.float32)
                    features[rng.choice(n_inst, 4, replace=False), label_idx] += shift
                write_bag(run_dir, slide_id, features)
                rows.append({"slide_id": slide_id, "patient_id": f"{cohort}-P{p:02d}",
                             "label": labels[label_idx], "cohort": cohort})
    manifest = write_manifest(root / "manifest.csv", rows)
    return run_dir, manifest


def small_config(**train_overrides) -> Config:
    """Fast settings: a small ABMIL, 3 folds, few epochs, 200 bootstrap resamples, CPU."""
    train = dict(model="abmil", model_args={"hidden_dim": 32, "attention_dim": 16, "dropout": 0.0},
                 folds=3, epochs=8, patience=8, lr=5e-3, bootstrap=200, device="cpu")
    train.update(train_overrides)
    return Config(extract=ExtractConfig(encoder=ENCODER), train=TrainConfig(**train))


@pytest.fixture
def cohort(tmp_path):
    """A fresh 12-patient planted-signal cohort per test → (run_dir, manifest_path)."""
    return make_cohort(tmp_path)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One trained abmil CV run shared by the session's tests → dict(run_dir, manifest, cfg, result)."""
    from stages.train import run_train
    from wsi_pipeline.run.manifest import load_manifest

    root = tmp_path_factory.mktemp("trained")
    run_dir, manifest_path = make_cohort(root, n_patients=18)
    cfg = small_config()
    manifest = load_manifest(manifest_path, require_labels=True)
    result = run_train(manifest, cfg, run_dir, progress=False)
    return {"run_dir": run_dir, "manifest_path": manifest_path, "manifest": manifest, "cfg": cfg,
            "result": result, "model_dir": RunFolder(run_dir).mil_dir("abmil", "c1")}


@pytest.fixture
def trained_copy(trained, tmp_path):
    """A private copy of the shared trained run (for tests that modify it)."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained["run_dir"], run_dir)
    return {**trained, "run_dir": run_dir, "model_dir": RunFolder(run_dir).mil_dir("abmil", "c1")}
