"""Checkpoints (safetensors) and the fold ensemble the heatmap stage uses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wsi_pipeline.errors import PipelineError
from wsi_pipeline.models.mil import create_aggregator
from wsi_pipeline.training.checkpoints import load_ensemble, load_fold_model, save_fold_model
from wsi_pipeline.training.inference import ensemble_predict, minmax

from .conftest import DIM


def meta(model="abmil", **extra):
    return {"model": model, "in_dim": DIM, "n_classes": 2, "classes": ["neg", "pos"],
            "model_args": {"hidden_dim": 8, "attention_dim": 4}, **extra}


def test_save_load_roundtrip_is_safetensors_only(tmp_path):
    torch.manual_seed(0)
    model = create_aggregator("abmil", DIM, 2, hidden_dim=8, attention_dim=4)
    save_fold_model(model, tmp_path / "fold_0", meta(fold=0))
    assert sorted(p.name for p in (tmp_path / "fold_0").iterdir()) == ["config.json", "model.safetensors"]
    loaded, m = load_fold_model(tmp_path / "fold_0")
    assert not loaded.training and m["fold"] == 0
    x = torch.randn(1, 7, DIM)
    model.eval()
    assert torch.equal(model(x).logits, loaded(x).logits)


def test_load_ensemble_sorts_folds_numerically_and_errors(tmp_path):
    with pytest.raises(PipelineError, match="model folder not found"):
        load_ensemble(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="no fold_"):
        load_ensemble(tmp_path / "empty")
    for k in (10, 2, 0):
        save_fold_model(create_aggregator("abmil", DIM, 2, hidden_dim=8, attention_dim=4),
                        tmp_path / "m" / f"fold_{k}", meta(fold=k))
    assert [m["fold"] for _, m in load_ensemble(tmp_path / "m")] == [0, 2, 10]
    (tmp_path / "m" / "fold_3").mkdir()  # a killed run's folder
    with pytest.raises(PipelineError, match="fold_3: no config.json"):
        load_ensemble(tmp_path / "m")


def test_load_fold_model_errors(tmp_path):
    model = create_aggregator("abmil", DIM, 2, hidden_dim=8, attention_dim=4)
    save_fold_model(model, tmp_path / "fold_0", meta())
    cfg = json.loads((tmp_path / "fold_0" / "config.json").read_text())
    (tmp_path / "fold_0" / "config.json").write_text(json.dumps({**cfg, "model": "no_such_mil"}))
    with pytest.raises(PipelineError, match=r"'no_such_mil' is not registered.*abmil"):
        load_fold_model(tmp_path / "fold_0")
    (tmp_path / "fold_0" / "config.json").write_text(json.dumps({**cfg, "in_dim": DIM + 1}))
    with pytest.raises(PipelineError, match="weights do not fit"):
        load_fold_model(tmp_path / "fold_0")


def test_ensemble_predict_means_probs_and_normalised_scores(tmp_path):
    torch.manual_seed(1)
    members = []
    for k, name in enumerate(("mean", "mean", "mean")):
        model = create_aggregator(name, DIM, 2, hidden_dim=8).eval()
        members.append((model, meta(model=name, fold=k)))
    features = np.random.default_rng(0).normal(size=(11, DIM)).astype(np.float32)
    coords = np.arange(22).reshape(11, 2) * 224
    out = ensemble_predict(members, features, coords)
    assert out.classes == ["neg", "pos"]
    assert out.probs.shape == (2,) and out.probs.sum() == pytest.approx(1.0)
    assert out.fold_probs.shape == (3, 2)
    assert np.allclose(out.probs, out.fold_probs.mean(0))
    assert out.instance_scores.shape == (11,)
    assert 0 <= out.instance_scores.min() and out.instance_scores.max() <= 1
    with torch.no_grad():
        raw = [m(torch.from_numpy(features)[None]) for m, _ in members]
    expected = np.mean([minmax(r.instance_scores[0].numpy()) for r in raw], axis=0)
    assert np.allclose(out.instance_scores, expected, atol=1e-6)
    assert out.instance_logits.shape == (11, 2)
    assert np.allclose(out.instance_logits, np.mean([r.instance_logits[0].numpy() for r in raw], axis=0), atol=1e-6)

    abmil = [(create_aggregator("abmil", DIM, 2, hidden_dim=8, attention_dim=4).eval(), meta())]
    assert ensemble_predict(abmil, features, None).instance_logits is None  # abmil has no per-class CAMs
    one = ensemble_predict(abmil, features[:1], coords[:1])
    assert one.instance_scores.tolist() == [0.5]  # a constant score carries no ranking
