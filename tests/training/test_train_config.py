"""The train: section of the config: validation of the keys the train stage relies on."""

from __future__ import annotations

import pytest

from wsi_pipeline.run.config import ConfigError, TrainConfig, config_from_dict


@pytest.mark.parametrize("bad, message", [
    ({"folds": 1}, "train.folds: must be >= 2"),
    ({"bootstrap": -1}, "train.bootstrap: must be >= 0"),
    ({"device": "tpu"}, "train.device: must be auto, cpu, cuda or cuda:N"),
    ({"classes": ["a"]}, "train.classes: need >= 2 distinct"),
    ({"classes": ["a", "a"]}, "train.classes: need >= 2 distinct"),
    ({"balance": "oversample"}, "train.balance: must be class_weights, sampler or none"),
    ({"weight_decay": -0.1}, "train.weight_decay: must be >= 0"),
    ({"instance_dropout": 1.0}, r"train.instance_dropout: must be in \[0, 1\)"),
    ({"center_per_slide": "yes"}, "train.center_per_slide: must be median, mean"),
    ({"center_per_slide": True, "standardize": False}, "train.center_per_slide: needs train.standardize"),
    ({"optimizer": "sgd"}, "train.optimizer: must be one of adamw, adam, radam"),
    ({"min_epochs": -1}, "train.min_epochs: must be >= 0"),
])
def test_bad_train_settings(bad, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"train": bad})


def test_good_train_settings():
    cfg = config_from_dict({"train": {"model": "abmil", "classes": ["neg", "pos"], "device": "cuda:1",
                                      "bootstrap": 0, "model_args": {"hidden_dim": 64}}})
    assert cfg.train == TrainConfig(model="abmil", classes=["neg", "pos"], device="cuda:1", bootstrap=0,
                                    model_args={"hidden_dim": 64})


@pytest.mark.parametrize("per_model, message", [
    ({"../x": {"epochs": 5}}, "train.per_model"),
    ({"fmamil": 3}, "train.per_model.fmamil: must be a mapping"),
    ({"fmamil": {"model": "abmil"}}, "train.per_model.fmamil: unknown or not per-model key.*model"),
    ({"fmamil": {"epoch": 5}}, "train.per_model.fmamil: unknown or not per-model key.*epoch"),
    ({"fmamil": {"epochs": "many"}}, "train.per_model.fmamil.epochs must be an integer"),
    ({"fmamil": {"instance_loss_weight": -1}}, "train.per_model.fmamil: train.instance_loss_weight: must be >= 0"),
])
def test_bad_per_model_settings_name_the_model_and_key(per_model, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"train": {"per_model": per_model}})


def test_per_model_settings_apply_to_their_model_only_and_merge_model_args():
    cfg = config_from_dict({"train": {
        "model": "mambamil", "epochs": 30, "model_args": {"dropout": 0.1, "d_model": 64},
        "per_model": {"fmamil": {"instance_loss_weight": 1, "model_args": {"d_model": 32, "final_norm": False}}}}})
    fm = cfg.train.for_model("fmamil")
    assert fm.model == "fmamil" and fm.instance_loss_weight == 1.0 and fm.epochs == 30
    assert fm.model_args == {"dropout": 0.1, "d_model": 32, "final_norm": False} and fm.per_model == {}
    other = cfg.train.for_model("abmil")
    assert other.instance_loss_weight == 0.0 and other.model_args == {"dropout": 0.1, "d_model": 64}
    assert cfg.train.model_args == {"dropout": 0.1, "d_model": 64}          # the base is untouched


def test_demo_config_gives_each_model_its_recipe():
    """configs/demo.yaml serves --model mambamil, fmamil and abmil: the instance loss (which abmil
    cannot take) and final_norm reach only the models they are for."""
    from pathlib import Path

    from wsi_pipeline.run.config import load_config

    train = load_config(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml").train
    fmamil, mambamil, abmil = (train.for_model(m) for m in ("fmamil", "mambamil", "abmil"))
    assert fmamil.instance_loss_weight == 1.0 and fmamil.model_args == {"final_norm": False}
    assert mambamil.instance_loss_weight == 0.0 and mambamil.model_args == {"final_norm": False}
    assert abmil.instance_loss_weight == 0.0 and abmil.model_args == {}
    assert {fmamil.center_per_slide, mambamil.center_per_slide, abmil.center_per_slide} == {"median"}
