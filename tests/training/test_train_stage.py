"""The train stage end to end on planted-signal bags: outputs, out-of-fold predictions, reload,
resume, other models and multiclass."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest
import torch

from stages.train import run_train
from wsi_pipeline.run.folder import RunFolder
from wsi_pipeline.run.manifest import load_manifest
from wsi_pipeline.training.bags import load_bag
from wsi_pipeline.training.checkpoints import load_ensemble, load_fold_model
from wsi_pipeline.training.inference import ensemble_predict

from ..reliability.writers import leave_dead_temp
from .conftest import ENCODER, make_cohort, small_config


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_planted_signal_is_learned_and_outputs_follow_the_contract(trained):
    result = trained["result"]["c1"]
    assert result["status"] == "done" and result["folds_trained"] == [0, 1, 2]
    model_dir = trained["model_dir"]
    metrics = json.loads((model_dir / "metrics.json").read_text())
    pooled = metrics["pooled"]
    assert pooled["auc"]["value"] >= 0.9, pooled
    assert pooled["n_slides"] == len(trained["manifest"]) and pooled["n_patients"] == 18
    for name in ("auc", "balanced_accuracy", "f1_macro"):
        low, high = pooled[name]["ci95"]
        assert 0 <= low <= pooled[name]["value"] <= high <= 1
    assert [f["fold"] for f in metrics["folds"]] == [0, 1, 2]
    assert sum(f["n_slides"] for f in metrics["folds"]) == pooled["n_slides"]
    assert metrics["classes"] == ["neg", "pos"] and metrics["model"] == "abmil"
    assert result["metrics"] == pooled
    for k in range(3):
        assert sorted(p.name for p in (model_dir / f"fold_{k}").iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((model_dir / "fold_0" / "config.json").read_text())
    for key in ("model", "in_dim", "n_classes", "classes", "model_args", "encoder", "fold",
                "train_slide_ids", "val_slide_ids", "test_slide_ids", "best_epoch", "config_hash", "versions"):
        assert key in meta, key
    assert meta["encoder"] == ENCODER and meta["in_dim"] == 16 and meta["model_args"]["hidden_dim"] == 32
    assert {"torch", "numpy", "scikit_learn", "safetensors", "wsi_pipeline"} <= set(meta["versions"])
    assert not list(model_dir.rglob("*.tmp-*"))


def test_predictions_are_one_row_per_slide_out_of_fold(trained):
    rows = read_csv(trained["model_dir"] / "predictions.csv")
    assert list(rows[0]) == ["slide_id", "patient_id", "cohort", "fold", "label", "prob_neg", "prob_pos"]
    assert sorted(r["slide_id"] for r in rows) == sorted(r.slide_id for r in trained["manifest"])
    splits = json.loads((trained["model_dir"] / "splits.json").read_text())
    test_fold = {s: f["fold"] for f in splits["folds"] for s in f["test"]}
    labels = {r.slide_id: r.label for r in trained["manifest"]}
    for row in rows:
        k = int(row["fold"])
        assert test_fold[row["slide_id"]] == k
        meta = json.loads((trained["model_dir"] / f"fold_{k}" / "config.json").read_text())
        assert row["slide_id"] in meta["test_slide_ids"]
        assert row["slide_id"] not in meta["train_slide_ids"] + meta["val_slide_ids"]
        assert row["label"] == labels[row["slide_id"]]
        assert float(row["prob_neg"]) + float(row["prob_pos"]) == pytest.approx(1.0)


def test_checkpoints_reload_and_reproduce_predictions(trained):
    rows = {r["slide_id"]: r for r in read_csv(trained["model_dir"] / "predictions.csv")}
    run = RunFolder(trained["run_dir"])
    for k in range(3):
        model, meta = load_fold_model(trained["model_dir"] / f"fold_{k}")
        for slide_id in meta["test_slide_ids"]:
            features, coords, _ = load_bag(run.features_h5(ENCODER, slide_id))
            with torch.no_grad():
                logits = model(torch.from_numpy(features)[None], torch.from_numpy(coords).float()[None]).logits
            prob = torch.softmax(logits, -1)[0].numpy()
            assert prob == pytest.approx([float(rows[slide_id]["prob_neg"]), float(rows[slide_id]["prob_pos"])],
                                         abs=1e-6)
    ensemble = load_ensemble(trained["model_dir"])
    assert [m["fold"] for _, m in ensemble] == [0, 1, 2]
    features, coords, _ = load_bag(run.features_h5(ENCODER, "c1-P01-S0"))
    out = ensemble_predict(ensemble, features, coords)
    assert out.classes == ["neg", "pos"] and out.instance_scores.shape == (len(features),)
    assert out.probs[1] > 0.5  # P01 is a positive patient; the ensemble has seen it in 2 of 3 folds


def test_rerun_resumes_and_retrains_only_what_changed(trained_copy, caplog):
    run_dir, model_dir, manifest = trained_copy["run_dir"], trained_copy["model_dir"], trained_copy["manifest"]
    cfg = trained_copy["cfg"]
    before = (model_dir / "predictions.csv").read_text()
    again = run_train(manifest, cfg, run_dir, progress=False)["c1"]
    assert again["folds_trained"] == [] and again["folds_skipped"] == [0, 1, 2] and again["splits"] == "reused"
    assert (model_dir / "predictions.csv").read_text() == before

    # A run killed inside fold 1 (weights written, config.json not yet) and before fold 2.
    (model_dir / "fold_1" / "config.json").unlink()
    for p in (model_dir / "fold_2").iterdir():
        p.unlink()
    (model_dir / "fold_2").rmdir()
    dead_temp = leave_dead_temp(model_dir / "fold_0" / "model.safetensors")  # its writer was killed
    mtime0 = (model_dir / "fold_0" / "model.safetensors").stat().st_mtime_ns
    resumed = run_train(manifest, cfg, run_dir, progress=False)["c1"]
    assert resumed["folds_trained"] == [1, 2] and resumed["folds_skipped"] == [0]
    assert (model_dir / "fold_0" / "model.safetensors").stat().st_mtime_ns == mtime0
    assert not dead_temp.exists()
    assert len(read_csv(model_dir / "predictions.csv")) == len(manifest)

    # Fewer folds: new splits (warned), every fold retrained, the stale fold_2 removed.
    import dataclasses
    fewer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, folds=2))
    with caplog.at_level(logging.WARNING, logger="wsi_pipeline"):
        changed = run_train(manifest, fewer, run_dir, progress=False)["c1"]
    assert changed["splits"] == "recomputed" and "n_folds 3 -> 2" in caplog.text
    assert changed["folds_trained"] == [0, 1] and not (model_dir / "fold_2").exists()
    assert len(load_ensemble(model_dir)) == 2


def test_mean_model_multiclass_and_cohort_selection(tmp_path):
    run_dir, manifest_path = make_cohort(tmp_path, n_patients=9, cohorts=("c1", "c2"),
                                         labels=("a", "b", "c"))
    manifest = load_manifest(manifest_path, require_labels=True)
    cfg = small_config(model="mean", model_args={"hidden_dim": 16}, folds=3, epochs=4, patience=4,
                       balance="none", grad_accumulation=2)
    results = run_train(manifest, cfg, run_dir, cohorts=["c2"], progress=False)
    assert list(results) == ["c2"] and results["c2"]["status"] == "done"
    mil = RunFolder(run_dir).root / "mil" / "mean"
    assert sorted(p.name for p in mil.iterdir()) == ["c2"]
    rows = read_csv(mil / "c2" / "predictions.csv")
    assert list(rows[0])[-3:] == ["prob_a", "prob_b", "prob_c"]
    assert len(rows) == sum(r.cohort == "c2" for r in manifest)
    metrics = json.loads((mil / "c2" / "metrics.json").read_text())
    assert metrics["auc"] == "one-vs-rest macro ROC AUC"
    assert metrics["pooled"]["auc"]["value"] is not None
    model, meta = load_fold_model(mil / "c2" / "fold_0")
    assert meta["classes"] == ["a", "b", "c"] and meta["model"] == "mean"
    # both cohorts: c2 reused, c1 trained; the model argument overrides train.model
    cfg_abmil = small_config(model="abmil", model_args={"hidden_dim": 16}, folds=3, epochs=4, patience=4,
                             balance="none", grad_accumulation=2)
    both = run_train(manifest, cfg_abmil, run_dir, model="mean", progress=False)
    assert both["c1"]["folds_trained"] == [0, 1, 2]
    assert both["c2"]["folds_skipped"] == [0, 1, 2]


def test_sampler_balance_with_explicit_classes_and_deterministic(tmp_path):
    run_dir, manifest_path = make_cohort(tmp_path, n_patients=12)
    manifest = load_manifest(manifest_path, require_labels=True)
    cfg = small_config(folds=2, epochs=3, classes=["pos", "neg"], balance="sampler", deterministic=True)
    result = run_train(manifest, cfg, run_dir, progress=False)["c1"]
    rows = read_csv(result["predictions"])
    assert list(rows[0])[-2:] == ["prob_pos", "prob_neg"]  # class order from train.classes
    assert not torch.are_deterministic_algorithms_enabled()
    metrics = json.loads((RunFolder(run_dir).mil_dir("abmil", "c1") / "metrics.json").read_text())
    assert metrics["auc"] == "ROC AUC of prob_neg"
    assert np.isfinite(metrics["pooled"]["auc"]["value"])


def test_paper_preset_trains_through_the_stage_with_its_optimizer(tmp_path):
    """configs/models/clam_abmil_paper.yaml's train section (Adam with L2, min_epochs) goes through
    the train stage; optimizer and min_epochs are recorded and part of the fold hash."""
    import dataclasses
    from pathlib import Path

    from wsi_pipeline.run.config import load_config

    preset = load_config(Path(__file__).resolve().parents[2] / "configs" / "models" / "clam_abmil_paper.yaml").train
    assert (preset.optimizer, preset.min_epochs) == ("adam", 52)
    run_dir, manifest_path = make_cohort(tmp_path, n_patients=6, slides_per_patient=(1,))
    manifest = load_manifest(manifest_path, require_labels=True)
    small = dict(folds=2, epochs=2, bootstrap=0, device="cpu", lr=1e-3,
                 model_args={**preset.model_args, "hidden_dim": 32, "attention_dim": 16})
    cfg = dataclasses.replace(small_config(), train=dataclasses.replace(preset, **small))
    result = run_train(manifest, cfg, run_dir, progress=False)["c1"]
    assert result["status"] == "done" and result["folds_trained"] == [0, 1]
    _, meta = load_fold_model(RunFolder(run_dir).mil_dir("abmil", "c1") / "fold_0")
    assert meta["train_config"]["optimizer"] == "adam" and meta["epochs_run"] == 2
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, optimizer="adamw"))
    assert run_train(manifest, other, run_dir, progress=False)["c1"]["folds_trained"] == [0, 1]


def test_per_model_settings_reach_only_the_model_they_name(tmp_path):
    """An instance loss in train.per_model.mean: abmil (no instance logits, which would refuse it)
    trains with the same config, and mean's folds record mean's own settings."""
    from stages.train import run_train
    from wsi_pipeline.run.manifest import load_manifest

    run_dir, manifest_path = make_cohort(tmp_path, n_patients=9)
    manifest = load_manifest(manifest_path, require_labels=True)
    cfg = small_config(folds=3, epochs=2, patience=2, bootstrap=0, model_args={"dropout": 0.0}, per_model={
        "abmil": {"model_args": {"hidden_dim": 32, "attention_dim": 16}},
        "mean": {"instance_loss_weight": 1.0, "lr": 1e-3, "model_args": {"hidden_dim": 16}}})
    assert run_train(manifest, cfg, run_dir, progress=False)["c1"]["folds_trained"] == [0, 1, 2]
    run_train(manifest, cfg, run_dir, model="mean", progress=False)
    _, meta = load_fold_model(RunFolder(run_dir).mil_dir("mean", "c1") / "fold_0")
    assert meta["model"] == "mean" and meta["model_args"] == {"dropout": 0.0, "hidden_dim": 16}
    assert meta["train_config"]["lr"] == 1e-3 and meta["train_config"]["instance_loss_weight"] == 1.0
