"""Regularisers against slide memorisation: instance dropout / shuffling (training passes only),
per-slide centring (stored with the checkpoint, applied by every consumer), and the Mamba layers'
context branch (layer scale, context drop)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from wsi_pipeline.errors import PipelineError
from wsi_pipeline.models.mil import create_aggregator
from wsi_pipeline.models.mil.mil_layers import PreNormResidual
from wsi_pipeline.training.bags import Bag
from wsi_pipeline.training.checkpoints import load_fold_model, save_fold_model
from wsi_pipeline.training.standardize import CENTER_KEY, InputStandardizer
from wsi_pipeline.training.trainer import instance_subset, seed_everything, train_fold

from .conftest import ENCODER

META = {"model": "abmil", "in_dim": 6, "n_classes": 2, "classes": ["neg", "pos"],
        "model_args": {"hidden_dim": 8, "attention_dim": 4, "dropout": 0.0}, "encoder": ENCODER}


def _bags(n_bags=6, n_inst=10, dim=6, seed=0):
    rng = np.random.default_rng(seed)
    return [Bag(f"s{i}", f"p{i}", i % 2, rng.normal(size=(n_inst, dim)).astype(np.float32),
                np.zeros((n_inst, 2), dtype=np.int64), "") for i in range(n_bags)]


def test_instance_subset_keeps_at_least_one_and_is_off_by_default():
    rng = np.random.default_rng(0)
    assert instance_subset(10, 0.0, False, rng) is None
    kept = instance_subset(10, 0.5, False, rng)
    assert len(kept) == 5 and np.all(np.diff(kept) > 0) and len(set(kept)) == 5
    assert len(instance_subset(3, 0.99, False, rng)) == 1
    assert len(instance_subset(1, 0.9, True, rng)) == 1
    shuffled = instance_subset(50, 0.0, True, rng)
    assert sorted(shuffled) == list(range(50)) and list(shuffled) != list(range(50))
    with pytest.raises(PipelineError, match="instance_dropout"):
        instance_subset(10, 1.0, False, rng)


class _Recorder(nn.Module):
    """An aggregator that records the bag length of every forward (train or eval)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, features, coords=None):
        self.seen.append((self.training, features.shape[1]))
        return self.inner(features, coords)


def test_instance_dropout_acts_on_training_passes_only():
    train, val = _bags(), _bags(2, seed=1)
    seed_everything(0)
    model = _Recorder(create_aggregator("abmil", 6, 2, **META["model_args"]))
    train_fold(model, train, val, n_classes=2, lr=1e-3, weight_decay=0.0, epochs=2, patience=5,
               balance="class_weights", grad_accumulation=1, seed=0, device=torch.device("cpu"),
               instance_dropout=0.5)
    train_lengths = {n for training, n in model.seen if training}
    eval_lengths = {n for training, n in model.seen if not training}
    assert train_lengths == {5} and eval_lengths == {10}


def test_center_per_slide_travels_with_the_checkpoint_and_removes_slide_shifts(tmp_path):
    bags = _bags()
    seed_everything(0)
    bare = create_aggregator("abmil", 6, 2, **META["model_args"])
    centred = InputStandardizer.fit(bare, bags, center_per_slide=True)
    # statistics are those of the bag-centred instances: mean ~0
    assert torch.allclose(centred.input_mean, torch.zeros(6), atol=1e-6)
    save_fold_model(centred, tmp_path / "fold_0", META)
    assert CENTER_KEY in load_file(str(tmp_path / "fold_0" / "model.safetensors"))
    loaded, meta = load_fold_model(tmp_path / "fold_0")
    assert loaded.center_per_slide and meta["center_per_slide"] is True
    x = torch.from_numpy(bags[0].features)[None]
    shift = torch.linspace(-3, 3, 6)                        # the same offset on every patch of a slide
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, loaded(x + shift).logits, atol=1e-5)
        assert torch.allclose(loaded(x).logits, centred.eval()(x).logits, atol=1e-6)
    # without centring the same checkpoint path gives a shift-sensitive model and no centre tensor
    plain = InputStandardizer.fit(bare, bags)
    save_fold_model(plain, tmp_path / "plain" / "fold_0", META)
    assert CENTER_KEY not in load_file(str(tmp_path / "plain" / "fold_0" / "model.safetensors"))
    loaded_plain, meta_plain = load_fold_model(tmp_path / "plain" / "fold_0")
    assert not loaded_plain.center_per_slide and "center_per_slide" not in meta_plain
    with torch.no_grad():
        assert not torch.allclose(loaded_plain(x).logits, loaded_plain(x + shift).logits, atol=1e-3)


def test_layer_scale_zero_starts_as_identity_and_context_drop_is_off_at_eval():
    x = torch.randn(2, 7, 8)
    layer = PreNormResidual(8, nn.Linear(8, 8), layer_scale=0.0)
    assert torch.equal(layer(x), x)
    torch.manual_seed(0)
    dropping = PreNormResidual(8, nn.Linear(8, 8), context_drop=0.5)
    reference = x + dropping.mixer(dropping.norm(x))
    dropping.eval()
    assert torch.allclose(dropping(x), reference)
    dropping.train()
    outs = [dropping(x[:1]) for _ in range(40)]
    assert any(torch.equal(o, x[:1]) for o in outs) and any(not torch.equal(o, x[:1]) for o in outs)
    with pytest.raises(ValueError, match="context_drop"):
        PreNormResidual(8, nn.Linear(8, 8), context_drop=1.0)


@pytest.mark.parametrize("name", ["mambamil", "fmamil"])
def test_mamba_models_take_the_context_options(name):
    seed_everything(0)
    model = create_aggregator(name, 6, 2, d_model=8, n_layers=1, layer_scale=0.0, context_drop=0.5)
    assert all(float(layer.gamma.detach().abs().sum()) == 0.0 for layer in model.layers)
    assert all(layer.context_drop == 0.5 for layer in model.layers)
    out = model.eval()(torch.randn(1, 5, 6), torch.randint(0, 1000, (1, 5, 2)).float())
    assert out.logits.shape == (1, 2)


def test_median_centring_does_not_carry_the_lesion_into_a_lesion_slides_normal_patches(tmp_path):
    # 30 % of one slide's patches carry a lesion offset in dimension 0. The bag mean moves by 30 % of
    # the offset, so mean centring shifts every normal patch of that slide in proportion to the lesion
    # (a shortcut a model can learn instead of the lesion). The median moves only within the normal
    # tissue's own spread (to its 0.5/0.7 quantile, ~0.57 sd), however strong the lesion.
    rng = np.random.default_rng(1)
    normal = rng.normal(size=(400, 6)).astype(np.float32)
    shift_of = {}
    for offset in (8.0, 80.0):
        lesion_slide = normal.copy()
        lesion_slide[:120, 0] += offset
        for stat in ("mean", "median"):
            model = InputStandardizer(create_aggregator("abmil", 6, 2, **META["model_args"]),
                                      np.zeros(6), np.ones(6), center_per_slide=stat)
            seen = []
            model.model.forward = lambda x, coords=None, seen=seen: seen.append(x[0]) or None
            for bag in (normal, lesion_slide):
                model(torch.from_numpy(bag)[None])
            shift_of[stat, offset] = float((seen[1][120:] - seen[0][120:]).abs().max())
    assert shift_of["mean", 8.0] == pytest.approx(2.4, rel=1e-3)
    assert shift_of["mean", 80.0] == pytest.approx(24.0, rel=1e-3)
    assert shift_of["median", 8.0] < 0.8
    assert shift_of["median", 80.0] == pytest.approx(shift_of["median", 8.0], abs=1e-5)
    plain = _bags(2)
    # a median-centred checkpoint says so, and loads with the same centring
    centred = InputStandardizer.fit(create_aggregator("abmil", 6, 2, **META["model_args"]), plain,
                                    center_per_slide="median")
    save_fold_model(centred, tmp_path / "fold_0", META)
    loaded, meta = load_fold_model(tmp_path / "fold_0")
    assert loaded.center_per_slide == "median" and meta["center_per_slide"] == "median"
    x = torch.from_numpy(plain[0].features)[None]
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, centred.eval()(x).logits, atol=1e-6)


def test_center_per_slide_true_means_median_and_mean_keeps_the_old_fold_hash():
    from wsi_pipeline.run.config import TrainConfig
    assert TrainConfig(center_per_slide=True).center_per_slide == "median"
    assert TrainConfig(center_per_slide="mean").center_per_slide == "mean"
    assert TrainConfig(center_per_slide=False).center_per_slide == ""
