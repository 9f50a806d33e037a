"""Every aggregator learns a planted signal: positive bags hold a few instances shifted along one
direction. A brief Adam run must separate the training bags (AUC ≥ 0.9)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from wsi_pipeline.models.mil import list_aggregators

from .small_models import grid_coords, make_small

IN_DIM = 16
EPOCHS = 4


def planted_bags(n_bags: int = 40, seed: int = 0):
    """(features (1, L, IN_DIM), coords (1, L, 2), label) with L in [30, 80]; half the bags are positive
    and carry 3–6 instances shifted by 3 along a fixed unit direction."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(IN_DIM, generator=generator)
    direction /= direction.norm()
    bags = []
    for i in range(n_bags):
        label = i % 2
        length = int(torch.randint(30, 81, (1,), generator=generator))
        features = torch.randn(length, IN_DIM, generator=generator)
        if label:
            n_shifted = int(torch.randint(3, 7, (1,), generator=generator))
            chosen = torch.randperm(length, generator=generator)[:n_shifted]
            features[chosen] += 3.0 * direction
        coords = grid_coords(length, 12, generator)
        bags.append((features[None], coords[None], label))
    return bags


CASES = [(name, {}) for name in list_aggregators()] + [("mambamil", {"init": "reference"})]


@pytest.mark.parametrize("name, overrides", CASES, ids=[n + "".join(f"-{v}" for v in o.values()) for n, o in CASES])
def test_learns_planted_signal(name, overrides):
    torch.manual_seed(0)
    np.random.seed(0)
    bags = planted_bags()
    if name != "transmil":                      # TransMIL's dropout is inside attention; keep its default
        overrides = {"dropout": 0.0, **overrides}
    model = make_small(name, IN_DIM, 2, **overrides)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    order = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(EPOCHS):
        for index in torch.randperm(len(bags), generator=order).tolist():
            features, coords, label = bags[index]
            out = model(features, coords)
            loss = torch.nn.functional.cross_entropy(out.logits, torch.tensor([label]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        probs = [torch.softmax(model(f, c).logits, -1)[0, 1].item() for f, c, _ in bags]
    assert roc_auc_score([label for *_, label in bags], probs) >= 0.9
