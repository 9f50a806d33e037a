"""The fold trainer: early stopping keeps the best epoch, balance modes, aux loss, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from wsi_pipeline.errors import PipelineError
from wsi_pipeline.models.mil import MILOutput, create_aggregator
from wsi_pipeline.training.bags import Bag, load_bag
from wsi_pipeline.training.trainer import (class_weights, deterministic_algorithms, predict_probs,
                                           seed_everything, train_fold)

from .conftest import DIM, planted_bag, write_bag


def bags(n=16, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = int(i % 4 == 0)  # imbalanced: 1 in 4 positive
        f = planted_bag(rng, bool(label), int(rng.integers(10, 20)))
        out.append(Bag(f"s{i}", f"p{i}", label, f, np.zeros((len(f), 2), np.int64), ""))
    return out


KW = dict(n_classes=2, lr=5e-3, weight_decay=1e-2, epochs=4, patience=4, grad_accumulation=1, seed=0,
          device=torch.device("cpu"))


def small_abmil():
    return create_aggregator("abmil", DIM, 2, hidden_dim=16, attention_dim=8, dropout=0.0)


def test_class_weights():
    w = class_weights([0, 0, 0, 1], 3)
    assert w[0] == pytest.approx(4 / (2 * 3)) and w[1] == pytest.approx(4 / 2) and w[2] == 0


@pytest.mark.parametrize("balance, accumulation", [("class_weights", 1), ("sampler", 3), ("none", 2)])
def test_train_fold_modes_learn_and_keep_best_epoch(balance, accumulation):
    seed_everything(0)
    model = small_abmil()
    data = bags()
    result = train_fold(model, data[:12], data[12:], **{**KW, "balance": balance,
                                                        "grad_accumulation": accumulation})
    assert result.monitored == "val_loss" and 1 <= result.best_epoch <= result.epochs_run <= 4
    val_losses = [h["val_loss"] for h in result.history]
    assert result.best_val_loss == pytest.approx(min(val_losses))
    assert result.best_epoch == 1 + int(np.argmin(val_losses))
    assert not model.training
    assert predict_probs(model, data[12:], torch.device("cpu")).shape == (4, 2)


def test_early_stopping_restores_best_weights():
    seed_everything(0)
    data = bags()
    # An absurd learning rate: the validation loss gets worse after the first epochs.
    model = small_abmil()
    result = train_fold(model, data[:12], data[12:], **{**KW, "lr": 5.0, "epochs": 30, "patience": 2,
                                                        "balance": "none"})
    assert result.stopped_early and result.epochs_run == result.best_epoch + 2 < 30
    from wsi_pipeline.training.trainer import evaluate_loss
    assert evaluate_loss(model, data[12:], torch.device("cpu")) == pytest.approx(result.best_val_loss, rel=1e-5)


class AuxOnly(nn.Module):
    """A model whose only trainable signal for `extra` is its aux loss (extra**2)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(DIM, 2)
        self.extra = nn.Parameter(torch.tensor(3.0))

    def forward(self, features, coords=None):
        logits = self.head(features.mean(1))
        return MILOutput(logits=logits, instance_scores=features[..., 0], aux_loss=self.extra ** 2)


def test_aux_loss_is_added():
    model = AuxOnly()
    data = bags()
    train_fold(model, data[:12], data[12:], **{**KW, "balance": "none", "lr": 0.05, "epochs": 3})
    assert abs(model.extra.item()) < 2.5


def test_deterministic_training_is_reproducible_and_flag_restored():
    data = bags()
    states = []
    for _ in range(2):
        seed_everything(7)
        with deterministic_algorithms(True):
            assert torch.are_deterministic_algorithms_enabled()
            model = small_abmil()
            train_fold(model, data[:12], data[12:], **{**KW, "balance": "sampler", "seed": 7})
        states.append(model.state_dict())
    assert not torch.are_deterministic_algorithms_enabled()
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k])


def test_load_bag_errors_name_the_slide(tmp_path):
    with pytest.raises(PipelineError, match=r"slide 'gone'.*no features file"):
        load_bag(tmp_path / "features" / "x" / "gone.h5")
    features = np.ones((5, DIM), np.float32)
    features[2, 3] = np.nan
    features[4, 0] = np.inf
    path = write_bag(tmp_path, "broken", features)
    with pytest.raises(PipelineError, match=r"slide 'broken'.*non-finite features \(NaN or inf\) in 2 of 5"):
        load_bag(path)
    bad = tmp_path / "garbage.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(PipelineError, match=r"slide 'garbage'.*unreadable"):
        load_bag(bad)
    f, c, attrs = load_bag(write_bag(tmp_path, "fine", np.ones((3, DIM), np.float64)))
    assert f.dtype == np.float32 and f.shape == (3, DIM) and c.dtype == np.int64 and c.shape == (3, 2)
    assert attrs["encoder"] == "test_encoder"
