"""Trainer recipe options: learning-rate warm-up, instance-level top-k loss, min_delta, min_epochs, optimizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_pipeline.errors import PipelineError
from wsi_pipeline.models.mil import create_aggregator
from wsi_pipeline.models.mil.registry import MILOutput
from wsi_pipeline.training.trainer import _bag_loss, build_optimizer, seed_everything, train_fold

from .test_standardize import _low_variance_bags


def test_warmup_ramps_the_learning_rate_linearly():
    bags = _low_variance_bags(0, 8)
    seed_everything(0)
    model = create_aggregator("abmil", 8, 2, hidden_dim=8, attention_dim=4, dropout=0.0)
    result = train_fold(model, bags, [], n_classes=2, lr=1e-3, weight_decay=0.0, epochs=3, patience=3,
                        balance="none", grad_accumulation=1, seed=0, device=torch.device("cpu"),
                        warmup_epochs=2)
    lrs = [h["lr"] for h in result.history]
    # 8 steps per epoch, 16 warm-up steps: after epoch 1 the factor is 9/16, then 1.
    np.testing.assert_allclose(lrs, [1e-3 * 9 / 16, 1e-3, 1e-3])


def test_instance_topk_loss_is_the_ce_of_the_top_k_mean_and_needs_instance_logits():
    il = torch.tensor([[[0.0, 3.0], [1.0, 0.0], [0.0, 1.0], [2.0, -1.0]]])      # (1, L=4, C=2)
    out = MILOutput(logits=torch.tensor([[0.2, 0.1]]), instance_scores=torch.zeros(1, 4), instance_logits=il)
    base = torch.nn.functional.cross_entropy(out.logits, torch.tensor([1]))
    pooled = torch.tensor([[(2.0 + 1.0) / 2, (3.0 + 1.0) / 2]])               # top-2 per class
    expected = base + 0.5 * torch.nn.functional.cross_entropy(pooled, torch.tensor([1]))
    torch.testing.assert_close(_bag_loss(out, 1, torch.device("cpu"), 0.5, 2), expected)
    torch.testing.assert_close(_bag_loss(out, 1, torch.device("cpu")), base)
    no_cam = MILOutput(logits=out.logits, instance_scores=torch.zeros(1, 4))
    with pytest.raises(PipelineError, match="needs an aggregator with instance logits"):
        _bag_loss(no_cam, 1, torch.device("cpu"), 0.5, 2)


def test_min_delta_stops_a_loss_that_only_creeps_down(monkeypatch):
    """Validation losses 1.0, 0.5, then -1e-4 per epoch: with min_delta 1e-3 training stops after
    `patience` creeping epochs but keeps the best (last) epoch's weights; without it runs to the cap."""
    from wsi_pipeline.training import trainer

    losses = iter([1.0, 0.5] + [0.5 - 1e-4 * i for i in range(1, 30)])
    monkeypatch.setattr(trainer, "evaluate_loss", lambda *a, **k: next(losses))
    bags = _low_variance_bags(0, 4)
    kwargs = dict(n_classes=2, lr=1e-3, weight_decay=0.0, epochs=12, patience=3, balance="none",
                  grad_accumulation=1, seed=0, device=torch.device("cpu"))
    model = create_aggregator("abmil", 8, 2, hidden_dim=8, attention_dim=4, dropout=0.0)
    stopped = train_fold(model, bags, bags, min_delta=1e-3, **kwargs)
    assert (stopped.epochs_run, stopped.best_epoch, stopped.stopped_early) == (5, 5, True)
    losses = iter([1.0, 0.5] + [0.5 - 1e-4 * i for i in range(1, 30)])
    capped = train_fold(model, bags, bags, **kwargs)
    assert (capped.epochs_run, capped.stopped_early) == (12, False)


def test_min_epochs_holds_early_stopping_back(monkeypatch):
    """A validation loss that never improves after epoch 1: patience 2 stops at epoch 3, unless
    min_epochs (CLAM's and MambaMIL's stop_epoch) holds it to 6; the best epoch stays 1 either way."""
    from wsi_pipeline.training import trainer

    monkeypatch.setattr(trainer, "evaluate_loss", lambda *a, **k: 1.0)
    bags = _low_variance_bags(0, 4)
    kwargs = dict(n_classes=2, lr=1e-3, weight_decay=0.0, epochs=10, patience=2, balance="none",
                  grad_accumulation=1, seed=0, device=torch.device("cpu"))
    model = create_aggregator("abmil", 8, 2, hidden_dim=8, attention_dim=4, dropout=0.0)
    early = train_fold(model, bags, bags, **kwargs)
    held = train_fold(model, bags, bags, min_epochs=6, **kwargs)
    assert (early.epochs_run, early.best_epoch, early.stopped_early) == (3, 1, True)
    assert (held.epochs_run, held.best_epoch, held.stopped_early) == (6, 1, True)


def test_adam_applies_weight_decay_as_l2_and_adamw_decoupled():
    """One step on a zero gradient: AdamW shrinks the weight by lr·wd; Adam's L2 term enters the
    moments, so its first step is lr·sign (Adam normalises the gradient wd·w)."""
    for name, expected in (("adamw", 1.0 - 0.1 * 0.5), ("adam", 1.0 - 0.1), ("radam", None)):
        weight = torch.nn.Parameter(torch.ones(1))
        optimizer = build_optimizer(name, [weight], lr=0.1, weight_decay=0.5)
        assert type(optimizer).__name__.lower() == name
        weight.grad = torch.zeros(1)
        optimizer.step()
        if expected is not None:
            torch.testing.assert_close(weight.detach(), torch.tensor([expected]))
    with pytest.raises(ValueError, match="optimizer must be adamw, adam or radam"):
        build_optimizer("sgd", [weight], lr=0.1, weight_decay=0.0)
