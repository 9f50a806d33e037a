"""train.lr_schedule: cosine follows PyTorch's CosineAnnealingLR(T_max=epochs, eta_min=0) stepped once
per epoch (2DMamba's recipe), also under warm-up; constant stays at lr; a bad name is a config error."""

import pytest
import torch

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.run.config import TrainConfig
from wsi_pipeline.training.trainer import lr_factor


def test_cosine_equals_cosine_annealing_stepped_per_epoch():
    epochs, steps_per_epoch = 20, 3
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    annealing = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=0)
    for epoch in range(epochs):
        for step in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
            assert lr_factor(step, 0, steps_per_epoch, epochs, "cosine") == pytest.approx(
                optimizer.param_groups[0]["lr"], abs=1e-12)
            assert lr_factor(step, 0, steps_per_epoch, epochs, "constant") == 1.0
        optimizer.step()
        annealing.step()
    # warm-up multiplies: half-way through a 4-step ramp in epoch 0
    assert lr_factor(1, 4, steps_per_epoch, epochs, "cosine") == pytest.approx(0.5)


def test_unknown_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="train.lr_schedule"):
        TrainConfig(lr_schedule="step")
