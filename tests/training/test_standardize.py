"""Input standardisation: fitted on training-fold instances only, stored with every fold checkpoint,
applied by every consumer (all load through training.checkpoints.load_fold_model)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stages.predict import run_predict
from stages.train import run_train
from wsi_pipeline.models.mil import create_aggregator
from wsi_pipeline.run.folder import RunFolder
from wsi_pipeline.run.manifest import load_manifest
from wsi_pipeline.training.bags import Bag, load_bag
from wsi_pipeline.training.checkpoints import load_ensemble, load_fold_model, save_fold_model
from wsi_pipeline.training.inference import ensemble_predict
from wsi_pipeline.training.metrics import binary_auc
from wsi_pipeline.training.standardize import InputStandardizer, fit_input_stats
from wsi_pipeline.training.trainer import predict_probs, seed_everything, train_fold

from .conftest import ENCODER, make_cohort, small_config, write_bag

META = {"model": "abmil", "in_dim": 8, "n_classes": 2, "classes": ["neg", "pos"],
        "model_args": {"hidden_dim": 16, "attention_dim": 8, "dropout": 0.0}, "encoder": ENCODER}


def _low_variance_bags(seed: int, n_bags: int, dim: int = 8, n_inst: int = 24):
    """Noise std 1 in every dimension but the last, std 1e-3 there; positive bags have 3 instances
    shifted by +4e-3 (4 of its stds) along that low-variance dimension only."""
    rng = np.random.default_rng(seed)
    bags = []
    for i in range(n_bags):
        x = rng.normal(size=(n_inst, dim)).astype(np.float32)
        x[:, -1] = rng.normal(0.0, 1e-3, n_inst)
        if i % 2:
            x[rng.choice(n_inst, 3, replace=False), -1] += 4e-3
        bags.append(Bag(f"s{i}", f"p{i}", i % 2, x, np.zeros((n_inst, 2), dtype=np.int64), ""))
    return bags


@pytest.mark.parametrize("standardize", [True, False])
def test_abmil_finds_a_low_variance_signal_only_when_standardised(standardize):
    train, val, test = _low_variance_bags(0, 20), _low_variance_bags(1, 6), _low_variance_bags(2, 20)
    seed_everything(0)
    model = create_aggregator("abmil", 8, 2, hidden_dim=32, attention_dim=16, dropout=0.0)
    if standardize:
        model = InputStandardizer.fit(model, train)
    train_fold(model, train, val, n_classes=2, lr=5e-3, weight_decay=1e-4, epochs=6, patience=6,
               balance="class_weights", grad_accumulation=1, seed=0, device=torch.device("cpu"))
    probs = predict_probs(model, test, torch.device("cpu"))
    auc = binary_auc(np.array([b.label for b in test]) == 1, probs[:, 1])
    if standardize:
        assert auc >= 0.9, auc
    else:
        assert auc <= 0.75, auc


def test_fit_input_stats_streams_exactly_and_floors_constant_dims():
    rng = np.random.default_rng(0)
    parts = [rng.normal(3.0, 2.0, size=(n, 4)) for n in (5, 17, 1, 40)]
    for p in parts:
        p[:, 2] = 7.0                                   # constant: centred, not scaled
    mean, std = fit_input_stats(parts)
    full = np.concatenate(parts)
    np.testing.assert_allclose(mean, full.mean(0), rtol=1e-12)
    np.testing.assert_allclose(std[[0, 1, 3]], full.std(0)[[0, 1, 3]], rtol=1e-10)
    assert std[2] == 1.0


def test_stats_come_from_the_training_fold_only_and_travel_with_the_checkpoint(tmp_path):
    run_dir, manifest_path = make_cohort(tmp_path, n_patients=12, shift=5.0)
    manifest = load_manifest(manifest_path, require_labels=True)
    result = run_train(manifest, small_config(epochs=2, patience=2), run_dir, progress=False)["c1"]
    assert result["status"] == "done"
    run = RunFolder(run_dir)
    for fold_dir in sorted(run.mil_dir("abmil", "c1").glob("fold_*")):
        meta = json.loads((fold_dir / "config.json").read_text())
        assert meta["standardize"] is True
        tensors = load_file(str(fold_dir / "model.safetensors"))
        train = np.concatenate([load_bag(run.features_h5(ENCODER, s))[0] for s in meta["train_slide_ids"]])
        with_val = np.concatenate([train] + [load_bag(run.features_h5(ENCODER, s))[0]
                                             for s in meta["val_slide_ids"] + meta["test_slide_ids"]])
        np.testing.assert_allclose(tensors["input_mean"].numpy(), train.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(tensors["input_std"].numpy(), train.std(0), rtol=1e-5)
        assert not np.allclose(tensors["input_mean"].numpy(), with_val.mean(0), rtol=1e-5, atol=1e-6)
        model, _ = load_fold_model(fold_dir)
        assert isinstance(model, InputStandardizer)


def _bare_and_standardised(tmp_path, mean, std):
    seed_everything(3)
    bare = create_aggregator("abmil", 8, 2, **META["model_args"])
    save_fold_model(InputStandardizer(bare, mean, std), tmp_path / "std" / "fold_0", META)
    save_fold_model(bare, tmp_path / "bare" / "fold_0", META)
    return tmp_path / "std", tmp_path / "bare"


def test_consumers_apply_the_stored_stats(tmp_path):
    """predict (and heatmap/segment, which share load_ensemble + ensemble_predict) on raw features
    with a standardised checkpoint == the bare model on features standardised by hand."""
    rng = np.random.default_rng(1)
    mean, std = rng.normal(5.0, 2.0, 8), rng.uniform(1e-3, 3.0, 8)
    std_dir, bare_dir = _bare_and_standardised(tmp_path, mean, std)
    raw = (rng.normal(size=(30, 8)) * std + mean).astype(np.float32)
    by_hand = ((raw - mean) / std).astype(np.float32)

    a = ensemble_predict(load_ensemble(std_dir), raw, None)
    b = ensemble_predict(load_ensemble(bare_dir), by_hand, None)
    c = ensemble_predict(load_ensemble(bare_dir), raw, None)
    np.testing.assert_allclose(a.probs, b.probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.instance_scores, b.instance_scores, rtol=1e-4, atol=1e-5)
    assert not np.allclose(a.instance_scores, c.instance_scores, atol=1e-3)

    # The predict stage end to end: raw features.h5 in, standardised scores out.
    for name, feats in (("raw", raw), ("hand", by_hand)):
        write_bag(tmp_path / name, "s1", feats)
    from tests.training.conftest import write_manifest
    manifest = load_manifest(write_manifest(tmp_path / "m.csv", [{"slide_id": "s1", "patient_id": "p",
                                                                  "label": "neg", "cohort": "c1"}]))
    out_std = run_predict(manifest, tmp_path / "raw", std_dir, tmp_path / "a.csv", device="cpu", progress=False)
    out_bare = run_predict(manifest, tmp_path / "hand", bare_dir, tmp_path / "b.csv", device="cpu", progress=False)
    assert out_std.done == out_bare.done == ["s1"]
    rows = [np.genfromtxt(p, delimiter=",", skip_header=1, usecols=(1, 2)) for p in (tmp_path / "a.csv", tmp_path / "b.csv")]
    np.testing.assert_allclose(rows[0], rows[1], rtol=1e-5, atol=1e-6)


def test_old_checkpoint_without_stats_loads_with_a_warning(tmp_path, caplog):
    seed_everything(4)
    bare = create_aggregator("abmil", 8, 2, **META["model_args"])
    fold_dir = tmp_path / "old" / "fold_0"
    save_fold_model(bare, fold_dir, META)
    meta = json.loads((fold_dir / "config.json").read_text())
    del meta["standardize"]                              # as written before standardisation existed
    (fold_dir / "config.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="wsi_pipeline"):
        model, _ = load_fold_model(fold_dir)
    assert "without input standardisation statistics" in caplog.text
    assert not isinstance(model, InputStandardizer)
    x = torch.randn(1, 10, 8)
    torch.testing.assert_close(model(x).logits, bare.eval()(x).logits)
    # config.json claiming stats the weights lack is an error, not a silent raw model.
    meta["standardize"] = True
    (fold_dir / "config.json").write_text(json.dumps(meta))
    with pytest.raises(Exception, match="holds no input_mean"):
        load_fold_model(fold_dir)

